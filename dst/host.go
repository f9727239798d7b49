package dst

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/internal/plant"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// Host kinds: how a host's backend lays out snapshots. Each kind is its
// own backend ("sim-vz", "sim-fc"): like VZ and Firecracker, neither
// restores the other's snapshots.
const (
	// KindVZ: single-file snapshots bound to the host that wrote them.
	KindVZ = "vz"
	// KindFC: split snapshots (state + memory) that may move.
	KindFC = "fc"
)

// HostConfig is one simulated host's fixed identity.
type HostConfig struct {
	ID          string
	Arch        vm.Architecture
	BaseImage   string
	Kind        string // KindVZ or KindFC
	MemoryBytes int
	Format      int // the KLP1 version its service writes
}

func (c HostConfig) hostBound() bool { return c.Kind == KindVZ }

func (c HostConfig) simOptions() sim.Options {
	o := sim.Options{Arch: c.Arch, HostID: c.ID, BaseImageVersion: c.BaseImage, MemoryBytes: c.MemoryBytes, Layout: vm.LayoutSplit,
		Backend: "sim-" + c.Kind}
	if c.Kind == KindVZ {
		o.Layout, o.HostBound = vm.LayoutSingle, true
	}
	return o
}

func (c HostConfig) String() string {
	return fmt.Sprintf("%s(%s %s %s mem=%d klp1=v%d)", c.ID, c.Arch, c.BaseImage, c.Kind, c.MemoryBytes, max(c.Format, 1))
}

// errHostDown: the host process is gone; nothing it was doing takes effect.
var errHostDown = errors.New("host process is gone")

// host is one simulated host: a sim.Factory and the production teleport
// service, behind gates that model the host process. A crash kills the
// process at a call boundary: its VMs die, and every later call from the
// dead incarnation (the rest of the service's code, its deferred
// cleanups) fails without effect, exactly as if the process had vanished.
// Committed packages survive in the store; uploads in flight become
// orphans.
type host struct {
	r     *run
	idx   int
	cfg   HostConfig
	alive bool
	epoch int
	fac   *sim.Factory
	svc   *service.Service
	vms   []*hostVM       // VMs of this incarnation, in creation order
	dying map[string]bool // VMs whose injected crash lands when their call returns
}

func newHost(r *run, cfg HostConfig) *host {
	h := &host{r: r, cfg: cfg}
	h.start()
	return h
}

// start boots a new incarnation of the host process.
func (h *host) start() {
	h.epoch++
	h.alive = true
	h.vms = nil
	h.dying = map[string]bool{}
	o := h.cfg.simOptions()
	o.Clock, o.Faults = h.r.clock, h
	epoch := h.epoch
	o.OnCreate = func(v *sim.VM) { h.adopt(v, epoch) }
	h.fac = sim.NewFactory(o)
	format := h.cfg.Format
	if format == 0 {
		format = blob.Version1
	}
	h.svc = service.New(&hostStore{h: h, epoch: h.epoch, s: h.r.store}, &hostFactory{h: h, epoch: h.epoch},
		service.WithClock(h.r.clock), service.WithIDs(h.r.autoPackageID), service.WithStepObserver(h.r.onServiceStep),
		service.WithFormat(format), service.WithWorkers(1))
	plant.SetServiceBugs(h.svc, h.r.cfg.serviceBugs())
}

// crash kills the host process: its VMs die with it.
func (h *host) crash(p Point, detail string) {
	if !h.alive {
		return
	}
	h.alive = false
	for _, v := range h.vms {
		v.inner.Crash()
	}
	h.r.inj.fire(p, h.cfg.ID, detail)
}

func (h *host) downErr(what string) error {
	return fmt.Errorf("host %s: %s: %w", h.cfg.ID, what, errHostDown)
}

// enter gates every call the host makes. It fails when the caller belongs
// to a dead incarnation, and may decide the host dies now: before the call
// (it never happens) or after it (it happens, but nobody hears the answer).
func (h *host) enter(epoch int, what string) (crashAfter bool, err error) {
	if !h.alive || epoch != h.epoch {
		return false, h.downErr(what)
	}
	if h.r.inj.roll(HostCrash) {
		if h.r.inj.rng.IntN(2) == 0 {
			h.crash(HostCrash, "before "+what)
			return false, h.downErr(what)
		}
		return true, nil
	}
	return false, nil
}

func (h *host) leave(crashAfter bool, what string, err error) error {
	if crashAfter {
		h.crash(HostCrash, "after "+what)
		return h.downErr(what)
	}
	return err
}

// Inject is the sim.Faults hook of this host's VMs. It runs with the VM's
// lock held, so a crash it decides lands when the call returns (settle).
func (h *host) Inject(point, vmID string) error {
	in := h.r.inj
	in.clock.Advance(vmLatency(point))
	if point == sim.OpDestroy {
		// Removing a VM, dead or alive, fails only when the hypervisor
		// will not go away.
		if in.roll(VMDestroy) {
			in.fire(VMDestroy, vmID, "")
			return fmt.Errorf("vm %s: the hypervisor will not go away: %w", vmID, ErrInjected)
		}
		return nil
	}
	if h.dying[vmID] {
		return fmt.Errorf("vm %s: %s: %w", vmID, point, vm.ErrCrashed)
	}
	if in.roll(VMCrash) {
		h.dying[vmID] = true
		h.r.crashedVM[vmID] = true
		in.fire(VMCrash, vmID, "during "+point)
		return fmt.Errorf("vm %s: hypervisor died during %s: %w: %w", vmID, point, ErrInjected, vm.ErrCrashed)
	}
	if point == vm.OpExec && in.roll(VMExecTimeout) {
		in.clock.Advance(execTimeout)
		in.fire(VMExecTimeout, vmID, "")
		return fmt.Errorf("vm %s: exec: no answer within %s: %w: %w", vmID, execTimeout, ErrInjected, vm.ErrTimeout)
	}
	p, ok := vmPoint(point)
	if ok && in.roll(p) {
		in.fire(p, vmID, "")
		if point == vm.OpExec {
			return fmt.Errorf("vm %s: exec: %w: %w", vmID, ErrInjected, vm.ErrGuest)
		}
		return fmt.Errorf("vm %s: %s failed: %w", vmID, point, ErrInjected)
	}
	return nil
}

// settle lands a crash decided during v's last call.
func (h *host) settle(v *hostVM) {
	if h.dying[v.inner.ID()] && !v.gone() && v.inner.State() != vm.StateCrashed {
		v.inner.Crash()
	}
}

// adopt records a VM the host's factory made (sim.Options.OnCreate).
func (h *host) adopt(inner *sim.VM, epoch int) *hostVM {
	v := &hostVM{h: h, epoch: epoch, inner: inner}
	h.vms = append(h.vms, v)
	return v
}

// vmOf is the host's record of a VM its factory made.
func (h *host) vmOf(inst vm.Instance) *hostVM {
	for _, v := range h.vms {
		if vm.Instance(v.inner) == inst {
			return v
		}
	}
	panic("dst: a VM the factory made was not adopted")
}

// hostFactory is the vm.Factory the host's service sees.
type hostFactory struct {
	h     *host
	epoch int
}

var _ vm.Factory = (*hostFactory)(nil)

func (f *hostFactory) Host() vm.HostInfo { return f.h.fac.Host() }

func (f *hostFactory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	after, err := f.h.enter(f.epoch, "create vm")
	if err != nil {
		return nil, err
	}
	inst, err := f.h.fac.Create(ctx, cfg)
	var v *hostVM
	if err == nil {
		v = f.h.vmOf(inst)
	}
	if err = f.h.leave(after, "create vm", err); err != nil {
		return nil, err
	}
	return v, nil
}

func (f *hostFactory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	after, err := f.h.enter(f.epoch, "restore vm")
	if err != nil {
		return nil, err
	}
	if f.h.r.cfg.harness.lenientBackend {
		md := snap.Metadata
		md.Architecture, md.HostBound = f.h.cfg.Arch, false
		snap = vm.NewSnapshot(md, snap.DeviceState, snap.Memory, nil)
	}
	inst, err := f.h.fac.CreateFromSnapshot(ctx, cfg, snap)
	var v *hostVM
	if err == nil {
		v = f.h.vmOf(inst)
		f.h.settle(v)
	}
	if err = f.h.leave(after, "restore vm", err); err != nil {
		return nil, err
	}
	return v, nil
}

// hostVM is a VM as its host's processes see it.
type hostVM struct {
	h     *host
	epoch int
	inner *sim.VM
	agent string // the agent the simulator runs in it ("" for none)
}

var _ vm.Instance = (*hostVM)(nil)

func (v *hostVM) ID() string               { return v.inner.ID() }
func (v *hostVM) State() vm.State          { return v.inner.State() }
func (v *hostVM) Config() vm.Config        { return v.inner.Config() }
func (v *hostVM) live() bool               { return !v.gone() && isLive(v.inner.State()) }
func isLive(s vm.State) bool               { return s == vm.StateRunning || s == vm.StatePaused }
func (v *hostVM) String() string           { return v.inner.ID() }
func (v *hostVM) guest() map[string]string { return v.inner.GuestState() }

func (v *hostVM) call(what string, f func() error) error {
	after, err := v.h.enter(v.epoch, what+" "+v.inner.ID())
	if err != nil {
		return err
	}
	err = f()
	v.h.settle(v)
	return v.h.leave(after, what+" "+v.inner.ID(), err)
}

func (v *hostVM) Start(ctx context.Context) error {
	return v.call("start", func() error { return v.inner.Start(ctx) })
}

func (v *hostVM) Stop(ctx context.Context) error {
	return v.call("stop", func() error { return v.inner.Stop(ctx) })
}

func (v *hostVM) Pause(ctx context.Context) error {
	return v.call("pause", func() error { return v.inner.Pause(ctx) })
}

func (v *hostVM) Resume(ctx context.Context) error {
	return v.call("resume", func() error {
		if v.h.r.cfg.harness.lyingResume {
			return nil
		}
		return v.inner.Resume(ctx)
	})
}

func (v *hostVM) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	var res vm.ExecResult
	err := v.call("exec", func() error {
		var err error
		res, err = v.inner.Exec(ctx, cmd, args, opts)
		return err
	})
	return res, err
}

// Destroy removes the VM; only a Destroy that succeeded makes it gone (a
// failed one leaves it, and the checkers see it).
func (v *hostVM) Destroy(ctx context.Context) error {
	return v.call("destroy", func() error {
		if v.h.r.cfg.harness.leakVMs {
			return nil
		}
		return v.inner.Destroy(ctx)
	})
}

// gone: the VM was destroyed, by whoever (the factory removes what a
// failed restore made).
func (v *hostVM) gone() bool { return v.inner.Destroyed() }

// Snapshot takes the snapshot, then applies the snapshot faults the
// hypervisor can cause after the fact: a payload too large for the store,
// or a bit flipped after its checksum was taken.
func (v *hostVM) Snapshot(ctx context.Context) (*vm.Snapshot, error) {
	var snap *vm.Snapshot
	err := v.call("snapshot", func() error {
		var err error
		snap, err = v.inner.Snapshot(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	in := v.h.r.inj
	if in.roll(VMSnapshotCorrupt) {
		s, off, err := flipPayloadBit(snap, in.rng.Uint64())
		if err != nil {
			return nil, fmt.Errorf("vm %s: snapshot: %w", v.inner.ID(), err)
		}
		in.fire(VMSnapshotCorrupt, v.inner.ID(), fmt.Sprintf("byte %d", off))
		snap = s
	}
	if in.roll(VMSnapshotTooLarge) {
		n := v.h.r.objectLimit + 1
		in.fire(VMSnapshotTooLarge, v.inner.ID(), fmt.Sprintf("%d bytes", n))
		md := snap.Metadata
		if md.Layout == vm.LayoutSingle {
			md.DeviceStateSize = n
			snap = vm.NewSnapshot(md, zeroPayload(n), nil, nil)
		} else {
			md.MemorySize = n
			snap = vm.NewSnapshot(md, snap.DeviceState, zeroPayload(n), nil)
		}
	}
	return snap, nil
}

// flipPayloadBit returns a copy of snap whose guest-memory payload has one
// bit flipped; the metadata keeps the checksums of the original.
func flipPayloadBit(snap *vm.Snapshot, bit uint64) (*vm.Snapshot, int64, error) {
	target := snap.Memory
	if target == nil {
		target = snap.DeviceState
	}
	rc, err := target.Open()
	if err != nil {
		return nil, 0, err
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || len(b) == 0 {
		return nil, 0, fmt.Errorf("read payload to corrupt: %v: %w", err, vm.ErrCorrupt)
	}
	bit %= uint64(len(b)) * 8
	b[bit/8] ^= 1 << (bit % 8)
	if snap.Memory != nil {
		return vm.NewSnapshot(snap.Metadata, snap.DeviceState, vm.BytesPayload(b), nil), int64(bit / 8), nil
	}
	return vm.NewSnapshot(snap.Metadata, vm.BytesPayload(b), nil, nil), int64(bit / 8), nil
}

// zeroPayload is n zero bytes, streamed, never held in memory.
type zeroPayload int64

func (z zeroPayload) Size() int64 { return int64(z) }
func (z zeroPayload) Open() (io.ReadCloser, error) {
	return io.NopCloser(io.LimitReader(zeroReader{}, int64(z))), nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// hostStore is the package store as one host process reaches it.
type hostStore struct {
	h     *host
	epoch int
	s     *Store
}

var _ teleport.ChunkStore = (*hostStore)(nil)

func (s *hostStore) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	after, err := s.h.enter(s.epoch, "store open chunks "+pkg.ID)
	if err != nil {
		return nil, err
	}
	cr, err := s.s.OpenChunks(ctx, pkg)
	if err = s.h.leave(after, "store open chunks "+pkg.ID, err); err != nil {
		return nil, err
	}
	return &hostChunks{s: s, id: pkg.ID, r: cr}, nil
}

type hostChunks struct {
	s  *hostStore
	id string
	r  teleport.ChunkReader
}

func (c *hostChunks) Close() error { return c.r.Close() }

func (c *hostChunks) FetchChunks(ctx context.Context, ids []teleport.ChunkID, fn func(teleport.ChunkID, []byte) error) error {
	after, err := c.s.h.enter(c.s.epoch, "store fetch chunks "+c.id)
	if err != nil {
		return err
	}
	return c.s.h.leave(after, "store fetch chunks "+c.id, c.r.FetchChunks(ctx, ids, fn))
}

func (s *hostStore) Create(ctx context.Context, id string) (teleport.Writer, error) {
	after, err := s.h.enter(s.epoch, "store create "+id)
	if err != nil {
		return nil, err
	}
	w, err := s.s.Create(ctx, id)
	if err = s.h.leave(after, "store create "+id, err); err != nil {
		return nil, err
	}
	return &hostWriter{s: s, id: id, w: w}, nil
}

func (s *hostStore) Open(ctx context.Context, id string) (teleport.Reader, error) {
	after, err := s.h.enter(s.epoch, "store open "+id)
	if err != nil {
		return nil, err
	}
	r, err := s.s.Open(ctx, id)
	if err = s.h.leave(after, "store open "+id, err); err != nil {
		return nil, err
	}
	return &hostReader{s: s, id: id, r: r}, nil
}

func (s *hostStore) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	after, err := s.h.enter(s.epoch, "store stat "+id)
	if err != nil {
		return nil, err
	}
	p, err := s.s.Stat(ctx, id)
	return p, s.h.leave(after, "store stat "+id, err)
}

func (s *hostStore) List(ctx context.Context) ([]*teleport.Package, error) {
	after, err := s.h.enter(s.epoch, "store list")
	if err != nil {
		return nil, err
	}
	l, err := s.s.List(ctx)
	return l, s.h.leave(after, "store list", err)
}

func (s *hostStore) Delete(ctx context.Context, id string) error {
	after, err := s.h.enter(s.epoch, "store delete "+id)
	if err != nil {
		return err
	}
	return s.h.leave(after, "store delete "+id, s.s.Delete(ctx, id))
}

type hostWriter struct {
	s  *hostStore
	id string
	w  teleport.Writer
}

var _ teleport.ChunkWriter = (*hostWriter)(nil)

func (w *hostWriter) RefChunk(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	after, err := w.s.h.enter(w.s.epoch, "store ref chunk "+w.id)
	if err != nil {
		return teleport.ChunkInfo{}, false, err
	}
	info, ok, err := w.w.(teleport.ChunkWriter).RefChunk(ctx, id)
	return info, ok, w.s.h.leave(after, "store ref chunk "+w.id, err)
}

func (w *hostWriter) PutChunk(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) error {
	after, err := w.s.h.enter(w.s.epoch, "store put chunk "+w.id)
	if err != nil {
		return err
	}
	return w.s.h.leave(after, "store put chunk "+w.id, w.w.(teleport.ChunkWriter).PutChunk(ctx, id, info, stored))
}

func (w *hostWriter) Write(p []byte) (int, error) {
	after, err := w.s.h.enter(w.s.epoch, "store write "+w.id)
	if err != nil {
		return 0, err
	}
	n, err := w.w.Write(p)
	if after {
		return 0, w.s.h.leave(after, "store write "+w.id, err)
	}
	return n, err
}

func (w *hostWriter) Commit(ctx context.Context, m *teleport.Package) error {
	after, err := w.s.h.enter(w.s.epoch, "store commit "+w.id)
	if err != nil {
		return err
	}
	return w.s.h.leave(after, "store commit "+w.id, w.w.Commit(ctx, m))
}

func (w *hostWriter) Abort(ctx context.Context) error {
	after, err := w.s.h.enter(w.s.epoch, "store abort "+w.id)
	if err != nil {
		return err
	}
	return w.s.h.leave(after, "store abort "+w.id, w.w.Abort(ctx))
}

type hostReader struct {
	s  *hostStore
	id string
	r  teleport.Reader
}

func (r *hostReader) Size() int64  { return r.r.Size() }
func (r *hostReader) Close() error { return r.r.Close() }

func (r *hostReader) ReadAt(p []byte, off int64) (int, error) {
	after, err := r.s.h.enter(r.s.epoch, "store read "+r.id)
	if err != nil {
		return 0, err
	}
	n, err := r.r.ReadAt(p, off)
	if after {
		return 0, r.s.h.leave(after, "store read "+r.id, err)
	}
	return n, err
}

// readAllBounded reads at most limit bytes (the simulated agent runtime's
// workspace reader).
func readAllBounded(r io.Reader, limit int64) ([]byte, error) {
	var b bytes.Buffer
	n, err := io.Copy(&b, io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if n > limit {
		return nil, fmt.Errorf("more than %d bytes: %w", limit, vm.ErrCorrupt)
	}
	return b.Bytes(), nil
}
