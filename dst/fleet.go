package dst

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/internal/plant"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// The fleet simulation runs the production move protocol (registry.Node:
// Create, Move, Claim, Reconcile) unchanged, with the production teleport
// service under it, on simulated hosts over the registry model (Registry):
// leases that expire on the simulated clock, the registry unavailable, a
// host cut off from it, a host daemon killed at every step of a move (its
// VMs survive, as QEMU's outlive kelpie serve) and restarted (it registers
// again and reconciles), and operators claiming packages that are no
// longer in flight. After every step SingleActivation and NoLoss are
// checked against the registry's records, not against the simulator's
// bookkeeping.

// FleetBug is a planted protocol bug.
type FleetBug string

// The fleet's planted bugs.
const (
	FleetBugNone FleetBug = ""
	// FleetBugSkipClaimCheck: a claim restores the package whatever the
	// record says (the epoch and in-flight check skipped).
	FleetBugSkipClaimCheck FleetBug = "skip-claim-check"
)

// FleetConfig is one fleet simulation run.
type FleetConfig struct {
	Seed  uint64
	Steps int // default 200
	Hosts int // default 3
	Bug   FleetBug
	Trace io.Writer
}

// FleetResult is what a fleet run did.
type FleetResult struct {
	Seed        uint64
	Steps       int
	Moves       int
	Crashes     int
	Claims      int
	StaleClaims int
	Violations  []Violation
	TraceHash   string
}

const (
	fleetLeaseTTL = 10 * time.Second
	fleetStepTime = time.Second
	fleetStore    = "store"
)

// fleetCrash is the panic that kills a host daemon at a step: it unwinds
// the daemon's call stack, as SIGKILL ends the process.
type fleetCrash struct{ host string }

type fleetHost struct {
	w    *fleetWorld
	id   string
	fac  *sim.Factory
	vms  map[string]*trackedVM // the machine's VMs: they outlive its daemon
	node *registry.Node
	up   bool // the daemon runs
	// crashAt is the step at which the daemon dies ("" none).
	crashAt string
}

type fleetWorld struct {
	cfg      FleetConfig
	ctx      context.Context
	clock    *Clock
	store    *Store
	reg      *Registry
	hosts    []*fleetHost
	tr       *tracer
	step     int
	op       string
	ids      int
	kv       map[string]map[string]string // agent -> its expected guest state
	lastPkg  map[string]string            // agent -> the last package it was in flight in
	names    []string                     // agents in creation order
	res      FleetResult
	violated bool
}

// RunFleet runs one seed of the fleet simulation.
func RunFleet(cfg FleetConfig) (*FleetResult, error) {
	if cfg.Steps == 0 {
		cfg.Steps = 200
	}
	if cfg.Hosts == 0 {
		cfg.Hosts = 3
	}
	if cfg.Hosts < 2 || cfg.Hosts > 16 {
		return nil, fmt.Errorf("fleet hosts %d out of range 2..16", cfg.Hosts)
	}
	w := &fleetWorld{cfg: cfg, ctx: context.Background(), clock: NewClock(), tr: newTracer(cfg.Trace), kv: map[string]map[string]string{},
		lastPkg: map[string]string{}}
	w.store = NewStore(StoreOptions{Clock: w.clock})
	w.reg = NewRegistry(w.clock)
	w.res.Seed = cfg.Seed
	w.tr.linef("fleet seed=%d steps=%d hosts=%d bug=%s", cfg.Seed, cfg.Steps, cfg.Hosts, cfg.Bug)
	for i := 0; i < cfg.Hosts; i++ {
		h := &fleetHost{w: w, id: fmt.Sprintf("h%d", i), vms: map[string]*trackedVM{}}
		h.fac = sim.NewFactory(sim.Options{Arch: vm.ArchX86_64, HostID: h.id, BaseImageVersion: "1.2.0", MemoryBytes: simMemoryBytes,
			Layout: vm.LayoutSplit, Backend: "sim-fc", Clock: w.clock})
		w.hosts = append(w.hosts, h)
		h.restart()
	}
	g := Stream(cfg.Seed, "fleet")
	for w.step = 0; w.step < cfg.Steps && !w.violated; w.step++ {
		w.clock.Advance(fleetStepTime)
		w.reg.Renew(func(id string) bool { return w.host(id).up })
		w.stepOnce(g)
		w.heal()
		w.check()
		w.res.Steps++
	}
	w.res.TraceHash = w.tr.sum()
	w.tr.linef("end steps=%d moves=%d crashes=%d claims=%d stale=%d violations=%d", w.res.Steps, w.res.Moves, w.res.Crashes, w.res.Claims,
		w.res.StaleClaims, len(w.res.Violations))
	res := w.res
	return &res, nil
}

func (w *fleetWorld) host(id string) *fleetHost {
	for _, h := range w.hosts {
		if h.id == id {
			return h
		}
	}
	return nil
}

func (w *fleetWorld) note(format string, args ...any) { w.tr.linef("    "+format, args...) }

func (w *fleetWorld) violate(inv, format string, args ...any) {
	v := Violation{Seed: w.cfg.Seed, Step: w.step, Invariant: inv, Detail: fmt.Sprintf(format, args...), Op: w.op,
		Replay: w.replay()}
	w.res.Violations = append(w.res.Violations, v)
	w.tr.linef("    VIOLATION %s: %s", inv, v.Detail)
	w.violated = true
}

// replay is the command that runs this seed again, with its trace.
func (w *fleetWorld) replay() string {
	cmd := fmt.Sprintf("kelpie sim fleet --seed %d --steps %d --hosts %d", w.cfg.Seed, w.cfg.Steps, w.cfg.Hosts)
	if w.cfg.Bug != FleetBugNone {
		cmd += " --bug " + string(w.cfg.Bug)
	}
	return cmd + " --trace"
}

func (w *fleetWorld) newID(prefix string) string {
	w.ids++
	return fmt.Sprintf("%s-%d", prefix, w.ids)
}

// restart starts the host's daemon: a new registration (taking the host
// over) and a reconcile of its records.
func (h *fleetHost) restart() {
	s, err := h.w.reg.Register(h.w.ctx, registry.Host{ID: h.id, Address: "sim://" + h.id}, fleetLeaseTTL)
	if err != nil {
		h.w.note("%s: register: %v", h.id, err)
		return
	}
	h.up, h.crashAt = true, ""
	h.node = &registry.Node{Reg: h.w.reg, Session: s, Host: h, Now: h.w.clock.Now, NewID: h.w.newID, OnStep: h.onStep}
	plant.SetRegistryBugs(h.node, plant.RegistryBugs{SkipClaimCheck: h.w.cfg.Bug == FleetBugSkipClaimCheck})
	repairs, err := h.guard(func() error {
		rs, err := h.node.Reconcile(h.w.ctx)
		for _, r := range rs {
			h.w.note("%s reconciled %s: %s (%s -> %s) %s", h.id, r.Agent, r.Action, r.From, r.To, r.Err)
		}
		return err
	})
	_ = repairs
	if err != nil {
		h.w.note("%s: reconcile: %v", h.id, err)
	}
}

func (h *fleetHost) onStep(ctx context.Context, agent, step string) {
	h.w.note("%s: %s %s", h.id, agent, step)
	if h.crashAt == step {
		panic(fleetCrash{h.id})
	}
}

// guard runs f as the daemon; a crash inside it kills the daemon.
func (h *fleetHost) guard(f func() error) (crashed bool, err error) {
	defer func() {
		if p := recover(); p != nil {
			c, ok := p.(fleetCrash)
			if !ok {
				panic(p)
			}
			fh := h.w.host(c.host)
			fh.up, fh.crashAt = false, ""
			h.w.res.Crashes++
			h.w.note("%s: daemon killed (its VMs keep running)", c.host)
			crashed, err = true, fmt.Errorf("daemon %s killed", c.host)
		}
	}()
	return false, f()
}

// trackedVM is a VM of a fleet host's machine: in the machine's table from
// the moment it exists until it is destroyed, whoever made or destroys it
// (the service's own cleanups included), as a QEMU VM is on disk.
type trackedVM struct {
	vm.Instance
	h *fleetHost
}

func (v *trackedVM) Destroy(ctx context.Context) error {
	if err := v.Instance.Destroy(ctx); err != nil {
		return err
	}
	if v.h.vms[v.ID()] == v {
		delete(v.h.vms, v.ID())
	}
	return nil
}

func (v *trackedVM) guest() map[string]string { return v.Instance.(*sim.VM).GuestState() }

// machineFactory registers every VM it makes in the machine's table.
type machineFactory struct{ h *fleetHost }

func (f machineFactory) Host() vm.HostInfo { return f.h.fac.Host() }

func (f machineFactory) track(inst vm.Instance, err error) (vm.Instance, error) {
	if err != nil {
		return nil, err
	}
	t := &trackedVM{Instance: inst, h: f.h}
	f.h.vms[inst.ID()] = t
	return t, nil
}

func (f machineFactory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	return f.track(f.h.fac.Create(ctx, cfg))
}

func (f machineFactory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	return f.track(f.h.fac.CreateFromSnapshot(ctx, cfg, snap))
}

// A fleetHost is the protocol's Machine: the production service over a
// simulated factory and the shared store.

func (h *fleetHost) service() *service.Service {
	return service.New(h.w.store, machineFactory{h}, service.WithClock(h.w.clock), service.WithIDs(func() string { return h.w.newID("upload") }),
		service.WithStepObserver(func(step string, d time.Duration) { h.onStep(h.w.ctx, "", "out:"+step) }))
}

func (h *fleetHost) Send(ctx context.Context, name string, req registry.SendRequest) (registry.Outcome, error) {
	inst, ok := h.vms[name]
	if !ok {
		return registry.NotCommitted, fmt.Errorf("no vm %s: %w", name, vm.ErrNotFound)
	}
	_, err := h.service().Out(ctx, inst, service.OutRequest{AgentID: name, Kind: teleport.KindTeleport, PackageID: req.Package, Fence: req.Fence})
	switch {
	case err == nil, errors.Is(err, service.ErrSourceNotSettled):
		inst.Destroy(ctx)
		return registry.Committed, nil
	case errors.Is(err, service.ErrOutcomeUnknown):
		return registry.Unknown, err
	}
	return registry.NotCommitted, err
}

func (h *fleetHost) Restore(ctx context.Context, name string, req registry.RestoreRequest) error {
	if _, ok := h.vms[name]; ok {
		return fmt.Errorf("vm %s exists here: %w", name, vm.ErrAlreadyExists)
	}
	svc := service.New(h.w.store, machineFactory{h}, service.WithClock(h.w.clock),
		service.WithStepObserver(func(step string, d time.Duration) { h.onStep(ctx, name, "in:"+step) }))
	_, _, err := svc.In(ctx, req.Package, vm.Config{Name: name}, service.InOptions{Fence: req.Fence})
	return err
}

func (h *fleetHost) VMState(ctx context.Context, name string) (registry.VMState, error) {
	inst, ok := h.vms[name]
	if !ok {
		return registry.VMAbsent, nil
	}
	switch inst.State() {
	case vm.StateRunning:
		return registry.VMRunning, nil
	case vm.StatePaused:
		return registry.VMPaused, nil
	}
	return registry.VMStopped, nil
}

func (h *fleetHost) Resume(ctx context.Context, name string) error {
	inst, ok := h.vms[name]
	if !ok {
		return fmt.Errorf("no vm %s: %w", name, vm.ErrNotFound)
	}
	return inst.Resume(ctx)
}

func (h *fleetHost) Destroy(ctx context.Context, name string) error {
	inst, ok := h.vms[name]
	if !ok {
		return nil
	}
	return inst.Destroy(ctx)
}

func (h *fleetHost) Committed(ctx context.Context, store, pkg string) (bool, error) {
	_, err := h.w.store.Stat(ctx, pkg)
	if errors.Is(err, teleport.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

var _ registry.Machine = (*fleetHost)(nil)

// claimer is how a source daemon reaches the target's: a call that fails
// (with the target's crash turned into a broken connection) rather than
// unwinding the source.
type claimer struct{ h *fleetHost }

func (c claimer) Claim(ctx context.Context, name, pkg string) (*registry.Agent, error) {
	if !c.h.up {
		return nil, fmt.Errorf("daemon %s: connection refused", c.h.id)
	}
	var a *registry.Agent
	_, err := c.h.guard(func() error {
		var err error
		a, err = c.h.node.Claim(ctx, name, pkg)
		return err
	})
	return a, err
}

// Steps of a move at which a daemon may be killed.
var fleetSourceSteps = []string{registry.StepMoving, "out:pause", "out:snapshot", "out:upload", registry.StepCommitted, registry.StepInFlight,
	registry.StepDestroyed}
var fleetTargetSteps = []string{registry.StepClaimed, "in:restore", registry.StepRestored, registry.StepRunning}

func (w *fleetWorld) upHosts() []*fleetHost {
	var out []*fleetHost
	for _, h := range w.hosts {
		if h.up {
			out = append(out, h)
		}
	}
	return out
}

func (w *fleetWorld) records(state registry.State) []registry.Agent {
	var out []registry.Agent
	for _, a := range w.reg.Records() {
		if a.State == state {
			out = append(out, a)
		}
	}
	return out
}

func (w *fleetWorld) stepOnce(g *rand.Rand) {
	up := w.upHosts()
	running := w.records(registry.StateRunning)
	x := g.IntN(100)
	switch {
	case x < 8 && len(up) < len(w.hosts):
		// A dead daemon comes back.
		var down []*fleetHost
		for _, h := range w.hosts {
			if !h.up {
				down = append(down, h)
			}
		}
		h := down[g.IntN(len(down))]
		w.op = "restart " + h.id
		w.tr.linef("%04d %s", w.step, w.op)
		h.restart()
	case x < 12 && len(up) > 1:
		h := up[g.IntN(len(up))]
		w.op = "kill " + h.id
		w.tr.linef("%04d %s", w.step, w.op)
		h.up = false
		w.res.Crashes++
	case x < 16:
		h := w.hosts[g.IntN(len(w.hosts))]
		cut := !w.reg.cut[h.id]
		w.op = fmt.Sprintf("cut %s=%v", h.id, cut)
		w.tr.linef("%04d %s", w.step, w.op)
		w.reg.Cut(h.id, cut)
	case x < 26 && len(up) > 0 && len(w.names) < 2*len(w.hosts):
		h := up[g.IntN(len(up))]
		name := fmt.Sprintf("a%d", w.step)
		w.op = "spawn " + name + " on " + h.id
		w.tr.linef("%04d %s", w.step, w.op)
		_, err := h.guard(func() error {
			_, err := h.node.Create(w.ctx, name, 64, func(ctx context.Context) error {
				inst, err := machineFactory{h}.Create(ctx, vm.Config{Name: name, VCPUs: 1, MemoryMiB: 64, BaseImageVersion: "1.2.0"})
				if err != nil {
					return err
				}
				return inst.Start(ctx)
			})
			return err
		})
		if err == nil {
			w.names = append(w.names, name)
			w.kv[name] = map[string]string{}
		}
		w.note("-> %v", err)
	case x < 46 && len(running) > 0:
		a := running[g.IntN(len(running))]
		h := w.host(a.Owner)
		key, val := fmt.Sprintf("k%d", g.IntN(4)), randValue(g)
		w.op = fmt.Sprintf("exec %s set %s %s", a.Name, key, val)
		w.tr.linef("%04d %s", w.step, w.op)
		if inst, ok := h.vms[a.Name]; ok && inst.State() == vm.StateRunning {
			if _, err := inst.Exec(w.ctx, "set", []string{key, val}, vm.ExecOptions{}); err == nil {
				w.kv[a.Name][key] = val
			}
		}
	case x < 80 && len(running) > 0 && len(up) > 1:
		a := running[g.IntN(len(running))]
		src := w.host(a.Owner)
		if !src.up {
			return
		}
		var others []*fleetHost
		for _, h := range up {
			if h != src {
				others = append(others, h)
			}
		}
		dst := others[g.IntN(len(others))]
		if g.IntN(3) == 0 {
			if g.IntN(2) == 0 {
				src.crashAt = fleetSourceSteps[g.IntN(len(fleetSourceSteps))]
			} else {
				dst.crashAt = fleetTargetSteps[g.IntN(len(fleetTargetSteps))]
			}
		}
		down := g.IntN(12) == 0
		w.op = fmt.Sprintf("move %s %s -> %s (kill source at %q, target at %q, registry down %v)", a.Name, src.id, dst.id, src.crashAt, dst.crashAt, down)
		w.tr.linef("%04d %s", w.step, w.op)
		w.reg.SetDown(down)
		_, err := src.guard(func() error {
			got, err := src.node.Move(w.ctx, a.Name, fleetStore, dst.id, claimer{dst})
			if got != nil && got.Package != "" {
				w.lastPkg[a.Name] = got.Package
			}
			return err
		})
		w.reg.SetDown(false)
		src.crashAt, dst.crashAt = "", ""
		w.res.Moves++
		if rec, gerr := w.reg.Agent(w.ctx, a.Name); gerr == nil && rec.Package != "" {
			w.lastPkg[a.Name] = rec.Package
		}
		w.note("-> %v", err)
	case x < 90:
		// An operator claims an agent on some host: in flight ones must
		// restore once; any other must be refused.
		recs := w.reg.Records()
		if len(recs) == 0 || len(up) == 0 {
			return
		}
		a := recs[g.IntN(len(recs))]
		h := up[g.IntN(len(up))]
		pkg := w.lastPkg[a.Name]
		if a.State == registry.StateInFlight {
			pkg = a.Package
		}
		if pkg == "" {
			return
		}
		w.op = fmt.Sprintf("claim %s (%s) on %s from %s", a.Name, a.State, h.id, pkg)
		w.tr.linef("%04d %s", w.step, w.op)
		if a.State != registry.StateInFlight {
			w.res.StaleClaims++
		}
		_, err := h.guard(func() error {
			_, err := h.node.Claim(w.ctx, a.Name, pkg)
			return err
		})
		w.res.Claims++
		w.note("-> %v", err)
	default:
		w.op = "idle"
		w.tr.linef("%04d idle", w.step)
	}
}

// heal is the daemons' lease-lost loop: a live daemon whose lease is gone
// and that can reach the registry registers again and reconciles.
func (w *fleetWorld) heal() {
	for _, h := range w.hosts {
		if !h.up || w.reg.cut[h.id] {
			continue
		}
		select {
		case <-h.node.Session.Lost():
			w.note("%s: lease lost; registering again", h.id)
			h.restart()
		default:
		}
	}
}

// check verifies SingleActivation and NoLoss against the registry.
func (w *fleetWorld) check() {
	recs := map[string]registry.Agent{}
	for _, a := range w.reg.Records() {
		recs[a.Name] = a
	}
	for _, name := range w.names {
		var runningOn []string
		for _, h := range w.hosts {
			if inst, ok := h.vms[name]; ok && inst.State() == vm.StateRunning {
				runningOn = append(runningOn, h.id)
			}
		}
		rec, ok := recs[name]
		if !ok {
			w.violate(InvNoLoss, "agent %s has no registry record", name)
			return
		}
		if len(runningOn) > 1 {
			w.violate(InvSingleActivation, "agent %s runs on %s; the registry says %s", name, strings.Join(runningOn, " and "), rec.Where())
			return
		}
		if len(runningOn) == 1 && (rec.Owner != runningOn[0] || rec.State == registry.StateInFlight) {
			w.violate(InvSingleActivation, "agent %s runs on %s, but the registry says it %s", name, runningOn[0], rec.Where())
			return
		}
		committed := func() bool { ok, _ := w.hosts[0].Committed(w.ctx, fleetStore, rec.Package); return ok }
		switch rec.State {
		case registry.StateRunning, registry.StatePaused:
			inst, ok := w.host(rec.Owner).vms[name]
			if !ok || !isLive(inst.State()) {
				w.violate(InvNoLoss, "agent %s: the registry says it %s, but that host has no live VM of it", name, rec.Where())
				return
			}
			if rec.State == registry.StateRunning && inst.State() == vm.StateRunning {
				if got := inst.guest(); !maps.Equal(got, w.kv[name]) {
					w.violate(InvSnapshotConsistency, "agent %s on %s: guest state %v, want %v", name, rec.Owner, got, w.kv[name])
					return
				}
			}
		case registry.StateInFlight, registry.StateClaiming:
			if !committed() {
				w.violate(InvNoLoss, "agent %s %s, and package %s is not committed", name, rec.Where(), rec.Package)
				return
			}
		case registry.StateMoving:
			if _, ok := w.host(rec.Owner).vms[name]; !ok && !committed() {
				w.violate(InvNoLoss, "agent %s %s: no VM on its host and package %s not committed", name, rec.Where(), rec.Package)
				return
			}
		case registry.StateStopped:
			w.violate(InvNoLoss, "agent %s is stopped (no fault here stops a VM)", name)
			return
		}
	}
}
