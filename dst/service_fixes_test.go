package dst

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// Regression tests for the two service bugs the simulation found (see the
// report): each fails on the service as it was.

type toggledFaults struct{ m map[StoreOp]StoreOutcome }

func (f *toggledFaults) StoreFault(op StoreOp, id string, n int64) StoreOutcome { return f.m[op] }

func newTestService(st teleport.Store, id string) (*sim.Factory, *service.Service) {
	f := sim.NewFactory(sim.Options{HostID: id, MemoryBytes: simMemoryBytes})
	n := 0
	return f, service.New(st, f, service.WithClock(NewClock()), service.WithIDs(func() string { n++; return fmt.Sprintf("%s-p%d", id, n) }))
}

func runningVM(t *testing.T, f *sim.Factory) vm.Instance {
	t.Helper()
	ctx := context.Background()
	inst, err := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
	if err != nil {
		t.Fatal(err)
	}
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := inst.Exec(ctx, "set", []string{"k", "v"}, vm.ExecOptions{}); err != nil {
		t.Fatal(err)
	}
	return inst
}

// corruptingVM flips a bit of every snapshot payload after its checksum was
// taken.
type corruptingVM struct{ vm.Instance }

func (c corruptingVM) Snapshot(ctx context.Context) (*vm.Snapshot, error) {
	s, err := c.Instance.Snapshot(ctx)
	if err != nil {
		return nil, err
	}
	s2, _, err := flipPayloadBit(s, 12345)
	return s2, err
}

// A move whose snapshot changed after its checksum was taken must fail
// before the commit, leaving the source running and nothing stored (it
// used to commit the bad package and stop the source: the agent was lost).
func TestOutRefusesPayloadThatFailsItsChecksum(t *testing.T) {
	ctx := context.Background()
	st := NewStore(StoreOptions{})
	f, svc := newTestService(st, "a")
	src := runningVM(t, f)
	_, err := svc.Out(ctx, corruptingVM{src}, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("Out of a corrupted snapshot: %v, want ErrCorrupt", err)
	}
	if src.State() != vm.StateRunning || src.(*sim.VM).GuestState()["k"] != "v" {
		t.Fatalf("source %s after the failed move", src.State())
	}
	if ids := st.Committed(); len(ids) != 0 {
		t.Fatalf("packages committed: %v", ids)
	}
}

// A read that fails is not a checksum mismatch: the package is fine and
// the caller may retry (it used to be refused as corrupt).
func TestInReportsReadFailureAsStoreError(t *testing.T) {
	ctx := context.Background()
	faults := &toggledFaults{m: map[StoreOp]StoreOutcome{}}
	st := NewStore(StoreOptions{Faults: faults})
	fa, a := newTestService(st, "a")
	_, b := newTestService(st, "b")
	pkg, err := a.Out(ctx, runningVM(t, fa), service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	faults.m[StoreOpRead] = Fail
	_, _, err = b.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	var re *teleport.RefusalError
	if err == nil || errors.As(err, &re) || !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("In with failing reads: %v, want a store error that is not a refusal", err)
	}
	delete(faults.m, StoreOpRead)
	inst, _, err := b.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if err != nil || inst.(*sim.VM).GuestState()["k"] != "v" {
		t.Fatalf("retry after the read failure: %v", err)
	}
}

// A bit flipped in the blob's metadata that leaves the snapshot id and
// checksums intact (here the architecture) must be refused as a checksum
// mismatch, not handed to the hypervisor.
func TestInRefusesMetadataThatDiffersFromManifest(t *testing.T) {
	ctx := context.Background()
	st := NewStore(StoreOptions{})
	fa, a := newTestService(st, "a")
	_, b := newTestService(st, "b")
	pkg, err := a.Out(ctx, runningVM(t, fa), service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	obj, _ := st.Peek(pkg.ID)
	at := bytes.Index(obj.Blob, []byte(`"architecture":"x86_64"`))
	if at < 0 {
		t.Fatal("no architecture in the blob's metadata")
	}
	at += len(`"architecture":"x86_6`) // the '4': one bit flip makes it '5'
	if _, err := st.CorruptAtRest(pkg.ID, uint64(at)*8); err != nil {
		t.Fatal(err)
	}
	_, _, err = b.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	var re *teleport.RefusalError
	if !errors.As(err, &re) || !errors.Is(err, teleport.ErrChecksumMismatch) {
		t.Fatalf("In of a package whose metadata changed: %v, want a checksum refusal", err)
	}
}

// When a commit's outcome is unknown (its answer was lost, and Stat does
// not get through), the package may be committed: nothing of it may be
// removed (its workspace once was, breaking the committed package), and
// the move's source stays paused.
func TestUnknownCommitKeepsThePackage(t *testing.T) {
	ctx := context.Background()
	st := NewStore(StoreOptions{Faults: &toggledFaults{m: map[StoreOp]StoreOutcome{StoreOpCommit: AckLost, StoreOpStat: Fail, StoreOpDelete: Fail}}})
	fa, a := newTestService(st, "a")
	src := runningVM(t, fa)
	_, err := a.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, PackageID: "cp",
		Workspace: vm.BytesPayload("files")})
	if !errors.Is(err, service.ErrOutcomeUnknown) {
		t.Fatalf("Out = %v, want ErrOutcomeUnknown", err)
	}
	obj, ok := st.Peek("cp")
	if !ok {
		t.Fatal("test setup: the lost-ack commit did not take effect")
	}
	if !bytes.HasSuffix(obj.Blob, []byte("files")) {
		t.Fatal("the committed package lost its workspace")
	}
}
