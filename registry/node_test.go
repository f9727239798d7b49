package registry_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
)

// machine is a host for protocol unit tests: VMs are states in a map,
// packages names in a store shared by the hosts of a test. The protocol
// runs against a real embedded etcd member.
type machine struct {
	mu     sync.Mutex
	vms    map[string]registry.VMState
	store  *pkgStore
	failAt string // "send", "send-unknown", "restore": fail there once
	// onPaused runs in Send once the source is paused, before the fence.
	onPaused func()
}

type pkgStore struct {
	mu   sync.Mutex
	pkgs map[string]bool
}

func newMachine(st *pkgStore) *machine {
	return &machine{vms: map[string]registry.VMState{}, store: st}
}

func (m *machine) fail(at string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failAt == at {
		m.failAt = ""
		return true
	}
	return false
}

func (m *machine) set(name string, s registry.VMState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s == registry.VMAbsent {
		delete(m.vms, name)
		return
	}
	m.vms[name] = s
}

func (m *machine) get(name string) registry.VMState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vms[name]
}

func (m *machine) Send(ctx context.Context, name string, req registry.SendRequest) (registry.Outcome, error) {
	if m.get(name) != registry.VMRunning {
		return registry.NotCommitted, errors.New("not running")
	}
	m.set(name, registry.VMPaused)
	if m.onPaused != nil {
		m.onPaused()
	}
	if m.fail("send") {
		if err := req.Fence(ctx, "resume-source"); err != nil {
			return registry.NotCommitted, err
		}
		m.set(name, registry.VMRunning)
		return registry.NotCommitted, errors.New("upload failed")
	}
	if err := req.Fence(ctx, "commit"); err != nil {
		return registry.NotCommitted, err
	}
	m.store.mu.Lock()
	m.store.pkgs[req.Package] = true
	m.store.mu.Unlock()
	if m.fail("send-unknown") {
		return registry.Unknown, errors.New("commit answer lost")
	}
	m.set(name, registry.VMStopped)
	return registry.Committed, nil
}

func (m *machine) Restore(ctx context.Context, name string, req registry.RestoreRequest) error {
	m.store.mu.Lock()
	ok := m.store.pkgs[req.Package]
	m.store.mu.Unlock()
	if !ok {
		return fmt.Errorf("no package %s", req.Package)
	}
	if m.get(name) != registry.VMAbsent {
		return fmt.Errorf("vm %s exists", name)
	}
	m.set(name, registry.VMPaused)
	if m.fail("restore") {
		m.set(name, registry.VMAbsent)
		return errors.New("restore failed")
	}
	if err := req.Fence(ctx); err != nil {
		m.set(name, registry.VMAbsent)
		return err
	}
	m.set(name, registry.VMRunning)
	return nil
}

func (m *machine) VMState(ctx context.Context, name string) (registry.VMState, error) {
	return m.get(name), nil
}
func (m *machine) Resume(ctx context.Context, name string) error {
	m.set(name, registry.VMRunning)
	return nil
}
func (m *machine) Destroy(ctx context.Context, name string) error {
	m.set(name, registry.VMAbsent)
	return nil
}
func (m *machine) Committed(ctx context.Context, store, pkg string) (bool, error) {
	m.store.mu.Lock()
	defer m.store.mu.Unlock()
	return m.store.pkgs[pkg], nil
}

type fleet struct {
	url   string
	store *pkgStore
	ids   int
	mu    sync.Mutex
}

func newFleet(t *testing.T) *fleet {
	return &fleet{url: registrytest.Member(t).URL(), store: &pkgStore{pkgs: map[string]bool{}}}
}

func (f *fleet) node(t *testing.T, id string) (*registry.Node, *machine) {
	t.Helper()
	r, err := registry.Open(f.url, registry.Options{Prefix: "/" + t.Name() + "/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	s, err := r.Register(context.Background(), registry.Host{ID: id}, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m := newMachine(f.store)
	return &registry.Node{Reg: r, Session: s, Host: m, Now: time.Now, NewID: func(p string) string {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.ids++
		return fmt.Sprintf("%s-%d", p, f.ids)
	}}, m
}

func boot(m *machine, name string) func(context.Context) error {
	return func(context.Context) error { m.set(name, registry.VMRunning); return nil }
}

func TestMoveEpochs(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	b, mb := f.node(t, "host-b")
	var steps []string
	a.OnStep = func(_ context.Context, _, s string) { steps = append(steps, "a:"+s) }
	b.OnStep = func(_ context.Context, _, s string) { steps = append(steps, "b:"+s) }
	rec, err := a.Create(ctx, "x", 256, boot(ma, "x"))
	if err != nil || rec.State != registry.StateRunning || rec.Epoch != 1 || rec.Owner != "host-a" {
		t.Fatalf("create: %+v %v", rec, err)
	}
	got, err := a.Move(ctx, "x", "/store", "host-b", b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != "host-b" || got.State != registry.StateRunning || got.Epoch != 3 {
		t.Fatalf("after the move: %+v, want running on host-b at epoch 3", got)
	}
	if ma.get("x") != registry.VMAbsent || mb.get("x") != registry.VMRunning {
		t.Fatalf("vms: a %q b %q", ma.get("x"), mb.get("x"))
	}
	want := "a:moving a:committed a:in-flight a:destroyed b:claimed b:restored b:running"
	if strings.Join(steps, " ") != want {
		t.Fatalf("steps %v, want %s", steps, want)
	}
	// The package stays claimed: a second claim of it is refused, naming
	// where the agent runs.
	c, mc := f.node(t, "host-c")
	_, err = c.Claim(ctx, "x", "pkg-x-1")
	if !errors.Is(err, registry.ErrRunsElsewhere) || !strings.Contains(err.Error(), "host-b") || mc.get("x") != registry.VMAbsent {
		t.Fatalf("second claim: %v (vm %q), want refused naming host-b", err, mc.get("x"))
	}
}

func TestSendFailureRollsBack(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	b, _ := f.node(t, "host-b")
	a.Create(ctx, "x", 0, boot(ma, "x"))
	ma.failAt = "send"
	if _, err := a.Move(ctx, "x", "/store", "host-b", b); err == nil {
		t.Fatal("move with a failing upload succeeded")
	}
	rec, _ := a.Reg.Agent(ctx, "x")
	if rec.State != registry.StateRunning || rec.Owner != "host-a" || rec.Epoch != 1 || ma.get("x") != registry.VMRunning {
		t.Fatalf("after a failed send: %+v vm %q, want running on host-a at epoch 1", rec, ma.get("x"))
	}
}

func TestRestoreFailureClaimsBack(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	b, mb := f.node(t, "host-b")
	a.Create(ctx, "x", 0, boot(ma, "x"))
	mb.failAt = "restore"
	got, err := a.Move(ctx, "x", "/store", "host-b", b)
	if err == nil || got == nil || got.Owner != "host-a" || got.State != registry.StateRunning || ma.get("x") != registry.VMRunning || mb.get("x") != registry.VMAbsent {
		t.Fatalf("move whose restore fails: %+v %v (a %q b %q); want it back on host-a", got, err, ma.get("x"), mb.get("x"))
	}
	// in-flight (2), claimed by b (3), back in flight (4), claimed by a (5).
	if got.Epoch != 5 {
		t.Fatalf("epoch %d, want 5", got.Epoch)
	}
}

func TestStaleLeaseRefused(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	a.Create(ctx, "x", 0, boot(ma, "x"))
	if _, err := a.Pause(ctx, "x", func(context.Context) error { ma.set("x", registry.VMPaused); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := registry.StopKeepAlive(ctx, a.Reg, a.Session); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Resume(ctx, "x"); !errors.Is(err, registry.ErrLeaseLost) {
		t.Fatalf("resume on an expired lease: %v, want ErrLeaseLost", err)
	}
	if ma.get("x") != registry.VMPaused {
		t.Fatalf("the stale host resumed its VM: %q", ma.get("x"))
	}
	if _, err := a.Send(ctx, "x", "/store", "", 0); err == nil {
		t.Fatal("a send on an expired lease started")
	}
}

// A fence that fails before the commit leaves the source paused and
// nothing committed.
func TestFenceBeforeCommit(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	a.Create(ctx, "x", 0, boot(ma, "x"))
	// The same host id registers again elsewhere while the send runs:
	// this node's lease is taken over between the pause and the commit.
	ma.onPaused = func() { f.node(t, "host-a") }
	_, err := a.Send(ctx, "x", "/store", "", 0)
	if !errors.Is(err, registry.ErrLeaseLost) || !strings.Contains(err.Error(), "fence before commit") {
		t.Fatalf("send after a take-over: %v, want ErrLeaseLost from the fence before the commit", err)
	}
	if ma.get("x") != registry.VMPaused || len(f.store.pkgs) != 0 {
		t.Fatalf("vm %q, packages %v", ma.get("x"), f.store.pkgs)
	}
}

func TestReconcile(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	b, mb := f.node(t, "host-b")
	for _, n := range []string{"committed", "uncommitted", "claimdead", "claimpaused", "creating"} {
		a.Create(ctx, n, 0, boot(ma, n))
	}
	set := func(n *registry.Node, name string, f func(*registry.Agent)) {
		cur, err := n.Reg.Agent(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		next := *cur
		f(&next)
		if _, err := n.Reg.Update(ctx, n.Session, cur, next); err != nil {
			t.Fatal(err)
		}
	}
	// A source killed after its commit, one killed before it.
	set(a, "committed", func(r *registry.Agent) { r.State, r.Package = registry.StateMoving, "p1" })
	f.store.pkgs["p1"] = true
	ma.set("committed", registry.VMStopped)
	set(a, "uncommitted", func(r *registry.Agent) { r.State, r.Package = registry.StateMoving, "p2" })
	ma.set("uncommitted", registry.VMPaused)
	// Targets killed mid-claim: before the restore, and after it.
	for _, n := range []string{"claimdead", "claimpaused"} {
		set(a, n, func(r *registry.Agent) { r.State, r.Package, r.Owner, r.Epoch = registry.StateInFlight, "p-"+n, "", 2 })
		f.store.pkgs["p-"+n] = true
		ma.set(n, registry.VMAbsent)
		set(b, n, func(r *registry.Agent) { r.State, r.Owner, r.Epoch = registry.StateClaiming, "host-b", 3 })
	}
	mb.set("claimpaused", registry.VMPaused)
	set(a, "creating", func(r *registry.Agent) { r.State = registry.StateCreating })
	ma.set("creating", registry.VMAbsent)

	ra, err := a.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range append(ra, rb...) {
		if r.Err != "" {
			t.Errorf("repair %+v", r)
		}
	}
	want := map[string]struct {
		state registry.State
		owner string
		vmA   registry.VMState
		vmB   registry.VMState
	}{
		"committed":   {registry.StateInFlight, "", registry.VMAbsent, registry.VMAbsent},
		"uncommitted": {registry.StateRunning, "host-a", registry.VMRunning, registry.VMAbsent},
		"claimdead":   {registry.StateInFlight, "", registry.VMAbsent, registry.VMAbsent},
		"claimpaused": {registry.StateRunning, "host-b", registry.VMAbsent, registry.VMRunning},
	}
	for name, w := range want {
		got, err := a.Reg.Agent(ctx, name)
		if err != nil || got.State != w.state || got.Owner != w.owner || ma.get(name) != w.vmA || mb.get(name) != w.vmB {
			t.Errorf("%s: %+v %v, vm a %q b %q; want %+v", name, got, err, ma.get(name), mb.get(name), w)
		}
	}
	if _, err := a.Reg.Agent(ctx, "creating"); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("an unfinished create with no VM must be removed: %v", err)
	}
	// The claim that died before its restore is claimable again, once.
	if got, err := a.Claim(ctx, "claimdead", ""); err != nil || got.Owner != "host-a" || ma.get("claimdead") != registry.VMRunning {
		t.Fatalf("claim after reconcile: %+v %v", got, err)
	}
	if _, err := b.Claim(ctx, "claimdead", ""); !errors.Is(err, registry.ErrRunsElsewhere) {
		t.Fatalf("second claim: %v", err)
	}
}

// A claim whose claimer died (its lease gone) is taken over by another
// host; the dead claimer can no longer make it run.
func TestClaimTakeOverFromDeadHost(t *testing.T) {
	ctx := context.Background()
	f := newFleet(t)
	a, ma := f.node(t, "host-a")
	b, mb := f.node(t, "host-b")
	a.Create(ctx, "x", 0, boot(ma, "x"))
	inflight, err := a.Send(ctx, "x", "/store", "host-b", 0)
	if err != nil {
		t.Fatal(err)
	}
	// b claims and then its lease runs out before it resumes the VM.
	cur, _ := b.Reg.Agent(ctx, "x")
	next := *cur
	next.State, next.Owner, next.Epoch = registry.StateClaiming, "host-b", cur.Epoch+1
	claim, err := b.Reg.Update(ctx, b.Session, cur, next)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.StopKeepAlive(ctx, b.Reg, b.Session); err != nil {
		t.Fatal(err)
	}
	got, err := a.Claim(ctx, "x", inflight.Package)
	if err != nil || got.Owner != "host-a" {
		t.Fatalf("take-over claim: %+v %v", got, err)
	}
	after := *claim
	after.State = registry.StateRunning
	if _, err := b.Reg.Update(ctx, b.Session, claim, after); err == nil {
		t.Fatal("the dead claimer's CAS to running succeeded")
	}
	if mb.get("x") != registry.VMAbsent {
		t.Fatal("b has a VM")
	}
}
