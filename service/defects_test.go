package service_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/mem"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// bufRestorer stages a workspace in memory and "restores" it by keeping it.
type bufRestorer struct {
	staged   bytes.Buffer
	restored string
	called   bool
}

func (b *bufRestorer) Stage(r io.Reader) error {
	_, err := io.Copy(&b.staged, r)
	return err
}

func (b *bufRestorer) Restore(ctx context.Context, inst vm.Instance) error {
	b.called, b.restored = true, b.staged.String()
	return nil
}

// faults fails the named fault points of a sim VM with the given errors.
type faults map[string]error

func (f faults) Inject(point, vmID string) error { return f[point] }

// A failed Out whose rollback resume fails too says so: the source is
// paused, and the error names it. (The snapshot-failure path used to drop
// the resume error: the source stayed paused with an error that did not
// mention it.)
func TestOutRollbackFailureIsReported(t *testing.T) {
	ctx := context.Background()
	fl := faults{}
	a := newHost(mem.New(), sim.Options{HostID: "a", Faults: fl})
	src := running(t, a, map[string]string{"k": "v"})
	fl[vm.OpSnapshot] = fmt.Errorf("snapshot broke: %w", vm.ErrCrashed)
	fl[vm.OpResume] = errors.New("resume broke")
	_, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if !errors.Is(err, service.ErrSourcePaused) || !strings.Contains(err.Error(), src.ID()) || !strings.Contains(err.Error(), "resume broke") {
		t.Fatalf("Out = %v, want ErrSourcePaused naming the source %s and the resume error", err, src.ID())
	}
	if !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("Out = %v lost the snapshot failure's category", err)
	}
	if src.State() != vm.StatePaused {
		t.Fatalf("source %s", src.State())
	}
}

// Categories survive the service's wrapping: callers (and the DST) tell a
// crashed or timed-out hypervisor apart from everything else.
func TestOutErrorsKeepTheirCategory(t *testing.T) {
	for _, c := range []struct {
		point string
		cause error
		keep  bool
		also  error
	}{
		{vm.OpPause, vm.ErrTimeout, false, nil},
		{vm.OpSnapshot, vm.ErrCrashed, false, nil},
		// A copy's capture is the backend's: its failure keeps its category.
		{vm.OpSnapshot, vm.ErrCrashed, true, nil},
		{vm.OpStop, vm.ErrTimeout, false, service.ErrSourceNotSettled},
	} {
		t.Run(c.point, func(t *testing.T) {
			ctx := context.Background()
			fl := faults{}
			a := newHost(mem.New(), sim.Options{HostID: "a", Faults: fl})
			src := running(t, a, nil)
			fl[c.point] = fmt.Errorf("injected: %w", c.cause)
			_, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport, KeepSource: c.keep})
			if !errors.Is(err, c.cause) || (c.also != nil && !errors.Is(err, c.also)) {
				t.Fatalf("Out = %v, want it to match %v and %v", err, c.cause, c.also)
			}
		})
	}
}

// hangingResume blocks Resume until its context ends.
type hangingResume struct{ vm.Instance }

func (h hangingResume) Resume(ctx context.Context) error {
	<-ctx.Done()
	return ctx.Err()
}

// The rollback of a failed Out runs after the caller's context ended, but
// not forever: it has a deadline of its own.
func TestRollbackHasADeadline(t *testing.T) {
	f := sim.NewFactory(sim.Options{HostID: "a"})
	svc := service.New(&faultyStore{Store: mem.New(), failCommit: true}, f, service.WithSettleTimeout(50*time.Millisecond))
	src := running(t, &host{f: f, svc: svc}, nil)
	done := make(chan error, 1)
	go func() {
		_, err := svc.Out(context.Background(), hangingResume{src}, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, service.ErrSourcePaused) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Out = %v, want ErrSourcePaused after the settle deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the rollback of a failed Out hangs on a resume that never returns")
	}
}

// gatedStore holds the commit of its first writer until released, so two
// uploads of one package id can be made to race.
type gatedStore struct {
	teleport.Store
	mu      sync.Mutex
	n       int
	arrived chan struct{}
	release chan struct{}
}

type gatedWriter struct {
	teleport.Writer
	s    *gatedStore
	gate bool
}

func (s *gatedStore) Create(ctx context.Context, id string) (teleport.Writer, error) {
	w, err := s.Store.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	return &gatedWriter{Writer: w, s: s, gate: s.n == 1}, nil
}

func (w *gatedWriter) Commit(ctx context.Context, m *teleport.Package) error {
	if w.gate {
		close(w.s.arrived)
		<-w.s.release
	}
	return w.Writer.Commit(ctx, m)
}

// Two Outs with the same explicit package id: the loser must neither claim
// the winner's package (it would stop its own source: that agent would be
// lost) nor remove anything of it. Only the upload id tells whose package
// the store holds.
func TestSamePackageIDLoserLeavesWinnerAlone(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	gs := &gatedStore{Store: inner, arrived: make(chan struct{}), release: make(chan struct{})}
	a := newHost(gs, sim.Options{HostID: "a"})
	b := newHost(gs, sim.Options{HostID: "b"})
	srcA := running(t, a, map[string]string{"who": "a"})
	srcB := running(t, b, map[string]string{"who": "b"})
	req := func(who string) service.OutRequest {
		return service.OutRequest{AgentID: "agent-" + who, AgentState: []byte(who), Kind: teleport.KindCheckpoint,
			PackageID: "same", Workspace: vm.BytesPayload("workspace of " + who)}
	}
	loser := make(chan error, 1)
	go func() {
		_, err := b.svc.Out(ctx, srcB, req("b"))
		loser <- err
	}()
	<-gs.arrived // b is about to commit
	if _, err := a.svc.Out(ctx, srcA, req("a")); err != nil {
		t.Fatalf("winner: %v", err)
	}
	close(gs.release)
	if err := <-loser; !errors.Is(err, teleport.ErrAlreadyExists) {
		t.Fatalf("loser: %v, want ErrAlreadyExists", err)
	}
	if srcB.State() != vm.StateRunning || guest(srcB)["who"] != "b" {
		t.Fatalf("the loser's source is %s: it took the winner's package for its own", srcB.State())
	}
	got, err := inner.Stat(ctx, "same")
	if err != nil || string(got.AgentState) != "a" {
		t.Fatalf("winner's package: %+v, %v", got, err)
	}
	ws := &bufRestorer{}
	inst, _, err := b.svc.In(ctx, "same", vm.Config{VCPUs: 1, MemoryMiB: 64}, service.InOptions{Workspace: ws})
	if err != nil || ws.restored != "workspace of a" {
		t.Fatalf("winner's workspace after the race: %q, %v", ws.restored, err)
	}
	inst.Destroy(ctx)
}

// stripsChecksum hands out snapshots whose memory checksum is missing.
type stripsChecksum struct{ vm.Instance }

func (s stripsChecksum) Snapshot(ctx context.Context) (*vm.Snapshot, error) {
	snap, err := s.Instance.Snapshot(ctx)
	if err == nil {
		snap.Metadata.MemorySHA256 = ""
	}
	return snap, err
}

// A section without a recorded checksum is refused before the commit:
// every restore would refuse it, so a move would have stopped its source
// for a package that no host can restore.
func TestOutRefusesSectionWithoutChecksum(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	src := running(t, a, map[string]string{"k": "v"})
	_, err := a.svc.Out(ctx, stripsChecksum{src}, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("Out = %v, want ErrCorrupt", err)
	}
	if src.State() != vm.StateRunning {
		t.Fatalf("source %s", src.State())
	}
	if l, _ := store.List(ctx); len(l) != 0 {
		t.Fatalf("package %s committed without its checksum", l[0].ID)
	}
}

// A failed In that cannot remove the VM it made says so, naming it.
func TestInReportsTheVMItCouldNotRemove(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	pkg, err := a.svc.Out(ctx, running(t, a, nil), service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	fl := faults{vm.OpResume: errors.New("resume broke"), sim.OpDestroy: errors.New("destroy broke")}
	b := newHost(store, sim.Options{HostID: "b", Faults: fl})
	_, _, err = b.svc.In(ctx, pkg.ID, vm.Config{Name: "restored"}, service.InOptions{})
	if !errors.Is(err, vm.ErrLeftBehind) || !strings.Contains(err.Error(), "restored") || !strings.Contains(err.Error(), "destroy broke") {
		t.Fatalf("In = %v, want ErrLeftBehind naming VM restored", err)
	}
}

// A Service not made by New refuses to work instead of panicking; one
// made by New with no options has working defaults.
func TestNewDefaults(t *testing.T) {
	ctx := context.Background()
	f := sim.NewFactory(sim.Options{HostID: "a"})
	src := running(t, &host{f: f}, nil)
	if _, err := (&service.Service{}).Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport}); err == nil {
		t.Fatal("a zero Service ran Out")
	}
	if _, _, err := (&service.Service{}).In(ctx, "x", vm.Config{}, service.InOptions{}); err == nil {
		t.Fatal("a zero Service ran In")
	}
	store := mem.New()
	before := time.Now()
	pkg, err := service.New(store, f).Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport, KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(pkg.ID, "pkg-") || pkg.UploadID == "" || pkg.UploadID == pkg.ID || pkg.CreatedAt.Before(before.Add(-time.Second)) {
		t.Fatalf("defaults made package %+v", pkg)
	}
}

// A checkpoint's workspace is a section of its package: committed with
// it, verified against its SHA-256 before the guest sees a byte, and gone
// with the package.
func TestWorkspaceIsASectionOfItsPackage(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	src := running(t, a, nil)
	pkg, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, KeepSource: true,
		Workspace: vm.BytesPayload("the files")})
	if err != nil {
		t.Fatal(err)
	}
	ws, ok := pkg.Section(teleport.SectionWorkspace)
	blobSec, _ := pkg.Section(teleport.SectionBlob)
	if !ok || ws.Size != 9 || ws.Offset != blobSec.Size || ws.Offset+ws.Size != pkg.SizeBytes {
		t.Fatalf("sections %+v of a %d-byte body", pkg.Sections, pkg.SizeBytes)
	}
	restore := func(st teleport.Store) (string, bool, error) {
		ws := &bufRestorer{}
		b := newHost(st, sim.Options{HostID: "b"})
		inst, _, err := b.svc.In(ctx, pkg.ID, vm.Config{VCPUs: 1, MemoryMiB: 64}, service.InOptions{Workspace: ws})
		if inst != nil {
			inst.Destroy(ctx)
		}
		return ws.restored, ws.called, err
	}
	if got, _, err := restore(store); err != nil || got != "the files" {
		t.Fatalf("workspace restored as %q (%v)", got, err)
	}
	// One flipped bit in the workspace: refused before the guest sees it.
	_, called, err := restore(&corruptingStore{Store: store, at: 3})
	if !errors.Is(err, teleport.ErrChecksumMismatch) || called {
		t.Fatalf("corrupt workspace: %v (restorer called: %v), want a checksum refusal before restoring", err, called)
	}
	if err := store.Delete(ctx, pkg.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, err := restore(store); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("after Delete: %v", err)
	}
}

// A checkpoint move whose commit outcome is unknown leaves its source
// paused, as a VM move does: the package may be published, and the agent
// must not run on in two places. (The source used to keep running.)
func TestCheckpointMoveUnknownOutcomeLeavesSourcePaused(t *testing.T) {
	ctx := context.Background()
	fs := &faultyStore{Store: mem.New(), loseAck: true, failStat: true}
	a := newHost(fs, sim.Options{HostID: "a"})
	src := running(t, a, nil)
	_, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, PackageID: "cp"})
	if !errors.Is(err, service.ErrOutcomeUnknown) || src.State() != vm.StatePaused {
		t.Fatalf("Out = %v with the source %s, want ErrOutcomeUnknown and a paused source", err, src.State())
	}
}

// tamperStore changes the body of every package it hands out: at the
// first occurrence of old, new is written instead.
type tamperStore struct {
	teleport.Store
	old, new []byte
}

type tamperReader struct {
	teleport.Reader
	at  int64
	new []byte
}

func (s *tamperStore) Open(ctx context.Context, id string) (teleport.Reader, error) {
	r, err := s.Store.Open(ctx, id)
	if err != nil {
		return nil, err
	}
	body := make([]byte, r.Size())
	r.ReadAt(body, 0)
	return &tamperReader{r, int64(bytes.Index(body, s.old)), s.new}, nil
}

func (r *tamperReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.Reader.ReadAt(p, off)
	for i := range r.new {
		if at := r.at + int64(i) - off; r.at >= 0 && at >= 0 && at < int64(n) {
			p[at] = r.new[i]
		}
	}
	return n, err
}

// The blob's metadata must be the manifest's byte for byte: a changed key
// that JSON would still read the same ("vm_id" as "Vm_id") is refused, not
// restored.
func TestInRefusesMetadataBytesThatDiffer(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	// Version 1: the tampering wrapper hides the store's chunk space.
	pkg, err := a.svc.Out(ctx, running(t, a, nil), service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport, Format: blob.Version1})
	if err != nil {
		t.Fatal(err)
	}
	b := newHost(&tamperStore{Store: store, old: []byte(`"vm_id"`), new: []byte(`"Vm_id"`)}, sim.Options{HostID: "b"})
	inst, _, err := b.svc.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if !errors.Is(err, teleport.ErrChecksumMismatch) || inst != nil {
		t.Fatalf("In of a package whose metadata bytes changed: %v, want a checksum refusal", err)
	}
}

// A checkpoint's agent state is checked against its SHA-256 before it is
// handed out.
func TestInRefusesChangedAgentState(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	pkg, err := a.svc.Out(ctx, nil, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, AgentState: []byte(`{"turn":7}`)})
	if err != nil {
		t.Fatal(err)
	}
	if pkg.AgentStateSHA256 == "" {
		t.Fatal("no agent state checksum in the manifest")
	}
	b := newHost(&statStore{Store: store, mut: func(p *teleport.Package) { p.AgentState = []byte(`{"turn":8}`) }}, sim.Options{HostID: "b"})
	if _, _, err := b.svc.In(ctx, pkg.ID, vm.Config{VCPUs: 1, MemoryMiB: 64}, service.InOptions{}); !errors.Is(err, teleport.ErrChecksumMismatch) {
		t.Fatalf("In with a changed agent state: %v", err)
	}
}

// statStore changes manifests as Stat hands them out.
type statStore struct {
	teleport.Store
	mut func(*teleport.Package)
}

func (s *statStore) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	p, err := s.Store.Stat(ctx, id)
	if err == nil {
		s.mut(p)
	}
	return p, err
}

// A refused restore that also left its VM behind says both.
func TestCorruptRestoreThatLeavesItsVMSaysSo(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	pkg, err := a.svc.Out(ctx, running(t, a, map[string]string{"k": "v"}), service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport, Format: blob.Version1})
	if err != nil {
		t.Fatal(err)
	}
	b := newHost(&corruptingStore{Store: store, at: 5}, sim.Options{HostID: "b", Faults: faults{sim.OpDestroy: errors.New("destroy broke")}})
	_, _, err = b.svc.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if !errors.Is(err, teleport.ErrChecksumMismatch) || !errors.Is(err, vm.ErrLeftBehind) {
		t.Fatalf("In = %v, want a checksum refusal that also matches ErrLeftBehind", err)
	}
}

// A failed upload leaves no goroutine behind (its section's hash used to
// wait forever).
func TestFailedUploadsLeakNoGoroutines(t *testing.T) {
	ctx := context.Background()
	a := newHost(&faultyStore{Store: mem.New(), failCommit: true}, sim.Options{HostID: "a"})
	src := running(t, a, nil)
	a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	before := runtime.NumGoroutine()
	for i := 0; i < 50; i++ {
		a.svc.Out(ctx, stripsChecksum{src}, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
		a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport})
	}
	time.Sleep(50 * time.Millisecond)
	if after := runtime.NumGoroutine(); after > before+5 {
		t.Fatalf("%d goroutines after 100 failed uploads, %d before", after, before)
	}
}
