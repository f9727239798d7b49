// Package service runs the teleport flows over any vm.Factory and any
// teleport.Store: Out (pause, snapshot, pack, upload, then resume or stop the
// source) and In (fetch, validate, create, restore, resume).
//
// The same code runs in production and in the simulation; it must never read
// the wall clock or global randomness itself when the caller gives it a
// clock and an id source (the defaults, for programs that embed it, are the
// system's). Its promise: a failed Out leaves the source VM as it was and no
// package visible, or says exactly what it could not undo; a failed In
// leaves no VM behind, or says it could not remove it (vm.ErrLeftBehind).
package service

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/internal/plant"
	"github.com/kelpie/teleport/vm"
)

// Clock tells time; production passes the real clock, the simulation its own.
type Clock interface{ Now() time.Time }

// Service is the teleport service of one host. Make it with New.
type Service struct {
	store   teleport.Store
	factory vm.Factory
	clock   Clock
	newID   func() string
	log     *slog.Logger
	onStep  func(step string, d time.Duration)
	settle  time.Duration
	format  int
	workers int
	bugs    plant.ServiceBugs
}

// An Option configures a Service.
type Option func(*Service)

// WithClock sets the clock that dates packages and times steps (default:
// the system clock).
func WithClock(c Clock) Option { return func(s *Service) { s.clock = c } }

// WithIDs sets the source of fresh package and upload ids (default: random
// "pkg-" ids).
func WithIDs(newID func() string) Option { return func(s *Service) { s.newID = newID } }

// WithLogger sets where warnings go (a base image PATCH difference;
// default: discarded).
func WithLogger(l *slog.Logger) Option { return func(s *Service) { s.log = l } }

// WithStepObserver is told each step's name and duration, by the clock.
func WithStepObserver(f func(step string, d time.Duration)) Option {
	return func(s *Service) { s.onStep = f }
}

// WithSettleTimeout bounds the work that runs after the caller's context
// ended or failed: resuming a source whose teleport failed, removing a
// half-restored VM (default vm.SettleTimeout).
func WithSettleTimeout(d time.Duration) Option { return func(s *Service) { s.settle = d } }

// WithFormat sets the KLP1 version packages are written in (default
// blob.FormatDefault, 2). A version 2 package needs a store with a chunk
// space (teleport.ChunkStore); into any other store it is version 1.
func WithFormat(v int) Option { return func(s *Service) { s.format = v } }

// WithWorkers sets how many goroutines chunk, compress and decode a
// version 2 package (default: one per CPU). 1 keeps all of it on the
// caller's goroutine, in order: what the deterministic simulation needs.
func WithWorkers(n int) Option { return func(s *Service) { s.workers = n } }

// New returns the teleport service of a host over store and factory.
func New(store teleport.Store, factory vm.Factory, opts ...Option) *Service {
	s := &Service{store: store, factory: factory, clock: systemClock{}, newID: randomID,
		log: slog.New(slog.DiscardHandler), settle: vm.SettleTimeout, format: blob.FormatDefault}
	for _, o := range opts {
		o(s)
	}
	return s
}

func init() {
	plant.SetServiceBugs = func(svc any, b plant.ServiceBugs) { svc.(*Service).bugs = b }
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return "pkg-" + hex.EncodeToString(b[:])
}

// Store is the service's package store.
func (s *Service) Store() teleport.Store { return s.store }

// Factory is the service's VM factory.
func (s *Service) Factory() vm.Factory { return s.factory }

// OutRequest says what to send.
type OutRequest struct {
	AgentID    string
	AgentState []byte
	Kind       teleport.SnapshotKind
	// KeepSource makes a copy: the source resumes afterwards. Otherwise the
	// source is stopped once the package is committed (a move).
	KeepSource bool
	// PackageID is optional; a fresh id is used when empty.
	PackageID string
	Env       map[string]string
	// Workspace, when set, becomes the package's workspace section (a
	// checkpoint's /workspace archive).
	Workspace vm.Payload
	// Format is the KLP1 version of the package (0: the service's).
	Format int
	// Disk, when set, is a checkpoint's workspace disk: it becomes the
	// package's disk section (a full VM's disk comes with its snapshot).
	Disk *vm.DiskImage
	// Fence, when set, is asked before the commit ("commit") and before a
	// failed Out resumes its source ("resume-source") whether the caller
	// still holds the agent (the registry's epoch). When it fails, Out
	// neither commits nor resumes: the source stays paused, and the error
	// (ErrFenced) says so.
	Fence func(ctx context.Context, action string) error
}

// Errors that say what a failed flow could not undo.
var (
	// ErrOutcomeUnknown: a commit failed and the store could not say
	// whether it took effect. Nothing was removed: the package may be
	// visible. A move's source stays paused so the agent cannot run twice;
	// check with `kelpie package show` and then resume the source or
	// restore the package, not both.
	ErrOutcomeUnknown = errors.New("package commit outcome unknown")
	// ErrSourceNotSettled: the package was committed, but the source VM
	// could not be resumed (copy) or stopped (move) afterwards. The package
	// is valid.
	ErrSourceNotSettled = errors.New("package committed but the source VM could not be settled")
	// ErrSourcePaused: a teleport out failed and resuming its source
	// failed too: the source VM is paused.
	ErrSourcePaused = errors.New("the source VM could not be resumed and is paused")
	// ErrFenced: the caller's fence refused a step: it no longer holds
	// the agent. Nothing was committed or resumed.
	ErrFenced = errors.New("fenced: the agent's registry record moved on")
	// errNotConfigured: a Service that was not made by New.
	errNotConfigured = errors.New("service: no store or factory (make it with service.New)")
)

func (s *Service) ready() error {
	if s == nil || s.store == nil || s.factory == nil || s.clock == nil || s.newID == nil {
		return errNotConfigured
	}
	return nil
}

func (s *Service) step(name string, start time.Time) {
	if s.onStep != nil {
		s.onStep(name, s.clock.Now().Sub(start))
	}
}

// settleContext is for work that must run after ctx ended: it keeps ctx's
// values, not its cancellation, and has a deadline of its own.
func (s *Service) settleContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s.settle)
}

// Out sends inst's agent to the store as a package of req.Kind. inst may be
// nil for a checkpoint that carries agent state only.
func (s *Service) Out(ctx context.Context, inst vm.Instance, req OutRequest) (*teleport.Package, error) {
	if err := s.ready(); err != nil {
		return nil, err
	}
	if _, err := teleport.ParseKind(string(req.Kind)); err != nil {
		return nil, err
	}
	if req.AgentID == "" {
		return nil, fmt.Errorf("teleport out: empty agent id: %w", teleport.ErrInvalidPackage)
	}
	full := req.Kind.FullVM()
	if full && inst == nil {
		return nil, fmt.Errorf("teleport out: a %s needs a VM: %w", req.Kind, vm.ErrInvalidState)
	}
	id := req.PackageID
	if id == "" {
		id = s.newID()
	}
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	host := s.factory.Host()

	// rollback returns a source that was running to running, and says so
	// when it cannot. It runs even when ctx has ended.
	wasRunning := false
	rollback := func(cause error) error {
		if !wasRunning || inst.State() != vm.StatePaused {
			return cause
		}
		rctx, cancel := s.settleContext(ctx)
		defer cancel()
		if errors.Is(cause, ErrFenced) {
			return fmt.Errorf("%w; source VM %s left paused: %w", cause, inst.ID(), ErrSourcePaused)
		}
		if req.Fence != nil {
			if ferr := req.Fence(rctx, "resume-source"); ferr != nil {
				return fmt.Errorf("%w; source VM %s left paused (%w): %w", cause, inst.ID(), ferr, ErrSourcePaused)
			}
		}
		if rerr := inst.Resume(rctx); rerr != nil {
			return fmt.Errorf("%w; resuming source VM %s failed too (%w): %w", cause, inst.ID(), rerr, ErrSourcePaused)
		}
		return cause
	}

	format, err := s.formatFor(req)
	if err != nil {
		return nil, err
	}
	// pause stops a running source for the capture (or, for a checkpoint
	// move, so that it cannot run on while its package may be published).
	// A pause that failed may have taken effect: rollback looks.
	pause := func() error {
		t := s.clock.Now()
		if inst.State() == vm.StateRunning {
			wasRunning = true
			if err := inst.Pause(ctx); err != nil {
				return rollback(fmt.Errorf("teleport out: pause: %w", err))
			}
		}
		s.step("pause", t)
		return nil
	}

	var snap *vm.Snapshot
	if full {
		if err := vm.CheckTransition(inst.ID(), vm.OpSnapshot, inst.State()); err != nil {
			return nil, fmt.Errorf("teleport out: %w", err)
		}
		// A move stays paused until the package is committed. A copy's
		// source is paused only by the capture itself: the backend resumes
		// it before the snapshot is packed and uploaded.
		if !req.KeepSource {
			if err := pause(); err != nil {
				return nil, err
			}
		}
		t := s.clock.Now()
		capture := inst.Snapshot
		if format == blob.Version2 {
			// The packer chunks guest memory itself: take it raw.
			capture = func(ctx context.Context) (*vm.Snapshot, error) { return vm.SnapshotForImage(ctx, s.factory, inst, "") }
		}
		if snap, err = capture(ctx); err != nil {
			return nil, rollback(fmt.Errorf("teleport out: snapshot: %w", err))
		}
		defer snap.Close()
		s.step("snapshot", t)
		if req.Kind == teleport.KindSuspend && snap.Metadata.HostID == "" {
			snap.Metadata.HostID = host.HostID
		}
		snap.Metadata.IsFullSnapshot = true
	} else {
		md := vm.SnapshotMetadata{SnapshotID: id + "-checkpoint", CreatedAtMs: s.clock.Now().UnixMilli(), Architecture: host.Arch,
			Layout: vm.LayoutNone, Backend: host.Backend, BackendVersion: host.BackendVersion, HostID: host.HostID,
			BaseImageVersion: host.BaseImageVersion}
		if inst != nil {
			c := inst.Config()
			md.VMID = inst.ID()
			md.VCPUCount, md.MemoryMiB = c.VCPUs, c.MemoryMiB
			md.Network, md.Hostname = c.NetworkSpec(), c.GuestHostname()
			if !req.KeepSource {
				// The agent's state is what the caller captured: a moved
				// source must not run on past it.
				if err := pause(); err != nil {
					return nil, err
				}
			}
		}
		snap = vm.NewSnapshot(md, nil, nil, nil)
	}

	t := s.clock.Now()
	pkg, err := s.upload(ctx, id, req, snap, format)
	if err != nil {
		err = fmt.Errorf("teleport out: %w", err)
		if inst == nil {
			return nil, err
		}
		if errors.Is(err, ErrOutcomeUnknown) && !req.KeepSource {
			// The package may be committed: resuming the source could
			// make the agent run twice.
			return nil, fmt.Errorf("%w; source VM %s left paused", err, inst.ID())
		}
		return nil, rollback(err)
	}
	s.step("upload", t)

	if inst == nil {
		return pkg, nil
	}
	t = s.clock.Now()
	sctx, cancel := s.settleContext(ctx)
	defer cancel()
	if req.KeepSource || s.bugs.ResumeSourceAfterMove {
		if wasRunning {
			if err := inst.Resume(sctx); err != nil {
				return pkg, fmt.Errorf("package %s: resume source: %w: %w", pkg.ID, err, ErrSourceNotSettled)
			}
		}
		s.step("resume-source", t)
		return pkg, nil
	}
	if err := inst.Stop(sctx); err != nil {
		return pkg, fmt.Errorf("package %s: stop source: %w: %w", pkg.ID, err, ErrSourceNotSettled)
	}
	s.step("stop-source", t)
	return pkg, nil
}

// formatFor is the KLP1 version req's package is written in: version 2
// only into a store with a chunk space.
func (s *Service) formatFor(req OutRequest) (int, error) {
	f := req.Format
	if f == 0 {
		f = s.format
	}
	switch f {
	case blob.Version1:
		return f, nil
	case blob.Version2:
		if _, ok := s.store.(teleport.ChunkStore); ok {
			return f, nil
		}
		if req.Format == blob.Version2 {
			return 0, fmt.Errorf("teleport out: this store has no chunk space for a version 2 package (use format v1): %w", teleport.ErrStore)
		}
		return blob.Version1, nil
	}
	return 0, fmt.Errorf("teleport out: blob format %d (want 1 or 2): %w", f, teleport.ErrInvalidPackage)
}

// upload packs and commits the package: the snapshot as a KLP1 blob of
// the given format (version 2: its chunks go to the store's chunk space,
// only those it lacks), then the workspace, each a section with its own
// size and SHA-256. On failure nothing is visible, or ErrOutcomeUnknown
// says the store could not tell.
func (s *Service) upload(ctx context.Context, id string, req OutRequest, snap *vm.Snapshot, format int) (*teleport.Package, error) {
	host := s.factory.Host()
	md := snap.Metadata
	pkg := &teleport.Package{
		ID: id, AgentID: req.AgentID, SourceArch: host.Arch, Kind: req.Kind, BaseImageVersion: host.BaseImageVersion,
		CreatedAt: s.clock.Now(), SourceHostID: host.HostID, Backend: host.Backend, AgentState: req.AgentState, Env: req.Env,
		UploadID: s.newID(), SourceKept: req.KeepSource, Network: md.Network,
	}
	// The disk: a full VM's comes with its snapshot, a checkpoint's apart.
	disk, diskMD := snap.Disk, md.Disk
	if req.Disk != nil {
		if req.Disk.Metadata.InBlob() {
			return nil, fmt.Errorf("package %s: a checkpoint's disk travels in a section of its own, not as a raw image: %w", id, teleport.ErrInvalidPackage)
		}
		disk, diskMD = req.Disk.Payload, &req.Disk.Metadata
	}
	pkg.Disk, pkg.Format = diskMD, format
	pkg.SealAgentState()
	if md.BaseImageVersion != "" {
		pkg.BaseImageVersion = md.BaseImageVersion
	}
	if md.Architecture != "" {
		pkg.SourceArch = md.Architecture
	}
	if req.Kind.FullVM() {
		pkg.Snapshot = &md
	}
	if err := pkg.Validate(); err != nil {
		return nil, err
	}

	w, err := s.store.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	committed := false
	sw := &sectionWriter{w: w}
	defer func() {
		sw.close()
		if !committed {
			actx, cancel := s.settleContext(ctx)
			defer cancel()
			w.Abort(actx)
		}
	}()
	eo := blob.EncodeOptions{Format: format, V2: blob.V2Options{Workers: s.workers}}
	if format == blob.Version2 {
		eo.V2.Chunks = w.(teleport.ChunkWriter)
	}
	enc, err := blob.EncodeSnapshot(ctx, sw.begin(teleport.SectionBlob), snap, eo)
	if err != nil {
		return nil, fmt.Errorf("pack package %s: %w", id, err)
	}
	sw.end()
	pkg.Format, pkg.LogicalBytes = enc.Format, enc.LogicalBytes
	if diskMD != nil && !diskMD.InBlob() {
		if err := sw.copySection(teleport.SectionDisk, disk, diskMD.PayloadBytes, diskMD.SHA256); err != nil {
			return nil, fmt.Errorf("pack the disk of %s: %w", id, err)
		}
	}
	if ws := req.Workspace; ws != nil {
		rc, err := ws.Open()
		if err != nil {
			return nil, fmt.Errorf("open workspace of %s: %w", id, err)
		}
		n, err := io.Copy(sw.begin(teleport.SectionWorkspace), io.LimitReader(rc, ws.Size()+1))
		rc.Close()
		if err == nil && n != ws.Size() {
			err = fmt.Errorf("workspace has %d bytes, expected %d: %w", n, ws.Size(), vm.ErrCorrupt)
		}
		if err != nil {
			return nil, fmt.Errorf("pack workspace of %s: %w", id, err)
		}
		sw.end()
	}
	pkg.Sections = sw.sections
	if req.Fence != nil {
		if err := req.Fence(ctx, "commit"); err != nil {
			return nil, fmt.Errorf("package %s not committed: %w: %w", id, err, ErrFenced)
		}
	}
	if err := w.Commit(ctx, pkg); err != nil {
		// The commit may have taken effect with its answer lost: ask the
		// store before declaring failure, or the agent could end up both
		// resumed here and restorable there.
		got, outcome, serr := s.whose(ctx, pkg)
		switch outcome {
		case uploadOurs:
			committed = true
			return got, nil
		case uploadUnknown:
			return nil, fmt.Errorf("commit package %s: %v; asking the store whether it took effect failed too (%v): %w", id, err, serr, ErrOutcomeUnknown)
		}
		return nil, fmt.Errorf("commit package %s: %w", id, err)
	}
	committed = true
	return pkg, nil
}

type uploadOutcome int

const (
	uploadAbsent  uploadOutcome = iota // no package of that id
	uploadTheirs                       // another writer's package holds the id
	uploadOurs                         // our commit took effect
	uploadUnknown                      // the store did not answer
)

// statAttempts is how often whose asks a store that does not answer.
const statAttempts = 3

// whose finds out whether the committed package id, if any, is this
// upload's: only the upload id tells, never the package id alone.
func (s *Service) whose(ctx context.Context, pkg *teleport.Package) (*teleport.Package, uploadOutcome, error) {
	sctx, cancel := s.settleContext(ctx)
	defer cancel()
	var err error
	for i := 0; i < statAttempts; i++ {
		var got *teleport.Package
		got, err = s.store.Stat(sctx, pkg.ID)
		switch {
		case err == nil && sameUpload(got, pkg):
			return got, uploadOurs, nil
		case err == nil:
			return nil, uploadTheirs, nil
		case errors.Is(err, teleport.ErrNotFound):
			return nil, uploadAbsent, nil
		case sctx.Err() != nil:
			return nil, uploadUnknown, err
		}
	}
	return nil, uploadUnknown, err
}

// sameUpload: b is the manifest of the very upload that made a.
func sameUpload(a, b *teleport.Package) bool {
	return a.ID == b.ID && a.UploadID != "" && a.UploadID == b.UploadID
}

// sectionWriter writes a package's body section by section, recording
// each one's offset, size and SHA-256 (hashed on its own goroutine).
type sectionWriter struct {
	w        io.Writer
	off      int64
	cur      teleport.Section
	h        *vm.AsyncHash
	sections []teleport.Section
}

func (sw *sectionWriter) begin(name string) io.Writer {
	sw.cur = teleport.Section{Name: name, Offset: sw.off}
	sw.h = vm.NewAsyncHash(sha256.New())
	return sw
}

func (sw *sectionWriter) Write(p []byte) (int, error) {
	n, err := sw.w.Write(p)
	sw.h.Write(p[:n])
	sw.off += int64(n)
	return n, err
}

func (sw *sectionWriter) end() {
	sw.cur.Size = sw.off - sw.cur.Offset
	sw.cur.SHA256 = hex.EncodeToString(sw.h.Sum())
	sw.h = nil
	sw.sections = append(sw.sections, sw.cur)
}

// copyBufferBytes is the chunk a section is copied in: large chunks keep
// the store's and the hashes' per-write costs small.
const copyBufferBytes = 1 << 20

// copySection writes payload p as section name, and checks it has the
// size and SHA-256 recorded for it: a payload that changed after its
// checksum was taken would make a package no host can restore.
func (sw *sectionWriter) copySection(name string, p vm.Payload, size int64, sum string) error {
	if p == nil || p.Size() != size {
		return fmt.Errorf("%s payload has %d bytes, its metadata says %d: %w", name, vm.PayloadSize(p), size, vm.ErrCorrupt)
	}
	rc, err := p.Open()
	if err != nil {
		return err
	}
	defer rc.Close()
	n, err := io.CopyBuffer(sw.begin(name), io.LimitReader(rc, size+1), make([]byte, copyBufferBytes))
	sw.end()
	switch {
	case err != nil:
		return err
	case n != size:
		return fmt.Errorf("%s payload has %d bytes, its metadata says %d: %w", name, n, size, vm.ErrCorrupt)
	case sw.sections[len(sw.sections)-1].SHA256 != sum:
		return fmt.Errorf("%s payload differs from its recorded checksum: %w", name, vm.ErrCorrupt)
	}
	return nil
}

// close ends the hash of a section that was never ended (a failed upload).
func (sw *sectionWriter) close() {
	if sw.h != nil {
		sw.h.Sum()
		sw.h = nil
	}
}

// InOptions tunes In.
type InOptions struct {
	// Workspace, when set and the package has a workspace, puts the
	// workspace into the VM once it runs.
	Workspace WorkspaceRestorer
	// Fence, when set, is asked after the restore and before the VM runs
	// (its Resume, or a checkpoint's fresh boot) whether the caller holds
	// the agent; when it fails, the VM is removed and In fails with
	// ErrFenced.
	Fence func(ctx context.Context) error
	// Identity, when set, is given to the restored guest before In
	// returns, so before its first command (vm.Reidentify): what a restore
	// that makes a second live copy of an agent needs.
	Identity *vm.Identity
}

// A WorkspaceRestorer puts a checkpoint's workspace archive into the VM
// restored from it, in two steps, so that nothing unverified reaches the
// guest: Stage receives the archive as it streams from the store (it must
// read it to the end; In verifies it in the same pass, vm.StagePayload),
// and Restore, called only if it matched, unpacks what was staged into the
// guest.
type WorkspaceRestorer interface {
	Stage(r io.Reader) error
	Restore(ctx context.Context, inst vm.Instance) error
}

// In fetches package id, validates it against this host, and returns a
// running VM restored from it whose guest answers (vm.WaitReady). On
// failure no VM is left behind, or vm.ErrLeftBehind says which one is.
func (s *Service) In(ctx context.Context, id string, cfg vm.Config, opts InOptions) (_ vm.Instance, _ *teleport.Package, err error) {
	if err := s.ready(); err != nil {
		return nil, nil, err
	}
	t := s.clock.Now()
	pkg, err := s.store.Stat(ctx, id)
	if err != nil {
		return nil, nil, fmt.Errorf("teleport in: %w", err)
	}
	host := s.factory.Host()
	if !s.bugs.SkipRestoreRules {
		warnings, err := teleport.Check(pkg, host)
		if err != nil {
			return nil, pkg, err
		}
		for _, w := range warnings {
			s.log.Warn("restoring with a caveat", "package", id, "warning", w)
		}
	}
	if err := pkg.CheckAgentState(); err != nil {
		return nil, pkg, refuse(pkg, err, "%v", err)
	}
	s.step("validate", t)

	var inst vm.Instance
	defer func() {
		if err != nil && inst != nil {
			err = vm.RemoveFailed(ctx, inst, err)
		}
	}()
	// The network as it left, unless the caller gives one.
	if cfg.Network == "" && pkg.Network != nil {
		cfg.SetNetwork(pkg.Network)
	}
	r, err := s.store.Open(ctx, id)
	if err != nil {
		return nil, pkg, fmt.Errorf("teleport in: %w", err)
	}
	defer r.Close()

	if pkg.Kind.FullVM() {
		t = s.clock.Now()
		snap, closeChunks, err := s.snapshotFromBlob(ctx, pkg, r)
		if err != nil {
			return nil, pkg, err
		}
		defer closeChunks()
		// The disk: in the blob (a version 2 raw image), or a section.
		if d, err := diskPayload(pkg, r); err != nil {
			return nil, pkg, err
		} else if d != nil {
			snap.Disk = d
		}
		inst, err = s.factory.CreateFromSnapshot(ctx, cfg, snap)
		if err != nil {
			inst = nil // the factory cleaned up, or said it could not
			if errors.Is(err, vm.ErrCorrupt) {
				return nil, pkg, refuse(pkg, err, "%v", err)
			}
			return nil, pkg, fmt.Errorf("teleport in: restore: %w", err)
		}
		s.step("restore", t)
		if err := fence(ctx, opts); err != nil {
			return nil, pkg, err
		}
		t = s.clock.Now()
		if err := inst.Resume(ctx); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: resume: %w", err)
		}
		s.step("resume", t)
		t = s.clock.Now()
		if err := vm.WaitReady(ctx, inst); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: the restored guest did not answer: %w", err)
		}
		s.step("ready", t)
	} else {
		t = s.clock.Now()
		disk, err := diskPayload(pkg, r)
		if err != nil {
			return nil, pkg, err
		}
		if disk != nil {
			// The fresh VM's workspace disk is the package's, verified
			// before the hypervisor starts.
			inst, err = vm.CreateWithDisk(ctx, s.factory, cfg, vm.NewDiskImage(*pkg.Disk, disk, nil))
		} else {
			inst, err = s.factory.Create(ctx, cfg)
		}
		if err != nil {
			inst = nil
			if errors.Is(err, vm.ErrCorrupt) {
				return nil, pkg, refuse(pkg, err, "%v", err)
			}
			return nil, pkg, fmt.Errorf("teleport in: create: %w", err)
		}
		if err := fence(ctx, opts); err != nil {
			return nil, pkg, err
		}
		if err := inst.Start(ctx); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: boot: %w", err)
		}
		s.step("boot", t)
	}
	if opts.Identity != nil {
		t = s.clock.Now()
		if err := vm.Reidentify(ctx, s.factory, inst, *opts.Identity); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: give the copy its own identity: %w", err)
		}
		s.step("identity", t)
	}
	if ws, ok := pkg.Section(teleport.SectionWorkspace); ok && opts.Workspace != nil {
		t = s.clock.Now()
		if err := s.restoreWorkspace(ctx, pkg, r, ws, inst, opts.Workspace); err != nil {
			return nil, pkg, err
		}
		s.step("workspace", t)
	}
	return inst, pkg, nil
}

func fence(ctx context.Context, opts InOptions) error {
	if opts.Fence == nil {
		return nil
	}
	if err := opts.Fence(ctx); err != nil {
		return fmt.Errorf("teleport in: %w: %w", err, ErrFenced)
	}
	return nil
}

// refuse is a checksum refusal of pkg, revealed by cause.
func refuse(pkg *teleport.Package, cause error, format string, args ...any) error {
	return &teleport.RefusalError{PackageID: pkg.ID, Rule: teleport.RuleChecksums,
		Reason: fmt.Sprintf(format, args...), Err: teleport.ErrChecksumMismatch, Cause: cause}
}

// readFailed: err is a read that failed, not bytes found wrong. Only bytes
// that were read and found wrong make a package corrupt; a failed read
// says nothing about the package (the caller may retry), so it must not be
// reported as a checksum refusal.
func readFailed(err error) bool {
	return !errors.Is(err, vm.ErrCorrupt) && !errors.Is(err, teleport.ErrChunkMissing) && !errors.Is(err, blob.ErrNotItsManifest) && blob.ErrorKind(err) == ""
}

// snapshotFromBlob maps a package's blob onto a snapshot whose payloads
// read straight from the store (blob.OpenPackage, which also checks the
// blob is the manifest's). A version 2 package's chunks come from the
// store's chunk space, each verified against its hash as it is read; the
// payloads' checksums are verified by the backend while it stages them
// (vm.Stage), in the same single read. The caller calls the returned func
// when done with the snapshot.
func (s *Service) snapshotFromBlob(ctx context.Context, pkg *teleport.Package, r teleport.Reader) (*vm.Snapshot, func(), error) {
	none := func() {}
	o := blob.OpenOptions{Workers: s.workers}
	closeChunks := none
	if pkg.Format == blob.Version2 {
		cs, ok := s.store.(teleport.ChunkStore)
		if !ok {
			return nil, none, fmt.Errorf("teleport in: package %s is version 2 and this store has no chunk space: %w", pkg.ID, teleport.ErrStore)
		}
		cr, err := cs.OpenChunks(ctx, pkg)
		if errors.Is(err, teleport.ErrChunkMissing) {
			return nil, none, refuse(pkg, err, "%v", err)
		}
		if err != nil {
			return nil, none, fmt.Errorf("teleport in: fetch package %s: %w", pkg.ID, err)
		}
		o.Chunks, closeChunks = cr, func() { cr.Close() }
	}
	snap, err := s.openBlob(pkg, r, o)
	if err != nil {
		closeChunks()
		return nil, none, err
	}
	return snap, closeChunks, nil
}

func (s *Service) openBlob(pkg *teleport.Package, r teleport.Reader, o blob.OpenOptions) (*vm.Snapshot, error) {
	snap, err := blob.OpenPackage(pkg, r, r.Size(), o)
	if err != nil {
		if readFailed(err) {
			return nil, fmt.Errorf("teleport in: fetch package %s: %w", pkg.ID, err)
		}
		return nil, refuse(pkg, err, "its blob is not the one its manifest describes: %v", err)
	}
	if s.bugs.SkipChecksums {
		// The planted bug: trust whatever bytes are there by re-hashing
		// them instead of verifying them.
		md := &snap.Metadata
		for _, p := range []struct {
			payload vm.Payload
			sum     *string
		}{{snap.DeviceState, &md.DeviceStateSHA256}, {snap.Memory, &md.MemorySHA256}} {
			if p.payload != nil {
				if *p.sum, err = vm.HashPayload(p.payload); err != nil {
					return nil, err
				}
			}
		}
	}
	return snap, nil
}

// diskPayload is the package's disk section as a payload read straight
// from the store, or nil when it has none. Its checksum is verified where
// it is staged (vm.Stage*), in the same single read.
func diskPayload(pkg *teleport.Package, r teleport.Reader) (vm.Payload, error) {
	sec, ok := pkg.Section(teleport.SectionDisk)
	if !ok {
		return nil, nil
	}
	if sec.Offset < 0 || sec.Size < 0 || sec.Offset > r.Size()-sec.Size {
		return nil, refuse(pkg, nil, "its body has %d bytes, its disk section ends at %d", r.Size(), sec.Offset+sec.Size)
	}
	return &vm.SectionPayload{R: r, Offset: sec.Offset, N: sec.Size}, nil
}

// restoreWorkspace stages the workspace section through the restorer,
// verifying it in the same pass, and has it restored only if it matched.
func (s *Service) restoreWorkspace(ctx context.Context, pkg *teleport.Package, r teleport.Reader, ws teleport.Section, inst vm.Instance, wr WorkspaceRestorer) error {
	if ws.Offset < 0 || ws.Size < 0 || ws.Offset > r.Size()-ws.Size {
		return refuse(pkg, nil, "its body has %d bytes, its workspace section ends at %d", r.Size(), ws.Offset+ws.Size)
	}
	payload := &vm.SectionPayload{R: r, Offset: ws.Offset, N: ws.Size}
	if err := vm.StagePayload("package "+pkg.ID, teleport.SectionWorkspace, payload, ws.Size, ws.SHA256, wr.Stage); err != nil {
		if errors.Is(err, vm.ErrCorrupt) {
			return refuse(pkg, err, "%v", err)
		}
		return fmt.Errorf("teleport in: workspace: %w", err)
	}
	if err := wr.Restore(ctx, inst); err != nil {
		return fmt.Errorf("teleport in: restore workspace: %w", err)
	}
	return nil
}
