package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// The end-to-end test drives real QEMU VMs through the kelpie binary, one
// process per command, as a user would: VMs must outlive the command that
// created them. Two KELPIE_HOMEs on this machine are two hosts.

func needQEMUCLI(t *testing.T) {
	t.Helper()
	mode := os.Getenv("KELPIE_QEMU_TESTS")
	if mode == "0" {
		t.Skip("KELPIE_QEMU_TESTS=0: real-VM tests disabled")
	}
	skip := t.Skipf
	if mode == "1" {
		skip = t.Fatalf
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		skip("qemu-system-x86_64 is not installed (run `kelpie image build` or scripts/setup-qemu.sh): %v", err)
	}
	if _, err := image.CurrentDir(); err != nil {
		skip("guest image missing (run `kelpie image build`): %v", err)
	}
}

type cli struct {
	t   *testing.T
	bin string
}

type result struct {
	stdout, stderr string
	code           int
}

// run runs the kelpie binary with KELPIE_HOME=home.
func (c cli) run(home string, args ...string) result {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append(os.Environ(), "KELPIE_HOME="+home)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if x, ok := err.(*exec.ExitError); ok {
		code = x.ExitCode()
	} else if err != nil {
		c.t.Fatalf("kelpie %s: %v", strings.Join(args, " "), err)
	}
	return result{o.String(), e.String(), code}
}

// ok runs a command that must succeed and returns its trimmed stdout.
func (c cli) ok(home string, args ...string) string {
	c.t.Helper()
	r := c.run(home, args...)
	if r.code != 0 {
		c.t.Fatalf("kelpie %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return strings.TrimSpace(r.stdout)
}

func (c cli) ls(home string) []host.VMInfo {
	c.t.Helper()
	var l []host.VMInfo
	if err := json.Unmarshal([]byte(c.ok(home, "vm", "ls", "--json")), &l); err != nil {
		c.t.Fatal(err)
	}
	return l
}

func (c cli) counter(home, name string) int {
	c.t.Helper()
	out := c.ok(home, "vm", "exec", name, "--", "sh", "-c", readCounterScript)
	n, err := strconv.Atoi(out)
	if err != nil {
		c.t.Fatalf("counter %q: %v", out, err)
	}
	return n
}

// counterContinues checks the counting process of the source is alive in
// name with its count carried over and still advancing.
func (c cli) counterContinues(home, name, pid string, before int) {
	c.t.Helper()
	if out := c.ok(home, "vm", "exec", name, "--", "sh", "-c", "kill -0 "+pid+" && echo alive"); out != "alive" {
		c.t.Fatalf("counter process %s not running in %s", pid, name)
	}
	after := c.counter(home, name)
	if after < before {
		c.t.Fatalf("%s: counter went back from %d to %d", name, before, after)
	}
	for deadline := time.Now().Add(30 * time.Second); c.counter(home, name) <= after; {
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: counter stuck at %d", name, after)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pidAlive reports whether a process runs (zombies do not: a QEMU whose
// kelpie parent exited is reaped by init, maybe late).
func pidAlive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// twoHomes builds the kelpie binary into a temporary directory and names
// two homes (hosts) and a store there; whatever VMs a failure leaves in
// the homes are removed at cleanup (VMs outlive kelpie by design).
func twoHomes(t *testing.T) (c cli, tmp, homeA, homeB, store string) {
	t.Helper()
	tmp = t.TempDir()
	bin := filepath.Join(tmp, "kelpie")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build kelpie: %v\n%s", err, out)
	}
	c = cli{t, bin}
	homeA, homeB, store = filepath.Join(tmp, "host-a"), filepath.Join(tmp, "host-b"), filepath.Join(tmp, "store")
	t.Cleanup(func() {
		for _, h := range []string{homeA, homeB} {
			var l []host.VMInfo
			json.Unmarshal([]byte(c.run(h, "vm", "ls", "--json").stdout), &l)
			for _, v := range l {
				c.run(h, "vm", "rm", v.Name)
			}
		}
	})
	return c, tmp, homeA, homeB, store
}

func TestQEMUEndToEnd(t *testing.T) {
	needQEMUCLI(t)
	c, tmp, homeA, homeB, store := twoHomes(t)
	bin := c.bin

	if dir := c.ok(homeA, "image", "build"); !strings.Contains(dir, "image") {
		t.Fatalf("image build printed %q", dir)
	}

	// Create with --accel auto: the choice and its reason are printed.
	r := c.run(homeA, "vm", "create", "a1", "--accel", "auto", "--memory", "256")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "a1" || !strings.Contains(r.stderr, "accelerator ") {
		t.Fatalf("vm create: %+v", r)
	}
	l := c.ls(homeA)
	if len(l) != 1 || l[0].Name != "a1" || l[0].State != "running" || !pidAlive(l[0].PID) {
		t.Fatalf("vm ls: %+v", l)
	}
	pidA1 := l[0].PID

	r = c.run(homeA, "vm", "exec", "a1", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
	if r.code != 7 || r.stdout != "out\n" || r.stderr != "err\n" {
		t.Fatalf("vm exec exit 7: %+v", r)
	}
	if r = c.run(homeA, "vm", "exec", "a1", "--", "no-such-cmd"); r.code != 127 {
		t.Fatalf("missing command: %+v", r)
	}
	pid := c.ok(homeA, "vm", "exec", "a1", "--", "sh", "-c",
		`setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`)
	for c.counter(homeA, "a1") < 3 {
		time.Sleep(100 * time.Millisecond)
	}
	c.ok(homeA, "vm", "exec", "a1", "--", "sh", "-c", "echo note > /tmp/note; echo ws > /workspace/w.txt")

	t.Run("PauseResume", func(t *testing.T) {
		c := cli{t, bin}
		c.ok(homeA, "vm", "pause", "a1")
		if l := c.ls(homeA); l[0].State != "paused" {
			t.Fatalf("after pause: %+v", l)
		}
		if r := c.run(homeA, "vm", "exec", "a1", "--", "true"); r.code != 1 || !strings.Contains(r.stderr, "paused") {
			t.Fatalf("exec on paused VM: %+v", r)
		}
		c.ok(homeA, "vm", "resume", "a1")
		c.ok(homeA, "vm", "exec", "a1", "--", "true")
	})

	t.Run("SnapshotToBlob", func(t *testing.T) {
		c := cli{t, bin}
		f := filepath.Join(tmp, "a1.klp1")
		c.ok(homeA, "vm", "snapshot", "a1", "--out", f)
		var h struct {
			V      uint64 `json:"version"`
			S      uint64 `json:"snapshot_len"`
			M      uint64 `json:"memory_len"`
			Stored int64  `json:"stored_bytes"`
			Chunks int    `json:"chunks"`
		}
		if err := json.Unmarshal([]byte(c.ok(homeA, "blob", "inspect", f, "--json")), &h); err != nil || h.V != 2 || h.S == 0 || h.M != 256<<20 ||
			h.Chunks == 0 || h.Stored <= 0 || h.Stored >= 40<<20 {
			t.Fatalf("blob inspect of a v2 snapshot: %+v %v", h, err)
		}
		// The memory comes back as a raw image with holes, and packs again
		// from it.
		un := filepath.Join(tmp, "un")
		c.ok(homeA, "blob", "unpack", f, "--out-dir", un)
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(un, "memory"), &st); err != nil || st.Size != 256<<20 || st.Blocks*512 >= st.Size {
			t.Fatalf("unpacked memory image: size %d, %d bytes allocated (%v): want 256 MiB with holes", st.Size, st.Blocks*512, err)
		}
		again := filepath.Join(tmp, "again.klp1")
		c.ok(homeA, "blob", "pack", "--metadata", filepath.Join(un, "metadata"), "--snapshot", filepath.Join(un, "snapshot"),
			"--memory", filepath.Join(un, "memory"), "--out", again)
		var h2 struct {
			M      uint64 `json:"memory_len"`
			Stored int64  `json:"stored_bytes"`
		}
		if err := json.Unmarshal([]byte(c.ok(homeA, "blob", "inspect", again, "--json")), &h2); err != nil || h2.M != h.M || h2.Stored != h.Stored {
			t.Fatalf("repacked: %+v vs %+v (%v)", h2, h, err)
		}
		f1 := filepath.Join(tmp, "a1-v1.klp1")
		c.ok(homeA, "vm", "snapshot", "a1", "--out", f1, "--format", "v1")
		if err := json.Unmarshal([]byte(c.ok(homeA, "blob", "inspect", f1, "--json")), &h); err != nil || h.V != 1 || h.M == 0 || h.M >= 200<<20 {
			t.Fatalf("blob inspect of a v1 snapshot: %+v %v", h, err)
		}
		if l := c.ls(homeA); l[0].State != "running" {
			t.Fatalf("after snapshot: %+v", l)
		}
	})

	var before int
	t.Run("TeleportBetweenHomes", func(t *testing.T) {
		c := cli{t, bin}
		// A copy first, with --json: one JSON object on stdout.
		r := c.run(homeA, "teleport", "out", "a1", "--store", store, "--keep-source", "--json")
		var res struct {
			ID                   string
			Logical, Stored, New int64
			Chunks, NewChunks    int
		}
		var raw map[string]any
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &raw) != nil || strings.Count(strings.TrimSpace(r.stdout), "\n") != 0 {
			t.Fatalf("teleport out --json: stdout must be one JSON object: %+v", r)
		}
		json.Unmarshal([]byte(r.stdout), &struct {
			ID        *string `json:"id"`
			Logical   *int64  `json:"logical_bytes"`
			Stored    *int64  `json:"stored_bytes"`
			New       *int64  `json:"new_bytes"`
			Chunks    *int    `json:"chunks"`
			NewChunks *int    `json:"new_chunks"`
		}{&res.ID, &res.Logical, &res.Stored, &res.New, &res.Chunks, &res.NewChunks})
		if res.ID == "" || res.Logical < 256<<20 || res.Stored <= 0 || res.Stored >= 40<<20 || res.New != res.Stored || res.Chunks == 0 || res.NewChunks != res.Chunks {
			t.Fatalf("first package of the guest: %+v", res)
		}
		var shown map[string]any
		if err := json.Unmarshal([]byte(c.ok(homeA, "package", "show", res.ID, "--store", store, "--json")), &shown); err != nil {
			t.Fatal(err)
		}
		for k, want := range map[string]float64{"logical_bytes": float64(res.Logical), "stored_bytes": float64(res.Stored), "new_bytes": float64(res.New),
			"chunks": float64(res.Chunks), "new_chunks": float64(res.NewChunks)} {
			if shown[k] != want {
				t.Fatalf("package show --json: %s = %v, teleport out said %v", k, shown[k], want)
			}
		}
		if ls := c.ok(homeA, "package", "ls", "--store", store); !strings.Contains(ls, "STORED") || !strings.Contains(ls, "NEW") || !strings.Contains(ls, res.ID) {
			t.Fatalf("package ls: %q", ls)
		}
		before = c.counter(homeA, "a1")
		r = c.run(homeA, "teleport", "out", "a1", "--store", store)
		id := strings.TrimSpace(r.stdout)
		if r.code != 0 || strings.Contains(id, "\n") || teleport.ValidateID(id) != nil {
			t.Fatalf("teleport out: stdout must be the id only: %+v", r)
		}
		if l := c.ls(homeA); len(l) != 0 {
			t.Fatalf("source still listed after a move: %+v", l)
		}
		if pidAlive(pidA1) {
			t.Fatalf("source QEMU %d still running after a move", pidA1)
		}
		// The second teleport of the same guest shares almost every chunk.
		var second map[string]any
		json.Unmarshal([]byte(c.ok(homeA, "package", "show", id, "--store", store, "--json")), &second)
		if nb, _ := second["new_bytes"].(float64); nb <= 0 || nb > 12<<20 {
			t.Fatalf("second teleport of the guest added %v bytes", second["new_bytes"])
		}
		t.Logf("first package %d bytes stored for %d logical; the second added %v", res.Stored, res.Logical, second["new_bytes"])
		if name := c.ok(homeB, "teleport", "in", id, "--store", store, "--name", "b1", "--accel", "tcg"); name != "b1" {
			t.Fatalf("teleport in printed %q", name)
		}
		c.counterContinues(homeB, "b1", pid, before)
		if out := c.ok(homeB, "vm", "exec", "b1", "--", "cat", "/tmp/note"); out != "note" {
			t.Fatalf("tmpfs file after teleport: %q", out)
		}
	})

	t.Run("SuspendResume", func(t *testing.T) {
		c := cli{t, bin}
		l := c.ls(homeB)
		if len(l) != 1 {
			t.Fatalf("vm ls on host-b: %+v", l)
		}
		qpid := l[0].PID
		before := c.counter(homeB, "b1")
		c.ok(homeB, "vm", "suspend", "b1")
		l = c.ls(homeB)
		if len(l) != 1 || l[0].State != "suspended" || l[0].PID != 0 || pidAlive(qpid) {
			t.Fatalf("after suspend: %+v (old QEMU alive: %v)", l, pidAlive(qpid))
		}
		c.ok(homeB, "vm", "resume", "b1")
		c.counterContinues(homeB, "b1", pid, before)
	})

	t.Run("SuspendRefusedOnAnotherHost", func(t *testing.T) {
		c := cli{t, bin}
		id := c.ok(homeB, "teleport", "out", "b1", "--store", store, "--kind", "suspend", "--keep-source")
		r := c.run(homeA, "teleport", "in", id, "--store", store, "--name", "x", "--accel", "tcg")
		if r.code != 1 || !strings.Contains(r.stderr, "host mismatch") || strings.Count(r.stderr, "\n") != 1 {
			t.Fatalf("suspend restored on another host: %+v", r)
		}
		if l := c.ls(homeA); len(l) != 0 {
			t.Fatalf("refused restore left %+v", l)
		}
	})

	t.Run("SimPackageRefused", func(t *testing.T) {
		c := cli{t, bin}
		id := simPackageInStore(t, store)
		r := c.run(homeA, "teleport", "in", id, "--store", store, "--name", "s1", "--accel", "tcg")
		if r.code != 1 || !strings.Contains(r.stderr, "backend mismatch") {
			t.Fatalf("sim package into qemu: %+v", r)
		}
	})

	t.Run("CheckpointAcrossArchitectures", func(t *testing.T) {
		c := cli{t, bin}
		state := filepath.Join(tmp, "agent-state.json")
		os.WriteFile(state, []byte(`{"turn":7}`), 0o600)
		r := c.run(homeB, "teleport", "out", "b1", "--store", store, "--kind", "auto", "--target-arch", "arm64",
			"--keep-source", "--agent-state", state)
		if r.code != 0 || !strings.Contains(r.stderr, "kind checkpoint") {
			t.Fatalf("auto kind for arm64: %+v", r)
		}
		id := strings.TrimSpace(r.stdout)
		stateOut := filepath.Join(tmp, "agent-state-out.json")
		c.ok(homeA, "teleport", "in", id, "--store", store, "--name", "c1", "--accel", "tcg", "--agent-state-out", stateOut)
		if b, _ := os.ReadFile(stateOut); string(b) != `{"turn":7}` {
			t.Fatalf("agent state %q", b)
		}
		if out := c.ok(homeA, "vm", "exec", "c1", "--", "cat", "/workspace/w.txt"); out != "ws" {
			t.Fatalf("workspace after checkpoint: %q", out)
		}
		if out := c.ok(homeA, "vm", "exec", "c1", "--", "sh", "-c", "test -e /tmp/counter && echo restored || echo fresh"); out != "fresh" {
			t.Fatal("a checkpoint carried guest memory")
		}
	})

	t.Run("Remove", func(t *testing.T) {
		c := cli{t, bin}
		pids := []int{c.ls(homeA)[0].PID, c.ls(homeB)[0].PID}
		c.ok(homeA, "vm", "rm", "c1")
		c.ok(homeB, "vm", "rm", "b1")
		if len(c.ls(homeA))+len(c.ls(homeB)) != 0 {
			t.Fatal("VMs left after rm")
		}
		for _, p := range pids {
			if pidAlive(p) {
				t.Fatalf("QEMU %d still running after vm rm", p)
			}
		}
		if _, err := os.Stat(filepath.Join(homeA, "vms", "c1")); !os.IsNotExist(err) {
			t.Fatalf("instance directory left: %v", err)
		}
		if r := c.run(homeA, "vm", "rm", "c1"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
			t.Fatalf("rm of a missing VM: %+v", r)
		}
	})

	t.Run("Demo", func(t *testing.T) {
		c := cli{t, bin}
		out := c.ok(homeA, "demo")
		if !strings.Contains(out, "real QEMU VM") || !strings.Contains(out, "demo complete") {
			t.Fatalf("demo output:\n%s", out)
		}
	})
}

func TestQEMUUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"vm"}, {"vm", "create"}, {"vm", "create", "x", "--backend", "hyperv"}, {"vm", "exec", "x"},
		{"vm", "snapshot", "x"}, {"teleport"}, {"teleport", "out"}, {"teleport", "in", "id"},
		{"teleport", "out", "x", "--target-arch", "arm64"}, {"image"}, {"vm", "create", "x", "--accel", "hvf"},
	} {
		t.Run(strings.Join(args, "_"), func(t *testing.T) {
			_, stderr, code := kelpie(t, map[string]string{"KELPIE_HOME": t.TempDir()}, args...)
			if code != 2 || strings.Count(stderr, "\n") != 1 {
				t.Fatalf("kelpie %v: exit %d, stderr %q; want a one-line usage error (exit 2)", args, code, stderr)
			}
		})
	}
	// A backend whose VMs cannot outlive one command is refused, saying why.
	_, stderr, code := kelpie(t, map[string]string{"KELPIE_HOME": t.TempDir()}, "vm", "create", "x", "--backend", "sim")
	if code != 1 || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "backend sim keeps its VMs only inside the process") {
		t.Fatalf("vm create --backend sim: exit %d, stderr %q", code, stderr)
	}
}

// simPackageInStore commits a sim-backend teleport package to a store.
func simPackageInStore(t *testing.T, dir string) string {
	t.Helper()
	ctx := context.Background()
	st, err := fs.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	f := sim.NewFactory(sim.Options{HostID: "sim-host", Arch: vm.HostArchitecture(), BaseImageVersion: image.Version()})
	inst, _ := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 256})
	inst.Start(ctx)
	svc := service.New(st, f)
	pkg, err := svc.Out(ctx, inst, service.OutRequest{AgentID: "sim-agent", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	return pkg.ID
}
