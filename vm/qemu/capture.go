package qemu

// Snapshots of a running or paused VM: the split layout (device state +
// the sparse guest RAM file) and the single layout (one migration stream).

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Snapshot captures a Running or Paused VM in the factory's layout.
func (v *Instance) Snapshot(ctx context.Context) (*vm.Snapshot, error) {
	return v.SnapshotLayout(ctx, v.rec.Layout)
}

// SnapshotLayout captures the VM in the given layout. A Running VM is
// resumed afterwards (also when the snapshot fails); a Paused one stays
// paused. The payloads are files owned by the returned snapshot.
func (v *Instance) SnapshotLayout(ctx context.Context, layout vm.Layout) (_ *vm.Snapshot, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpSnapshot); err != nil {
		return nil, err
	}
	if layout != vm.LayoutSplit && layout != vm.LayoutSingle {
		return nil, fmt.Errorf("vm %s: snapshot layout %q (want split or single): %w", v.rec.Name, layout, vm.ErrInvalidConfig)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, migrateTimeoutDefault)
		defer cancel()
	}
	start := time.Now()
	wasRunning := v.State() == vm.StateRunning
	if err := os.MkdirAll(v.f.tmpDir(), 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(v.f.tmpDir(), snapDirPrefix(os.Getpid()))
	if err != nil {
		return nil, err
	}
	release := func() error { return os.RemoveAll(dir) }
	c := &capture{v: v, layout: layout, dir: dir, statePath: filepath.Join(dir, "state"),
		ramBytes: int64(v.rec.Config.MemoryMiB) << 20, wasRunning: wasRunning, stats: SnapshotStats{Layout: layout}}
	defer func() {
		if c.ram != nil {
			c.ram.Close()
		}
		if c.raw != nil {
			c.raw.Close()
			os.Remove(c.raw.Name())
		}
		if err == nil {
			return
		}
		release()
		// A failed snapshot leaves the source as it was.
		if wasRunning && !c.stopped.IsZero() && v.State() != vm.StateCrashed {
			// The resume must run even when ctx ended, but not forever.
			rctx, cancel := vm.SettleContext(ctx)
			defer cancel()
			if q, qerr := v.qmpConn(rctx); qerr == nil {
				if cerr := q.Call(rctx, "cont", nil, nil); cerr != nil {
					err = fmt.Errorf("%w (and resuming the VM failed: %v)", err, cerr)
				}
			}
		}
		err = v.failed(vm.OpSnapshot, err)
	}()
	if c.q, err = v.qmpConn(ctx); err != nil {
		return nil, err
	}
	var unsubscribe func()
	c.events, unsubscribe = c.q.subscribe()
	defer unsubscribe()
	if layout == vm.LayoutSplit {
		if c.ram, err = os.Open(v.ramPath()); err != nil {
			return nil, fmt.Errorf("open guest RAM: %w", err)
		}
		c.src = c.ram
	}
	status, err := c.q.status(ctx)
	if err != nil {
		return nil, err
	}
	switch {
	case !wasRunning && status == "postmigrate":
		err = c.reuseSaved(ctx)
	case layout == vm.LayoutSplit:
		err = c.split(ctx)
	default:
		err = c.single(ctx)
	}
	if err != nil {
		return nil, err
	}
	if c.kind != "" {
		v.rememberSaved(c.statePath, c.kind, wasRunning)
	}
	// A QEMU that died while we captured it may have left a torn stream
	// behind: such a snapshot is not handed out.
	if v.State() == vm.StateCrashed {
		return nil, errors.New("QEMU exited during the snapshot")
	}
	md := v.metadata(layout)
	sum, err := vm.HashFile(c.statePath)
	if err != nil {
		return nil, err
	}
	md.DeviceStateSHA256, md.DeviceStateSize, md.Checksum = sum.SHA256, sum.Size, sum.CRC32C
	state, err := vm.NewFilePayload(c.statePath)
	if err != nil {
		return nil, err
	}
	var memory vm.Payload
	if layout == vm.LayoutSplit {
		// Encode from the private copy or, for a paused guest, from its
		// RAM file, which nothing writes while the guest is stopped.
		memPath := filepath.Join(dir, "memory")
		if md.MemorySHA256, md.MemorySize, err = c.encode(memPath); err != nil {
			return nil, err
		}
		if memory, err = vm.NewFilePayload(memPath); err != nil {
			return nil, err
		}
	}
	md.SizeBytes = uint64(md.DeviceStateSize + md.MemorySize)
	c.stats.StateBytes, c.stats.MemoryBytes = md.DeviceStateSize, md.MemorySize
	c.stats.Total = time.Since(start)
	v.lastSnap = c.stats
	return vm.NewSnapshot(md, state, memory, release), nil
}

// Kinds of saved device-state streams (see rememberSaved).
const (
	savedDevices  = "devices"  // x-ignore-shared: devices and ROMs only
	savedFull     = "full"     // guest RAM inside
	savedStripped = "stripped" // a full stream with the guest RAM pages taken out
)

// capture is one snapshot in progress.
type capture struct {
	v          *Instance
	layout     vm.Layout
	dir        string
	statePath  string
	ramBytes   int64
	wasRunning bool
	q          *qmpClient
	events     <-chan qmpEvent
	ram        *os.File // the guest RAM file (split)
	raw        *os.File // a private copy of it, when the guest ran on
	src        *os.File // what the memory section is encoded from
	stopped    time.Time
	kind       string // kind of stream written to statePath
	stats      SnapshotStats
}

// split saves the device state apart from guest RAM.
func (c *capture) split(ctx context.Context) error {
	if c.v.liveCapture(c.wasRunning) {
		if err := c.splitLive(ctx); !errors.Is(err, errStream) || errors.Is(err, errStreamLate) {
			return err
		}
		// This QEMU's stream is not one we understand: stop the guest
		// and copy its RAM file instead.
	}
	if err := setupMigration(ctx, c.q, true, true); err != nil {
		return err
	}
	if c.wasRunning {
		// Allocate the copy's pages before the guest stops, so that the
		// copy while it is stopped only moves bytes.
		if err := c.newRaw(); err != nil {
			return err
		}
		preallocate(c.raw, c.ram, c.ramBytes)
		c.stopped = time.Now()
		if err := c.q.Call(ctx, "stop", nil, nil); err != nil {
			return err
		}
	}
	// RAM stays in its file (x-ignore-shared): the stream holds devices.
	t := time.Now()
	if _, err := migrateToFile(ctx, c.q, c.statePath, c.events); err != nil {
		return fmt.Errorf("save device state: %w", err)
	}
	c.kind = savedDevices
	c.stats.StateSave = time.Since(t)
	if c.v.hookAfterStateSaved != nil {
		c.v.hookAfterStateSaved()
	}
	if !c.wasRunning {
		return nil
	}
	// Copy RAM while the guest is stopped; it resumes on its own file and
	// the copy is the snapshot's.
	t = time.Now()
	if _, err := copySparse(c.raw, c.ram, c.ramBytes); err != nil {
		return fmt.Errorf("capture guest RAM: %w", err)
	}
	c.stats.RAMCapture = time.Since(t)
	c.src = c.raw
	return c.resume(ctx)
}

// splitLive lets QEMU copy RAM with a live migration (ramstream.go).
func (c *capture) splitLive(ctx context.Context) error {
	if err := c.newRaw(); err != nil {
		return err
	}
	sf, err := os.OpenFile(c.statePath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	t := time.Now()
	completed, qemuDowntime, err := captureRAMLive(ctx, c.q, c.events, c.raw, c.ramBytes, sf)
	if cerr := sf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if errors.Is(err, errStreamLate) && c.wasRunning {
			c.stopped = time.Now() // stopped for good: the caller resumes it
		}
		if errors.Is(err, errStream) {
			c.stats.LiveFallback = err.Error()
			c.raw.Close()
			os.Remove(c.raw.Name())
			c.raw = nil
		}
		return fmt.Errorf("capture guest RAM: %w", err)
	}
	c.kind = savedStripped
	c.stats.LiveRAM, c.stats.RAMCapture, c.src = true, time.Since(t), c.raw
	if c.v.hookAfterStateSaved != nil {
		c.v.hookAfterStateSaved()
	}
	if !c.wasRunning {
		return nil
	}
	c.stopped = completed.Add(-qemuDowntime)
	return c.resume(ctx)
}

// single saves the whole VM, RAM inside, in one stream. From a running
// guest under KVM QEMU copies RAM live and stops the guest only for the
// last dirty pages; under TCG the guest is stopped first (liveCapture).
func (c *capture) single(ctx context.Context) error {
	if err := setupMigration(ctx, c.q, false, true); err != nil {
		return err
	}
	live := c.v.liveCapture(c.wasRunning)
	if c.wasRunning {
		c.stopped = time.Now()
		if !live {
			if err := c.q.Call(ctx, "stop", nil, nil); err != nil {
				return err
			}
		}
	}
	st, err := migrateToFile(ctx, c.q, c.statePath, c.events)
	if err != nil {
		return fmt.Errorf("save VM: %w", err)
	}
	c.kind = savedFull
	if c.v.hookAfterStateSaved != nil {
		c.v.hookAfterStateSaved()
	}
	if !c.wasRunning {
		return nil
	}
	if live {
		c.stats.LiveRAM = true
		c.stopped = time.Now().Add(-time.Duration(st.Downtime) * time.Millisecond)
	}
	return c.resume(ctx)
}

// resume continues the guest that the capture stopped.
func (c *capture) resume(ctx context.Context) error {
	if err := c.q.Call(ctx, "cont", nil, nil); err != nil {
		return err
	}
	c.stats.Downtime = time.Since(c.stopped)
	c.stopped = time.Time{}
	return nil
}

func (c *capture) newRaw() error {
	raw, err := os.OpenFile(filepath.Join(c.dir, "mem.raw"), os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	c.raw = raw
	return raw.Truncate(c.ramBytes)
}

// encode writes the memory section, hashing it on the way.
func (c *capture) encode(path string) (string, int64, error) {
	mf, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", 0, err
	}
	mh := vm.NewAsyncHash(sha256.New())
	t := time.Now()
	n, err := encodeMemory(io.MultiWriter(mf, mh), c.src, c.ramBytes)
	sum := hex.EncodeToString(mh.Sum())
	c.stats.Encode = time.Since(t)
	if cerr := mf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", 0, fmt.Errorf("encode guest RAM: %w", err)
	}
	return sum, n, nil
}

func (v *Instance) metadata(layout vm.Layout) vm.SnapshotMetadata {
	now := time.Now()
	var r [3]byte
	rand.Read(r[:])
	return vm.SnapshotMetadata{
		SnapshotID:   fmt.Sprintf("%s-%d-%s", v.rec.Name, now.UnixMilli(), hex.EncodeToString(r[:])),
		VMID:         v.rec.Name,
		CreatedAtMs:  now.UnixMilli(),
		Architecture: vm.HostArchitecture(), VCPUCount: v.rec.Config.VCPUs, MemoryMiB: v.rec.Config.MemoryMiB,
		IsFullSnapshot: true,
		Backend:        BackendName, BackendVersion: v.f.qemuVersion, HostID: v.f.opts.HostID, Layout: layout,
		BaseImageVersion: v.rec.Config.BaseImageVersion,
		Compat:           compat(v.f.qemuVersion, v.rec.Accel, v.rec.CPU),
	}
}

// SnapshotLayoutDefault is the layout Snapshot uses for this VM.
func (v *Instance) SnapshotLayoutDefault() vm.Layout { return v.rec.Layout }

// Compat is what a full snapshot of this VM requires of the restoring
// host (see Factory.Host).
func (v *Instance) Compat() map[string]string {
	return compat(v.f.qemuVersion, v.rec.Accel, v.rec.CPU)
}
