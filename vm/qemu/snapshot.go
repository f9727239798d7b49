package qemu

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Migration tuning. QEMU's default bandwidth cap (128 MiB/s) makes a save
// several times slower than the disk; a live single-layout save stops the
// guest only once the remaining dirty RAM fits the downtime limit.
const (
	migrateBandwidthBytesPerSec = int64(1) << 40
	migrateDowntimeLimitMs      = 20
	migrateTimeoutDefault       = 5 * time.Minute
	migrateFDName               = "kelpie-migration"
)

// SnapshotStats describes the last snapshot an instance took.
type SnapshotStats struct {
	Layout vm.Layout
	// Downtime is how long the snapshot kept a Running guest's vCPUs
	// stopped (0 when the VM was already Paused).
	Downtime time.Duration
	// Total is the whole Snapshot call, hashing included.
	Total time.Duration
	// StateBytes and MemoryBytes are the section sizes.
	StateBytes, MemoryBytes int64
	// LiveRAM: the guest's RAM was copied by a live migration while it
	// ran (KVM; see liveCapture and ramstream.go); otherwise it was copied
	// while stopped. LiveFallback says why a live copy was abandoned.
	LiveRAM      bool
	LiveFallback string
	// StateSave is the device-state save; RAMCapture the copy of a
	// running guest's RAM (live or while stopped; split layout).
	StateSave, RAMCapture time.Duration
	// Encode: writing (and hashing) the sparse memory section.
	Encode time.Duration
}

// RestoreStats describes the last restore into an instance.
type RestoreStats struct {
	// Stage: verifying and copying the payloads into the instance
	// directory; Launch: starting QEMU; Load: the incoming migration.
	Stage, Launch, Load time.Duration
}

// LastRestoreStats returns what the last Restore on this handle measured.
func (v *Instance) LastRestoreStats() RestoreStats {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.lastRestore
}

// LastSnapshotStats returns what the last Snapshot on this handle measured.
func (v *Instance) LastSnapshotStats() SnapshotStats {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.lastSnap
}

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
			if q, qerr := v.qmpConn(context.WithoutCancel(ctx)); qerr == nil {
				if cerr := q.Call(context.WithoutCancel(ctx), "cont", nil, nil); cerr != nil {
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
	if md.DeviceStateSHA256, md.DeviceStateSize, md.Checksum, err = hashFile(c.statePath); err != nil {
		return nil, err
	}
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
	mh := newAsyncHash(sha256.New())
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

// QEMU refuses to save a VM a second time until it has run again
// ("paused due to previous migration"). A paused guest that was saved has
// not changed since, so that save is still exact: the instance keeps the
// last stream of a paused guest beside its RAM file and a new snapshot
// reuses it.
func (v *Instance) savedPath(kind string) string { return v.ramPath() + ".saved-" + kind }

// rememberSaved keeps (a link to) the stream just saved while the guest
// stays paused, and drops it once the guest ran.
func (v *Instance) rememberSaved(statePath, kind string, resumed bool) {
	v.forgetSaved()
	if resumed {
		return
	}
	if err := os.Link(statePath, v.savedPath(kind)); err != nil {
		copyFileTo(statePath, v.savedPath(kind))
	}
}

func (v *Instance) forgetSaved() {
	for _, k := range []string{savedDevices, savedFull, savedStripped} {
		os.Remove(v.savedPath(k))
	}
}

// reuseSaved makes the snapshot of a paused guest that QEMU has saved
// already, from the stream it saved then.
func (c *capture) reuseSaved(ctx context.Context) error {
	have := ""
	for _, k := range []string{savedDevices, savedFull, savedStripped} {
		if _, err := os.Stat(c.v.savedPath(k)); err == nil {
			have = k
			break
		}
	}
	switch {
	case have == "":
		return fmt.Errorf("QEMU has saved this paused VM already and refuses again; resume it first: %w", vm.ErrInvalidState)
	case c.layout == vm.LayoutSingle && have != savedFull:
		return fmt.Errorf("this paused VM was saved without its RAM in the stream; resume it before a single-layout snapshot: %w", vm.ErrInvalidState)
	case c.layout == vm.LayoutSplit && have == savedFull:
		// Take the guest RAM pages out of the full stream.
		in, err := os.Open(c.v.savedPath(have))
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(c.statePath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		err = newRAMSplitter(in, nil, c.ramBytes, out).Split()
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		return err
	}
	return copyFileTo(c.v.savedPath(have), c.statePath)
}

// copyFileTo copies a file (a link when both are on one filesystem).
func copyFileTo(from, to string) error {
	os.Remove(to)
	if err := os.Link(from, to); err == nil {
		return nil
	}
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeNewFile(to, in)
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

// hashFile returns a file's SHA-256, size and CRC-32C (Kelpie's checksum
// field), reading it once.
func hashFile(path string) (string, int64, uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, 0, err
	}
	defer f.Close()
	h := sha256.New()
	c := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	n, err := io.Copy(io.MultiWriter(h, c), f)
	if err != nil {
		return "", 0, 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, c.Sum32(), nil
}

// setupMigration sets the capabilities both ends must agree on, and on the
// source the bandwidth and downtime limits.
func setupMigration(ctx context.Context, q *qmpClient, ignoreShared, source bool) error {
	caps := []map[string]any{
		{"capability": "x-ignore-shared", "state": ignoreShared},
		{"capability": "events", "state": true},
	}
	if err := q.Call(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return err
	}
	if !source {
		return nil
	}
	return q.Call(ctx, "migrate-set-parameters", map[string]any{
		"max-bandwidth": migrateBandwidthBytesPerSec, "downtime-limit": migrateDowntimeLimitMs}, nil)
}

// migrateToFile saves the VM into path through a descriptor handed to QEMU
// (no shell, no cat). QEMU 7.2 has no file: URI.
func migrateToFile(ctx context.Context, q *qmpClient, path string, events <-chan qmpEvent) (migrationStatus, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return migrationStatus{}, err
	}
	defer f.Close()
	if err := q.CallWithFile(ctx, "getfd", map[string]any{"fdname": migrateFDName}, f); err != nil {
		return migrationStatus{}, err
	}
	if err := q.Call(ctx, "migrate", map[string]any{"uri": "fd:" + migrateFDName}, nil); err != nil {
		q.Call(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": migrateFDName}, nil)
		return migrationStatus{}, err
	}
	return q.waitMigration(ctx, events)
}

// liveCapture says whether to copy a snapshot's RAM with a live migration
// (the guest keeps running while its RAM is copied). Only KVM's dirty log
// is trusted for that: under TCG, QEMU 7.2 misses some guest writes during
// the first RAM migration of a QEMU process (a test here found 6-7 pages
// of a busy guest stale), so a TCG guest is stopped while RAM is copied.
// Tests force the stream path with forceStream on a paused guest, where it
// is exact.
func (v *Instance) liveCapture(running bool) bool {
	return (running && v.rec.Accel == AccelKVM) || v.forceStream
}

// captureRAMLive runs a precopy migration of the running guest into a pipe
// and splits it (ramstream.go): guest RAM into raw, the rest into state.
// On success the guest is stopped (postmigrate) and raw holds its RAM
// exactly; it returns when the migration completed and how long QEMU had
// the guest stopped by then. An errStream error means the stream was not
// understood and the migration was cancelled (the guest runs again);
// errStreamLate means it was not understood after the guest had stopped.
func captureRAMLive(ctx context.Context, q *qmpClient, events <-chan qmpEvent, raw *os.File, ramBytes int64, state io.Writer) (time.Time, time.Duration, error) {
	if err := setupMigration(ctx, q, false, true); err != nil {
		return time.Time{}, 0, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return time.Time{}, 0, err
	}
	defer pr.Close()
	// A larger pipe lets QEMU write in bigger bursts.
	syscall.Syscall(syscall.SYS_FCNTL, pw.Fd(), fSetPipeSz, 1<<20)
	err = q.CallWithFile(ctx, "getfd", map[string]any{"fdname": migrateFDName}, pw)
	pw.Close() // QEMU holds its own copy; EOF comes when it closes it
	if err != nil {
		return time.Time{}, 0, err
	}
	abort := func() {
		q.Call(context.WithoutCancel(ctx), "migrate_cancel", nil, nil)
		pr.Close() // unblocks a QEMU write into a pipe nobody reads
	}
	stop := context.AfterFunc(ctx, abort)
	defer stop()
	rs := newRAMSplitter(pr, raw, ramBytes, state)
	split := make(chan error, 1)
	go func() { split <- rs.Split() }()
	if err := q.Call(ctx, "migrate", map[string]any{"uri": "fd:" + migrateFDName}, nil); err != nil {
		q.Call(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": migrateFDName}, nil)
		pr.Close()
		<-split
		return time.Time{}, 0, err
	}
	type outcome struct {
		st   migrationStatus
		err  error
		when time.Time
	}
	done := make(chan outcome, 1)
	go func() {
		st, err := q.waitMigration(ctx, events)
		done <- outcome{st, err, time.Now()}
	}()
	serr := <-split
	if serr != nil {
		abort()
	}
	m := <-done
	switch {
	case serr != nil && m.err != nil && m.st.Status == "cancelled":
		return time.Time{}, 0, serr
	case m.err != nil:
		return time.Time{}, 0, m.err
	case serr != nil:
		return time.Time{}, 0, fmt.Errorf("%w: %v", errStreamLate, serr)
	}
	return m.when, time.Duration(m.st.Downtime) * time.Millisecond, nil
}

// fSetPipeSz is F_SETPIPE_SZ.
const fSetPipeSz = 1031

// checkSnapshot refuses, before anything starts, a snapshot this host
// cannot restore into a VM configured as cfg.
func (f *Factory) checkSnapshot(md vm.SnapshotMetadata, cfg vm.Config, host map[string]string) error {
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: "+format+": %w", append([]any{md.SnapshotID}, append(args, vm.ErrIncompatible)...)...)
	}
	switch {
	case md.Backend != BackendName:
		return refuse("written by backend %q; the qemu backend restores only its own snapshots", md.Backend)
	case md.Architecture != vm.HostArchitecture():
		return refuse("taken on %s, this host is %s", md.Architecture, vm.HostArchitecture())
	case md.Layout != vm.LayoutSplit && md.Layout != vm.LayoutSingle:
		return refuse("layout %q has no VM state to restore", md.Layout)
	case cfg.MemoryMiB != md.MemoryMiB:
		return refuse("holds a %d MiB guest, the VM is configured with %d MiB", md.MemoryMiB, cfg.MemoryMiB)
	case cfg.VCPUs != md.VCPUCount:
		return refuse("holds %d vCPUs, the VM is configured with %d", md.VCPUCount, cfg.VCPUs)
	}
	keys := make([]string, 0, len(host))
	for k := range host {
		keys = append(keys, k)
	}
	for k := range md.Compat {
		if _, ok := host[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		want, have := md.Compat[k], host[k]
		if want != have {
			if want == "" {
				want = "(not recorded)"
			}
			if have == "" {
				have = "(unknown)"
			}
			return refuse("qemu %s: snapshot has %q, this host has %q", k, want, have)
		}
	}
	return nil
}

// Restore loads a snapshot into a Created or Stopped VM, which is Paused
// afterwards. The payloads are verified against the metadata while they
// are copied into the instance directory (guest RAM sparse), before QEMU
// starts; they are never modified.
func (v *Instance) Restore(ctx context.Context, snap *vm.Snapshot) (err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpRestore); err != nil {
		return err
	}
	if snap == nil {
		return fmt.Errorf("vm %s: restore: no snapshot: %w", v.rec.Name, vm.ErrInvalidConfig)
	}
	md := snap.Metadata
	if err := v.f.checkSnapshot(md, v.rec.Config, compat(v.f.qemuVersion, v.rec.Accel, v.rec.CPU)); err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
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
	if err := v.stage(md, snap); err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	stats.Stage = time.Since(t)
	t = time.Now()
	p, q, err := v.launch(ctx, true)
	if err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	stats.Launch = time.Since(t)
	t = time.Now()
	fail := func(err error) error {
		v.dropConns()
		p.kill(context.WithoutCancel(ctx))
		if !p.alive() && ctx.Err() == nil && !errors.Is(err, vm.ErrCorrupt) {
			return fmt.Errorf("vm %s: restore: %v (QEMU: %s): %w", v.rec.Name, err, tailFile(v.path(qemuLog), 600), vm.ErrCorrupt)
		}
		return fmt.Errorf("vm %s: restore: %w", v.rec.Name, err)
	}
	v.qmp = q
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
		return fail(fmt.Errorf("%v: %w", err, vm.ErrCorrupt))
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
	return v.setState(vm.StatePaused, p)
}

// stage copies the payloads into the instance directory (guest RAM decoded
// sparse) and verifies sizes and checksums; any mismatch is ErrCorrupt and
// nothing is left behind. Each section is hashed by its own reader while
// another copies it: Payload.Open gives independent readers, and on two
// cores hashing and copying then overlap instead of adding up.
func (v *Instance) stage(md vm.SnapshotMetadata, snap *vm.Snapshot) (err error) {
	switch {
	case snap.DeviceState == nil:
		return fmt.Errorf("snapshot %s has no device state: %w", md.SnapshotID, vm.ErrCorrupt)
	case md.Layout == vm.LayoutSplit && snap.Memory == nil:
		return fmt.Errorf("split snapshot %s has no memory section: %w", md.SnapshotID, vm.ErrCorrupt)
	case md.Layout == vm.LayoutSingle && snap.Memory != nil && snap.Memory.Size() > 0:
		return fmt.Errorf("single-layout snapshot %s carries a memory section: %w", md.SnapshotID, vm.ErrCorrupt)
	}
	memTmp := v.ramPath() + stagingSuffix
	defer func() {
		if err != nil {
			os.Remove(memTmp)
			os.Remove(v.path(stagedState))
		}
	}()
	type section struct {
		name     string
		p        vm.Payload
		wantSum  string
		wantSize int64
		copy     func(r io.Reader) error
		hashErr  error
		copyErr  error
	}
	secs := []*section{{name: "snapshot", p: snap.DeviceState, wantSum: md.DeviceStateSHA256, wantSize: md.DeviceStateSize,
		copy: func(r io.Reader) error { return writeNewFile(v.path(stagedState), r) }}}
	if md.Layout == vm.LayoutSplit {
		secs = append(secs, &section{name: "memory", p: snap.Memory, wantSum: md.MemorySHA256, wantSize: md.MemorySize,
			copy: func(r io.Reader) error {
				f, err := os.OpenFile(memTmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
				if err != nil {
					return err
				}
				err = decodeMemory(f, r, int64(v.rec.Config.MemoryMiB)<<20)
				if cerr := f.Close(); err == nil {
					err = cerr
				}
				return err
			}})
	}
	var wg sync.WaitGroup
	for _, sec := range secs {
		if sec.wantSum == "" {
			return fmt.Errorf("snapshot %s: %s section has no recorded checksum: %w", md.SnapshotID, sec.name, vm.ErrCorrupt)
		}
		if sec.p.Size() != sec.wantSize {
			return fmt.Errorf("snapshot %s: %s section has %d bytes, metadata says %d: %w", md.SnapshotID, sec.name, sec.p.Size(), sec.wantSize, vm.ErrCorrupt)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			got, err := vm.HashPayload(sec.p)
			if err == nil && got != sec.wantSum {
				err = fmt.Errorf("snapshot %s: %s section checksum mismatch (sha256 %.12s, metadata says %.12s): %w", md.SnapshotID, sec.name, got, sec.wantSum, vm.ErrCorrupt)
			}
			sec.hashErr = err
		}()
		go func() {
			defer wg.Done()
			rc, err := sec.p.Open()
			if err != nil {
				sec.copyErr = err
				return
			}
			defer rc.Close()
			sec.copyErr = sec.copy(io.LimitReader(rc, sec.wantSize))
		}()
	}
	wg.Wait()
	// A damaged section is reported as the checksum mismatch it is, even
	// when the damage also broke its format.
	for _, sec := range secs {
		if sec.hashErr != nil {
			return sec.hashErr
		}
	}
	for _, sec := range secs {
		if sec.copyErr != nil {
			return fmt.Errorf("stage %s section: %w", sec.name, sec.copyErr)
		}
	}
	if md.Layout == vm.LayoutSplit {
		return os.Rename(memTmp, v.ramPath())
	}
	return nil
}

// writeNewFile copies r into a new file at path.
func writeNewFile(path string, r io.Reader) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// SnapshotLayoutDefault is the layout Snapshot uses for this VM.
func (v *Instance) SnapshotLayoutDefault() vm.Layout { return v.rec.Layout }

// Compat is what a full snapshot of this VM requires of the restoring
// host (see Factory.Host).
func (v *Instance) Compat() map[string]string {
	return compat(v.f.qemuVersion, v.rec.Accel, v.rec.CPU)
}
