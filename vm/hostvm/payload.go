package hostvm

import (
	"fmt"
	"io"
	"os"

	"github.com/kelpie/teleport/vm"
)

// checkSnapshot refuses, before any file is touched, a snapshot this
// backend and host cannot restore into a VM configured as cfg: the shared
// comparison (vm.CheckSnapshot) first, then what only a VM's configuration
// decides.
func (f *Factory) checkSnapshot(snap *vm.Snapshot, cfg vm.Config) error {
	md := snap.Metadata
	if err := vm.CheckSnapshot(md, f.Host()); err != nil {
		return err
	}
	if md.VCPUCount != cfg.VCPUs || md.MemoryMiB != cfg.MemoryMiB {
		return fmt.Errorf("snapshot %s: the snapshot's machine has %d vCPUs and %d MiB, the config asks for %d vCPUs and %d MiB: %w",
			md.SnapshotID, md.VCPUCount, md.MemoryMiB, cfg.VCPUs, cfg.MemoryMiB, vm.ErrIncompatible)
	}
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: "+format+": %w", append(append([]any{md.SnapshotID}, args...), vm.ErrCorrupt)...)
	}
	if vm.PayloadSize(snap.DeviceState) == 0 {
		return corrupt("the device-state section is empty")
	}
	if md.Layout == vm.LayoutSplit && vm.PayloadSize(snap.Memory) == 0 {
		return corrupt("a split snapshot needs a memory section")
	}
	return nil
}

// fileSink writes a section to a new file at path (never over an
// existing one).
func fileSink(path string) vm.Sink {
	return func(r io.Reader) error {
		out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, r)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		return err
	}
}
