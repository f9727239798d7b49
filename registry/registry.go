// Package registry is the agent registry: which host owns each agent, in
// what state, at what epoch, and which hosts are alive. It holds the
// interface (Registry, Session), the etcd implementation (Open, over
// go.etcd.io/etcd/client/v3), an embedded single etcd member (StartMember)
// and the fenced move protocol (Node: Send, Claim, Move, Reconcile) that
// production and the simulation both run.
//
// The registry is the authority on where an agent runs. Every ownership
// change is a compare-and-swap on the record's revision that increments its
// epoch, made under the acting host's lease; every side effect for an
// agent (committing its package, restoring, resuming, destroying the
// source) happens only after the CAS that allows it, or after a fence
// check (Registry.Check) that the record has not moved on. This package
// must never read the wall clock or global randomness in code the
// simulation drives: Node takes a clock and an id source.
package registry

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// State is where an agent is in its life.
type State string

// The agent states. The owner is the host whose record it is: the host that
// runs it, or, for StateMoving and StateClaiming, the host acting on it.
const (
	StateCreating  State = "creating"  // the owner is booting its VM
	StateRunning   State = "running"   // the owner runs it
	StatePaused    State = "paused"    // the owner holds it, vCPUs stopped
	StateSuspended State = "suspended" // a suspend package of the owner's holds it
	StateStopped   State = "stopped"   // the owner's VM is shut down (its memory gone)
	StateMoving    State = "moving"    // the owner is sending it out as Package
	StateInFlight  State = "in-flight" // committed in Package; no host owns it; claimable once
	StateClaiming  State = "claiming"  // the owner claimed Package and is restoring it
	StateDeleting  State = "deleting"  // the owner is removing it
)

// States lists every state, in the order above.
var States = []State{StateCreating, StateRunning, StatePaused, StateSuspended, StateStopped, StateMoving, StateInFlight,
	StateClaiming, StateDeleting}

// Agent is one agent's record.
type Agent struct {
	Name  string `json:"name"`
	Owner string `json:"owner"` // host id; "" while in flight
	State State  `json:"state"`
	// Epoch increments on every ownership change (moving -> in flight ->
	// claiming); a side effect carries the epoch it acts for.
	Epoch uint64 `json:"epoch"`
	// Package and Store: the package that holds or will hold the agent
	// (moving, in flight, claiming, suspended).
	Package string `json:"package,omitempty"`
	Store   string `json:"store,omitempty"`
	// Target is where a moving agent is going ("" for a plain teleport
	// out); From is the host an in-flight agent left.
	Target string `json:"target,omitempty"`
	From   string `json:"from,omitempty"`
	// Since is when the record entered its state.
	Since     time.Time `json:"since"`
	MemoryMiB int       `json:"memory_mib,omitempty"`
	// CopyOf names the agent this one was copied from (a copy or a fork
	// is a new agent, in flight in its own package).
	CopyOf string `json:"copy_of,omitempty"`
	// Revision is the record's revision in the registry: what a CAS
	// compares. It is not stored.
	Revision int64 `json:"revision"`
	// Op is the id of the write that made this record version, set by the
	// registry on every write: a retried write whose first attempt took
	// effect recognises itself by it.
	Op string `json:"op,omitempty"`
}

// Host is one host of the fleet.
type Host struct {
	ID string `json:"id"`
	// Address is its daemon's API URL ("" for a host driven by the CLI).
	Address string `json:"address"`
	// Alive: its lease holds.
	Alive bool `json:"alive"`
	// Since is when it last registered.
	Since time.Time `json:"since"`
}

// Registry is the agent registry. Implementations: the etcd one (Open) and
// the simulation's model (dst). Every write is made under a Session and
// refused with ErrLeaseLost when the session's lease no longer holds.
type Registry interface {
	// Register makes host h alive under a lease of ttl, taking over any
	// earlier registration of the same id, and keeps it alive until the
	// session is closed or the lease is lost.
	Register(ctx context.Context, h Host, ttl time.Duration) (Session, error)
	// Hosts lists every host ever registered, by id, with whether its
	// lease holds.
	Hosts(ctx context.Context) ([]Host, error)
	// Agent returns one record, or ErrNotFound.
	Agent(ctx context.Context, name string) (*Agent, error)
	// Agents lists every record, by name.
	Agents(ctx context.Context) ([]Agent, error)
	// Create adds a record; ErrExists if the name is taken.
	Create(ctx context.Context, s Session, a Agent) (*Agent, error)
	// Update replaces record prev with next if the record is still at
	// prev.Revision (ErrConflict otherwise) and s's lease holds.
	Update(ctx context.Context, s Session, prev *Agent, next Agent) (*Agent, error)
	// Delete removes record prev, under the same conditions as Update.
	Delete(ctx context.Context, s Session, prev *Agent) error
	// Check is a fence: nil if the record is still at a.Revision and s's
	// lease holds, else ErrConflict or ErrLeaseLost.
	Check(ctx context.Context, s Session, a *Agent) error
	Close() error
}

// Session is a host's registration: its lease.
type Session interface {
	HostID() string
	// Lost is closed when the lease is gone (expired or revoked).
	Lost() <-chan struct{}
	// Close revokes the lease: the host is no longer alive.
	Close(ctx context.Context) error
}

// Error categories.
var (
	ErrNotFound = errors.New("no such agent in the registry")
	ErrExists   = errors.New("agent name taken in the registry")
	// ErrConflict: the record moved on since it was read (another
	// ownership change won).
	ErrConflict = errors.New("registry record changed")
	// ErrLeaseLost: the acting host's lease expired or was taken over.
	ErrLeaseLost = errors.New("host lease lost")
	// ErrUnavailable: the registry did not answer in time.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrWrongState: the record is not in a state that allows the operation.
	ErrWrongState = errors.New("agent is not in a state that allows this")
	// ErrRunsElsewhere: the agent runs on another host (or is held there).
	ErrRunsElsewhere = errors.New("agent runs elsewhere")
	// ErrOutcomeUnknown: a move's package commit had no known outcome; the
	// record stays moving until Reconcile finds out.
	ErrOutcomeUnknown = errors.New("move outcome unknown")
)

// Validate checks a record's fields before it is written.
func (a *Agent) Validate() error {
	if a.Name == "" || len(a.Name) > 64 {
		return fmt.Errorf("agent name %q must be 1..64 bytes: %w", a.Name, ErrWrongState)
	}
	known := false
	for _, s := range States {
		known = known || s == a.State
	}
	if !known {
		return fmt.Errorf("agent %s: unknown state %q: %w", a.Name, a.State, ErrWrongState)
	}
	if (a.State == StateInFlight) != (a.Owner == "") {
		return fmt.Errorf("agent %s: state %s with owner %q: only an in-flight agent has no owner: %w", a.Name, a.State, a.Owner, ErrWrongState)
	}
	switch a.State {
	case StateMoving, StateInFlight, StateClaiming:
		if a.Package == "" {
			return fmt.Errorf("agent %s: state %s needs a package: %w", a.Name, a.State, ErrWrongState)
		}
	}
	return nil
}

// Where says, in words, where an agent is: for refusals.
func (a *Agent) Where() string {
	since := a.Since.UTC().Format(time.RFC3339)
	switch a.State {
	case StateInFlight:
		return fmt.Sprintf("in flight in package %s since %s (epoch %d)", a.Package, since, a.Epoch)
	case StateRunning:
		return fmt.Sprintf("runs on host %s since %s (epoch %d)", a.Owner, since, a.Epoch)
	}
	return fmt.Sprintf("is %s on host %s since %s (epoch %d)", a.State, a.Owner, since, a.Epoch)
}
