package qemu

import (
	"time"

	"github.com/kelpie/teleport/vm"
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
	// DiskCapture: copying a running guest's workspace disk while it was
	// stopped; DiskEncode: writing (and hashing) its payload; DiskBytes
	// the payload's size.
	DiskCapture, DiskEncode time.Duration
	DiskBytes               int64
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

// LastSnapshotDowntime is how long the last Snapshot on this handle kept
// a running guest stopped (vm.DowntimeReporter).
func (v *Instance) LastSnapshotDowntime() time.Duration {
	return v.LastSnapshotStats().Downtime
}
