package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
	"github.com/kelpie/teleport/server"
)

// The daemon tests run real `kelpie serve` and `kelpie registry serve`
// processes on loopback: a 3-member etcd cluster, daemons with their own
// homes sharing a filesystem store, real QEMU guests, and kill -9.

type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startProc(t *testing.T, dir, name, bin string, env []string, args ...string) *proc {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); f.Close(); close(p.done) }()
	t.Cleanup(func() { p.kill9() })
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// kill9 kills the process by its id and waits for it.
func (p *proc) kill9() {
	if p.running() {
		p.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-p.done
}

// wait waits for the process to exit by itself.
func (p *proc) wait(d time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		return fmt.Errorf("%s still running after %v", p.name, d)
	}
}

func (p *proc) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

type testCluster struct {
	t       *testing.T
	bin     string
	dir     string
	members []*proc
	url     string
	store   string
	token   string
}

// newCluster starts 3 registry members with `kelpie registry serve`.
func newCluster(t *testing.T, bin string) *testCluster {
	dir := t.TempDir()
	addrs := registrytest.FreeAddrs(t, 6)
	clients, peers := addrs[:3], addrs[3:]
	initial := registrytest.InitialCluster(peers)
	c := &testCluster{t: t, bin: bin, dir: dir, store: filepath.Join(dir, "store"), token: "e2e-token"}
	os.WriteFile(filepath.Join(dir, "token"), []byte(c.token+"\n"), 0o600)
	for i := 0; i < 3; i++ {
		c.members = append(c.members, startProc(t, dir, fmt.Sprintf("m%d", i), bin, nil, "registry", "serve",
			"--data", filepath.Join(dir, fmt.Sprintf("m%d", i)), "--listen", clients[i], "--name", fmt.Sprintf("m%d", i),
			"--peer", peers[i], "--initial-cluster", initial))
	}
	c.url = "etcd://" + strings.Join(clients, ",")
	return c
}

type testDaemon struct {
	c      *testCluster
	name   string
	home   string
	listen string
	url    string
	id     string
	p      *proc
	client *server.Client
}

func (c *testCluster) daemon(name string) *testDaemon {
	d := &testDaemon{c: c, name: name, home: filepath.Join(c.dir, name), listen: registrytest.FreeAddr(c.t)}
	d.url = "http://" + d.listen
	d.client = server.NewClient(d.url, server.ClientOptions{Token: c.token})
	c.t.Cleanup(func() {
		// VMs outlive their daemon by design: remove what a test left.
		if d.p != nil {
			d.p.kill9()
		}
		out, _ := exec.Command(c.bin, "vm", "ls", "--json").Output()
		_ = out
		cmd := exec.Command(c.bin, "vm", "ls", "--json")
		cmd.Env = append(os.Environ(), "KELPIE_HOME="+d.home)
		b, _ := cmd.Output()
		var l []host.VMInfo
		json.Unmarshal(b, &l)
		for _, v := range l {
			rm := exec.Command(c.bin, "vm", "rm", v.Name)
			rm.Env = append(os.Environ(), "KELPIE_HOME="+d.home)
			rm.Run()
		}
	})
	return d
}

// start runs the daemon (crashAt: a crash point) and waits until it is
// ready.
func (d *testDaemon) start(crashAt string) {
	t := d.c.t
	t.Helper()
	env := []string{"KELPIE_HOME=" + d.home}
	if crashAt != "" {
		env = append(env, "KELPIE_CRASH_AT="+crashAt)
	}
	d.p = startProc(t, d.c.dir, d.name, d.c.bin, env, "serve", "--home", d.home, "--listen", d.listen, "--registry", d.c.url,
		"--store", d.c.store, "--token-file", filepath.Join(d.c.dir, "token"))
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := d.client.Ready(ctx)
		cancel()
		if err == nil {
			break
		}
		if !d.p.running() || time.Now().After(deadline) {
			t.Fatalf("daemon %s not ready: %v\n%s", d.name, err, d.p.logText())
		}
		time.Sleep(100 * time.Millisecond)
	}
	h, err := d.client.Health(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	d.id = h["host_id"]
}

// kelpie runs the CLI through this daemon.
func (d *testDaemon) kelpie(args ...string) result {
	d.c.t.Helper()
	return runKelpie(d.c.t, d.c.bin, []string{"KELPIE_TOKEN=" + d.c.token}, append([]string{"--server", d.url}, args...)...)
}

func runKelpie(t *testing.T, bin string, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if x, ok := err.(*exec.ExitError); ok {
		code = x.ExitCode()
	} else if err != nil {
		t.Fatalf("kelpie %s: %v", strings.Join(args, " "), err)
	}
	return result{o.String(), e.String(), code}
}

func (d *testDaemon) ok(args ...string) string {
	d.c.t.Helper()
	r := d.kelpie(args...)
	if r.code != 0 {
		d.c.t.Fatalf("kelpie --server %s %s: exit %d\nstdout: %s\nstderr: %s", d.name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return strings.TrimSpace(r.stdout)
}

func (d *testDaemon) counter(name string) int {
	d.c.t.Helper()
	out := d.ok("agent", "exec", name, "--", "sh", "-c", readCounterScript)
	n, err := strconv.Atoi(out)
	if err != nil {
		d.c.t.Fatalf("counter %q: %v", out, err)
	}
	return n
}

func (d *testDaemon) show(name string) registry.Agent {
	d.c.t.Helper()
	var a registry.Agent
	if err := json.Unmarshal([]byte(d.ok("agent", "show", name, "--json")), &a); err != nil {
		d.c.t.Fatal(err)
	}
	return a
}

// vmRunning is the state of this host's VM name ("" if none).
func (d *testDaemon) vmState(name string) string {
	vms, err := d.client.VMs(context.Background())
	if err != nil {
		d.c.t.Fatalf("vms of %s: %v", d.name, err)
	}
	for _, v := range vms {
		if v.Name == name {
			return v.State
		}
	}
	return ""
}

func metricsOf(t *testing.T, d *testDaemon) string {
	req, _ := http.NewRequest("GET", d.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+d.c.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func buildKelpie(t *testing.T) string {
	bin := filepath.Join(t.TempDir(), "kelpie")
	// The crash tests need the daemon's crash points (KELPIE_CRASH_AT),
	// which only this build tag compiles in.
	if out, err := exec.Command("go", "build", "-tags", "kelpie_crashpoints", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build kelpie: %v\n%s", err, out)
	}
	return bin
}

// TestDaemonsQEMU: two daemons and a 3-member cluster; an agent with a
// counting process moves A -> B through the API while a registry member is
// killed; the count goes on; a second teleport in of the claimed package is
// refused with where the agent runs; the CLI refuses a served home; a
// SIGTERM leaves the guest running and a restarted daemon re-attaches.
func TestDaemonsQEMU(t *testing.T) {
	needQEMUCLI(t)
	bin := buildKelpie(t)
	c := newCluster(t, bin)
	a, b := c.daemon("host-a"), c.daemon("host-b")
	a.start("")
	b.start("")

	// With a workspace disk: it moves with the agent through the daemons.
	if out := a.ok("agent", "create", "ag", "--memory", "256", "--disk", "64M"); out != "ag" {
		t.Fatalf("agent create printed %q", out)
	}
	if got := a.ok("agent", "exec", "ag", "--", "sh", "-c", "grep ' /workspace ' /proc/mounts | cut -d' ' -f1,3 && echo kept > /workspace/on-disk && sync"); got != "/dev/vda ext4" {
		t.Fatalf("/workspace through the daemon: %q", got)
	}
	rec := a.show("ag")
	if rec.Owner != a.id || rec.State != registry.StateRunning || rec.Epoch != 1 {
		t.Fatalf("after create: %+v", rec)
	}
	if r := b.kelpie("agent", "create", "ag"); r.code == 0 || !strings.Contains(r.stderr, "exists") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("a second create of ag elsewhere: %+v", r)
	}
	pid := a.ok("agent", "exec", "ag", "--", "sh", "-c", demoCounter)
	time.Sleep(500 * time.Millisecond)
	before := a.counter("ag")

	// The move, with a registry member killed while it runs.
	type moveRes struct{ r result }
	done := make(chan result, 1)
	go func() { done <- a.kelpie("agent", "move", "ag", "--to", b.id) }()
	time.Sleep(300 * time.Millisecond)
	c.members[2].kill9()
	r := <-done
	if r.code != 0 || strings.TrimSpace(r.stdout) != b.id {
		t.Fatalf("agent move: %+v", r)
	}
	rec = b.show("ag")
	if rec.Owner != b.id || rec.State != registry.StateRunning || rec.Epoch != 3 {
		t.Fatalf("after the move: %+v", rec)
	}
	if st := a.vmState("ag"); st != "" {
		t.Fatalf("host-a still has the VM (%s)", st)
	}
	if out := b.ok("agent", "exec", "ag", "--", "sh", "-c", "kill -0 "+pid+" && echo alive"); out != "alive" {
		t.Fatal("the counting process did not move")
	}
	if out := b.ok("agent", "exec", "ag", "--", "cat", "/workspace/on-disk"); out != "kept" {
		t.Fatalf("the file on the workspace disk after the move: %q", out)
	}
	after := b.counter("ag")
	if after < before {
		t.Fatalf("counter went back: %d -> %d", before, after)
	}
	for deadline := time.Now().Add(20 * time.Second); b.counter("ag") <= after; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the counter stopped on host-b")
		}
	}

	// Registry-wide answers from either daemon.
	var agents []map[string]any
	json.Unmarshal([]byte(a.ok("agent", "ls", "--json")), &agents)
	if len(agents) != 1 || agents[0]["name"] != "ag" || agents[0]["owner"] != b.id || agents[0]["state"] != "running" || agents[0]["epoch"] != 3.0 {
		t.Fatalf("agent ls through host-a: %+v", agents)
	}
	var hosts []map[string]any
	json.Unmarshal([]byte(b.ok("host", "ls", "--json")), &hosts)
	if len(hosts) != 2 || hosts[0]["alive"] != true || hosts[1]["alive"] != true || hosts[0]["address"] == "" {
		t.Fatalf("host ls: %+v", hosts)
	}

	// The claimed package stays; a second teleport in is refused (CLI with
	// the registry on a third home), naming the host and since when.
	pkgs, err := a.client.Packages(context.Background(), "")
	if err != nil || len(pkgs) != 1 {
		t.Fatalf("packages: %+v %v", pkgs, err)
	}
	homeC := filepath.Join(c.dir, "host-c")
	r = runKelpie(t, bin, []string{"KELPIE_HOME=" + homeC}, "teleport", "in", pkgs[0].ID, "--store", c.store, "--registry", c.url)
	if r.code == 0 || !strings.Contains(r.stderr, "runs on host "+b.id+" since ") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("second teleport in: %+v", r)
	}
	// Without a registry, the CLI says single activation is not enforced.
	// And on a home a daemon serves, the CLI refuses.
	r = runKelpie(t, bin, []string{"KELPIE_HOME=" + b.home}, "vm", "ls")
	if r.code == 0 || !strings.Contains(r.stderr, "served by the daemon at "+b.url) {
		t.Fatalf("CLI on a served home: %+v", r)
	}

	// Metrics.
	m := metricsOf(t, a)
	for _, want := range []string{`kelpie_teleport_step_seconds_count{op="out",step="snapshot"} 1`, "kelpie_move_seconds_count 1"} {
		if !strings.Contains(m, want) {
			t.Errorf("host-a metrics lack %s", want)
		}
	}
	if m := metricsOf(t, b); !strings.Contains(m, `kelpie_agents{state="running"} 1`) {
		t.Errorf("host-b metrics lack its running agent")
	}

	// SIGTERM: the daemon stops, the guest does not.
	vms, _ := b.client.VMs(context.Background())
	qemuPID := vms[0].PID
	b.p.cmd.Process.Signal(syscall.SIGTERM)
	if err := b.p.wait(30 * time.Second); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, b.p.logText())
	}
	if !pidAlive(qemuPID) {
		t.Fatal("SIGTERM of the daemon killed the guest")
	}
	var hs []registry.Host
	json.Unmarshal([]byte(a.ok("host", "ls", "--json")), &hs)
	for _, h := range hs {
		if h.ID == b.id && h.Alive {
			t.Fatal("a stopped daemon's host is still alive")
		}
	}
	b.start("")
	if vms, _ := b.client.VMs(context.Background()); len(vms) != 1 || vms[0].PID != qemuPID || vms[0].State != "running" {
		t.Fatalf("after restart: %+v (QEMU pid was %d)", vms, qemuPID)
	}
	if out := b.ok("agent", "exec", "ag", "--", "sh", "-c", "kill -0 "+pid+" && echo alive"); out != "alive" {
		t.Fatal("the counting process did not survive the daemon's restart")
	}
	b.ok("agent", "rm", "ag")
	if r := a.kelpie("agent", "show", "ag", "--json"); r.code == 0 {
		t.Fatalf("agent show after rm: %+v", r)
	}
	if b.vmState("ag") != "" {
		t.Fatal("agent rm left its VM")
	}
}

// crash is one kill -9 point of a move: which daemon dies, and where.
type crash struct {
	source bool
	step   string
}

// TestDaemonsCrashQEMU kills the source or the target daemon with SIGKILL
// at each step of a move, restarts it, and checks that afterwards exactly
// one host runs the agent, or it is in flight in a committed package that
// can be claimed exactly once — never two, never none — and that its
// guest's counter goes on.
func TestDaemonsCrashQEMU(t *testing.T) {
	needQEMUCLI(t)
	bin := buildKelpie(t)
	c := newCluster(t, bin)
	a, b := c.daemon("host-a"), c.daemon("host-b")
	a.start("")
	b.start("")
	a.ok("agent", "create", "ag", "--memory", "256")
	pid := a.ok("agent", "exec", "ag", "--", "sh", "-c", demoCounter)
	owner, other := a, b
	last := 0
	cases := []crash{
		{true, "moving"}, {true, "out:snapshot"}, {true, "out:upload"}, {true, "committed"}, {true, "in-flight"}, {true, "destroyed"},
		{false, "claimed"}, {false, "in:restore"}, {false, "restored"}, {false, "running"},
	}
	for _, cs := range cases {
		who := other
		if cs.source {
			who = owner
		}
		t.Logf("case: kill -9 of %s (the %s) at %s", who.name, map[bool]string{true: "source", false: "target"}[cs.source], cs.step)
		// Restart the daemon that is to die with its crash point.
		who.p.kill9()
		who.start(cs.step)
		r := owner.kelpie("agent", "move", "ag", "--to", other.id)
		if err := who.p.wait(60 * time.Second); err == nil || !strings.Contains(who.p.logText(), "crash point reached") {
			t.Fatalf("%s did not crash at %s (move: %+v)\n%s", who.name, cs.step, r, who.p.logText())
		}
		who.start("")
		// Let both reconcile and settle, then check the invariant.
		var rec registry.Agent
		settled := false
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
			rec = a.show("ag")
			if rec.State == registry.StateRunning || rec.State == registry.StateInFlight {
				settled = true
				break
			}
		}
		if !settled {
			t.Fatalf("after %s: the record did not settle: %+v", cs.step, rec)
		}
		sa, sb := a.vmState("ag"), b.vmState("ag")
		if sa == "running" && sb == "running" {
			t.Fatalf("after %s: the agent runs on both hosts", cs.step)
		}
		switch rec.State {
		case registry.StateInFlight:
			if sa == "running" || sb == "running" {
				t.Fatalf("after %s: in flight, yet a VM runs (a %q, b %q)", cs.step, sa, sb)
			}
			// Claimable exactly once.
			if _, err := c.pkgCommitted(a, rec.Package); err != nil {
				t.Fatalf("after %s: in flight in %s, which is not committed: %v", cs.step, rec.Package, err)
			}
			if got := other.ok("agent", "claim", "ag"); got != other.id {
				t.Fatalf("claim printed %q", got)
			}
			if r := owner.kelpie("agent", "claim", "ag"); r.code == 0 {
				t.Fatalf("after %s: a second claim succeeded: %+v", cs.step, r)
			}
			rec = a.show("ag")
		}
		runs := map[string]*testDaemon{a.id: a, b.id: b}[rec.Owner]
		if rec.State != registry.StateRunning || runs == nil || runs.vmState("ag") != "running" {
			t.Fatalf("after %s: %+v, vms a %q b %q", cs.step, rec, a.vmState("ag"), b.vmState("ag"))
		}
		notRuns := a
		if runs == a {
			notRuns = b
		}
		if st := notRuns.vmState("ag"); st == "running" {
			t.Fatalf("after %s: %s also runs it", cs.step, notRuns.name)
		}
		if out := runs.ok("agent", "exec", "ag", "--", "sh", "-c", "kill -0 "+pid+" && echo alive"); out != "alive" {
			t.Fatalf("after %s: the counting process is gone", cs.step)
		}
		n := runs.counter("ag")
		if n < last {
			t.Fatalf("after %s: the counter went back from %d to %d", cs.step, last, n)
		}
		last = n
		t.Logf("  -> runs on %s (epoch %d), counter %d", runs.name, rec.Epoch, n)
		owner, other = runs, notRuns
	}
}

func (c *testCluster) pkgCommitted(d *testDaemon, id string) (bool, error) {
	_, err := d.client.Package(context.Background(), "", id)
	return err == nil, err
}
