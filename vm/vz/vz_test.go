package vz

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/hostvm"
	"github.com/kelpie/teleport/vm/hostvm/hostvmtest"
	"github.com/kelpie/teleport/vm/vmtest"
)

// fakeVZ is Virtualization.framework as the driver sees it. It enforces
// the framework's documented rules (start a stopped VM; save a paused one;
// restore only into a stopped VM that never ran, which ends paused) and its
// host binding: a save file is sealed with this host's key and a
// configuration fingerprint, so another host, or another configuration,
// cannot restore it.
type fakeVZ struct {
	macOS   string
	hostKey string

	mu       sync.Mutex
	machines []*fakeMachine
	calls    []string
}

func (h *fakeVZ) facts() (hostFacts, error) { return hostFacts{MacOSVersion: h.macOS}, nil }

func (h *fakeVZ) newMachine(ctx context.Context, s machineSpec) (vzMachine, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := &fakeMachine{h: h, spec: s, state: "stopped", exited: make(chan struct{})}
	h.machines = append(h.machines, m)
	return m, nil
}

func (h *fakeVZ) record(s string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, s)
}

func (h *fakeVZ) log() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.calls...)
}

type fakeMachine struct {
	h    *fakeVZ
	spec machineSpec

	mu     sync.Mutex
	state  string // stopped, running, paused, error
	ran    bool
	guest  *hostvmtest.KVGuest
	exited chan struct{}
}

func (m *fakeMachine) done() <-chan struct{} { return m.exited }

// rule fails a call made in the wrong state, as the framework does.
func (m *fakeMachine) rule(op string, ok bool) error {
	m.h.record(op)
	if !ok {
		return fmt.Errorf("fake VZ: %s is invalid in state %s", op, m.state)
	}
	return nil
}

func (m *fakeMachine) start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("start", m.state == "stopped" && !m.ran); err != nil {
		return err
	}
	m.state, m.ran, m.guest = "running", true, hostvmtest.NewKVGuest()
	return nil
}

func (m *fakeMachine) pause(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("pause", m.state == "running"); err != nil {
		return err
	}
	m.state = "paused"
	m.guest.SetPaused(true)
	return nil
}

func (m *fakeMachine) resume(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("resume", m.state == "paused"); err != nil {
		return err
	}
	m.state = "running"
	m.guest.SetPaused(false)
	return nil
}

func (m *fakeMachine) stop(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("stop", true); err != nil {
		return err
	}
	if m.guest != nil {
		m.guest.Stop()
	}
	if m.ran && m.state != "stopped" {
		close(m.exited)
	}
	m.state = "stopped"
	return nil
}

// crash is the VM entering VZVirtualMachineStateError.
func (m *fakeMachine) crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state = "error"
	m.guest.Stop()
	close(m.exited)
}

// saveFile is the fake's save file: sealed with the host key.
type saveFile struct {
	Seal   string `json:"seal"`
	Config string `json:"config"`
	Memory []byte `json:"memory"`
}

func (m *fakeMachine) fingerprint() string {
	c := m.spec.Config
	return fmt.Sprintf("vcpus=%d mem=%d kernel=%s initrd=%s args=%q disk=%s", c.VCPUs, c.MemoryMiB, c.Kernel, c.Initrd, m.spec.BootArgs, c.RootDisk)
}

func seal(key string, mem []byte) string {
	s := sha256.Sum256(append([]byte(key), mem...))
	return fmt.Sprintf("%x", s)
}

func (m *fakeMachine) save(ctx context.Context, path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("save", m.state == "paused"); err != nil {
		return err
	}
	mem, err := m.guest.Memory(0)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(saveFile{Seal: seal(m.h.hostKey, mem), Config: m.fingerprint(), Memory: mem})
	return os.WriteFile(path, b, 0o600)
}

func (m *fakeMachine) restore(ctx context.Context, path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.rule("restore", m.state == "stopped" && !m.ran); err != nil {
		return err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var f saveFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("fake VZ: not a save file: %v", err)
	}
	if f.Seal != seal(m.h.hostKey, f.Memory) {
		return errors.New("fake VZ: the save file was written on another Mac")
	}
	if f.Config != m.fingerprint() {
		return fmt.Errorf("fake VZ: the save file is incompatible with this configuration (%s vs %s)", f.Config, m.fingerprint())
	}
	g := hostvmtest.NewKVGuest()
	if err := g.LoadMemory(f.Memory); err != nil {
		return err
	}
	g.SetPaused(true)
	m.state, m.ran, m.guest = "paused", true, g
	return nil
}

// connect reaches a guest process listening on the agent port through a
// socket pair, like a VZVirtioSocketConnection.
func (m *fakeMachine) connect(ctx context.Context, port uint32) (io.ReadWriteCloser, error) {
	m.mu.Lock()
	g, state := m.guest, m.state
	m.mu.Unlock()
	m.h.record("connect")
	if port != hostvm.AgentVsockPort || g == nil || state == "stopped" || state == "error" {
		return nil, errors.New("fake VZ: connection refused")
	}
	host, guest := net.Pipe()
	go func() {
		g.Serve(guest)
		guest.Close()
	}()
	return host, nil
}

type rig struct {
	f  *hostvm.Factory
	hv *fakeVZ
}

func newRig(t testing.TB, hostID, key string) rig {
	t.Helper()
	hv := &fakeVZ{macOS: "14.5", hostKey: key}
	f, err := newFactory(Options{Dir: t.TempDir(), HostID: hostID, BaseImageVersion: "1.0.0"}, hv)
	if err != nil {
		t.Fatal(err)
	}
	return rig{f: f, hv: hv}
}

func guestConfig(t testing.TB) vm.Config {
	dir := t.TempDir()
	k, i := filepath.Join(dir, "Image"), filepath.Join(dir, "initramfs.cpio.gz")
	for _, p := range []string{k, i} {
		os.WriteFile(p, []byte("x"), 0o600)
	}
	// The same paths for every VM of one test: the framework restores a
	// save file only into an identical configuration.
	return vm.Config{VCPUs: 2, MemoryMiB: 512, Kernel: k, Initrd: i}
}

func set(ctx context.Context, inst vm.Instance, k, v string) error {
	res, err := inst.Exec(ctx, "set", []string{k, v}, vm.ExecOptions{})
	if err == nil && res.ExitCode != 0 {
		err = fmt.Errorf("set: exit %d", res.ExitCode)
	}
	return err
}

func get(ctx context.Context, inst vm.Instance, k string) (string, error) {
	res, err := inst.Exec(ctx, "get", []string{k}, vm.ExecOptions{})
	return strings.TrimSpace(string(res.Stdout)), err
}

// The conformance suite through the VZ driver against the fake framework:
// single-file, host-bound snapshots.
func TestConformanceAgainstFakeVZ(t *testing.T) {
	var once sync.Once
	var cfg vm.Config
	vmtest.Run(t, vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return newRig(t, "mac-a", "key-a").f },
		Config: func(t *testing.T) vm.Config {
			once.Do(func() { cfg = guestConfig(t) })
			return cfg
		},
		Write:   set,
		Read:    get,
		Timeout: 20 * time.Second,
	})
}

func TestSnapshotIsOneHostBoundFile(t *testing.T) {
	r := newRig(t, "mac-a", "key-a")
	ctx := context.Background()
	cfg := guestConfig(t)
	inst, err := r.f.Create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := set(ctx, inst, "k", "v"); err != nil {
		t.Fatal(err)
	}
	snap, err := inst.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	md := snap.Metadata
	if md.Layout != vm.LayoutSingle || snap.Memory != nil || md.MemorySize != 0 || !md.HostBound ||
		md.HostID != "mac-a" || md.Backend != BackendName || md.Architecture != vm.ArchArm64 ||
		md.Compat[CompatMacOSVersion] != "14.5" {
		t.Fatalf("metadata %+v", md)
	}
	if got := strings.Join(r.hv.log(), ","); !strings.HasPrefix(got, "start,connect,") || !strings.HasSuffix(got, "pause,save,resume") {
		t.Fatalf("framework calls %s", got)
	}

	// Same Mac: restores (a suspend).
	dst, err := r.f.CreateFromSnapshot(ctx, cfg, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(ctx)
	if err := dst.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := get(ctx, dst, "k"); err != nil || v != "v" {
		t.Fatalf("restored %q %v", v, err)
	}

	// Another Mac, same macOS: refused by Kelpie before the framework
	// sees the file.
	other := newRig(t, "mac-b", "key-b")
	if _, err := other.f.CreateFromSnapshot(ctx, cfg, snap); !errors.Is(err, vm.ErrIncompatible) ||
		!strings.Contains(err.Error(), "only on the host that wrote them") {
		t.Fatalf("restore on another Mac: %v", err)
	}
	if len(other.hv.log()) != 0 {
		t.Fatalf("the framework was called: %v", other.hv.log())
	}
	// Metadata that lies about the host: the framework's own seal still
	// refuses, and the error is ErrIncompatible.
	forged := *snap
	forged.Metadata.HostID = "mac-b"
	if _, err := other.f.CreateFromSnapshot(ctx, cfg, &forged); !errors.Is(err, vm.ErrIncompatible) ||
		!strings.Contains(err.Error(), "another Mac") {
		t.Fatalf("forged host id: %v", err)
	}
}

func TestRestoreNeedsIdenticalConfiguration(t *testing.T) {
	r := newRig(t, "mac-a", "key-a")
	ctx := context.Background()
	cfg := guestConfig(t)
	inst, err := r.f.Create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	snap, err := inst.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	other := cfg
	other.KernelArgs = "console=hvc0 debug"
	_, err = r.f.CreateFromSnapshot(ctx, other, snap)
	if !errors.Is(err, vm.ErrIncompatible) || !strings.Contains(err.Error(), "incompatible with this configuration") {
		t.Fatalf("got %v", err)
	}
}

func TestMacOSVersions(t *testing.T) {
	for v, ok := range map[string]bool{"14.0": true, "15.1.1": true, "26.0": true, "13.6": false, "12": false, "": false, "x": false} {
		hv := &fakeVZ{macOS: v}
		_, err := newFactory(Options{Dir: t.TempDir(), HostID: "m"}, hv)
		if ok != (err == nil) || (!ok && !errors.Is(err, vm.ErrUnsupported)) {
			t.Errorf("macOS %q: %v", v, err)
		}
	}
}

func TestUserNetworkRefused(t *testing.T) {
	r := newRig(t, "mac-a", "key-a")
	cfg := guestConfig(t)
	cfg.Network = vm.NetworkRestricted
	if _, err := r.f.Create(context.Background(), cfg); !errors.Is(err, vm.ErrUnsupported) {
		t.Fatalf("got %v", err)
	}
}

func TestVMErrorIsACrash(t *testing.T) {
	r := newRig(t, "mac-a", "key-a")
	ctx := context.Background()
	inst, err := r.f.Create(ctx, guestConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	r.hv.machines[0].crash()
	if inst.State() != vm.StateCrashed {
		t.Fatalf("state %s", inst.State())
	}
	if _, err := inst.Exec(ctx, "echo", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("exec: %v", err)
	}
}

func TestCallRespectsContext(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := call(ctx, func() error { <-release; return nil }); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	if err := call(context.Background(), func() error { return io.EOF }); err != io.EOF {
		t.Fatalf("got %v", err)
	}
}

// On this platform the real framework is not there: NewFactory says so.
func TestStubOffMac(t *testing.T) {
	if _, err := newHypervisor(t.TempDir()); err == nil {
		t.Skip("built with the real framework")
	}
	if _, err := NewFactory(context.Background(), Options{Dir: t.TempDir(), HostID: "h"}); !errors.Is(err, vm.ErrUnsupported) {
		t.Fatalf("got %v", err)
	}
}

func TestLoadOrCreateID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", machineIDFile)
	n := 0
	create := func() ([]byte, error) { n++; return []byte(fmt.Sprintf("id-%d", n)), nil }
	a, err := loadOrCreateID(path, create)
	if err != nil || string(a) != "id-1" {
		t.Fatalf("first: %q %v", a, err)
	}
	// The identifier is stable: the same bytes every time after.
	b, err := loadOrCreateID(path, create)
	if err != nil || string(b) != "id-1" || n != 1 {
		t.Fatalf("second: %q %v (created %d)", b, err, n)
	}
	// Two processes racing: the loser adopts the winner's identifier.
	other := filepath.Join(t.TempDir(), machineIDFile)
	os.WriteFile(other+".tmp-winner", []byte("winner"), 0o600)
	os.Link(other+".tmp-winner", other)
	if got, err := loadOrCreateID(other, create); err != nil || string(got) != "winner" {
		t.Fatalf("race: %q %v", got, err)
	}
	if _, err := loadOrCreateID(filepath.Join(t.TempDir(), "x"), func() ([]byte, error) { return nil, io.ErrUnexpectedEOF }); err == nil {
		t.Fatal("creation failure ignored")
	}
}

func TestVMWatch(t *testing.T) {
	for _, c := range []struct {
		name   string
		events []vmEvent
		gone   bool
	}{
		{"fresh VM is stopped", []vmEvent{eventStopped}, false},
		{"failed restore", []vmEvent{eventTransient, eventStopped}, false},
		{"stopped after running", []vmEvent{eventTransient, eventActive, eventTransient, eventStopped}, true},
		{"stopped after a restore", []vmEvent{eventTransient, eventActive, eventStopped}, true},
		{"error", []vmEvent{eventError}, true},
		{"paused", []vmEvent{eventActive, eventTransient, eventActive}, false},
	} {
		var w vmWatch
		gone := false
		for _, e := range c.events {
			gone = w.gone(e)
		}
		if gone != c.gone {
			t.Errorf("%s: gone=%v", c.name, gone)
		}
	}
}
