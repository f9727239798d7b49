package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Clone restores copies of the VM on this host from one capture
// (vm.Cloner): the source stops once, for as long as a snapshot of it
// would (its device state saved, its RAM and workspace disk copied), and
// runs on; each copy gets that device state, RAM and disk as its own, with
// cfgs[i]'s name, hostname, agent id and ports, and goes to start as soon
// as it is Paused. Nothing is
// encoded, hashed or decoded: the capture never leaves this host, so
// there is no transport to verify against, and the copies start as fast
// as their QEMUs do. On failure no copy is left behind, or the error says
// which one is (vm.ErrLeftBehind).
func (v *Instance) Clone(ctx context.Context, cfgs []vm.Config, start func(context.Context, int, vm.Instance) error) (_ []vm.Instance, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpSnapshot); err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, migrateTimeoutDefault)
		defer cancel()
	}
	// The copies exist before the source stops: a taken name or port
	// refuses the clone while the source runs undisturbed.
	src := v.rec.Config
	clones := make([]*Instance, 0, len(cfgs))
	defer func() {
		if err == nil {
			return
		}
		for _, c := range clones {
			if derr := c.Destroy(context.WithoutCancel(ctx)); derr != nil {
				err = fmt.Errorf("%w; removing copy %s failed too (%v): %w", err, c.ID(), derr, vm.ErrLeftBehind)
			}
		}
	}()
	for _, cfg := range cfgs {
		if err := cloneDevices(&cfg, src); err != nil {
			return nil, err
		}
		c, err := v.f.createInstance(ctx, cfg, false, true)
		if err != nil {
			return nil, err
		}
		// Same machine: the device state loads into the same CPU model and
		// accelerator.
		c.rec.Accel, c.rec.CPU, c.rec.TSCKHz = v.rec.Accel, v.rec.CPU, v.rec.TSCKHz
		if err := c.saveRecord(); err != nil {
			c.Destroy(context.WithoutCancel(ctx))
			return nil, err
		}
		clones = append(clones, c)
	}

	capt, err := v.newCapture(vm.LayoutSplit)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(capt.dir)
	defer capt.closeFiles()
	if err := capt.run(ctx); err != nil {
		return nil, capt.undo(ctx, err)
	}
	v.lastSnap = capt.stats
	disk := capt.diskCopy
	if disk == "" {
		disk = v.diskPath()
	}
	// The copies map the captured RAM copy-on-write: it must not change
	// under them, so a paused source's live RAM file is copied first. The
	// file goes when Clone returns: the copies' QEMUs keep their maps.
	base := ""
	if capt.raw != nil && capt.src == capt.raw {
		base = capt.raw.Name()
	} else {
		base = filepath.Join(capt.dir, "mem.base")
		out, err := os.OpenFile(base, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err == nil {
			if err = out.Truncate(capt.ramBytes); err == nil {
				_, err = copySparse(out, capt.src, capt.ramBytes)
			}
			if cerr := out.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			return nil, fmt.Errorf("vm %s: clone: copy guest RAM: %w", v.rec.Name, err)
		}
	}

	errs := make([]error, len(clones))
	var wg sync.WaitGroup
	for i, c := range clones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = c.loadCapture(ctx, capt, base, disk); errs[i] == nil && start != nil {
				errs[i] = start(ctx, i, c)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("vm %s: clone: %w", v.rec.Name, err)
	}
	out := make([]vm.Instance, len(clones))
	for i, c := range clones {
		out[i] = c
	}
	return out, nil
}

// cloneDevices makes cfg a copy of src's machine: its size, network device
// (mode and MAC; the ports are cfg's) and workspace disk.
func cloneDevices(cfg *vm.Config, src vm.Config) error {
	if cfg.Network != "" && cfg.Network != src.Network {
		return fmt.Errorf("vm %s: a copy of a VM with network %s cannot have network %s: %w", cfg.Name, orNoneMode(src.Network), cfg.Network, vm.ErrIncompatible)
	}
	cfg.VCPUs, cfg.MemoryMiB, cfg.Disk = src.VCPUs, src.MemoryMiB, src.Disk
	cfg.Network, cfg.MAC = src.Network, src.MAC
	if !cfg.Network.HasDevice() {
		cfg.Publish, cfg.Forwards = nil, nil
	}
	cfg.BaseImageVersion = src.BaseImageVersion
	return nil
}

func orNoneMode(m vm.NetworkMode) vm.NetworkMode {
	if m == "" {
		return vm.NetworkNone
	}
	return m
}

// loadCapture makes a capture this copy's own, its guest RAM mapped
// copy-on-write from base, its disk copied sparse (while its QEMU starts),
// its device state linked, and loads it into a new QEMU.
func (v *Instance) loadCapture(ctx context.Context, c *capture, base, disk string) (err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	defer func() {
		os.Remove(v.path(stagedState))
		v.launchBase = ""
		if err != nil {
			v.clearRuntime()
		}
	}()
	t := time.Now()
	if err := copyFileTo(c.statePath, v.path(stagedState)); err != nil {
		return err
	}
	done := make(chan error, 1)
	if v.hasDisk() {
		// The image exists at its size before QEMU opens it; QEMU reads
		// none of it before the incoming migration, which waits for the
		// copy.
		in, err := os.Open(disk)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(v.diskPath(), os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
		if err != nil {
			return err
		}
		defer out.Close()
		if err := out.Truncate(v.rec.Config.Disk.SizeBytes); err != nil {
			return err
		}
		go func() {
			_, err := copySparse(out, in, v.rec.Config.Disk.SizeBytes)
			done <- err
		}()
	} else {
		done <- nil
	}
	var stage time.Duration
	staged := sync.OnceValue(func() error {
		err := <-done
		stage = time.Since(t)
		if err != nil {
			return fmt.Errorf("copy the workspace disk: %w", err)
		}
		return nil
	})
	defer staged() // never return while the copy still writes
	v.launchBase = base
	v.stmu.Lock()
	v.run.PrivateRAM = true
	v.stmu.Unlock()
	err = v.loadStaged(ctx, RestoreStats{}, staged)
	v.lastRestore.Stage = stage
	return err
}
