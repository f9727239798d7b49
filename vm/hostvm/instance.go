package hostvm

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Instance is one VM of a hostvm backend.
//
// Lifecycle calls (Start, Stop, Pause, Resume, Snapshot, Restore, Destroy)
// run one at a time, in call order, and give up waiting for each other when
// their ctx ends. Exec does not wait for them: a command may run while the
// VM is paused for a snapshot, as it would on a real machine.
type Instance struct {
	f   *Factory
	id  string
	dir string
	cfg vm.Config
	ops chan struct{} // held by the lifecycle call in progress

	mu        sync.Mutex
	state     vm.State
	m         Machine // set while a hypervisor runs (or died unreaped)
	closing   bool    // Stop/Destroy is ending m on purpose
	destroyed bool
}

var _ vm.Instance = (*Instance)(nil)

// ID returns the instance id.
func (v *Instance) ID() string { return v.id }

// Config returns the configuration the instance was created with.
func (v *Instance) Config() vm.Config {
	c := v.cfg
	c.Env = maps.Clone(c.Env)
	return c
}

// Dir is the instance's private directory.
func (v *Instance) Dir() string { return v.dir }

// State reports the state; StateCrashed once the hypervisor is gone
// without Stop or Destroy having ended it.
func (v *Instance) State() vm.State {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.refreshLocked()
	return v.state
}

func (v *Instance) refreshLocked() {
	if v.m == nil || v.closing || !isDone(v.m.Done()) {
		return
	}
	switch v.state {
	case vm.StateStarting, vm.StateRunning, vm.StatePaused:
		v.state = vm.StateCrashed
	}
}

func (v *Instance) setState(s vm.State) {
	v.mu.Lock()
	v.state = s
	v.mu.Unlock()
}

func (v *Instance) lock(ctx context.Context, op string) error {
	select {
	case v.ops <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("vm %s: %s: waiting for the previous operation: %w", v.id, op, ctx.Err())
	}
}

func (v *Instance) unlock() { <-v.ops }

// begin checks that op is legal now and returns the machine and state.
// The caller holds the operation lock.
func (v *Instance) begin(ctx context.Context, op string) (Machine, vm.State, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("vm %s: %s: %w", v.id, op, err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.destroyed {
		return nil, 0, fmt.Errorf("vm %s: %s: the VM was destroyed: %w", v.id, op, vm.ErrNotFound)
	}
	v.refreshLocked()
	if v.state == vm.StateCrashed && op != vm.OpStop {
		return nil, 0, fmt.Errorf("vm %s: %s: the hypervisor exited: %w", v.id, op, vm.ErrCrashed)
	}
	if err := vm.CheckTransition(v.id, op, v.state); err != nil {
		return nil, 0, err
	}
	return v.m, v.state, nil
}

// failed wraps a machine error; a machine that died meanwhile makes the VM
// Crashed and the error ErrCrashed.
func (v *Instance) failed(m Machine, op string, err error) error {
	if isDone(m.Done()) {
		v.mu.Lock()
		v.refreshLocked()
		crashed := v.state == vm.StateCrashed
		v.mu.Unlock()
		if crashed {
			return fmt.Errorf("vm %s: %s: %w: %w", v.id, op, err, vm.ErrCrashed)
		}
	}
	return fmt.Errorf("vm %s: %s: %w", v.id, op, err)
}

func (v *Instance) machineSpec() MachineSpec {
	return MachineSpec{ID: v.id, Dir: v.dir, Config: v.Config()}
}

// Start boots a Created or Stopped VM and returns once the guest is ready.
// On failure the VM is back where it was.
func (v *Instance) Start(ctx context.Context) error {
	if err := v.lock(ctx, vm.OpStart); err != nil {
		return err
	}
	defer v.unlock()
	_, prev, err := v.begin(ctx, vm.OpStart)
	if err != nil {
		return err
	}
	v.setState(vm.StateStarting)
	m, err := v.f.driver.Boot(ctx, v.machineSpec())
	if err != nil {
		v.setState(prev)
		return fmt.Errorf("vm %s: start: %w", v.id, err)
	}
	v.mu.Lock()
	v.m, v.state = m, vm.StateRunning
	v.mu.Unlock()
	return nil
}

// Stop ends the hypervisor; guest memory is lost. Stopping a Stopped VM is
// a no-op; a Crashed VM is reaped and becomes Stopped.
func (v *Instance) Stop(ctx context.Context) error {
	if err := v.lock(ctx, vm.OpStop); err != nil {
		return err
	}
	defer v.unlock()
	v.mu.Lock()
	if v.destroyed {
		v.mu.Unlock()
		return fmt.Errorf("vm %s: stop: the VM was destroyed: %w", v.id, vm.ErrNotFound)
	}
	if v.state == vm.StateStopped || v.state == vm.StateCreated {
		v.state = vm.StateStopped
		v.mu.Unlock()
		return nil
	}
	m := v.m
	v.closing = true
	v.mu.Unlock()
	if err := v.shutdown(ctx, m); err != nil {
		return fmt.Errorf("vm %s: stop: %w", v.id, err)
	}
	v.mu.Lock()
	v.state = vm.StateStopped
	v.mu.Unlock()
	return nil
}

// shutdown ends m and removes the restore files it used. The caller set
// closing; shutdown clears it.
func (v *Instance) shutdown(ctx context.Context, m Machine) error {
	if m != nil {
		if err := m.Shutdown(ctx); err != nil {
			v.mu.Lock()
			v.closing = false
			v.mu.Unlock()
			return err
		}
	}
	v.mu.Lock()
	v.m, v.closing = nil, false
	v.mu.Unlock()
	if err := os.RemoveAll(filepath.Join(v.dir, restoreDirName)); err != nil {
		return fmt.Errorf("remove restore files: %w", err)
	}
	return nil
}

// Pause freezes a Running VM.
func (v *Instance) Pause(ctx context.Context) error {
	if err := v.lock(ctx, vm.OpPause); err != nil {
		return err
	}
	defer v.unlock()
	m, _, err := v.begin(ctx, vm.OpPause)
	if err != nil {
		return err
	}
	if err := m.Pause(ctx); err != nil {
		return v.failed(m, vm.OpPause, err)
	}
	v.setState(vm.StatePaused)
	return nil
}

// Resume continues a Paused VM.
func (v *Instance) Resume(ctx context.Context) error {
	if err := v.lock(ctx, vm.OpResume); err != nil {
		return err
	}
	defer v.unlock()
	m, _, err := v.begin(ctx, vm.OpResume)
	if err != nil {
		return err
	}
	if err := m.Resume(ctx); err != nil {
		return v.failed(m, vm.OpResume, err)
	}
	v.setState(vm.StateRunning)
	return nil
}

// Exec runs a command in the guest of a Running VM. Config.Env and
// Config.Workdir are defaults that opts overrides.
func (v *Instance) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	if err := ctx.Err(); err != nil {
		return vm.ExecResult{}, fmt.Errorf("vm %s: exec %s: %w", v.id, cmd, err)
	}
	v.mu.Lock()
	if v.destroyed {
		v.mu.Unlock()
		return vm.ExecResult{}, fmt.Errorf("vm %s: exec: the VM was destroyed: %w", v.id, vm.ErrNotFound)
	}
	v.refreshLocked()
	if v.state == vm.StateCrashed {
		v.mu.Unlock()
		return vm.ExecResult{}, fmt.Errorf("vm %s: exec: the hypervisor exited: %w", v.id, vm.ErrCrashed)
	}
	if err := vm.CheckTransition(v.id, vm.OpExec, v.state); err != nil {
		v.mu.Unlock()
		return vm.ExecResult{}, err
	}
	m := v.m
	v.mu.Unlock()

	if opts.Workdir == "" {
		opts.Workdir = v.cfg.Workdir
	}
	if len(v.cfg.Env) > 0 {
		env := maps.Clone(v.cfg.Env)
		maps.Copy(env, opts.Env)
		opts.Env = env
	}
	res, err := m.Exec(ctx, cmd, args, opts)
	if err != nil {
		return res, v.failed(m, "exec "+cmd, err)
	}
	return res, nil
}

// Snapshot captures a Running or Paused VM into files it owns until the
// snapshot is closed. A Running VM is paused for the save and resumed
// before the files are hashed; if anything fails, it is resumed and no
// files are left.
func (v *Instance) Snapshot(ctx context.Context) (_ *vm.Snapshot, err error) {
	if err := v.lock(ctx, vm.OpSnapshot); err != nil {
		return nil, err
	}
	defer v.unlock()
	m, st, err := v.begin(ctx, vm.OpSnapshot)
	if err != nil {
		return nil, err
	}
	wasRunning := st == vm.StateRunning
	if wasRunning {
		if err := m.Pause(ctx); err != nil {
			return nil, v.failed(m, "snapshot: pause", err)
		}
		v.setState(vm.StatePaused)
	}
	// rollback returns a source that was running to running; it runs even
	// when ctx has ended.
	rollback := func(err error) error {
		if !wasRunning || isDone(m.Done()) {
			return err
		}
		sctx, cancel := vm.SettleContext(ctx)
		defer cancel()
		if rerr := m.Resume(sctx); rerr != nil {
			return fmt.Errorf("%w (and resuming the VM failed: %v)", err, rerr)
		}
		v.setState(vm.StateRunning)
		return err
	}

	snapID, sdir, now, err := v.f.newSnapshotDir(v.id)
	if err != nil {
		return nil, rollback(fmt.Errorf("vm %s: snapshot: %w", v.id, err))
	}
	defer func() {
		if err != nil {
			os.RemoveAll(sdir)
		}
	}()
	files := Files{State: filepath.Join(sdir, stateFileName)}
	if v.f.spec.Layout == vm.LayoutSplit {
		files.Memory = filepath.Join(sdir, memoryFileName)
	}
	if err := m.Save(ctx, files); err != nil {
		return nil, rollback(v.failed(m, vm.OpSnapshot, err))
	}
	if wasRunning {
		// The files are complete once Save returns: let the guest run
		// while they are hashed.
		if err := m.Resume(ctx); err != nil {
			return nil, v.failed(m, "snapshot: resume", err)
		}
		v.setState(vm.StateRunning)
	}
	return v.describe(snapID, sdir, now, files)
}

// describe hashes the saved files and builds the snapshot over them.
func (v *Instance) describe(snapID, sdir string, now time.Time, files Files) (*vm.Snapshot, error) {
	s := v.f.spec
	state, err := vm.HashFile(files.State)
	if err != nil {
		return nil, fmt.Errorf("vm %s: snapshot: read state file: %w", v.id, err)
	}
	if state.Size == 0 {
		return nil, fmt.Errorf("vm %s: snapshot: the %s driver wrote an empty state file: %w", v.id, s.Backend, vm.ErrCorrupt)
	}
	md := vm.SnapshotMetadata{
		SnapshotID: snapID, VMID: v.id, CreatedAtMs: now.UnixMilli(),
		Checksum:     state.CRC32C,
		Architecture: s.Arch, VCPUCount: v.cfg.VCPUs, MemoryMiB: v.cfg.MemoryMiB, IsFullSnapshot: true,
		Backend: s.Backend, BackendVersion: s.BackendVersion, HostID: s.HostID, Layout: s.Layout,
		BaseImageVersion:  v.cfg.BaseImageVersion,
		DeviceStateSHA256: state.SHA256, DeviceStateSize: state.Size,
		Compat: maps.Clone(s.Compat), HostBound: s.HostBound,
	}
	statePayload, err := vm.NewFilePayload(files.State)
	if err != nil {
		return nil, fmt.Errorf("vm %s: snapshot: %w", v.id, err)
	}
	var memPayload vm.Payload
	if files.Memory != "" {
		mem, err := vm.HashFile(files.Memory)
		if err != nil {
			return nil, fmt.Errorf("vm %s: snapshot: read memory file: %w", v.id, err)
		}
		if mem.Size == 0 {
			return nil, fmt.Errorf("vm %s: snapshot: the %s driver wrote an empty memory file: %w", v.id, s.Backend, vm.ErrCorrupt)
		}
		md.MemorySHA256, md.MemorySize = mem.SHA256, mem.Size
		p, err := vm.NewFilePayload(files.Memory)
		if err != nil {
			return nil, fmt.Errorf("vm %s: snapshot: %w", v.id, err)
		}
		memPayload = p
	}
	md.SizeBytes = uint64(md.DeviceStateSize + md.MemorySize)
	return vm.NewSnapshot(md, statePayload, memPayload, func() error { return os.RemoveAll(sdir) }), nil
}

// restore loads snap, which the factory has checked against this host,
// into a Created VM, which is Paused afterwards. Its payloads are copied
// into the VM directory and verified in one pass; the driver never sees
// bytes that failed their checksum. snap is only read.
func (v *Instance) restore(ctx context.Context, snap *vm.Snapshot) error {
	if err := v.lock(ctx, vm.OpRestore); err != nil {
		return err
	}
	defer v.unlock()
	if _, _, err := v.begin(ctx, vm.OpRestore); err != nil {
		return err
	}
	files, err := v.stage(ctx, snap)
	if err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.id, err)
	}
	m, err := v.f.driver.Restore(ctx, v.machineSpec(), files)
	if err != nil {
		os.RemoveAll(filepath.Dir(files.State))
		return fmt.Errorf("vm %s: restore: %w", v.id, err)
	}
	v.mu.Lock()
	v.m, v.state = m, vm.StatePaused
	v.mu.Unlock()
	return nil
}

// stage copies snap's payloads into a fresh restore directory through
// vm.Stage, which verifies sizes and checksums in the same pass; the
// memory file through vm.StageImage, so pages of zeros stay holes (and a
// KLP1 version 2 image is written chunk by chunk, in parallel).
func (v *Instance) stage(ctx context.Context, snap *vm.Snapshot) (Files, error) {
	dir := filepath.Join(v.dir, restoreDirName)
	if err := os.RemoveAll(dir); err != nil {
		return Files{}, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return Files{}, err
	}
	files := Files{State: filepath.Join(dir, stateFileName)}
	var err error
	if v.f.spec.Layout == vm.LayoutSplit {
		files.Memory = filepath.Join(dir, memoryFileName)
		err = stageMemory(ctx, snap, files)
	} else {
		err = vm.Stage(snap, vm.FileSink(files.State), nil)
	}
	if err != nil {
		os.RemoveAll(dir)
		return Files{}, err
	}
	return files, nil
}

// stageMemory stages a split snapshot's payloads, the memory into a file
// of its size.
func stageMemory(ctx context.Context, snap *vm.Snapshot, files Files) error {
	f, err := os.OpenFile(files.Memory, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(snap.Metadata.MemorySize)
	if err == nil {
		err = vm.StageImage(ctx, snap, vm.FileSink(files.State), f, nil)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Destroy ends the hypervisor if it runs and removes the VM directory. A
// destroyed instance refuses further calls with ErrNotFound; a second
// Destroy is a no-op.
func (v *Instance) Destroy(ctx context.Context) error {
	if err := v.lock(ctx, "destroy"); err != nil {
		return err
	}
	defer v.unlock()
	v.mu.Lock()
	if v.destroyed {
		v.mu.Unlock()
		return nil
	}
	m := v.m
	v.closing = true
	v.mu.Unlock()
	if err := v.shutdown(ctx, m); err != nil {
		return fmt.Errorf("vm %s: destroy: %w", v.id, err)
	}
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("vm %s: destroy: %w", v.id, err)
	}
	v.mu.Lock()
	v.destroyed, v.state = true, vm.StateStopped
	v.mu.Unlock()
	return nil
}
