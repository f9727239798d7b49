package host_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// stuckHypervisor fails Stop and Destroy while stuck is set: a hypervisor
// that will not go away.
type stuckHypervisor struct{ stuck atomic.Bool }

func (s *stuckHypervisor) Inject(point, _ string) error {
	if s.stuck.Load() && (point == vm.OpStop || point == sim.OpDestroy) {
		return errors.New("the hypervisor will not go away")
	}
	return nil
}

// A committed move whose source cannot be removed leaves it here, paused,
// and marked: it refuses to run or to be sent again, so the agent cannot
// run twice (here and wherever the package is restored); `vm rm` clears
// it once the hypervisor goes.
func TestMovedSourceThatWillNotGoRefusesToRun(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	store := filepath.Join(dir, "packages")
	faults := &stuckHypervisor{}
	a := openHost(t, filepath.Join(dir, "a"), host.Options{Backends: []host.Backend{{Name: "sim",
		Open: func(ctx context.Context, env host.BackendEnv) (vm.Factory, error) {
			return sim.NewFactory(sim.Options{HostID: env.HostID, BaseImageVersion: image.Version(), Faults: faults}), nil
		}}}})
	if _, err := a.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	faults.stuck.Store(true)
	out, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store})
	if err != nil {
		t.Fatalf("TeleportOut = %v, want the commit with a warning", err)
	}
	if out.SourceRemoved || !strings.Contains(out.Warning, "refuses to run") {
		t.Fatalf("result %+v: want the source kept, with a warning saying it refuses to run", out)
	}
	info, err := a.VM(ctx, "agent")
	if err != nil || info.MovedTo != out.Package.ID || info.State != vm.StatePaused.String() {
		t.Fatalf("VM = %+v, %v: want it paused, moved to %s", info, err, out.Package.ID)
	}
	refusals := map[string]func() error{
		"resume": func() error { _, err := a.ResumeVM(ctx, "agent"); return err },
		"start":  func() error { return a.StartVM(ctx, "agent") },
		"teleport out": func() error {
			_, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store, KeepSource: true})
			return err
		},
		"suspend": func() error { _, err := a.SuspendVM(ctx, "agent", store); return err },
		"fork":    func() error { _, err := a.ForkVM(ctx, "agent", host.ForkRequest{Count: 1}); return err },
	}
	for what, f := range refusals {
		err := f()
		if !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), out.Package.ID) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s of the moved-out source: %v, want one line naming package %s", what, err, out.Package.ID)
		}
	}
	if info, _ := a.VM(ctx, "agent"); info.State != vm.StatePaused.String() {
		t.Fatalf("the source is %s after the refusals", info.State)
	}
	// The package restores elsewhere: the agent runs there, once.
	b := openHost(t, filepath.Join(dir, "b"), host.Options{})
	if _, err := b.TeleportIn(ctx, out.Package.ID, host.InRequest{Store: store, Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RemoveVM(ctx, "agent"); err == nil {
		t.Fatal("RemoveVM succeeded while the hypervisor will not go")
	}
	faults.stuck.Store(false)
	if _, err := a.RemoveVM(ctx, "agent"); err != nil {
		t.Fatal(err)
	}
	// The name is free again, and a new VM of it runs.
	if _, err := a.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	if err := a.PauseVM(ctx, "agent"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ResumeVM(ctx, "agent"); err != nil {
		t.Fatalf("a new VM of the name: %v", err)
	}
}

// A move's record is written before its commit, so a process that died
// between the commit and removing its source leaves a record behind: the
// next command asks the store. A committed package keeps the VM from
// running; a package that never committed gives the VM back.
func TestMoveRecordOfADeadProcess(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	home, store := filepath.Join(dir, "a"), filepath.Join(dir, "packages")
	a := openHost(t, home, host.Options{})
	if _, err := a.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	// A committed package of the agent (a copy stands in for the move
	// whose process died), and a process that is gone.
	out, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store, KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.PauseVM(ctx, "agent"); err != nil {
		t.Fatal(err)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	record := func(pkg string) {
		t.Helper()
		b, _ := json.Marshal(map[string]any{"name": "agent", "package_id": pkg, "store": store, "at": time.Now(), "pid": dead.Process.Pid})
		if err := os.MkdirAll(filepath.Join(home, "moved"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(home, "moved", "agent.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	record(out.Package.ID)
	if _, err := a.ResumeVM(ctx, "agent"); !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), out.Package.ID) {
		t.Fatalf("resume after a committed move: %v, want a refusal naming %s", err, out.Package.ID)
	}
	// A record of a commit that never happened is dropped.
	record("agent-never-committed")
	if _, err := a.ResumeVM(ctx, "agent"); err != nil {
		t.Fatalf("resume after a move that never committed: %v", err)
	}
	if info, _ := a.VM(ctx, "agent"); info.MovedTo != "" || info.State != vm.StateRunning.String() {
		t.Fatalf("VM after the dropped record: %+v", info)
	}
}
