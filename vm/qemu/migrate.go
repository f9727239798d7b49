package qemu

import (
	"context"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
)

// QEMU migrations: the transport of every snapshot and restore.

// Migration tuning. QEMU's default bandwidth cap (128 MiB/s) makes a save
// several times slower than the disk; a live single-layout save stops the
// guest only once the remaining dirty RAM fits the downtime limit.
const (
	migrateBandwidthBytesPerSec = int64(1) << 40
	migrateDowntimeLimitMs      = 20
	migrateTimeoutDefault       = 5 * time.Minute
	migrateFDName               = "kelpie-migration"
)

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
