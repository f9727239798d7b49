package image

// Real-VM tests: boot the built image under QEMU TCG (microvm, 256 MiB,
// 1 vCPU, RAM in a memory-backend-file), talk to the agent, and move the
// VM through migrate-to-file + restore into a new QEMU process.
//
// They run when qemu-system-x86_64 and a built image (scripts/setup-qemu.sh)
// are present and are skipped otherwise (and with -short).
// KELPIE_QEMU_TESTS=0 skips them; KELPIE_QEMU_TESTS=1 makes a missing QEMU
// or image a failure instead of a skip.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/agent"
)

func needQEMU(t *testing.T) string {
	t.Helper()
	mode := os.Getenv("KELPIE_QEMU_TESTS")
	if mode == "0" {
		t.Skip("KELPIE_QEMU_TESTS=0")
	}
	if testing.Short() && mode != "1" {
		t.Skip("QEMU boot test skipped in -short mode")
	}
	skip := t.Skipf
	if mode == "1" {
		skip = t.Fatalf
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		skip("qemu-system-x86_64 not installed (run scripts/setup-qemu.sh): %v", err)
	}
	dir, err := CurrentDir()
	if err != nil {
		skip("%v", err)
	}
	return dir
}

// vm is one QEMU process.
type vm struct {
	t    *testing.T
	cfg  QEMUConfig
	cmd  *exec.Cmd
	qmp  *qmpConn
	exit chan error
	out  bytes.Buffer
}

func startVM(t *testing.T, cfg QEMUConfig) *vm {
	t.Helper()
	args, err := cfg.Args()
	if err != nil {
		t.Fatal(err)
	}
	v := &vm{t: t, cfg: cfg, exit: make(chan error, 1)}
	v.cmd = exec.Command(cfg.BinaryPath(), args...)
	v.cmd.Stdout, v.cmd.Stderr = &v.out, &v.out
	v.cmd.SysProcAttr = qemuProcAttr()
	t.Logf("starting %s %s", cfg.BinaryPath(), shellQuote(args))
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.exit <- v.cmd.Wait() }()
	t.Cleanup(v.kill)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v.qmp, err = dialQMP(ctx, cfg.QMPSocket)
	if err != nil {
		v.kill()
		t.Fatalf("qmp: %v\nqemu output:\n%s", err, v.out.String())
	}
	return v
}

func (v *vm) kill() {
	if v.cmd.Process == nil {
		return
	}
	select {
	case <-v.exit:
		return
	default:
	}
	v.cmd.Process.Kill()
	<-v.exit
	v.exit <- errors.New("killed") // keep later receivers from blocking
}

// quit asks QEMU to exit and waits.
func (v *vm) quit() {
	v.qmp.cmd("quit", nil) // connection may drop before the reply
	select {
	case <-v.exit:
		v.exit <- errors.New("exited")
	case <-time.After(10 * time.Second):
		v.kill()
	}
}

func (v *vm) dumpConsole() {
	if v.cfg.ConsoleLog == "" {
		return
	}
	b, _ := os.ReadFile(v.cfg.ConsoleLog)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	v.t.Logf("guest console (tail):\n%s\nqemu output:\n%s", b, v.out.String())
}

func shellQuote(args []string) string {
	var b strings.Builder
	for i, a := range args {
		if i > 0 {
			b.WriteByte(' ')
		}
		if strings.ContainsAny(a, " ,=") && strings.Contains(a, " ") {
			b.WriteString("'" + a + "'")
		} else {
			b.WriteString(a)
		}
	}
	return b.String()
}

// --- minimal QMP client ---

type qmpConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialQMP(ctx context.Context, path string) (*qmpConn, error) {
	var conn net.Conn
	for {
		var err error
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(20 * time.Millisecond):
		}
	}
	q := &qmpConn{c: conn, r: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	if _, err := q.cmd("qmp_capabilities", nil); err != nil {
		return nil, err
	}
	return q, nil
}

// cmd runs one QMP command and returns its "return" value, skipping events.
func (q *qmpConn) cmd(name string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	q.c.SetDeadline(time.Now().Add(30 * time.Second))
	defer q.c.SetDeadline(time.Time{})
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, err
		}
		var m struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &m); err != nil {
			return nil, fmt.Errorf("qmp: bad line %q", line)
		}
		if m.Event != "" {
			continue
		}
		if m.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s: %s", name, m.Error.Class, m.Error.Desc)
		}
		return m.Return, nil
	}
}

func (q *qmpConn) mustCmd(t *testing.T, name string, args any) json.RawMessage {
	t.Helper()
	r, err := q.cmd(name, args)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// waitMigration polls query-migrate until completed.
func (q *qmpConn) waitMigration(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(q.mustCmd(t, "query-migrate", nil), &st); err != nil {
			t.Fatal(err)
		}
		switch st.Status {
		case "completed":
			return
		case "failed", "cancelled":
			t.Fatalf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		if time.Now().After(deadline) {
			t.Fatalf("migration still %q after %v", st.Status, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (q *qmpConn) status(t *testing.T) string {
	var st struct {
		Status string `json:"status"`
	}
	json.Unmarshal(q.mustCmd(t, "query-status", nil), &st)
	return st.Status
}

// --- tests ---

func testConfig(t *testing.T, imageDir, dir, name string) QEMUConfig {
	return QEMUConfig{
		ImageDir:    imageDir,
		MemPath:     filepath.Join(dir, name+".mem"),
		AgentSocket: filepath.Join(dir, name+".agent.sock"),
		QMPSocket:   filepath.Join(dir, name+".qmp.sock"),
		ConsoleLog:  filepath.Join(dir, name+".console.log"),
	}
}

// bootAndConnect starts a VM and waits for the agent; it returns the time
// from QEMU start to the first successful ping.
func bootAndConnect(t *testing.T, cfg QEMUConfig) (*vm, *agent.Client, *agent.PingResult, time.Duration) {
	t.Helper()
	start := time.Now()
	v := startVM(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, cfg.AgentSocket)
	if err != nil {
		v.dumpConsole()
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p, err := c.WaitReady(ctx)
	if err != nil {
		v.dumpConsole()
		t.Fatal(err)
	}
	return v, c, p, time.Since(start)
}

func TestBootPingExec(t *testing.T) {
	imageDir := needQEMU(t)
	m, err := LoadManifest(imageDir)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	v, c, p, ready := bootAndConnect(t, testConfig(t, imageDir, dir, "vm"))
	t.Logf("boot-to-ready %v; ping: %+v", ready, p)
	if p.Version != agent.Version || p.ImageVersion != m.Version || p.BootID == "" {
		t.Errorf("unexpected ping result %+v (manifest version %s)", p, m.Version)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	r, err := c.Exec(ctx, agent.ExecRequest{Cmd: "echo", Args: []string{"hi"}})
	if err != nil || r.ExitCode != 0 || string(r.Stdout) != "hi\n" {
		t.Fatalf("echo hi: %+v, %v", r, err)
	}

	r, err = c.Exec(ctx, agent.ExecRequest{
		Shell:   `cat; echo "$FOO"; pwd; echo err >&2; exit 3`,
		Stdin:   []byte("from-stdin\n"),
		Env:     []string{"FOO=bar"},
		Workdir: "/tmp",
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "from-stdin\nbar\n/tmp\n"; string(r.Stdout) != want || string(r.Stderr) != "err\n" || r.ExitCode != 3 {
		t.Errorf("shell exec = %+v, want stdout %q", r, want)
	}

	r, err = c.Exec(ctx, agent.ExecRequest{Shell: "echo start; sleep 30", Timeout: 500 * time.Millisecond})
	if err != nil || !r.TimedOut || string(r.Stdout) != "start\n" || r.Duration > 5*time.Second {
		t.Errorf("timeout exec = %+v, %v", r, err)
	}

	r, err = c.Exec(ctx, agent.ExecRequest{Shell: "yes | head -c 100000", OutputLimit: 1000})
	if err != nil || !r.StdoutTruncated || len(r.Stdout) != 1000 {
		t.Errorf("truncated exec: len %d, %+v", len(r.Stdout), err)
	}

	if _, err := c.Exec(ctx, agent.ExecRequest{Cmd: "no-such-cmd"}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing command: err = %v", err)
	}

	data := bytes.Repeat([]byte("kelpie\x00\xff"), 100000) // 800 kB, binary
	if err := c.WriteFile(ctx, "/tmp/sub/f.bin", data, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := c.ReadFile(ctx, "/tmp/sub/f.bin")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes (want %d), %v", len(got), len(data), err)
	}
	r, _ = c.Exec(ctx, agent.ExecRequest{Shell: "stat -c %a /tmp/sub/f.bin"})
	if string(r.Stdout) != "600\n" {
		t.Errorf("mode = %q", r.Stdout)
	}
	if _, err := c.ReadFile(ctx, "/nonexistent"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ReadFile missing: %v", err)
	}
	if err := c.Sync(ctx); err != nil {
		t.Error(err)
	}
	if err := c.ReseedRNG(ctx); err != nil {
		t.Error(err)
	}
	now := time.Now()
	if err := c.SetTime(ctx, now); err != nil {
		t.Error(err)
	}
	if p, err := c.Ping(ctx); err != nil || p.Time.Sub(now).Abs() > 5*time.Second {
		t.Errorf("guest time %v vs %v: %v", p.Time, now, err)
	}

	// Host disconnects (the port reads EOF in the guest) and comes back.
	c.Close()
	time.Sleep(500 * time.Millisecond)
	c, err = agent.Dial(ctx, v.cfg.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p2, err := c.WaitReady(ctx); err != nil || p2.BootID != p.BootID {
		t.Fatalf("after reconnect: %+v %v", p2, err)
	}

	// The agent crashes: busybox init respawns it.
	kctx, kcancel := context.WithTimeout(ctx, time.Second)
	c.Exec(kctx, agent.ExecRequest{Shell: "kill -9 $PPID"})
	kcancel()
	p3, err := c.WaitReady(ctx)
	if err != nil || p3.BootID != p.BootID || p3.AgentUptime > 5*time.Second {
		t.Fatalf("after agent kill: %+v %v", p3, err)
	}

	// Each agent also listened on AF_VSOCK port 1024 (the respawned one
	// after its predecessor's socket was released). This VM has no vsock
	// device: the agent says so, and the serial port works regardless.
	vsockLine := fmt.Sprintf("kelpie-agent: serving on vsock:any:%d", agent.VsockPort)
	var console string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(v.cfg.ConsoleLog)
		console = string(b)
		if strings.Count(console, vsockLine) >= 2 || time.Now().After(deadline) {
			break
		}
	}
	if strings.Count(console, vsockLine) != 2 || strings.Count(console, "kelpie-agent: vsock: no vsock device") != 2 ||
		strings.Contains(console, "not serving on vsock") {
		v.dumpConsole()
		t.Errorf("console: want two agent starts, each listening on vsock port %d and reporting no vsock device", agent.VsockPort)
	}
	v.quit()
}

// TestSnapshotRestore moves a running guest through migrate-to-file and a
// restore into a new QEMU process, and checks that the agent answers on the
// new socket and a background counter keeps counting from where it was.
func TestSnapshotRestore(t *testing.T) {
	imageDir := needQEMU(t)
	dir := t.TempDir()
	srcCfg := testConfig(t, imageDir, dir, "src")
	src, c, p1, ready := bootAndConnect(t, srcCfg)
	t.Logf("source boot-to-ready %v", ready)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	r, err := c.Exec(ctx, agent.ExecRequest{
		Shell:      `i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done`,
		Background: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("counter pid %d", r.Pid)
	readCounter := func(c *agent.Client) int {
		t.Helper()
		// The loop truncates then writes the file: retry an empty read.
		var b []byte
		for i := 0; i < 20 && len(bytes.TrimSpace(b)) == 0; i++ {
			var err error
			if b, err = c.ReadFile(ctx, "/tmp/counter"); err != nil {
				t.Fatal(err)
			}
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("counter %q: %v", b, err)
		}
		return n
	}
	var before int
	for before < 5 {
		time.Sleep(200 * time.Millisecond)
		before = readCounter(c)
	}

	// Leave a partial request frame in the guest's input (a host that
	// vanished mid-write): the restored agent must not wedge on it.
	c.Close()
	raw, err := net.Dial("unix", srcCfg.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// Also leave a request in flight: its response reaches the new host
	// after the restore and must be ignored as stale.
	inflight, _ := agent.AppendFrame(nil, []byte(`{"id":1,"op":"exec","args":{"shell":"sleep 0.5; echo late"}}`))
	frame, _ := agent.AppendFrame(nil, []byte(`{"id":2,"op":"exec","args":{"shell":"touch /tmp/partial-frame-ran"}}`))
	if _, err := raw.Write(append(inflight, frame[:30]...)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)

	// Snapshot: RAM stays in the shared file (x-ignore-shared), device
	// state goes to stateFile.
	stateFile := filepath.Join(dir, "state")
	q := src.qmp
	q.mustCmd(t, "migrate-set-capabilities", map[string]any{"capabilities": []any{
		map[string]any{"capability": "x-ignore-shared", "state": true},
	}})
	q.mustCmd(t, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40})
	tSnap := time.Now()
	q.mustCmd(t, "stop", nil)
	q.mustCmd(t, "migrate", map[string]any{"uri": "exec:cat > " + stateFile})
	q.waitMigration(t, 60*time.Second)
	snapDur := time.Since(tSnap)
	if st := q.status(t); st != "postmigrate" {
		t.Errorf("source status %q, want postmigrate", st)
	}
	src.quit()
	st, _ := os.Stat(stateFile)
	t.Logf("snapshot took %v; state file %d bytes; counter was %d", snapDur, st.Size(), before)

	// Restore 1: a new process on a copy of the RAM file, mapped share=on
	// (so the restored VM could be snapshotted the same way again).
	// Restore 2: from the same snapshot, mapping the original RAM file
	// share=off (copy-on-write: the snapshot file stays untouched and can
	// be restored any number of times).
	memSum := fileSum(t, srcCfg.MemPath)
	copyCfg := testConfig(t, imageDir, dir, "dst1")
	if err := copyFile(srcCfg.MemPath, copyCfg.MemPath); err != nil {
		t.Fatal(err)
	}
	privCfg := testConfig(t, imageDir, dir, "dst2")
	privCfg.MemPath, privCfg.MemPrivate = srcCfg.MemPath, true
	for _, cfg := range []QEMUConfig{copyCfg, privCfg} {
		cfg.Incoming = true
		tRestore := time.Now()
		dst := startVM(t, cfg)
		dq := dst.qmp
		dq.mustCmd(t, "migrate-set-capabilities", map[string]any{"capabilities": []any{
			map[string]any{"capability": "x-ignore-shared", "state": true},
		}})
		dq.mustCmd(t, "migrate-incoming", map[string]any{"uri": "exec:cat " + stateFile})
		dq.waitMigration(t, 60*time.Second)
		hashStart := time.Now()
		if !cfg.MemPrivate && fileSum(t, cfg.MemPath) != memSum {
			// QEMU must not write guest RAM (ROMs, kernel) while
			// setting up an incoming VM; the RAM file is the snapshot.
			t.Errorf("destination QEMU modified the shared RAM file before cont")
		}
		tRestore = tRestore.Add(time.Since(hashStart)) // don't count the check
		dq.mustCmd(t, "cont", nil)
		restoreDur := time.Since(tRestore)

		c2, err := agent.Dial(ctx, cfg.AgentSocket)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := c2.WaitReady(ctx)
		if err != nil {
			dst.dumpConsole()
			t.Fatal(err)
		}
		t.Logf("restore share=%v: process start to cont %v, to first ping %v",
			!cfg.MemPrivate, restoreDur, time.Since(tRestore))
		// The guest wall clock stood still while the VM was frozen.
		lag := time.Since(p2.Time)
		if err := c2.SetTime(ctx, time.Now()); err != nil {
			t.Error(err)
		}
		if p3, err := c2.Ping(ctx); err != nil || time.Since(p3.Time).Abs() > time.Second {
			t.Errorf("after SetTime guest clock %v: %v", p3.Time, err)
		}
		t.Logf("guest clock lagged %v after restore; fixed with SetTime", lag.Round(time.Millisecond))
		if err := c2.ReseedRNG(ctx); err != nil {
			t.Error(err)
		}
		if p2.BootID != p1.BootID {
			t.Errorf("boot id changed: %s -> %s (guest rebooted?)", p1.BootID, p2.BootID)
		}
		after := readCounter(c2)
		if after < before || after > before+20 {
			t.Errorf("counter after restore = %d, before = %d", after, before)
		}
		time.Sleep(time.Second)
		later := readCounter(c2)
		if later <= after {
			t.Errorf("counter stuck at %d after restore", later)
		}
		t.Logf("counter: before snapshot %d, right after restore %d, 1s later %d", before, after, later)
		if _, err := c2.ReadFile(ctx, "/tmp/partial-frame-ran"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the partial request frame was executed (err %v)", err)
		}
		// The in-flight exec's response is stale. So is the late answer to
		// any ping WaitReady gave up on (its first try waits 250 ms, which
		// a restore on a loaded host can exceed).
		if st := c2.Stats(); st.StaleResponses < 1 {
			t.Errorf("stale responses = %d, want at least 1 (the in-flight exec)", st.StaleResponses)
		} else if st.StaleResponses > 1 {
			t.Logf("stale responses = %d: the in-flight exec and late pings", st.StaleResponses)
		}
		if r, err := c2.Exec(ctx, agent.ExecRequest{Cmd: "echo", Args: []string{"moved"}}); err != nil || string(r.Stdout) != "moved\n" {
			t.Errorf("exec after restore: %+v %v", r, err)
		}
		if testing.Verbose() {
			dst.dumpConsole()
		}
		c2.Close()
		dst.quit()
	}
	if fileSum(t, srcCfg.MemPath) != memSum {
		t.Errorf("share=off restore modified the snapshot RAM file")
	}
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// TestBootTiming measures boot-to-ready (QEMU start to first successful
// ping) KELPIE_BOOT_TIMING times; it is skipped unless that is set.
func TestBootTiming(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("KELPIE_BOOT_TIMING"))
	if n <= 0 {
		t.Skip("set KELPIE_BOOT_TIMING=N to measure N boots")
	}
	imageDir := needQEMU(t)
	var total, min, max time.Duration
	for i := 0; i < n; i++ {
		v, c, _, ready := bootAndConnect(t, testConfig(t, imageDir, t.TempDir(), "vm"))
		t.Logf("boot %d: %v", i+1, ready.Round(time.Millisecond))
		total += ready
		if min == 0 || ready < min {
			min = ready
		}
		max = maxDur(max, ready)
		c.Close()
		v.kill()
	}
	t.Logf("boot-to-ready over %d boots: mean %v, min %v, max %v", n,
		(total / time.Duration(n)).Round(time.Millisecond), min.Round(time.Millisecond), max.Round(time.Millisecond))
}

func maxDur(a, b time.Duration) time.Duration {
	if a > b {
		return a
	}
	return b
}
