package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kelpie/teleport/internal/plant"
)

// Machine is what the protocol needs from the host it runs on: production
// adapts a host.Host (package fleet), the simulation its simulated hosts.
// Every method acts on this host only; the VM of an agent is named after
// it.
type Machine interface {
	// Send pauses VM name, snapshots it and commits it as package
	// req.Package in req.Store; on success the source VM is stopped, not
	// removed. It calls req.Fence before the commit and before a failed
	// send resumes its source: a fence that fails stops the send and leaves
	// the source paused.
	Send(ctx context.Context, name string, req SendRequest) (Outcome, error)
	// Restore restores package req.Package from req.Store as VM name and
	// calls req.Fence after the restore and before the VM resumes; if the
	// fence fails the VM is removed and Restore fails.
	Restore(ctx context.Context, name string, req RestoreRequest) error
	// VMState is the state of the local VM name (VMAbsent if none).
	VMState(ctx context.Context, name string) (VMState, error)
	Resume(ctx context.Context, name string) error
	Destroy(ctx context.Context, name string) error
	// Committed says whether package pkg is committed in store.
	Committed(ctx context.Context, store, pkg string) (bool, error)
}

// SendRequest says where Machine.Send commits the agent.
type SendRequest struct {
	Store, Package string
	Fence          func(ctx context.Context, action string) error
	// Format is the package's KLP1 version (0: the host's default).
	Format int
	// Copy keeps the source running: the package is a new agent's (AgentID).
	Copy    bool
	AgentID string
}

// RestoreRequest says what Machine.Restore restores.
type RestoreRequest struct {
	Store, Package string
	Fence          func(ctx context.Context) error
}

// Outcome is what a Send did to its package.
type Outcome int

const (
	NotCommitted Outcome = iota // no package; the source is as it was (or paused, if the error says so)
	Committed                   // the package is in the store; the source is stopped
	Unknown                     // the store could not say; the source is paused
)

// VMState is a local VM's state as the protocol sees it.
type VMState string

const (
	VMAbsent  VMState = ""
	VMRunning VMState = "running"
	VMPaused  VMState = "paused"
	VMStopped VMState = "stopped"
	// VMSuspended: no VM runs; the host keeps it in a suspend package.
	VMSuspended VMState = "suspended"
)

// Node runs the fenced protocol for one host: its registry session, its
// host, its clock and id source.
type Node struct {
	Reg     Registry
	Session Session
	Host    Machine
	// Now and NewID are the clock and the package id source; the
	// simulation passes its own.
	Now   func() time.Time
	NewID func(prefix string) string
	// OnStep, when set, is told each protocol step as it is reached (the
	// simulation traces them; the daemon times them, and its crash tests
	// stop the process there).
	OnStep func(ctx context.Context, agent, step string)
	// SettleTimeout bounds the registry writes that must happen after the
	// caller's context ended (default 30 s).
	SettleTimeout time.Duration

	bugs plant.RegistryBugs
}

func init() {
	plant.SetRegistryBugs = func(n any, b plant.RegistryBugs) { n.(*Node).bugs = b }
}

// The protocol steps reported to OnStep, in move order.
const (
	StepMoving     = "moving"      // the record says the source is sending it
	StepCommitted  = "committed"   // the package is in the store
	StepInFlight   = "in-flight"   // the record names the package at epoch e+1
	StepDestroyed  = "destroyed"   // the source VM is gone
	StepClaimed    = "claimed"     // the target holds the claim
	StepRestored   = "restored"    // the target's VM is restored, not resumed
	StepRunning    = "running"     // the record says the target runs it
	StepRolledBack = "rolled-back" // a move that failed before its commit: the source runs again
)

func (n *Node) self() string { return n.Session.HostID() }

func (n *Node) step(ctx context.Context, agent, s string) {
	if n.OnStep != nil {
		n.OnStep(ctx, agent, s)
	}
}

func (n *Node) now() time.Time { return n.Now().UTC() }

// settle is for registry writes that must happen even after ctx ended.
func (n *Node) settle(ctx context.Context) (context.Context, context.CancelFunc) {
	d := n.SettleTimeout
	if d == 0 {
		d = 30 * time.Second
	}
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}

// own returns name's record if this host owns it in one of states.
func (n *Node) own(ctx context.Context, name string, states ...State) (*Agent, error) {
	a, err := n.Reg.Agent(ctx, name)
	if err != nil {
		return nil, err
	}
	if a.Owner != n.self() {
		return a, fmt.Errorf("agent %s %s, not on this host (%s): %w", name, a.Where(), n.self(), ErrRunsElsewhere)
	}
	for _, s := range states {
		if a.State == s {
			return a, nil
		}
	}
	return a, fmt.Errorf("agent %s is %s: %w", name, a.State, ErrWrongState)
}

// transition is the CAS of a into state s (with the fields set by f).
func (n *Node) transition(ctx context.Context, a *Agent, s State, f func(*Agent)) (*Agent, error) {
	next := *a
	next.State, next.Since, next.Op = s, n.now(), ""
	if f != nil {
		f(&next)
	}
	return n.Reg.Update(ctx, n.Session, a, next)
}

// Create records a new agent owned by this host and boots it with boot;
// the record says running only once boot returned.
func (n *Node) Create(ctx context.Context, name string, memoryMiB int, boot func(ctx context.Context) error) (*Agent, error) {
	a, err := n.Reg.Create(ctx, n.Session, Agent{Name: name, Owner: n.self(), State: StateCreating, Epoch: 1, Since: n.now(), MemoryMiB: memoryMiB})
	if err != nil {
		if errors.Is(err, ErrExists) {
			if cur, gerr := n.Reg.Agent(ctx, name); gerr == nil {
				return nil, fmt.Errorf("agent %s exists: it %s: %w", name, cur.Where(), ErrExists)
			}
		}
		return nil, err
	}
	if err := boot(ctx); err != nil {
		sctx, cancel := n.settle(ctx)
		defer cancel()
		if derr := n.Reg.Delete(sctx, n.Session, a); derr != nil {
			return nil, fmt.Errorf("%w; removing its registry record failed too (%v): the next reconcile removes it", err, derr)
		}
		return nil, err
	}
	return n.transition(ctx, a, StateRunning, nil)
}

// Fork records copies of this host's agent name, running or paused, as
// new agents owned by this host: each record is created (creating) before
// fork, which makes every copy at once, runs, and says running once it
// returned. If a copy's name is taken, nothing is made; if fork fails,
// the copies' records go again.
func (n *Node) Fork(ctx context.Context, name string, copies []string, fork func(ctx context.Context) error) ([]*Agent, error) {
	src, err := n.own(ctx, name, StateRunning, StatePaused)
	if err != nil {
		return nil, err
	}
	made := make([]*Agent, len(copies))
	// Each copy's Create boots the next one's; the last boots them all.
	boot := fork
	for i := len(copies) - 1; i >= 0; i-- {
		i, inner := i, boot
		boot = func(ctx context.Context) error {
			a, err := n.Create(ctx, copies[i], src.MemoryMiB, inner)
			made[i] = a
			return err
		}
	}
	if err := boot(ctx); err != nil {
		return nil, err
	}
	return made, nil
}

// Remove destroys this host's VM of agent name and removes its record. An
// in-flight agent's record is removed from any host (its package stays in
// the store until `package rm`).
func (n *Node) Remove(ctx context.Context, name string) error {
	a, err := n.Reg.Agent(ctx, name)
	if err != nil {
		return err
	}
	if a.State == StateInFlight {
		return n.Reg.Delete(ctx, n.Session, a)
	}
	if a, err = n.own(ctx, name, StateRunning, StatePaused, StateStopped, StateSuspended, StateDeleting); err != nil {
		return err
	}
	if a.State != StateDeleting {
		if a, err = n.transition(ctx, a, StateDeleting, nil); err != nil {
			return err
		}
	}
	if err := n.Host.Destroy(ctx, name); err != nil {
		return fmt.Errorf("agent %s: %w (its record says deleting; rm again to finish)", name, err)
	}
	return n.Reg.Delete(ctx, n.Session, a)
}

// Pause stops the vCPUs of this host's agent, then records it paused.
func (n *Node) Pause(ctx context.Context, name string, pause func(ctx context.Context) error) (*Agent, error) {
	a, err := n.own(ctx, name, StateRunning)
	if err != nil {
		return nil, err
	}
	if err := pause(ctx); err != nil {
		return nil, err
	}
	return n.transition(ctx, a, StatePaused, nil)
}

// Resume records this host's paused agent running (the CAS is the fence),
// then resumes its VM; if the VM will not resume, the record goes back.
func (n *Node) Resume(ctx context.Context, name string) (*Agent, error) {
	a, err := n.own(ctx, name, StatePaused, StateRunning)
	if err != nil {
		return nil, err
	}
	if a.State == StateRunning {
		return a, nil
	}
	b, err := n.transition(ctx, a, StateRunning, nil)
	if err != nil {
		return nil, err
	}
	if err := n.Host.Resume(ctx, name); err != nil {
		sctx, cancel := n.settle(ctx)
		defer cancel()
		if _, berr := n.transition(sctx, b, StatePaused, nil); berr != nil {
			return nil, fmt.Errorf("%w; recording it paused again failed too (%v)", err, berr)
		}
		return nil, err
	}
	return b, nil
}

// Suspend runs suspend (which stores this host's agent in a suspend
// package of this host and returns its id), then records it suspended.
func (n *Node) Suspend(ctx context.Context, name string, suspend func(ctx context.Context) (string, error)) (*Agent, error) {
	a, err := n.own(ctx, name, StateRunning, StatePaused)
	if err != nil {
		return nil, err
	}
	pkg, err := suspend(ctx)
	if err != nil {
		return nil, err
	}
	return n.transition(ctx, a, StateSuspended, func(s *Agent) { s.Package = pkg })
}

// Unsuspend records this host's suspended agent running (the fence), then
// runs resume; if that fails, the record goes back to suspended.
func (n *Node) Unsuspend(ctx context.Context, name string, resume func(ctx context.Context) error) (*Agent, error) {
	a, err := n.own(ctx, name, StateSuspended)
	if err != nil {
		return nil, err
	}
	b, err := n.transition(ctx, a, StateRunning, func(r *Agent) { r.Package = "" })
	if err != nil {
		return nil, err
	}
	if err := resume(ctx); err != nil {
		sctx, cancel := n.settle(ctx)
		defer cancel()
		if _, berr := n.transition(sctx, b, StateSuspended, func(s *Agent) { s.Package = a.Package }); berr != nil {
			return nil, fmt.Errorf("%w; recording it suspended again failed too (%v)", err, berr)
		}
		return nil, err
	}
	return b, nil
}

// Stop records a stopped VM of this host's agent, after stop ran.
func (n *Node) Stop(ctx context.Context, name string, stop func(ctx context.Context) error) (*Agent, error) {
	a, err := n.own(ctx, name, StateRunning, StatePaused)
	if err != nil {
		return nil, err
	}
	if err := stop(ctx); err != nil {
		return nil, err
	}
	return n.transition(ctx, a, StateStopped, nil)
}

// Send moves this host's agent out of it: the record says moving, the host
// commits the package, the record says in flight at epoch e+1, and the
// source VM is destroyed. Before the commit, a failure resumes the source
// and the record says running again. target is recorded for the reader
// ("" for a plain teleport out); format is the package's KLP1 version (0:
// the host's default).
func (n *Node) Send(ctx context.Context, name, store, target string, format int) (*Agent, error) {
	a, err := n.own(ctx, name, StateRunning)
	if err != nil {
		return nil, err
	}
	pkg := n.NewID("pkg-" + name)
	moving, err := n.transition(ctx, a, StateMoving, func(m *Agent) { m.Package, m.Store, m.Target = pkg, store, target })
	if err != nil {
		return nil, err
	}
	n.step(ctx, name, StepMoving)
	fence := func(ctx context.Context, action string) error {
		if err := n.Reg.Check(ctx, n.Session, moving); err != nil {
			return fmt.Errorf("agent %s: fence before %s: %w", name, action, err)
		}
		return nil
	}
	outcome, serr := n.Host.Send(ctx, name, SendRequest{Store: store, Package: pkg, Fence: fence, Format: format})
	sctx, cancel := n.settle(ctx)
	defer cancel()
	switch outcome {
	case Unknown:
		return moving, fmt.Errorf("agent %s: %w; the record stays moving and the source paused until a reconcile asks the store: %w", name, serr, ErrOutcomeUnknown)
	case NotCommitted:
		if st, _ := n.Host.VMState(sctx, name); st != VMRunning {
			// The source could not be resumed: the record stays moving,
			// and a reconcile resumes it.
			return moving, serr
		}
		if _, err := n.transition(sctx, moving, StateRunning, func(m *Agent) { m.Package, m.Store, m.Target = "", "", "" }); err != nil {
			return moving, fmt.Errorf("%w; recording agent %s running again failed (%v): a reconcile does it", serr, name, err)
		}
		n.step(ctx, name, StepRolledBack)
		return nil, serr
	}
	n.step(ctx, name, StepCommitted)
	inflight, err := n.transition(sctx, moving, StateInFlight, func(m *Agent) {
		m.Epoch++
		m.Owner, m.From, m.Target = "", n.self(), target
	})
	if err != nil {
		return moving, fmt.Errorf("agent %s: package %s is committed, but recording it in flight failed (%w); a reconcile does it", name, pkg, err)
	}
	n.step(ctx, name, StepInFlight)
	if err := n.Host.Destroy(sctx, name); err != nil {
		return inflight, fmt.Errorf("agent %s is in flight in %s, but removing the stopped source failed: %w", name, pkg, err)
	}
	n.step(ctx, name, StepDestroyed)
	if serr != nil {
		return inflight, serr
	}
	return inflight, nil
}

// Copy makes a new agent, newName, from a copy of this host's agent name:
// the new record is created moving (so the name is taken before anything
// is written), the host commits the copy with the source kept running,
// and the record says in flight, claimable once. A copy that did not
// commit removes its record. format is as for Send.
func (n *Node) Copy(ctx context.Context, name, newName, store string, format int) (*Agent, error) {
	src, err := n.own(ctx, name, StateRunning, StatePaused)
	if err != nil {
		return nil, err
	}
	pkg := n.NewID("pkg-" + newName)
	rec, err := n.Reg.Create(ctx, n.Session, Agent{Name: newName, Owner: n.self(), State: StateMoving, Epoch: 1, Package: pkg, Store: store,
		Since: n.now(), MemoryMiB: src.MemoryMiB, CopyOf: name})
	if err != nil {
		if errors.Is(err, ErrExists) {
			if cur, gerr := n.Reg.Agent(ctx, newName); gerr == nil {
				return nil, fmt.Errorf("agent %s exists: it %s: %w", newName, cur.Where(), ErrExists)
			}
		}
		return nil, err
	}
	n.step(ctx, newName, StepMoving)
	outcome, serr := n.Host.Send(ctx, name, SendRequest{Store: store, Package: pkg, Copy: true, AgentID: newName, Format: format,
		Fence: func(ctx context.Context, action string) error {
			if err := n.Reg.Check(ctx, n.Session, rec); err != nil {
				return fmt.Errorf("agent %s: fence before %s: %w", newName, action, err)
			}
			return nil
		}})
	sctx, cancel := n.settle(ctx)
	defer cancel()
	switch outcome {
	case Unknown:
		return rec, fmt.Errorf("copy %s of %s: %w; a reconcile asks the store: %w", newName, name, serr, ErrOutcomeUnknown)
	case NotCommitted:
		if err := n.Reg.Delete(sctx, n.Session, rec); err != nil {
			return nil, fmt.Errorf("%w; removing the record of copy %s failed too (%v): a reconcile does it", serr, newName, err)
		}
		return nil, serr
	}
	n.step(ctx, newName, StepCommitted)
	inflight, err := n.transition(sctx, rec, StateInFlight, func(f *Agent) {
		f.Epoch++
		f.Owner, f.From = "", n.self()
	})
	if err != nil {
		return rec, fmt.Errorf("copy %s: package %s is committed, but recording it in flight failed (%w); a reconcile does it", newName, pkg, err)
	}
	n.step(ctx, newName, StepInFlight)
	return inflight, serr
}

// Claim restores agent name on this host from the package its record
// names: the record must be in flight (in pkg, if pkg is not ""), or held
// by a host whose lease is gone. The claim is a CAS to "claiming by this
// host" at epoch e+1; the restored VM resumes only after the CAS to
// running. A restore that fails puts the agent back in flight.
func (n *Node) Claim(ctx context.Context, name, pkg string) (*Agent, error) {
	a, err := n.claimable(ctx, name, pkg)
	if err != nil {
		return nil, err
	}
	claim, err := n.transition(ctx, a, StateClaiming, func(c *Agent) {
		c.Epoch++
		c.Owner, c.Target = n.self(), ""
	})
	if err != nil {
		return nil, err
	}
	n.step(ctx, name, StepClaimed)
	var running *Agent
	rerr := n.Host.Restore(ctx, name, RestoreRequest{Store: claim.Store, Package: claim.Package, Fence: func(ctx context.Context) error {
		n.step(ctx, name, StepRestored)
		r, err := n.transition(ctx, claim, StateRunning, func(r *Agent) { r.Package, r.Store, r.From = "", "", "" })
		if err != nil {
			return fmt.Errorf("agent %s: fence before resume: %w", name, err)
		}
		running = r
		n.step(ctx, name, StepRunning)
		return nil
	}})
	if rerr == nil {
		return running, nil
	}
	// Back in flight, so that another claim can restore it.
	sctx, cancel := n.settle(ctx)
	defer cancel()
	back, cur := claim, claim
	if running != nil {
		cur = running
	}
	if st, _ := n.Host.VMState(sctx, name); st == VMRunning && running != nil {
		// The VM resumed after all: it runs here.
		return running, nil
	}
	if _, err := n.transition(sctx, cur, StateInFlight, func(f *Agent) {
		f.Epoch++
		f.Owner, f.Package, f.Store, f.From = "", back.Package, back.Store, back.From
	}); err != nil {
		return nil, fmt.Errorf("%w; putting agent %s back in flight failed (%v): a reconcile does it", rerr, name, err)
	}
	return nil, rerr
}

// claimable is name's record if this host may claim it.
func (n *Node) claimable(ctx context.Context, name, pkg string) (*Agent, error) {
	a, err := n.Reg.Agent(ctx, name)
	if err != nil {
		return nil, err
	}
	if n.bugs.SkipClaimCheck {
		// The planted bug: restore whatever the record says, in flight
		// or not (the simulation's checkers must catch it).
		if a.Package == "" {
			a.Package, a.Store = pkg, "store"
		}
		return a, nil
	}
	if pkg != "" && a.Package != pkg {
		return nil, fmt.Errorf("agent %s %s; package %s is not its current package: %w", name, a.Where(), pkg, ErrRunsElsewhere)
	}
	switch a.State {
	case StateInFlight:
		return a, nil
	case StateClaiming, StateMoving:
		if a.Owner == n.self() {
			return nil, fmt.Errorf("agent %s is %s on this host: %w", name, a.State, ErrWrongState)
		}
		alive, err := n.alive(ctx, a.Owner)
		if err != nil {
			return nil, err
		}
		if alive {
			return nil, fmt.Errorf("agent %s %s and that host is alive: %w", name, a.Where(), ErrRunsElsewhere)
		}
		if a.State == StateMoving {
			// A source that died mid-move: its package, if committed,
			// holds the agent; if not, only the source can bring it back.
			ok, err := n.Host.Committed(ctx, a.Store, a.Package)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, fmt.Errorf("agent %s %s; its package is not committed, so only that host can resume it: %w", name, a.Where(), ErrRunsElsewhere)
			}
		}
		return a, nil
	}
	return nil, fmt.Errorf("agent %s %s: %w", name, a.Where(), ErrRunsElsewhere)
}

func (n *Node) alive(ctx context.Context, id string) (bool, error) {
	hosts, err := n.Reg.Hosts(ctx)
	if err != nil {
		return false, err
	}
	for _, h := range hosts {
		if h.ID == id {
			return h.Alive, nil
		}
	}
	return false, nil
}

// Claimer restores an in-flight agent on some host: a remote daemon, or a
// Node of this process.
type Claimer interface {
	Claim(ctx context.Context, name, pkg string) (*Agent, error)
}

var _ Claimer = (*Node)(nil)

// Move sends this host's agent to the host behind to: Send, then to.Claim.
// If the target cannot claim it, this host claims it back, so that a
// failed move leaves the agent running here whenever it can.
func (n *Node) Move(ctx context.Context, name, store, target string, to Claimer) (*Agent, error) {
	inflight, err := n.Send(ctx, name, store, target, 0)
	if err != nil {
		return inflight, err
	}
	got, cerr := to.Claim(ctx, name, inflight.Package)
	if cerr == nil {
		return got, nil
	}
	cur, err := n.Reg.Agent(ctx, name)
	if err != nil || cur.State != StateInFlight || cur.Package != inflight.Package {
		return cur, fmt.Errorf("move of %s to %s: %w", name, target, cerr)
	}
	back, err := n.Claim(ctx, name, inflight.Package)
	if err != nil {
		return cur, fmt.Errorf("move of %s to %s: %w; claiming it back here failed too (%v): it is in flight in %s", name, target, cerr, err, inflight.Package)
	}
	return back, fmt.Errorf("move of %s to %s failed (%w); it runs here again, restored from %s", name, target, cerr, inflight.Package)
}

// Repair is what Reconcile did to one agent.
type Repair struct {
	Agent  string `json:"agent"`
	From   State  `json:"from"`
	To     State  `json:"to"` // "" when the record was removed
	Action string `json:"action"`
	Err    string `json:"error,omitempty"`
}

// Reconcile brings every record this host owns in line with its VMs, after
// a crash or restart: a move that never committed is rolled back (the
// source resumed), one that committed has its source destroyed, a claim
// whose VM never resumed goes back in flight, and unfinished creates and
// deletes are finished. It also destroys local VMs of agents the registry
// says are elsewhere (a source whose move another host resolved). Agents
// in only names some agents; nil means all.
func (n *Node) Reconcile(ctx context.Context, only ...string) ([]Repair, error) {
	agents, err := n.Reg.Agents(ctx)
	if err != nil {
		return nil, err
	}
	var out []Repair
	for i := range agents {
		a := &agents[i]
		if len(only) > 0 && !contains(only, a.Name) {
			continue
		}
		r, err := n.reconcile(ctx, a)
		if r.Action == "" && err == nil {
			continue
		}
		if err != nil {
			r.Err = err.Error()
		}
		out = append(out, r)
	}
	return out, nil
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func (n *Node) reconcile(ctx context.Context, a *Agent) (Repair, error) {
	r := Repair{Agent: a.Name, From: a.State, To: a.State}
	to := func(s State, action string, f func(*Agent)) (Repair, error) {
		r.To, r.Action = s, action
		_, err := n.transition(ctx, a, s, f)
		return r, err
	}
	if a.Owner != n.self() {
		if a.From == n.self() && a.State == StateInFlight || a.Owner != "" {
			// A stopped source whose move completed, or one another host
			// resolved: it must never resume here.
			if st, err := n.Host.VMState(ctx, a.Name); err == nil && st != VMAbsent && st != VMRunning {
				r.Action = "destroyed the stale source VM here"
				return r, n.Host.Destroy(ctx, a.Name)
			}
		}
		return r, nil
	}
	st, err := n.Host.VMState(ctx, a.Name)
	if err != nil {
		return r, err
	}
	switch a.State {
	case StateCreating:
		if st == VMRunning {
			return to(StateRunning, "boot had finished", nil)
		}
		if st != VMAbsent {
			if err := n.Host.Destroy(ctx, a.Name); err != nil {
				return r, err
			}
		}
		r.To, r.Action = "", "removed an unfinished create"
		return r, n.Reg.Delete(ctx, n.Session, a)
	case StateDeleting:
		if st != VMAbsent {
			if err := n.Host.Destroy(ctx, a.Name); err != nil {
				return r, err
			}
		}
		r.To, r.Action = "", "finished a delete"
		return r, n.Reg.Delete(ctx, n.Session, a)
	case StateMoving:
		ok, err := n.Host.Committed(ctx, a.Store, a.Package)
		if err != nil {
			return r, fmt.Errorf("move of %s: is package %s committed? %w", a.Name, a.Package, err)
		}
		if ok {
			r, err := to(StateInFlight, "the move had committed: in flight; source destroyed", func(f *Agent) {
				f.Epoch++
				f.Owner, f.From = "", n.self()
			})
			if err != nil {
				return r, err
			}
			if st != VMAbsent && a.CopyOf == "" {
				return r, n.Host.Destroy(ctx, a.Name)
			}
			return r, nil
		}
		clear := func(f *Agent) { f.Package, f.Store, f.Target = "", "", "" }
		if a.CopyOf != "" {
			r.To, r.Action = "", "removed a copy that had not committed"
			return r, n.Reg.Delete(ctx, n.Session, a)
		}
		switch st {
		case VMRunning:
			return to(StateRunning, "the move had not committed; the source runs", clear)
		case VMPaused:
			// Fenced: the CAS back to running comes before the resume.
			r, err := to(StateRunning, "the move had not committed: source resumed", clear)
			if err != nil {
				return r, err
			}
			return r, n.Host.Resume(ctx, a.Name)
		case VMStopped:
			return to(StateStopped, "the move had not committed and its source had stopped", clear)
		}
		return to(StateStopped, "the move had not committed and its source VM is gone", clear)
	case StateClaiming:
		switch st {
		case VMRunning:
			return to(StateRunning, "the restore had finished", func(f *Agent) { f.Package, f.Store, f.From = "", "", "" })
		case VMPaused:
			r, err := to(StateRunning, "the restore had finished: resumed", func(f *Agent) { f.Package, f.Store, f.From = "", "", "" })
			if err != nil {
				return r, err
			}
			return r, n.Host.Resume(ctx, a.Name)
		case VMStopped:
			if err := n.Host.Destroy(ctx, a.Name); err != nil {
				return r, err
			}
		}
		return to(StateInFlight, "the restore had not finished: back in flight", func(f *Agent) {
			f.Epoch++
			f.Owner = ""
		})
	case StateSuspended:
		switch st {
		case VMRunning:
			return to(StateRunning, "its VM runs again", func(r *Agent) { r.Package = "" })
		case VMAbsent, VMStopped:
			return to(StateStopped, "its VM and its suspend record are gone", nil)
		}
	case StateRunning, StatePaused:
		switch st {
		case VMSuspended:
			return to(StateSuspended, "its VM is suspended", nil)
		case VMAbsent, VMStopped:
			return to(StateStopped, "its VM is "+orGone(st), nil)
		case VMRunning:
			if a.State == StatePaused {
				return to(StateRunning, "its VM runs", nil)
			}
		case VMPaused:
			if a.State == StateRunning {
				// The record says running: a resume whose CAS landed and
				// whose VM did not resume yet. Finish it.
				r.Action = "resumed its VM, as its record says"
				return r, n.Host.Resume(ctx, a.Name)
			}
		}
	}
	return r, nil
}

func orGone(s VMState) string {
	if s == VMAbsent {
		return "gone"
	}
	return string(s)
}
