package vm

import (
	"context"
	"fmt"
	"io"
	"maps"
	"time"
)

// Roles: abilities only some backends have. Callers find them by type
// assertion, through the helpers below, never by casting to a backend's
// concrete type; a backend that gains a role works everywhere at once.
// Each role has a sentinel that a caller gets when the backend lacks it;
// every sentinel also matches ErrUnsupported.

// Attacher is a Factory whose VMs outlive the process that made them:
// Attach returns a handle on an existing VM by name (ErrNotFound if none).
type Attacher interface {
	Attach(ctx context.Context, name string) (Instance, error)
}

// Lister is a Factory that can list the VMs it has on this host.
type Lister interface {
	List(ctx context.Context) ([]Info, error)
}

// Info describes one VM in a listing.
type Info struct {
	Name      string
	Backend   string
	State     State
	PID       int // the hypervisor process, 0 if none runs
	VCPUs     int
	MemoryMiB int
	Accel     string // the accelerator, where the backend has a choice
	Dir       string // where the VM's files live on this host
	CreatedAt time.Time
	Network   NetworkMode
	// Ports are the published ports as bound now (a HostPort asked as 0
	// shows the port it got); empty while no hypervisor runs.
	Ports     []PortBinding
	Forwards  []Forward
	DiskBytes int64 // the workspace disk's size, 0 without one
	Hostname  string
	AgentID   string
}

// Detacher is an Instance handle that holds connections other processes
// need (a QEMU socket serves one client at a time): Detach releases them
// and the VM keeps running. The handle may be used again afterwards.
type Detacher interface {
	Detach() error
}

// ReadyWaiter is an Instance whose guest may need a moment after Resume to
// answer commands again (after a restore, the first answer is the moment
// it is usable): WaitReady returns once it does.
type ReadyWaiter interface {
	WaitReady(ctx context.Context) error
}

// WorkspaceArchiver is an Instance that can carry its guest's workspace
// (/workspace) as one archive: what a checkpoint takes along when it
// leaves the VM behind.
type WorkspaceArchiver interface {
	ArchiveWorkspace(ctx context.Context, w io.Writer) (int64, error)
	RestoreWorkspace(ctx context.Context, r io.Reader) error
}

// LayoutSnapshotter is an Instance that can snapshot in more than one
// layout.
type LayoutSnapshotter interface {
	SnapshotLayout(ctx context.Context, layout Layout) (*Snapshot, error)
}

// ImageSnapshotter is an Instance that can capture its guest memory as
// a raw image (MemoryFormatImage) rather than in its own encoding, for a
// packer that chunks memory itself (KLP1 version 2): the backend then
// neither encodes nor hashes guest RAM, and reads a paused guest's RAM in
// place. layout "" is the backend's own.
type ImageSnapshotter interface {
	SnapshotImage(ctx context.Context, layout Layout) (*Snapshot, error)
}

// FactsReporter is an Instance whose snapshots record backend facts of
// their own rather than its factory's (a QEMU VM keeps the accelerator it
// was created with).
type FactsReporter interface {
	Compat() map[string]string
}

// DowntimeReporter is an Instance that measures how long its last
// Snapshot kept a running guest stopped.
type DowntimeReporter interface {
	LastSnapshotDowntime() time.Duration
}

// Identity is what makes a live copy of a VM its own: its hostname and
// fresh entropy for its kernel's random number generator.
type Identity struct {
	Hostname string
	// Entropy is mixed into the guest's entropy pool before its CRNG is
	// reseeded (RNDADDENTROPY, then RNDRESEEDCRNG): 32..4096 bytes from
	// the host's own CSPRNG.
	Entropy []byte
}

// IdentityMinEntropyBytes is the least entropy Reidentify accepts.
const IdentityMinEntropyBytes = 32

// Reidentifier is an Instance that can give a running guest a new
// identity: what a restore that makes a second live copy of a VM (a
// fork) does before the copy's first command, so that copies neither
// share random numbers nor a name.
type Reidentifier interface {
	Reidentify(ctx context.Context, id Identity) error
}

// Cloner is an Instance that can restore copies of itself on its own host
// from one capture, without a snapshot's encoding and verification (the
// capture never leaves the host): each copy has cfgs[i]'s name, hostname,
// agent id and published ports, and the source's machine and devices.
// Each copy is handed to start (when not nil), on a goroutine of its own,
// as soon as it is restored and Paused; Clone returns when every start
// returned. The source is left as it was (a running one pauses for the
// capture only). On any failure no copy is left, or ErrLeftBehind says
// which one is.
type Cloner interface {
	Clone(ctx context.Context, cfgs []Config, start func(ctx context.Context, i int, copy Instance) error) ([]Instance, error)
}

// DiskExporter is an Instance that can hand out its workspace disk as a
// consistent image while the guest runs on (filesystem frozen for the
// copy): what a checkpoint carries instead of an archive of /workspace.
type DiskExporter interface {
	ExportDisk(ctx context.Context) (*DiskImage, error)
}

// DiskCreator is a Factory that can create a VM whose workspace disk is
// the given image (cfg.Disk must describe it); the image is verified
// against its metadata before the hypervisor starts.
type DiskCreator interface {
	CreateWithDisk(ctx context.Context, cfg Config, disk *DiskImage) (Instance, error)
}

// GuestTime is a reading of a guest's clocks, with the host's wall clock
// at the middle of the round trip that read them.
type GuestTime struct {
	Realtime  time.Time     // the guest's wall clock (CLOCK_REALTIME)
	Monotonic time.Duration // CLOCK_MONOTONIC: never goes back
	Boottime  time.Duration // CLOCK_BOOTTIME
	Host      time.Time     // the host's wall clock meanwhile
	RoundTrip time.Duration // how long the read took: the uncertainty
}

// Offset is how far the guest's wall clock is ahead of the host's.
func (t GuestTime) Offset() time.Duration { return t.Realtime.Sub(t.Host) }

// TimeReader is an Instance whose guest clocks can be read to the
// nanosecond (a busybox guest's date has whole seconds only).
type TimeReader interface {
	GuestTime(ctx context.Context) (GuestTime, error)
}

// AccelReporter is a Factory with a choice of accelerator: Accelerator
// says which one its new VMs get and why.
type AccelReporter interface {
	Accelerator() (name, why string)
}

// The sentinels of the roles.
var (
	ErrNoAttach    = &roleError{"re-attach a VM made by another process"}
	ErrNoList      = &roleError{"list its VMs"}
	ErrNoWorkspace = &roleError{"archive a guest workspace"}
	ErrNoLayout    = &roleError{"choose a snapshot layout"}
	ErrNoIdentity  = &roleError{"give a running guest a new identity"}
	ErrNoDisk      = &roleError{"carry a workspace disk"}
	ErrNoTime      = &roleError{"read the guest's clocks"}
)

type roleError struct{ what string }

func (e *roleError) Error() string { return "cannot " + e.what }

// Is makes every role sentinel match ErrUnsupported.
func (e *roleError) Is(target error) bool { return target == ErrUnsupported }

func lacks(backend string, sentinel *roleError) error {
	return fmt.Errorf("backend %s %w", backend, sentinel)
}

// Attach returns a handle on VM name of f, or ErrNoAttach when f's VMs do
// not outlive the process that made them.
func Attach(ctx context.Context, f Factory, name string) (Instance, error) {
	a, ok := f.(Attacher)
	if !ok {
		return nil, lacks(f.Host().Backend, ErrNoAttach)
	}
	return a.Attach(ctx, name)
}

// List lists f's VMs, or fails with ErrNoList.
func List(ctx context.Context, f Factory) ([]Info, error) {
	l, ok := f.(Lister)
	if !ok {
		return nil, lacks(f.Host().Backend, ErrNoList)
	}
	return l.List(ctx)
}

// Detach releases inst's connections if it holds any; the VM keeps
// running. A backend without the role holds none.
func Detach(inst Instance) error {
	if d, ok := inst.(Detacher); ok {
		return d.Detach()
	}
	return nil
}

// WaitReady returns once inst's guest answers. A backend without the role
// is ready when Resume returns.
func WaitReady(ctx context.Context, inst Instance) error {
	if w, ok := inst.(ReadyWaiter); ok {
		return w.WaitReady(ctx)
	}
	return nil
}

// ArchiveWorkspace writes inst's guest workspace to w, or fails with
// ErrNoWorkspace.
func ArchiveWorkspace(ctx context.Context, f Factory, inst Instance, w io.Writer) (int64, error) {
	a, ok := inst.(WorkspaceArchiver)
	if !ok {
		return 0, lacks(f.Host().Backend, ErrNoWorkspace)
	}
	return a.ArchiveWorkspace(ctx, w)
}

// RestoreWorkspace unpacks a workspace archive into inst's guest, or fails
// with ErrNoWorkspace.
func RestoreWorkspace(ctx context.Context, f Factory, inst Instance, r io.Reader) error {
	a, ok := inst.(WorkspaceArchiver)
	if !ok {
		return lacks(f.Host().Backend, ErrNoWorkspace)
	}
	return a.RestoreWorkspace(ctx, r)
}

// SnapshotLayout snapshots inst in layout; "" is the backend's own
// layout. Another layout from a backend without the role is ErrNoLayout.
func SnapshotLayout(ctx context.Context, f Factory, inst Instance, layout Layout) (*Snapshot, error) {
	if layout == "" {
		return inst.Snapshot(ctx)
	}
	if l, ok := inst.(LayoutSnapshotter); ok {
		return l.SnapshotLayout(ctx, layout)
	}
	return nil, lacks(f.Host().Backend, ErrNoLayout)
}

// SnapshotForImage snapshots inst in layout for a packer that chunks
// memory itself: with its memory as a raw image where the backend can
// (ImageSnapshotter), in its usual form otherwise.
func SnapshotForImage(ctx context.Context, f Factory, inst Instance, layout Layout) (*Snapshot, error) {
	if s, ok := inst.(ImageSnapshotter); ok {
		return s.SnapshotImage(ctx, layout)
	}
	return SnapshotLayout(ctx, f, inst, layout)
}

// SnapshotHost is what a snapshot of inst would record about its host:
// f's host, with inst's own backend facts where it has them.
func SnapshotHost(f Factory, inst Instance) HostInfo {
	h := f.Host()
	if r, ok := inst.(FactsReporter); ok {
		h.Compat = maps.Clone(r.Compat())
	}
	return h
}

// Reidentify gives inst's guest a new identity, or fails with
// ErrNoIdentity.
func Reidentify(ctx context.Context, f Factory, inst Instance, id Identity) error {
	r, ok := inst.(Reidentifier)
	if !ok {
		return lacks(f.Host().Backend, ErrNoIdentity)
	}
	if len(id.Entropy) < IdentityMinEntropyBytes {
		return fmt.Errorf("vm %s: reidentify with %d bytes of entropy, want at least %d: %w", inst.ID(), len(id.Entropy), IdentityMinEntropyBytes, ErrInvalidConfig)
	}
	return r.Reidentify(ctx, id)
}

// ExportDisk hands out inst's workspace disk image, or fails with
// ErrNoDisk.
func ExportDisk(ctx context.Context, f Factory, inst Instance) (*DiskImage, error) {
	e, ok := inst.(DiskExporter)
	if !ok {
		return nil, lacks(f.Host().Backend, ErrNoDisk)
	}
	return e.ExportDisk(ctx)
}

// CreateWithDisk creates a VM of f whose workspace disk is disk, or fails
// with ErrNoDisk.
func CreateWithDisk(ctx context.Context, f Factory, cfg Config, disk *DiskImage) (Instance, error) {
	c, ok := f.(DiskCreator)
	if !ok {
		return nil, lacks(f.Host().Backend, ErrNoDisk)
	}
	return c.CreateWithDisk(ctx, cfg, disk)
}

// ReadGuestTime reads inst's guest clocks, or fails with ErrNoTime.
func ReadGuestTime(ctx context.Context, f Factory, inst Instance) (GuestTime, error) {
	r, ok := inst.(TimeReader)
	if !ok {
		return GuestTime{}, lacks(f.Host().Backend, ErrNoTime)
	}
	return r.GuestTime(ctx)
}

// LastSnapshotDowntime is how long inst's last snapshot stopped its guest,
// and whether the backend measures it.
func LastSnapshotDowntime(inst Instance) (time.Duration, bool) {
	if r, ok := inst.(DowntimeReporter); ok {
		return r.LastSnapshotDowntime(), true
	}
	return 0, false
}
