package qemu

// Restores: the snapshot is checked against this host, staged and verified
// (vm.Stage), and loaded by an incoming migration into a fresh QEMU.

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/kelpie/teleport/vm"
)

// checkSnapshot refuses, before anything starts, a snapshot this host
// cannot restore into a VM configured as cfg: the shared comparison
// (vm.CheckSnapshot) first, then what only the VM's configuration decides.
func (f *Factory) checkSnapshot(md vm.SnapshotMetadata, cfg vm.Config) error {
	if err := vm.CheckSnapshot(md, f.Host()); err != nil {
		return err
	}
	return vm.CheckShape(md, cfg)
}

// restoreDevices makes cfg's devices the snapshot's: its network device
// (mode and MAC; the ports are cfg's when cfg gives the network, else
// the recorded ones), its workspace disk and its hostname. A cfg that asks
// for other devices is refused: the device state must find the devices
// it was saved from.
func restoreDevices(cfg *vm.Config, md vm.SnapshotMetadata) error {
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: "+format+": %w", append([]any{md.SnapshotID}, append(args, vm.ErrIncompatible)...)...)
	}
	switch n := md.Network; {
	case n == nil && cfg.Network.HasDevice():
		return refuse("its VM has no network device, and the VM is configured with network %s", cfg.Network)
	case n == nil:
		cfg.SetNetwork(nil)
	case cfg.Network == "":
		cfg.SetNetwork(n)
	case cfg.Network != n.Mode:
		return refuse("its VM's network is %s, and the VM is configured with %s", n.Mode, cfg.Network)
	case cfg.MAC != "" && cfg.MAC != n.MAC:
		return refuse("its VM's MAC address is %s, and the VM is configured with %s", n.MAC, cfg.MAC)
	default:
		cfg.MAC = n.MAC
	}
	if md.Disk == nil {
		if cfg.Disk.Present() {
			return refuse("its VM has no workspace disk, and the VM is configured with one")
		}
	} else if err := checkDiskConfig(cfg, md.Disk); err != nil {
		return err
	}
	if cfg.Hostname == "" {
		cfg.Hostname = md.Hostname
	}
	return nil
}

// restore loads a snapshot, which the factory has checked against this
// host, into a Created VM, which is Paused afterwards. The payloads are
// verified against the metadata while they are copied into the instance
// directory (guest RAM sparse), before QEMU starts; they are never
// modified.
func (v *Instance) restore(ctx context.Context, snap *vm.Snapshot) (err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpRestore); err != nil {
		return err
	}
	md := snap.Metadata
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, migrateTimeoutDefault)
		defer cancel()
	}
	v.dropConns()
	v.clearRuntime()
	defer func() {
		os.Remove(v.path(stagedState))
		if err != nil {
			v.clearRuntime()
		}
	}()
	var stats RestoreStats
	t := time.Now()
	if err := v.stage(ctx, md, snap); err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	stats.Stage = time.Since(t)
	return v.loadStaged(ctx, stats, nil)
}

// loadStaged starts QEMU waiting for a migration and loads the staged
// device state (stagedState) into it, with the guest RAM and the disk in
// place; the VM is Paused afterwards. When staged is not nil, the RAM and
// disk files exist at their sizes but are still being filled: QEMU maps
// and opens them, and touches neither before the incoming migration, which
// waits for staged. Call with v.mu held.
func (v *Instance) loadStaged(ctx context.Context, stats RestoreStats, staged func() error) error {
	t := time.Now()
	p, q, err := v.launch(ctx, true)
	if err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	stats.Launch = time.Since(t)
	t = time.Now()
	// The payloads passed vm.Stage: whatever fails now is QEMU's, not the
	// snapshot's bytes, and says so with its own category.
	fail := func(err error) error {
		died := !p.alive()
		v.dropConns()
		kctx, cancel := vm.SettleContext(ctx)
		defer cancel()
		p.kill(kctx)
		if died && ctx.Err() == nil {
			return fmt.Errorf("vm %s: restore: QEMU exited while loading the snapshot (%s): %w: %w", v.rec.Name, tailFile(v.path(qemuLog), 600), err, vm.ErrCrashed)
		}
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	v.qmp = q
	ports, err := boundPorts(ctx, q, v.rec.Config.Publish)
	if err != nil {
		return fail(err)
	}
	// Connect the agent before the device state loads: the stream says the
	// host was connected at the snapshot, and a connected socket keeps the
	// restored guest from seeing the port close and reopen.
	v.preconnectAgent(ctx)
	events, unsubscribe := q.subscribe()
	defer unsubscribe()
	// A split snapshot's state is either a device-only stream saved with
	// x-ignore-shared or a full stream with the guest RAM pages taken out
	// (live copies, ramstream.go); the stream says which.
	ignoreShared, err := streamIgnoresShared(v.path(stagedState))
	if err != nil {
		return fail(fmt.Errorf("the device-state stream is not one this QEMU understands (%w): %w", err, vm.ErrIncompatible))
	}
	if staged != nil {
		if err := staged(); err != nil {
			return fail(err)
		}
	}
	if err := setupMigration(ctx, q, ignoreShared, false); err != nil {
		return fail(err)
	}
	sf, err := os.Open(v.path(stagedState))
	if err != nil {
		return fail(err)
	}
	defer sf.Close()
	if err := q.CallWithFile(ctx, "getfd", map[string]any{"fdname": migrateFDName}, sf); err != nil {
		return fail(err)
	}
	if err := q.Call(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + migrateFDName}, nil); err != nil {
		return fail(err)
	}
	if _, err := q.waitMigration(ctx, events); err != nil {
		return fail(err)
	}
	stats.Load = time.Since(t)
	v.lastRestore = stats
	return v.setStatePorts(vm.StatePaused, p, ports)
}

// stage copies the payloads into the instance directory (guest RAM
// decoded sparse) through vm.Stage, which verifies sizes and checksums in
// the same pass; on any error nothing is left behind. A raw memory image
// (KLP1 version 2) goes through vm.StageImage: its pages are written into
// the RAM file at their offsets, chunks fetched and verified in parallel,
// and the pages that hold nothing stay holes.
func (v *Instance) stage(ctx context.Context, md vm.SnapshotMetadata, snap *vm.Snapshot) (err error) {
	switch {
	case snap.DeviceState == nil:
		return fmt.Errorf("snapshot %s has no device state: %w", md.SnapshotID, vm.ErrCorrupt)
	case md.Layout == vm.LayoutSplit && snap.Memory == nil:
		return fmt.Errorf("split snapshot %s has no memory section: %w", md.SnapshotID, vm.ErrCorrupt)
	}
	memTmp := v.ramPath() + stagingSuffix
	defer func() {
		if err != nil {
			os.Remove(memTmp)
			os.Remove(v.path(stagedState))
		}
	}()
	os.Remove(v.path(stagedState))
	deviceState := vm.FileSink(v.path(stagedState))
	disk := diskSink(v.diskPath(), md.Disk)
	ramBytes := int64(v.rec.Config.MemoryMiB) << 20
	if md.Layout == vm.LayoutSplit && md.MemoryFormat == vm.MemoryFormatImage {
		if md.MemorySize != ramBytes {
			return fmt.Errorf("snapshot %s holds %d MiB of RAM, the VM has %d MiB: %w", md.SnapshotID, md.MemorySize>>20, ramBytes>>20, vm.ErrIncompatible)
		}
		f, err := os.OpenFile(memTmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
		if err != nil {
			return err
		}
		err = f.Truncate(ramBytes)
		if err == nil {
			err = vm.StageImage(ctx, snap, deviceState, f, disk)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(v.diskPath())
			return err
		}
		return os.Rename(memTmp, v.ramPath())
	}
	if md.MemoryFormat != "" {
		return fmt.Errorf("snapshot %s: unknown memory format %q: %w", md.SnapshotID, md.MemoryFormat, vm.ErrIncompatible)
	}
	var memory vm.Sink
	if md.Layout == vm.LayoutSplit {
		memory = func(r io.Reader) error {
			f, err := os.OpenFile(memTmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
			if err != nil {
				return err
			}
			err = decodeMemory(f, r, ramBytes)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			return err
		}
	}
	if err := vm.StageWithDisk(ctx, snap, deviceState, memory, disk); err != nil {
		os.Remove(v.diskPath())
		return err
	}
	if md.Layout == vm.LayoutSplit {
		return os.Rename(memTmp, v.ramPath())
	}
	return nil
}
