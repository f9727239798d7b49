package vm

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"
)

// SettleTimeout bounds the work that must run after the caller's context
// ended or an operation failed: resuming a source whose snapshot failed,
// removing a half-restored VM, reaping a process. A wedged hypervisor must
// not hang its caller forever.
const SettleTimeout = 30 * time.Second

// SettleContext keeps ctx's values but not its cancellation, with a
// deadline of its own (SettleTimeout).
func SettleContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), SettleTimeout)
}

// ConfigFor is cfg with what a restore of md takes from the snapshot: the
// vCPUs and the memory size, where cfg leaves them zero.
func ConfigFor(cfg Config, md SnapshotMetadata) Config {
	if cfg.VCPUs == 0 {
		cfg.VCPUs = md.VCPUCount
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = md.MemoryMiB
	}
	return cfg
}

// CheckShape refuses to restore md into a VM configured with another
// machine shape: a snapshot holds exactly its vCPUs and memory.
func CheckShape(md SnapshotMetadata, cfg Config) error {
	if md.VCPUCount != cfg.VCPUs || md.MemoryMiB != cfg.MemoryMiB {
		return fmt.Errorf("snapshot %s: its machine has %d vCPUs and %d MiB, the VM is configured with %d vCPUs and %d MiB: %w",
			md.SnapshotID, md.VCPUCount, md.MemoryMiB, cfg.VCPUs, cfg.MemoryMiB, ErrIncompatible)
	}
	return nil
}

// RemoveFailed destroys inst, which a failed operation made, and returns
// cause, saying also (ErrLeftBehind) when inst could not be removed.
func RemoveFailed(ctx context.Context, inst Instance, cause error) error {
	sctx, cancel := SettleContext(ctx)
	defer cancel()
	if err := inst.Destroy(sctx); err != nil {
		return fmt.Errorf("%w; removing VM %s failed too (%w): %w", cause, inst.ID(), err, ErrLeftBehind)
	}
	return cause
}

// FileSink writes a staged section to a new file at path, never over an
// existing one.
func FileSink(path string) Sink {
	return func(r io.Reader) error {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, r)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
		}
		return err
	}
}
