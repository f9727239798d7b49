package host_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

func openHost(t *testing.T, home string, o host.Options) *host.Host {
	t.Helper()
	o.Home = home
	if o.Backends == nil {
		o.Backends = []host.Backend{host.SimBackend()}
	}
	h, err := host.Open(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// machine is VMs that outlive the Host values that made them, as QEMU
// processes outlive a kelpie command: a sim backend that gained the
// re-attach role. Nothing in host names it.
type machine struct {
	mu  sync.Mutex
	vms map[string]vm.Instance
}

type durableFactory struct {
	*sim.Factory
	m *machine
}

func (f durableFactory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	inst, err := f.Factory.Create(ctx, cfg)
	if err == nil {
		f.m.mu.Lock()
		f.m.vms[cfg.Name] = inst
		f.m.mu.Unlock()
	}
	return inst, err
}

func (f durableFactory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	inst, err := f.Factory.CreateFromSnapshot(ctx, cfg, snap)
	if err == nil {
		f.m.mu.Lock()
		f.m.vms[cfg.Name] = inst
		f.m.mu.Unlock()
	}
	return inst, err
}

func (f durableFactory) Attach(ctx context.Context, name string) (vm.Instance, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	inst, ok := f.m.vms[name]
	if !ok || inst.State() == vm.StateStopped {
		return nil, fmt.Errorf("vm %s: %w", name, vm.ErrNotFound)
	}
	return inst, nil
}

func durableBackend(m *machine) host.Backend {
	return host.Backend{Name: "sim", Open: func(ctx context.Context, env host.BackendEnv) (vm.Factory, error) {
		return durableFactory{sim.NewFactory(sim.Options{HostID: env.HostID, BaseImageVersion: image.Version()}), m}, nil
	}}
}

// A caller that exits after each call (the CLI) is refused a backend
// whose VMs would die with it, in one line; the same backend works for a
// program that keeps running.
func TestOneShotRefusesBackendsWithoutReattach(t *testing.T) {
	ctx := context.Background()
	cli := openHost(t, t.TempDir(), host.Options{OneShot: true})
	_, err := cli.CreateVM(ctx, host.VMSpec{Name: "a"})
	if !errors.Is(err, host.ErrNotDurable) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("CreateVM = %v, want ErrNotDurable on one line", err)
	}
	if !strings.Contains(err.Error(), "backend sim") {
		t.Fatalf("the refusal does not name the backend: %v", err)
	}
	if vms, _ := cli.VMs(ctx); len(vms) != 0 {
		t.Fatalf("refused create left %v", vms)
	}
	prog := openHost(t, t.TempDir(), host.Options{})
	if _, err := prog.CreateVM(ctx, host.VMSpec{Name: "a"}); err != nil {
		t.Fatalf("an embedding program: %v", err)
	}
}

// A backend that gains the re-attach role works for one-shot callers at
// once: the VM made by one Host is driven by the next, by name.
func TestRoleFoundByAssertion(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	m := &machine{vms: map[string]vm.Instance{}}
	first := openHost(t, home, host.Options{OneShot: true, Backends: []host.Backend{durableBackend(m)}})
	if _, err := first.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	first.Exec(ctx, "agent", "set", []string{"k", "v"}, vm.ExecOptions{})
	first.Close()
	next := openHost(t, home, host.Options{OneShot: true, Backends: []host.Backend{durableBackend(m)}})
	res, err := next.Exec(ctx, "agent", "get", []string{"k"}, vm.ExecOptions{})
	if err != nil || string(res.Stdout) != "v\n" {
		t.Fatalf("exec through a second Host: %q, %v", res.Stdout, err)
	}
	if _, err := next.CreateVM(ctx, host.VMSpec{Name: "agent"}); !errors.Is(err, vm.ErrAlreadyExists) {
		t.Fatalf("second create of one name: %v", err)
	}
}

func TestUnknownBackendAndBadNames(t *testing.T) {
	ctx := context.Background()
	h := openHost(t, t.TempDir(), host.Options{})
	if _, err := h.CreateVM(ctx, host.VMSpec{Name: "a", Backend: "hyperv"}); !errors.Is(err, host.ErrUnknownBackend) || !strings.Contains(err.Error(), "sim") {
		t.Fatalf("unknown backend: %v", err)
	}
	for _, name := range []string{"", "../x", "a/b", ".x"} {
		if _, err := h.CreateVM(ctx, host.VMSpec{Name: name}); !errors.Is(err, vm.ErrInvalidConfig) {
			t.Errorf("CreateVM(%q) = %v", name, err)
		}
		if _, err := h.Exec(ctx, name, "get", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrInvalidConfig) {
			t.Errorf("Exec(%q) = %v", name, err)
		}
	}
	if _, err := h.Exec(ctx, "nope", "get", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("exec on a missing VM: %v", err)
	}
}

func TestHostIDIsStable(t *testing.T) {
	home := t.TempDir()
	a := openHost(t, home, host.Options{})
	b := openHost(t, home, host.Options{})
	c := openHost(t, t.TempDir(), host.Options{})
	if a.ID() == "" || a.ID() != b.ID() || a.ID() == c.ID() {
		t.Fatalf("host ids %q %q %q", a.ID(), b.ID(), c.ID())
	}
	if got := openHost(t, home, host.Options{HostID: "pinned"}).ID(); got != "pinned" {
		t.Fatalf("HostID option ignored: %q", got)
	}
}

// Suspend writes its record before it touches the VM, atomically, so a
// crash at any step leaves a record `vm resume` can act on. Each crash
// point is played by leaving the state a crash there would leave.
func TestResumeAfterACrashedSuspend(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	m := &machine{vms: map[string]vm.Instance{}}
	opts := host.Options{OneShot: true, Backends: []host.Backend{durableBackend(m)}}
	h := openHost(t, home, opts)
	h.CreateVM(ctx, host.VMSpec{Name: "agent"})
	h.Exec(ctx, "agent", "set", []string{"k", "v"}, vm.ExecOptions{})

	// Crash after the record, before the package: the VM is paused.
	if err := h.PauseVM(ctx, "agent"); err != nil {
		t.Fatal(err)
	}
	rec := map[string]any{"name": "agent", "state": "suspending", "backend": "sim", "package_id": "suspend-agent-0",
		"store": filepath.Join(home, "packages"), "config": map[string]any{"VCPUs": 1, "MemoryMiB": 256}}
	b, _ := json.Marshal(rec)
	os.MkdirAll(filepath.Join(home, "suspended"), 0o755)
	if err := os.WriteFile(filepath.Join(home, "suspended", "agent.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	info, err := h.VM(ctx, "agent")
	if err != nil || info.State != "suspending" {
		t.Fatalf("an unfinished suspend lists as %+v, %v", info, err)
	}
	if _, err := h.ResumeVM(ctx, "agent"); err != nil {
		t.Fatalf("resume after a crashed suspend: %v", err)
	}
	if res, err := h.Exec(ctx, "agent", "get", []string{"k"}, vm.ExecOptions{}); err != nil || string(res.Stdout) != "v\n" {
		t.Fatalf("after resume: %q %v", res.Stdout, err)
	}
	if _, err := os.Stat(filepath.Join(home, "suspended", "agent.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record left: %v", err)
	}

	// A whole suspend, then a crash that leaves the record "suspending"
	// with the package committed and the VM gone: resume restores it.
	pkg, err := h.SuspendVM(ctx, "agent", "")
	if err != nil {
		t.Fatal(err)
	}
	rec["package_id"] = pkg.ID
	b, _ = json.Marshal(rec)
	os.WriteFile(filepath.Join(home, "suspended", "agent.json"), b, 0o644)
	if _, err := h.ResumeVM(ctx, "agent"); err != nil {
		t.Fatalf("resume from the package of a half-recorded suspend: %v", err)
	}
	if res, _ := h.Exec(ctx, "agent", "get", []string{"k"}, vm.ExecOptions{}); string(res.Stdout) != "v\n" {
		t.Fatalf("restored guest: %q", res.Stdout)
	}
	if l, _ := h.Packages(ctx, ""); len(l) != 0 {
		t.Fatalf("the suspend package stays after resume: %v", l[0].ID)
	}
}

// A failed suspend leaves the VM running and no record.
func TestFailedSuspendLeavesNoRecord(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	h := openHost(t, home, host.Options{OpenStore: func(ctx context.Context, url string) (teleport.Store, error) {
		return nil, fmt.Errorf("store %s is down: %w", url, teleport.ErrStore)
	}})
	h.CreateVM(ctx, host.VMSpec{Name: "agent"})
	if _, err := h.SuspendVM(ctx, "agent", ""); !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("SuspendVM = %v", err)
	}
	info, err := h.VM(ctx, "agent")
	if err != nil || info.State != "running" {
		t.Fatalf("after a failed suspend: %+v %v", info, err)
	}
}

// notReady is a sim VM whose guest never answers after a restore.
type notReady struct{ vm.Instance }

func (notReady) WaitReady(ctx context.Context) error {
	return fmt.Errorf("guest agent: no answer: %w", vm.ErrTimeout)
}

type notReadyFactory struct {
	*sim.Factory
	made *[]vm.Instance
}

func (f notReadyFactory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	inst, err := f.Factory.CreateFromSnapshot(ctx, cfg, snap)
	if err != nil {
		return nil, err
	}
	*f.made = append(*f.made, inst)
	return notReady{inst}, nil
}

// A restore whose guest does not become ready fails, and the VM it made
// is removed, not left running unreported.
func TestTeleportInRemovesAGuestThatIsNotReady(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	store := filepath.Join(dir, "packages")
	a := openHost(t, filepath.Join(dir, "a"), host.Options{})
	a.CreateVM(ctx, host.VMSpec{Name: "agent"})
	out, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	var made []vm.Instance
	b := openHost(t, filepath.Join(dir, "b"), host.Options{Backends: []host.Backend{{Name: "sim",
		Open: func(ctx context.Context, env host.BackendEnv) (vm.Factory, error) {
			return notReadyFactory{sim.NewFactory(sim.Options{HostID: env.HostID, BaseImageVersion: image.Version()}), &made}, nil
		}}}})
	_, err = b.TeleportIn(ctx, out.Package.ID, host.InRequest{Store: store, Name: "agent"})
	if !errors.Is(err, vm.ErrTimeout) || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("TeleportIn = %v, want a readiness failure", err)
	}
	if len(made) != 1 || made[0].State() != vm.StateStopped {
		t.Fatalf("the unready VM was not removed: %v", made)
	}
	if vms, _ := b.VMs(ctx); len(vms) != 0 {
		t.Fatalf("host b lists %v", vms)
	}
	// The package is intact: the agent can come in elsewhere.
	c := openHost(t, filepath.Join(dir, "c"), host.Options{})
	if _, err := c.TeleportIn(ctx, out.Package.ID, host.InRequest{Store: store, Name: "agent"}); err != nil {
		t.Fatal(err)
	}
}

// package verify counts what it verified; a damaged section fails it.
func TestVerifyPackage(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	h := openHost(t, home, host.Options{})
	h.CreateVM(ctx, host.VMSpec{Name: "agent"})
	out, err := h.TeleportOut(ctx, "agent", host.OutRequest{KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	v, err := h.VerifyPackage(ctx, "", out.Package.ID)
	if err != nil || !v.OK || v.SectionsVerified != 2 || v.Sections[0] != teleport.SectionBlob || v.Sections[1] != "chunks" {
		t.Fatalf("verify: %+v %v", v, err)
	}
	// A damaged chunk fails it too, naming the chunk.
	packs, _ := filepath.Glob(filepath.Join(home, "packages", "chunks", "packs", "*.pack"))
	if len(packs) == 0 {
		t.Fatal("no chunk packs in the store")
	}
	for _, p := range packs {
		pb, _ := os.ReadFile(p)
		orig := bytes.Clone(pb)
		for i := 10; i < len(pb); i += 512 {
			pb[i] ^= 1
		}
		os.WriteFile(p, pb, 0o644)
		v, err = h.VerifyPackage(ctx, "", out.Package.ID)
		os.WriteFile(p, orig, 0o644)
		if !errors.Is(err, teleport.ErrChecksumMismatch) || v.OK || !strings.Contains(err.Error(), "chunk ") {
			t.Fatalf("verify of a package with a damaged chunk: %+v %v", v, err)
		}
	}
	blobPath := filepath.Join(home, "packages", "packages", out.Package.ID, "blob")
	b, err := os.ReadFile(blobPath)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-100] ^= 1
	os.WriteFile(blobPath, b, 0o644)
	v, err = h.VerifyPackage(ctx, "", out.Package.ID)
	if !errors.Is(err, teleport.ErrChecksumMismatch) || v == nil || v.OK || v.Error == "" {
		t.Fatalf("verify of a damaged package: %+v %v", v, err)
	}
}
