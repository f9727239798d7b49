// Package fleet is one host of a fleet: a host.Host under the registry's
// ownership rules. It adapts the host library to the fenced protocol
// (registry.Machine) and offers the host's agent operations — create,
// remove, pause, resume, stop, suspend, teleport out and in, copy, move,
// claim, reconcile — each of which asks the registry before it acts. The
// daemon (server/) and the CLI (with --registry) both call it; neither
// holds ownership logic of its own.
//
// Without a registry (Reg nil) every operation goes straight to the host
// and single activation is not enforced: callers say so to their users.
// It must never act on an agent the registry says is elsewhere.
package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
)

// LeaseTTLDefault is how long a host stays alive in the registry without
// renewing its lease.
const LeaseTTLDefault = 10 * time.Second

// Machine is a host.Host as the protocol sees it.
type Machine struct {
	H *host.Host
	// OnPackage, when set, is told each package sent ("out") or restored
	// ("in").
	OnPackage func(direction string, p *teleport.Package)
}

var _ registry.Machine = Machine{}

// Send commits VM name as package req.Package (a move: the source is
// stopped and removed once it is committed; a copy keeps it running).
func (m Machine) Send(ctx context.Context, name string, req registry.SendRequest) (registry.Outcome, error) {
	out := host.OutRequest{Store: req.Store, PackageID: req.Package, Fence: req.Fence, KeepSource: req.Copy, AgentID: req.AgentID, Format: req.Format}
	res, err := m.H.TeleportOut(ctx, name, out)
	switch {
	case err == nil:
		if m.OnPackage != nil {
			m.OnPackage("out", res.Package)
		}
		return registry.Committed, nil
	case errors.Is(err, service.ErrOutcomeUnknown):
		return registry.Unknown, err
	}
	return registry.NotCommitted, err
}

// Restore restores package req.Package as VM name, fenced before it runs.
func (m Machine) Restore(ctx context.Context, name string, req registry.RestoreRequest) error {
	res, err := m.H.TeleportIn(ctx, req.Package, host.InRequest{Store: req.Store, Name: name, Fence: req.Fence})
	if err == nil && m.OnPackage != nil {
		m.OnPackage("in", res.Package)
	}
	return err
}

// VMState is the host's VM name as the protocol sees it.
func (m Machine) VMState(ctx context.Context, name string) (registry.VMState, error) {
	info, err := m.H.VM(ctx, name)
	if errors.Is(err, vm.ErrNotFound) {
		return registry.VMAbsent, nil
	}
	if err != nil {
		return registry.VMAbsent, err
	}
	switch info.State {
	case vm.StateRunning.String():
		return registry.VMRunning, nil
	case vm.StatePaused.String():
		return registry.VMPaused, nil
	case host.StateSuspended:
		return registry.VMSuspended, nil
	}
	return registry.VMStopped, nil
}

// Resume continues VM name.
func (m Machine) Resume(ctx context.Context, name string) error {
	_, err := m.H.ResumeVM(ctx, name)
	return err
}

// Destroy removes VM name; one that is gone already is no error.
func (m Machine) Destroy(ctx context.Context, name string) error {
	_, err := m.H.RemoveVM(ctx, name)
	if errors.Is(err, vm.ErrNotFound) {
		return nil
	}
	return err
}

// Committed says whether package pkg is in store.
func (m Machine) Committed(ctx context.Context, store, pkg string) (bool, error) {
	_, err := m.H.Package(ctx, store, pkg)
	if errors.Is(err, teleport.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// Fleet is one host in the fleet.
type Fleet struct {
	Host *host.Host
	// Reg is the registry; nil when there is none (single activation is
	// then not enforced).
	Reg  registry.Registry
	opts Options
	node atomic.Pointer[registry.Node]
}

// Options configure Join.
type Options struct {
	// Address is this host's daemon URL ("" for a CLI command).
	Address  string
	LeaseTTL time.Duration // default LeaseTTLDefault
	OnStep   func(ctx context.Context, agent, step string)
	// OnPackage is told each package this host sends or restores.
	OnPackage func(direction string, p *teleport.Package)
}

// Join registers h in reg (taking over an earlier registration of the same
// host id) and returns it as a fleet host. reg nil gives a Fleet without a
// registry.
func Join(ctx context.Context, h *host.Host, reg registry.Registry, o Options) (*Fleet, error) {
	if o.LeaseTTL == 0 {
		o.LeaseTTL = LeaseTTLDefault
	}
	f := &Fleet{Host: h, Reg: reg, opts: o}
	if reg == nil {
		return f, nil
	}
	if err := f.Rejoin(ctx); err != nil {
		return nil, err
	}
	return f, nil
}

// Rejoin registers the host again under a new lease (after its lease was
// lost): operations still running under the old one are fenced off.
// Reconcile afterwards.
func (f *Fleet) Rejoin(ctx context.Context) error {
	s, err := f.Reg.Register(ctx, registry.Host{ID: f.Host.ID(), Address: f.opts.Address}, f.opts.LeaseTTL)
	if err != nil {
		return err
	}
	f.node.Store(&registry.Node{Reg: f.Reg, Session: s, Host: Machine{H: f.Host, OnPackage: f.opts.OnPackage}, Now: time.Now, NewID: newID, OnStep: f.opts.OnStep})
	return nil
}

// Node is the protocol node of the host's current registration (nil
// without a registry).
func (f *Fleet) Node() *registry.Node { return f.node.Load() }

// Lost is closed when the current registration's lease is gone.
func (f *Fleet) Lost() <-chan struct{} {
	if n := f.Node(); n != nil {
		return n.Session.Lost()
	}
	return nil
}

// Leave revokes the host's lease.
func (f *Fleet) Leave(ctx context.Context) error {
	if n := f.Node(); n != nil {
		return n.Session.Close(ctx)
	}
	return nil
}

func newID(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// Enforced says whether single activation is enforced (a registry).
func (f *Fleet) Enforced() bool { return f.Node() != nil }

// Create creates and boots agent spec.Name on this host.
func (f *Fleet) Create(ctx context.Context, spec host.VMSpec) (*registry.Agent, *host.VMInfo, error) {
	if err := vm.ValidateName(spec.Name); err != nil {
		return nil, nil, err
	}
	n := f.Node()
	if n == nil {
		info, err := f.Host.CreateVM(ctx, spec)
		return nil, info, err
	}
	var info *host.VMInfo
	mem := spec.MemoryMiB
	if mem == 0 {
		mem = host.VMMemoryMiBDefault
	}
	a, err := n.Create(ctx, spec.Name, mem, func(ctx context.Context) error {
		var err error
		info, err = f.Host.CreateVM(ctx, spec)
		return err
	})
	return a, info, err
}

// Fork makes req.Count copies of this host's VM name (host.ForkVM);
// with a registry each copy is a new agent of this host, recorded before
// it is made (registry.Node.Fork).
func (f *Fleet) Fork(ctx context.Context, name string, req host.ForkRequest) (*host.ForkResult, []*registry.Agent, error) {
	n := f.Node()
	if n == nil {
		res, err := f.Host.ForkVM(ctx, name, req)
		return res, nil, err
	}
	names, err := host.ForkNames(name, req)
	if err != nil {
		return nil, nil, err
	}
	var res *host.ForkResult
	agents, err := n.Fork(ctx, name, names, func(ctx context.Context) error {
		var err error
		res, err = f.Host.ForkVM(ctx, name, req)
		return err
	})
	return res, agents, err
}

// Remove destroys agent name's VM here and removes its record.
func (f *Fleet) Remove(ctx context.Context, name string) (*host.RemoveResult, error) {
	n := f.Node()
	if n == nil {
		return f.Host.RemoveVM(ctx, name)
	}
	if err := n.Remove(ctx, name); err != nil {
		return nil, err
	}
	return &host.RemoveResult{Name: name}, nil
}

// Pause pauses agent name.
func (f *Fleet) Pause(ctx context.Context, name string) error {
	n := f.Node()
	if n == nil {
		return f.Host.PauseVM(ctx, name)
	}
	_, err := n.Pause(ctx, name, func(ctx context.Context) error { return f.Host.PauseVM(ctx, name) })
	return err
}

// Stop shuts agent name's VM down.
func (f *Fleet) Stop(ctx context.Context, name string) error {
	n := f.Node()
	if n == nil {
		return f.Host.StopVM(ctx, name)
	}
	_, err := n.Stop(ctx, name, func(ctx context.Context) error { return f.Host.StopVM(ctx, name) })
	return err
}

// Resume continues a paused agent, or restores a suspended one (its
// record says running first: the CAS is the fence).
func (f *Fleet) Resume(ctx context.Context, name string) (*host.ResumeResult, error) {
	n := f.Node()
	if n == nil {
		return f.Host.ResumeVM(ctx, name)
	}
	a, err := n.Reg.Agent(ctx, name)
	if err != nil {
		return nil, err
	}
	if a.State != registry.StateSuspended {
		if _, err := n.Resume(ctx, name); err != nil {
			return nil, err
		}
		return &host.ResumeResult{Name: name}, nil
	}
	var res *host.ResumeResult
	_, err = n.Unsuspend(ctx, name, func(ctx context.Context) error {
		var err error
		res, err = f.Host.ResumeVM(ctx, name)
		return err
	})
	return res, err
}

// Suspend suspends agent name into a package of this host.
func (f *Fleet) Suspend(ctx context.Context, name, store string) (*teleport.Package, error) {
	n := f.Node()
	if n == nil {
		return f.Host.SuspendVM(ctx, name, store)
	}
	var pkg *teleport.Package
	_, err := n.Suspend(ctx, name, func(ctx context.Context) (string, error) {
		var err error
		pkg, err = f.Host.SuspendVM(ctx, name, store)
		if pkg != nil {
			return pkg.ID, err
		}
		return "", err
	})
	return pkg, err
}

// TeleportOut sends agent name out of this host. A move goes through the
// protocol (the record says in flight in the package); a copy becomes a
// new agent (req.AgentID, or a fresh name), in flight in its package. The
// registry's flow supports the teleport kind; other kinds without a
// registry only.
func (f *Fleet) TeleportOut(ctx context.Context, name string, req host.OutRequest) (*host.OutResult, *registry.Agent, error) {
	n := f.Node()
	if n == nil {
		res, err := f.Host.TeleportOut(ctx, name, req)
		return res, nil, err
	}
	if req.Kind != "" && req.Kind != string(teleport.KindTeleport) {
		return nil, nil, fmt.Errorf("with a registry, teleport out sends the whole VM (kind teleport); a %s goes through vm suspend or without a registry: %w",
			req.Kind, vm.ErrUnsupported)
	}
	var a *registry.Agent
	var err error
	if req.KeepSource {
		newName := req.AgentID
		if newName == "" {
			newName = newID(name + "-copy")
		}
		if err := vm.ValidateName(newName); err != nil {
			return nil, nil, err
		}
		a, err = n.Copy(ctx, name, newName, req.Store, req.Format)
	} else {
		a, err = n.Send(ctx, name, req.Store, "", req.Format)
	}
	if a == nil || a.State != registry.StateInFlight {
		return nil, a, err
	}
	pkg, perr := f.Host.Package(ctx, req.Store, a.Package)
	if perr != nil {
		return nil, a, errors.Join(err, perr)
	}
	res := &host.OutResult{Package: pkg, Kind: pkg.Kind, SourceRemoved: !req.KeepSource}
	if err != nil {
		res.Warning = err.Error()
	}
	return res, a, nil
}

// TeleportIn restores package id on this host. With a registry the package
// must be its agent's current package, in flight (a claim): a package
// whose agent runs elsewhere is refused naming the host and since when.
// The VM is named after the agent.
func (f *Fleet) TeleportIn(ctx context.Context, id string, req host.InRequest) (*host.InResult, *registry.Agent, error) {
	n := f.Node()
	if n == nil {
		res, err := f.Host.TeleportIn(ctx, id, req)
		return res, nil, err
	}
	pkg, err := f.Host.Package(ctx, req.Store, id)
	if err != nil {
		return nil, nil, err
	}
	if req.Name != "" && req.Name != pkg.AgentID {
		return nil, nil, fmt.Errorf("package %s holds agent %s; with a registry its VM keeps that name (--name %s): %w", id, pkg.AgentID, pkg.AgentID, vm.ErrInvalidConfig)
	}
	cur, err := n.Reg.Agent(ctx, pkg.AgentID)
	if err != nil {
		if errors.Is(err, registry.ErrNotFound) {
			return nil, nil, fmt.Errorf("package %s: agent %s is not in the registry (removed, or sent without one); nothing may restore it under the registry's rules: %w",
				id, pkg.AgentID, registry.ErrNotFound)
		}
		return nil, nil, err
	}
	if cur.Store != "" && cur.Store != req.Store {
		req.Store = cur.Store
	}
	a, err := n.Claim(ctx, pkg.AgentID, id)
	if err != nil {
		return nil, a, err
	}
	info, err := f.Host.VM(ctx, pkg.AgentID)
	if err != nil {
		return nil, a, err
	}
	return &host.InResult{VM: *info, Package: pkg}, a, nil
}

// Claim restores in-flight agent name here (pkg "" for its current
// package).
func (f *Fleet) Claim(ctx context.Context, name, pkg string) (*registry.Agent, error) {
	n := f.Node()
	if n == nil {
		return nil, errNoRegistry
	}
	return n.Claim(ctx, name, pkg)
}

var errNoRegistry = fmt.Errorf("this needs a registry (--registry or KELPIE_REGISTRY): %w", vm.ErrUnsupported)

// Move sends agent name to the host behind to.
func (f *Fleet) Move(ctx context.Context, name, store, target string, to registry.Claimer) (*registry.Agent, error) {
	n := f.Node()
	if n == nil {
		return nil, errNoRegistry
	}
	return n.Move(ctx, name, store, target, to)
}

// Reconcile repairs this host's records after a crash (only: some agents).
func (f *Fleet) Reconcile(ctx context.Context, only ...string) ([]registry.Repair, error) {
	n := f.Node()
	if n == nil {
		return nil, nil
	}
	return n.Reconcile(ctx, only...)
}
