// Package vm is the contract every hypervisor backend implements: a VM
// instance with a lifecycle, command execution, snapshot and restore, and a
// factory that creates instances fresh or from a snapshot.
//
// This package holds types and rules only. It must never import a backend,
// start a process, or touch the wall clock: backends and the simulation both
// build on it unchanged.
package vm

import (
	"context"
	"fmt"
	"io"
	"time"
)

// State is where a VM is in its lifecycle.
type State int

// The lifecycle states. A VM starts in Created; Crashed means the hypervisor
// died underneath us and only Stop or Destroy remain.
const (
	StateCreated State = iota
	StateStarting
	StateRunning
	StatePaused
	StateStopped
	StateCrashed
)

var stateNames = [...]string{"created", "starting", "running", "paused", "stopped", "crashed"}

func (s State) String() string {
	if int(s) >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// ParseState is the inverse of State.String.
func ParseState(s string) (State, error) {
	for i, n := range stateNames {
		if n == s {
			return State(i), nil
		}
	}
	return 0, fmt.Errorf("unknown VM state %q: %w", s, ErrInvalidConfig)
}

// Instance is one VM. Every blocking call takes ctx first and returns when ctx
// is done. Illegal transitions return an error that matches ErrInvalidState.
// Abilities only some backends have are role interfaces (roles.go).
type Instance interface {
	// ID is stable for the life of the instance and unique on its host.
	ID() string
	// State reports the current state. Backends that supervise a process
	// report StateCrashed once the process is gone unexpectedly.
	State() State
	// Config is the configuration the instance was created with.
	Config() Config

	// Start boots a Created or Stopped VM and returns once its guest is ready.
	Start(ctx context.Context) error
	// Stop shuts a VM down. Stopping a Stopped VM is a no-op.
	Stop(ctx context.Context) error
	// Pause freezes a Running VM's vCPUs.
	Pause(ctx context.Context) error
	// Resume continues a Paused VM.
	Resume(ctx context.Context) error

	// Exec runs a command in the guest of a Running VM.
	Exec(ctx context.Context, cmd string, args []string, opts ExecOptions) (ExecResult, error)

	// Snapshot captures a Running or Paused VM. A Running VM is paused for
	// the capture and resumed afterwards; a Paused VM stays paused. The
	// caller owns the returned snapshot and must Close it.
	Snapshot(ctx context.Context) (*Snapshot, error)

	// Destroy stops the VM if needed and removes everything it owns on the
	// host. A destroyed instance accepts no further calls.
	Destroy(ctx context.Context) error
}

// Factory creates instances of one backend on one host.
type Factory interface {
	// Host describes this host and backend, for restore validation.
	Host() HostInfo
	// Create makes a new instance in state Created.
	Create(ctx context.Context, cfg Config) (Instance, error)
	// CreateFromSnapshot makes an instance and restores snap into it. It
	// refuses a snapshot this host cannot restore (CheckSnapshot) before
	// making anything, and verifies the payloads (Stage) before the
	// hypervisor starts. The instance is Paused on success; on failure
	// nothing is left behind. The snapshot's payloads are only read.
	CreateFromSnapshot(ctx context.Context, cfg Config, snap *Snapshot) (Instance, error)
}

// HostInfo says what a factory's snapshots need and what it can restore.
type HostInfo struct {
	Arch             Architecture
	Backend          string
	BackendVersion   string
	HostID           string
	BaseImageVersion string
	// Compat lists backend facts a full snapshot must match exactly to be
	// restored here (hypervisor version, machine type, CPU model, ...).
	Compat map[string]string
	// HostBound: this backend's snapshots restore only on this host (an
	// Apple VZ save file is encrypted with a key of the Mac that wrote it).
	HostBound bool
	// Layouts are the snapshot layouts this backend restores.
	Layouts []Layout
}

// ExecOptions tunes one Exec call. Zero values mean "backend default".
type ExecOptions struct {
	Timeout          time.Duration
	Workdir          string
	Env              map[string]string
	Stdin            []byte
	OutputLimitBytes int
}

// ExecResult is what a guest command produced.
type ExecResult struct {
	ExitCode        int
	Stdout          []byte
	Stderr          []byte
	TimedOut        bool
	OutputTruncated bool
}

// Payload is one section of a snapshot: a file or a reader of known size.
// Open returns a fresh reader positioned at the start each time it is called,
// so a payload can be read more than once without ever being held in
// memory whole.
type Payload interface {
	Size() int64
	Open() (io.ReadCloser, error)
}

// ImagePayload is a memory payload that is a guest memory image made of
// content-addressed chunks, each checked against its own hash as it is
// read (KLP1 version 2): reading it verifies it, whether or not the
// metadata records a checksum. Open streams the whole image, zeros
// included; WriteImage writes only the pages that hold data into dst at
// their offsets, fetching and verifying chunks in parallel, so dst (a
// fresh file of Size bytes) keeps holes where the guest has nothing. A
// chunk that is missing or does not match its hash fails with ErrCorrupt,
// naming the chunk, and nothing written may then be used.
type ImagePayload interface {
	Payload
	WriteImage(ctx context.Context, dst io.WriterAt) error
}

// Snapshot is metadata plus up to three payloads: the device state
// (KLP1's "snapshot" section), the guest memory (its "memory" section) and
// the workspace disk's blocks (a package section of its own: KLP1 v1 has
// no disk section). Single-file layouts (VZ-like, a QEMU stream with RAM
// inside) fill DeviceState only; split layouts (Firecracker-like) fill
// DeviceState and Memory. Disk is set when the VM has a workspace disk
// (Metadata.Disk).
type Snapshot struct {
	Metadata    SnapshotMetadata
	DeviceState Payload // nil when empty
	Memory      Payload // nil when empty
	Disk        Payload // nil when the VM has no workspace disk

	release releaser
}

// NewSnapshot builds a snapshot whose Close calls release (may be nil), for
// backends that own temporary files behind the payloads.
func NewSnapshot(md SnapshotMetadata, deviceState, memory Payload, release func() error) *Snapshot {
	return &Snapshot{Metadata: md, DeviceState: deviceState, Memory: memory, release: releaser{release}}
}

// Close releases whatever backs the payloads. It is safe to call twice.
func (s *Snapshot) Close() error {
	if s == nil {
		return nil
	}
	return s.release.run()
}

// releaser runs a release function once; the second run is a no-op.
type releaser struct{ f func() error }

func (r *releaser) run() error {
	f := r.f
	r.f = nil
	if f == nil {
		return nil
	}
	return f()
}

// PayloadSize is p.Size(), or 0 for a nil payload.
func PayloadSize(p Payload) int64 {
	if p == nil {
		return 0
	}
	return p.Size()
}
