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
func (v *Instance) SnapshotLayout(ctx context.Context, layout vm.Layout) (*vm.Snapshot, error) {
	return v.snapshot(ctx, layout, false)
}

var _ vm.ImageSnapshotter = (*Instance)(nil)

// SnapshotImage is SnapshotLayout for a packer that chunks guest memory
// itself (KLP1 version 2): a split snapshot's memory payload is the guest
// RAM as a raw, sparse image (vm.MemoryFormatImage), neither encoded nor
// hashed here. A running guest's RAM is copied while it is stopped, as
// for any split snapshot, and packed after it resumes; a paused guest's
// RAM file is read in place, so it must stay paused until the snapshot is
// closed (a teleport's move does).
func (v *Instance) SnapshotImage(ctx context.Context, layout vm.Layout) (*vm.Snapshot, error) {
	if layout == "" {
		layout = v.rec.Layout
	}
	return v.snapshot(ctx, layout, true)
}

func (v *Instance) snapshot(ctx context.Context, layout vm.Layout, image bool) (_ *vm.Snapshot, err error) {
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
	c, err := v.newCapture(layout)
	if err != nil {
		return nil, err
	}
	dir := c.dir
	release := func() error { return os.RemoveAll(dir) }
	defer func() {
		c.closeFiles()
		if err != nil {
			release()
			err = c.undo(ctx, err)
		}
	}()
	if err := c.run(ctx); err != nil {
		return nil, err
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
	// The disk is encoded beside the memory (two cores, two streams): from
	// the copy taken while the guest was stopped or, for a paused guest,
	// from its image, which nothing writes while it is stopped.
	type encoded struct {
		md  *vm.DiskMetadata
		p   vm.Payload
		err error
	}
	diskDone := make(chan encoded, 1)
	if v.hasDisk() {
		src := c.diskCopy
		if src == "" {
			src = v.diskPath()
		}
		if image {
			// The image as it is, like guest RAM: a version 2 packer
			// chunks it (and skips its holes) itself.
			var e encoded
			e.md, e.p, e.err = diskImage(src, v.rec.Config.Disk)
			diskDone <- e
		} else {
			go func() {
				t := time.Now()
				var e encoded
				e.md, e.p, e.err = diskPayload(src, filepath.Join(dir, "disk"), v.rec.Config.Disk)
				c.stats.DiskEncode = time.Since(t)
				diskDone <- e
			}()
		}
	} else {
		diskDone <- encoded{}
	}
	var memory vm.Payload
	var merr error
	switch {
	case layout == vm.LayoutSplit && image:
		// The private copy, or a paused guest's RAM file, as it is.
		md.MemoryFormat, md.MemorySize = vm.MemoryFormatImage, c.ramBytes
		p := v.ramPath()
		if c.src == c.raw {
			p, c.keepRaw = c.raw.Name(), true
		}
		var fp *vm.FilePayload
		if fp, merr = vm.NewFilePayload(p); merr == nil {
			if fp.Size() != c.ramBytes {
				merr = fmt.Errorf("guest RAM file %s has %d bytes, the VM %d", p, fp.Size(), c.ramBytes)
			}
			memory = fp
		}
	case layout == vm.LayoutSplit:
		// Encode from the private copy or, for a paused guest, from its
		// RAM file, which nothing writes while the guest is stopped.
		memPath := filepath.Join(dir, "memory")
		if md.MemorySHA256, md.MemorySize, merr = c.encode(memPath); merr == nil {
			memory, merr = vm.NewFilePayload(memPath)
		}
	}
	d := <-diskDone
	if err := errors.Join(merr, d.err); err != nil {
		return nil, err
	}
	disk := d.p
	if d.md != nil {
		md.Disk, c.stats.DiskBytes = d.md, d.md.PayloadBytes
		if c.diskCopy != "" && !d.md.InBlob() {
			os.Remove(c.diskCopy)
		}
	}
	md.SizeBytes = uint64(md.DeviceStateSize + md.MemorySize + md.DiskPayloadSize())
	c.stats.StateBytes, c.stats.MemoryBytes = md.DeviceStateSize, md.MemorySize
	c.stats.Total = time.Since(start)
	v.lastSnap = c.stats
	snap := vm.NewSnapshot(md, state, memory, release)
	snap.Disk = disk
	return snap, nil
}

// newCapture prepares a capture of the VM in layout into a new directory
// under the factory's tmpDir. Call with v.mu held.
func (v *Instance) newCapture(layout vm.Layout) (*capture, error) {
	if err := os.MkdirAll(v.f.tmpDir(), 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(v.f.tmpDir(), snapDirPrefix(os.Getpid()))
	if err != nil {
		return nil, err
	}
	return &capture{v: v, layout: layout, dir: dir, statePath: filepath.Join(dir, "state"),
		ramBytes: int64(v.rec.Config.MemoryMiB) << 20, wasRunning: v.State() == vm.StateRunning, stats: SnapshotStats{Layout: layout}}, nil
}

// run captures the VM: the device state into statePath, and (split) the
// guest RAM as it was at that instant in src, and the workspace disk in
// diskCopy (or, for a paused guest, in place). A running guest runs again
// afterwards.
func (c *capture) run(ctx context.Context) (err error) {
	v := c.v
	if c.q, err = v.qmpConn(ctx); err != nil {
		return err
	}
	var unsubscribe func()
	c.events, unsubscribe = c.q.subscribe()
	defer unsubscribe()
	if c.layout == vm.LayoutSplit && !v.privateRAM() {
		if c.ram, err = os.Open(v.ramPath()); err != nil {
			return fmt.Errorf("open guest RAM: %w", err)
		}
		c.src = c.ram
	}
	status, err := c.q.status(ctx)
	if err != nil {
		return err
	}
	switch {
	case !c.wasRunning && status == "postmigrate" && v.privateRAM():
		return fmt.Errorf("QEMU has saved this paused fork already, and its RAM is in no file to save again; resume it first: %w", vm.ErrInvalidState)
	case !c.wasRunning && status == "postmigrate":
		err = c.reuseSaved(ctx)
	case c.layout == vm.LayoutSplit:
		err = c.split(ctx)
	default:
		err = c.single(ctx)
	}
	if err != nil {
		return err
	}
	if c.kind != "" {
		v.rememberSaved(c.statePath, c.kind, c.wasRunning)
	}
	// A QEMU that died while we captured it may have left a torn stream
	// behind: such a capture is not used.
	if v.State() == vm.StateCrashed {
		return errors.New("QEMU exited during the snapshot")
	}
	return nil
}

// closeFiles closes the capture's RAM files (and removes the private
// copy, which the snapshot's memory section has been encoded from, unless
// it is the memory payload itself).
func (c *capture) closeFiles() {
	if c.ram != nil {
		c.ram.Close()
	}
	if c.raw != nil {
		c.raw.Close()
		if !c.keepRaw {
			os.Remove(c.raw.Name())
		}
	}
}

// undo leaves the source of a failed capture as it was: running again if
// the capture stopped it. The resume runs even when ctx ended, but not
// forever.
func (c *capture) undo(ctx context.Context, err error) error {
	v := c.v
	if c.wasRunning && !c.stopped.IsZero() && v.State() != vm.StateCrashed {
		rctx, cancel := vm.SettleContext(ctx)
		defer cancel()
		v.setClockStale(true)
		if q, qerr := v.qmpConn(rctx); qerr == nil {
			if cerr := q.Call(rctx, "cont", nil, nil); cerr != nil {
				err = fmt.Errorf("%w (and resuming the VM failed: %v)", err, cerr)
			}
		}
	}
	return v.failed(vm.OpSnapshot, err)
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
	keepRaw    bool     // the private copy is the snapshot's memory payload
	stopped    time.Time
	kind       string // kind of stream written to statePath
	diskCopy   string // the workspace disk as it was while the guest was stopped
	stats      SnapshotStats
}

// split saves the device state apart from guest RAM.
func (c *capture) split(ctx context.Context) error {
	if c.v.privateRAM() {
		// A fork's guest RAM is a copy-on-write map of the capture it came
		// from, not its RAM file: it comes out of the migration stream,
		// which under TCG is exact for a stopped guest only.
		stopped := false
		if c.wasRunning && c.v.rec.Accel != AccelKVM {
			c.stopped, stopped = time.Now(), true
			if err := c.q.Call(ctx, "stop", nil, nil); err != nil {
				return err
			}
		}
		return c.splitLive(ctx, stopped)
	}
	if c.v.liveCapture(c.wasRunning) {
		if err := c.splitLive(ctx, false); !errors.Is(err, errStream) || errors.Is(err, errStreamLate) {
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

// splitLive lets QEMU copy RAM with a live migration (ramstream.go);
// stopped says the capture stopped the running guest before.
func (c *capture) splitLive(ctx context.Context, stopped bool) error {
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
	if !stopped {
		c.stopped = completed.Add(-qemuDowntime)
	}
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

// resume continues the guest that the capture stopped, once the
// workspace disk is copied as it was at that instant (QEMU drained and
// flushed the disk's requests when it stopped the guest).
func (c *capture) resume(ctx context.Context) error {
	if c.v.hasDisk() {
		t := time.Now()
		c.diskCopy = filepath.Join(c.dir, "disk.raw")
		if err := c.v.copyDisk(c.diskCopy); err != nil {
			return fmt.Errorf("capture the workspace disk: %w", err)
		}
		c.stats.DiskCapture = time.Since(t)
	}
	// The guest's wall clock stood still meanwhile (agentConn sets it).
	if err := c.v.setClockStale(true); err != nil {
		return err
	}
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
		Network:          v.rec.Config.NetworkSpec(),
		Hostname:         v.rec.Config.GuestHostname(),
	}
}

// SnapshotLayoutDefault is the layout Snapshot uses for this VM.
func (v *Instance) SnapshotLayoutDefault() vm.Layout { return v.rec.Layout }

// Compat is what a full snapshot of this VM requires of the restoring
// host (see Factory.Host).
func (v *Instance) Compat() map[string]string {
	return compat(v.f.qemuVersion, v.rec.Accel, v.rec.CPU)
}
