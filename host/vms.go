package host

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

// Defaults for new VMs.
const (
	VMMemoryMiBDefault = 256
	VMCPUsDefault      = 1
	// VMNetworkDefault: a sandbox reaches nothing but what it is given.
	VMNetworkDefault = vm.NetworkRestricted
)

// VMSpec describes a VM to create.
type VMSpec struct {
	Name      string
	Backend   string // "" for the host's default
	Accel     string // for backends with a choice; "" for the default
	VCPUs     int    // 0 for VMCPUsDefault
	MemoryMiB int    // 0 for VMMemoryMiBDefault
	Env       map[string]string
	Workdir   string
	// Network is none, restricted or full ("" for VMNetworkDefault);
	// Publish and Forwards are its ports (host -> guest, guest -> host).
	Network  vm.NetworkMode
	Publish  []vm.Publish
	Forwards []vm.Forward
	// DiskBytes sizes the workspace disk mounted at /workspace (0: none;
	// /workspace is then in guest RAM).
	DiskBytes int64
}

// VMInfo describes one VM of the host: running, paused, stopped, or
// suspended into a package.
type VMInfo struct {
	Name      string    `json:"name"`
	Backend   string    `json:"backend"`
	State     string    `json:"state"`
	PID       int       `json:"pid,omitempty"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	Accel     string    `json:"accel,omitempty"`
	Dir       string    `json:"dir,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// A suspended VM's package and store.
	PackageID string `json:"package_id,omitempty"`
	Store     string `json:"store,omitempty"`
	Network   string `json:"network,omitempty"`
	// Ports are the published ports as bound now: a host port asked as 0
	// shows the one it got.
	Ports     []vm.PortBinding `json:"ports,omitempty"`
	Forwards  []vm.Forward     `json:"forwards,omitempty"`
	DiskBytes int64            `json:"disk_bytes,omitempty"`
	Hostname  string           `json:"hostname,omitempty"`
	// AgentID is the agent the VM runs (its name unless it came as a move
	// of another agent).
	AgentID string `json:"agent_id,omitempty"`
	// MovedTo is the package a committed move left this VM behind for
	// (its hypervisor would not go): it refuses to run; remove it.
	MovedTo string `json:"moved_to,omitempty"`
}

// StateSuspended is a VMInfo state: the VM is a package in a store.
const StateSuspended = "suspended"

func infoOf(i vm.Info) VMInfo {
	return VMInfo{Name: i.Name, Backend: i.Backend, State: i.State.String(), PID: i.PID, VCPUs: i.VCPUs, MemoryMiB: i.MemoryMiB,
		Accel: i.Accel, Dir: i.Dir, CreatedAt: i.CreatedAt, Network: string(i.Network), Ports: i.Ports, Forwards: i.Forwards,
		DiskBytes: i.DiskBytes, Hostname: i.Hostname, AgentID: orName(i.AgentID, i.Name)}
}

func orName(id, name string) string {
	if id == "" {
		return name
	}
	return id
}

// CreateVM creates a VM and boots it; it returns once the guest answers.
// The name must be free on this host, among every backend's VMs and the
// suspended ones.
func (h *Host) CreateVM(ctx context.Context, spec VMSpec) (*VMInfo, error) {
	if err := vm.ValidateName(spec.Name); err != nil {
		return nil, err
	}
	unlock, err := h.lockVM(ctx, spec.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := h.nameFree(ctx, spec.Name); err != nil {
		return nil, err
	}
	f, err := h.Factory(ctx, spec.Backend, spec.Accel)
	if err != nil {
		return nil, err
	}
	if err := h.durable(ctx, f); err != nil {
		return nil, err
	}
	cfg := vm.Config{Name: spec.Name, VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, Env: spec.Env, Workdir: spec.Workdir,
		Network: spec.Network, Publish: spec.Publish, Forwards: spec.Forwards, Disk: vm.Disk{SizeBytes: spec.DiskBytes}}
	if cfg.Network == "" {
		cfg.Network = VMNetworkDefault
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = VMCPUsDefault
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = VMMemoryMiBDefault
	}
	inst, err := f.Create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := inst.Start(ctx); err != nil {
		return nil, vm.RemoveFailed(ctx, inst, err)
	}
	lv := h.keep(spec.Name, inst, f)
	// A move record of an earlier VM of this name is stale: that VM is
	// gone, or the name would not have been free.
	if err := h.clearMoved(spec.Name); err != nil {
		return nil, err
	}
	info := h.describe(ctx, lv)
	return &info, nil
}

// durable refuses, for a caller that exits after each call, a backend
// whose VMs would die with it.
func (h *Host) durable(ctx context.Context, f vm.Factory) error {
	if _, ok := f.(vm.Attacher); ok || !h.o.OneShot {
		return nil
	}
	return fmt.Errorf("backend %s keeps its VMs only inside the process that made them, and this command exits when it is done; "+
		"use a backend whose VMs outlive one command (%s) or embed the host library: %w", f.Host().Backend, strings.Join(h.durableBackends(ctx), ", "), ErrNotDurable)
}

func (h *Host) durableBackends(ctx context.Context) []string {
	var out []string
	for _, b := range h.o.Backends {
		f, err := h.Factory(ctx, b.Name, "")
		if err != nil {
			continue
		}
		if _, ok := f.(vm.Attacher); ok {
			out = append(out, b.Name)
		}
	}
	if len(out) == 0 {
		return []string{"none runs here"}
	}
	return out
}

// nameFree fails with vm.ErrAlreadyExists when name is taken on this host.
func (h *Host) nameFree(ctx context.Context, name string) error {
	if _, err := h.readSuspended(name); err == nil {
		return fmt.Errorf("vm %s is suspended (kelpie vm resume %s, or vm rm it): %w", name, name, vm.ErrAlreadyExists)
	}
	_, err := h.attach(ctx, name)
	switch {
	case err == nil:
		return fmt.Errorf("vm %s: %w", name, vm.ErrAlreadyExists)
	case errors.Is(err, vm.ErrNotFound):
		return nil
	}
	return err
}

// keep records a handle on VM name. If another caller kept one first (two
// attached at once), that one stays and this one is let go: one handle per
// VM, or a backend whose sockets serve one client would be blocked.
func (h *Host) keep(name string, inst vm.Instance, f vm.Factory) *liveVM {
	lv := &liveVM{inst: inst, f: f, backend: f.Host().Backend}
	h.mu.Lock()
	prev := h.live[name]
	if prev == nil || prev.inst == inst {
		h.live[name] = lv
	}
	h.mu.Unlock()
	if prev != nil && prev.inst != inst {
		vm.Detach(inst)
		return prev
	}
	return lv
}

func (h *Host) forget(name string) {
	h.mu.Lock()
	delete(h.live, name)
	h.mu.Unlock()
}

// attach finds VM name: one this process holds, else one a backend can
// re-attach to (a VM another process made).
func (h *Host) attach(ctx context.Context, name string) (*liveVM, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, err
	}
	h.mu.Lock()
	lv := h.live[name]
	h.mu.Unlock()
	if lv != nil {
		return lv, nil
	}
	var unavailable []string
	looked := 0
	for _, b := range h.o.Backends {
		f, err := h.Factory(ctx, b.Name, "")
		if err != nil {
			unavailable = append(unavailable, err.Error())
			continue
		}
		looked++
		inst, err := vm.Attach(ctx, f, name)
		switch {
		case err == nil:
			return h.keep(name, inst, f), nil
		case errors.Is(err, vm.ErrNotFound), errors.Is(err, vm.ErrNoAttach):
			continue
		}
		return nil, err
	}
	if looked == 0 {
		return nil, fmt.Errorf("no VM %s on this host: no backend runs here (%s): %w", name, strings.Join(unavailable, "; "), vm.ErrNotFound)
	}
	return nil, fmt.Errorf("no VM %s on this host: %w", name, vm.ErrNotFound)
}

// describe is a VM's VMInfo, from its backend's listing where it has one.
func (h *Host) describe(ctx context.Context, lv *liveVM) VMInfo {
	if l, ok := lv.f.(vm.Lister); ok {
		if infos, err := l.List(ctx); err == nil {
			for _, i := range infos {
				if i.Name == lv.inst.ID() {
					return infoOf(i)
				}
			}
		}
	}
	c := lv.inst.Config()
	return VMInfo{Name: lv.inst.ID(), Backend: lv.backend, State: lv.inst.State().String(), VCPUs: c.VCPUs, MemoryMiB: c.MemoryMiB,
		Network: string(c.Network), Forwards: c.Forwards, DiskBytes: c.Disk.SizeBytes, Hostname: c.GuestHostname(),
		AgentID: orName(c.AgentID, lv.inst.ID())}
}

// VM describes VM name.
func (h *Host) VM(ctx context.Context, name string) (*VMInfo, error) {
	if rec, err := h.readSuspended(name); err == nil {
		info := rec.info()
		return &info, nil
	}
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	info := h.describe(ctx, lv)
	info.MovedTo = h.movedTo(name)
	return &info, nil
}

// VMs lists every VM of this host, sorted by name: those its backends
// list, those this process holds, and the suspended ones.
func (h *Host) VMs(ctx context.Context) ([]VMInfo, error) {
	byName := map[string]VMInfo{}
	for _, b := range h.o.Backends {
		f, err := h.Factory(ctx, b.Name, "")
		if err != nil {
			continue // a backend that cannot run here has no VMs here
		}
		infos, err := vm.List(ctx, f)
		if errors.Is(err, vm.ErrNoList) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("backend %s: %w", b.Name, err)
		}
		for _, i := range infos {
			byName[i.Name] = infoOf(i)
		}
	}
	h.mu.Lock()
	var held []*liveVM
	for _, name := range sortedKeys(h.live) {
		if _, listed := byName[name]; !listed {
			held = append(held, h.live[name])
		}
	}
	h.mu.Unlock()
	for _, lv := range held {
		byName[lv.inst.ID()] = h.describe(ctx, lv)
	}
	recs, err := h.listSuspended()
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		byName[r.Name] = r.info()
	}
	out := make([]VMInfo, 0, len(byName))
	for _, name := range sortedKeys(byName) {
		info := byName[name]
		info.MovedTo = h.movedTo(name)
		out = append(out, info)
	}
	return out, nil
}

// Exec runs a command in VM name's guest.
func (h *Host) Exec(ctx context.Context, name, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	lv, err := h.attach(ctx, name)
	if err != nil {
		return vm.ExecResult{}, err
	}
	return lv.inst.Exec(ctx, cmd, args, opts)
}

// StartVM boots a stopped VM.
func (h *Host) StartVM(ctx context.Context, name string) error {
	return h.withVM(ctx, name, func(lv *liveVM) error {
		if err := h.refuseMoved(ctx, name); err != nil {
			return err
		}
		return lv.inst.Start(ctx)
	})
}

// PauseVM freezes a running VM's vCPUs.
func (h *Host) PauseVM(ctx context.Context, name string) error {
	return h.withVM(ctx, name, func(lv *liveVM) error { return lv.inst.Pause(ctx) })
}

// StopVM shuts a VM down; its memory is lost.
func (h *Host) StopVM(ctx context.Context, name string) error {
	return h.withVM(ctx, name, func(lv *liveVM) error { return lv.inst.Stop(ctx) })
}

func (h *Host) withVM(ctx context.Context, name string, f func(*liveVM) error) error {
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	lv, err := h.attach(ctx, name)
	if err != nil {
		return err
	}
	return f(lv)
}

// ResumeVM continues a paused VM, or restores a suspended one under its
// name (see Resume).
func (h *Host) ResumeVM(ctx context.Context, name string) (*ResumeResult, error) {
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec, err := h.readSuspended(name); err == nil {
		return h.resumeSuspended(ctx, rec)
	} else if !errors.Is(err, vm.ErrNotFound) {
		return nil, err
	}
	if err := h.refuseMoved(ctx, name); err != nil {
		return nil, err
	}
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := lv.inst.Resume(ctx); err != nil {
		return nil, err
	}
	// The guest answers, with its wall clock set from the host's, before
	// ResumeVM returns.
	if err := vm.WaitReady(ctx, lv.inst); err != nil {
		return nil, fmt.Errorf("vm %s runs again, but its guest does not answer: %w", name, err)
	}
	return &ResumeResult{Name: name}, nil
}

// GuestTime reads VM name's guest clocks, with the host's clock at the
// same moment (vm.TimeReader).
func (h *Host) GuestTime(ctx context.Context, name string) (vm.GuestTime, error) {
	lv, err := h.attach(ctx, name)
	if err != nil {
		return vm.GuestTime{}, err
	}
	return vm.ReadGuestTime(ctx, lv.f, lv.inst)
}

// RemoveVM destroys a VM and everything it owns on the host; a suspended
// VM's package goes with it.
func (h *Host) RemoveVM(ctx context.Context, name string) (*RemoveResult, error) {
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	res := &RemoveResult{Name: name}
	rec, rerr := h.readSuspended(name)
	lv, err := h.attach(ctx, name)
	switch {
	case err == nil:
		if err := lv.inst.Destroy(ctx); err != nil {
			return nil, err
		}
		h.forget(name)
	case !errors.Is(err, vm.ErrNotFound) || rerr != nil:
		return nil, err
	}
	if err := h.clearMoved(name); err != nil {
		return nil, fmt.Errorf("vm %s removed, but its move record stays: %w", name, err)
	}
	if rerr == nil {
		if err := h.removeSuspended(ctx, rec); err != nil {
			return nil, err
		}
		res.PackageID = rec.PackageID
	}
	return res, nil
}

// RemoveResult says what RemoveVM removed.
type RemoveResult struct {
	Name string
	// PackageID is the suspended VM's package, removed with it.
	PackageID string
}

// SnapshotResult describes a snapshot written to a file.
type SnapshotResult struct {
	SnapshotID string
	Layout     vm.Layout
	SizeBytes  int64 // the blob file
	Format     int   // its KLP1 version
	// LogicalBytes: the device state and guest memory it stands for.
	LogicalBytes int64
	// Downtime is how long the snapshot kept a running guest stopped,
	// where the backend measures it (DowntimeKnown).
	Downtime      time.Duration
	DowntimeKnown bool
	// NoDisk says why the blob lacks the VM's workspace disk ("" when the
	// VM has none or the blob carries it): a KLP1 v1 blob has no section
	// for it.
	NoDisk string
}

// SnapshotVM writes a snapshot of VM name to the KLP1 blob file out, in
// layout ("" for the backend's own) and format (a KLP1 version; 0 for
// blob.FormatDefault). The VM keeps running (or stays paused). The file
// appears only when complete.
func (h *Host) SnapshotVM(ctx context.Context, name, out string, layout vm.Layout, format int) (*SnapshotResult, error) {
	if format == 0 {
		format = blob.FormatDefault
	}
	if format != blob.Version1 && format != blob.Version2 {
		return nil, fmt.Errorf("blob format %d: %w", format, blob.ErrUnsupportedVersion)
	}
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	capture := vm.SnapshotLayout
	if format == blob.Version2 {
		capture = vm.SnapshotForImage // the packer chunks guest memory itself
	}
	snap, err := capture(ctx, lv.f, lv.inst, layout)
	if err != nil {
		return nil, err
	}
	defer snap.Close()
	res := &SnapshotResult{SnapshotID: snap.Metadata.SnapshotID, Layout: snap.Metadata.Layout, Format: format}
	res.Downtime, res.DowntimeKnown = vm.LastSnapshotDowntime(lv.inst)
	if snap.Disk != nil && !snap.Metadata.Disk.InBlob() {
		res.NoDisk = "a KLP1 v1 blob file has no section for the workspace disk, so this file carries memory and devices only (v2 carries it; teleport out always does)"
	}
	enc, err := blob.WriteSnapshotFile(ctx, out, snap, blob.EncodeOptions{Format: format})
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", out, err)
	}
	res.SizeBytes, res.LogicalBytes = enc.Bytes, enc.LogicalBytes
	return res, nil
}

// liveNames lists the VMs this process holds, for tests and the daemon.
func (h *Host) liveNames() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	names := sortedKeys(h.live)
	return slices.Clip(names)
}
