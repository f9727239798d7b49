package hostvm

import (
	"fmt"

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
	if err := vm.CheckShape(md, cfg); err != nil {
		return err
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
