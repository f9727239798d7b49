// Package hostvm is the platform-independent core shared by the backends
// whose VM is one hypervisor process or object on this host (Firecracker on
// Linux, Apple Virtualization.framework on macOS): the lifecycle state
// machine, per-VM directories, snapshot file staging, the mapping of
// snapshot files onto the KLP1 blob sections, restore validation, and
// cleanup. A backend supplies only a Driver: the thin glue that boots, pauses,
// saves and loads its hypervisor.
//
// Everything here runs and is tested on any platform with a fake Driver.
// This package must never start a process, call a hypervisor, or read a
// snapshot payload whole into memory: payloads are streamed to and from
// files.
package hostvm

import (
	"context"
	"fmt"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Clock tells time for snapshot ids and timestamps.
type Clock interface{ Now() time.Time }

// Spec describes one backend on this host: what its snapshots record and
// what a snapshot must match to be restored here.
type Spec struct {
	Backend          string // "firecracker", "vz", ...
	BackendVersion   string // the hypervisor's version
	Arch             vm.Architecture
	HostID           string
	BaseImageVersion string // default for configs that do not set one
	// Layout is LayoutSplit (state file + memory file) or LayoutSingle
	// (one save file, memory section empty).
	Layout vm.Layout
	// HostBound: snapshots restore only on the host that wrote them (a VZ
	// save file is encrypted with a key of the Mac that wrote it).
	HostBound bool
	// Compat are the backend facts a snapshot must match exactly to be
	// restored here; recorded in every snapshot (SnapshotMetadata.Compat)
	// and published by Factory.Host.
	Compat map[string]string
	// RequireBoot makes Create insist on a kernel and an initrd path.
	RequireBoot bool
}

// Validate checks that the spec names a backend, host and layout.
func (s Spec) Validate() error {
	if s.Backend == "" {
		return fmt.Errorf("hostvm: spec has no backend name: %w", vm.ErrInvalidConfig)
	}
	if _, err := vm.ParseArchitecture(string(s.Arch)); err != nil {
		return fmt.Errorf("hostvm: %s spec: %w", s.Backend, err)
	}
	if s.HostID == "" {
		return fmt.Errorf("hostvm: %s spec has no host id: %w", s.Backend, vm.ErrInvalidConfig)
	}
	if s.Layout != vm.LayoutSplit && s.Layout != vm.LayoutSingle {
		return fmt.Errorf("hostvm: %s spec layout %q (want split or single): %w", s.Backend, s.Layout, vm.ErrInvalidConfig)
	}
	return nil
}

// MachineSpec is what a driver needs to run one VM.
type MachineSpec struct {
	// ID is the instance id (a vm.ValidateName-safe name).
	ID string
	// Dir is the instance's private directory. It exists when the driver
	// is called and is removed with everything in it on Destroy. The core
	// only uses names starting with "hostvm-" in it; the driver may use any
	// other name (sockets, logs, links).
	Dir    string
	Config vm.Config
}

// Files names a snapshot's files. Memory is "" for the single-file layout.
type Files struct {
	State  string
	Memory string
}

// Driver is a backend's platform glue. Both methods start a fresh
// hypervisor process (or object); on error they leave nothing running.
type Driver interface {
	// Boot starts a VM for m.Config and returns once its guest agent
	// answers.
	Boot(ctx context.Context, m MachineSpec) (Machine, error)
	// Restore starts a VM from snapshot files the core has staged and
	// verified; the VM is paused afterwards. The files stay in place until
	// the machine is shut down (Firecracker maps the memory file).
	Restore(ctx context.Context, m MachineSpec, f Files) (Machine, error)
}

// ConfigChecker is implemented by drivers that cannot run every valid
// vm.Config (Firecracker has no user-mode network); Create calls it.
type ConfigChecker interface {
	CheckConfig(cfg vm.Config) error
}

// Guest runs commands in a running VM's guest.
type Guest interface {
	Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error)
}

// Machine is one running hypervisor process or object. The core serialises
// lifecycle calls; Exec may run concurrently with them.
type Machine interface {
	Guest
	// Pause freezes the vCPUs of a running VM.
	Pause(ctx context.Context) error
	// Resume continues a paused VM.
	Resume(ctx context.Context) error
	// Save writes the paused VM's snapshot to f (the files do not exist
	// yet) and leaves the VM paused.
	Save(ctx context.Context, f Files) error
	// Shutdown ends the hypervisor; guest memory is lost. It is safe to
	// call more than once and after the process died on its own.
	Shutdown(ctx context.Context) error
	// Done is closed once the hypervisor is gone, for whatever reason.
	Done() <-chan struct{}
}

// Names the core uses inside a VM directory and for snapshot files.
const (
	restoreDirName = "hostvm-restore"
	stateFileName  = "state"
	memoryFileName = "memory"
	vmsDirName     = "vms"
	snapsDirName   = "snapshots"
)

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
