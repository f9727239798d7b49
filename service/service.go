// Package service runs the teleport flows over any vm.Factory and any
// teleport.Store: Out (pause, snapshot, pack, upload, then resume or stop the
// source) and In (fetch, validate, create, restore, resume).
//
// The same code runs in production and in the simulation; it must never read
// the wall clock or global randomness itself (Clock and NewID are injected).
// Its promise: a failed Out leaves the source VM as it was and no package
// visible; a failed In leaves no VM and no temporary files behind.
package service

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"reflect"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

// Clock tells time; production passes the real clock, the simulation its own.
type Clock interface{ Now() time.Time }

// Service is the teleport service of one host.
type Service struct {
	Store   teleport.Store
	Factory vm.Factory
	Clock   Clock
	// NewID returns a fresh package id.
	NewID func() string
	// Log receives warnings (a base image PATCH difference); nil discards.
	Log *slog.Logger
	// OnStep, when set, is told each step's name and duration (by Clock).
	OnStep func(step string, d time.Duration)
	// Bugs plants known bugs so the simulation can prove its checkers fire.
	// Never set outside tests; the zero value is the correct service.
	Bugs Bugs
}

// Bugs are test-only switches that break the service on purpose.
type Bugs struct {
	SkipRestoreRules      bool // restore without checking architecture/host/version rules
	SkipChecksums         bool // restore payloads without verifying their checksums
	ResumeSourceAfterMove bool // leave the source running after a move
}

// OutRequest says what to send.
type OutRequest struct {
	AgentID    string
	AgentState []byte
	Kind       teleport.SnapshotKind
	// KeepSource makes a copy: the source resumes afterwards. Otherwise the
	// source is stopped once the package is committed (a move).
	KeepSource bool
	// PackageID is optional; NewID is used when empty.
	PackageID string
	Env       map[string]string
	// Workspace, when set, is stored beside the package (a checkpoint's
	// /workspace archive).
	Workspace vm.Payload
}

// ErrOutcomeUnknown: a commit failed, the store could not say whether it took
// effect, and removing the package failed too. The source was resumed; the
// package may still be visible. Check with `kelpie package show` and remove
// it (or the source) so the agent runs in one place only.
var ErrOutcomeUnknown = errors.New("package commit outcome unknown")

// ErrSourceNotSettled: the package was committed, but the source VM could not
// be resumed (copy) or stopped (move) afterwards. The package is valid.
var ErrSourceNotSettled = errors.New("package committed but the source VM could not be settled")

func (s *Service) step(name string, start time.Time) {
	if s.OnStep != nil {
		s.OnStep(name, s.Clock.Now().Sub(start))
	}
}

func (s *Service) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// Out sends inst's agent to the store as a package of req.Kind. inst may be
// nil for a checkpoint that carries agent state only.
func (s *Service) Out(ctx context.Context, inst vm.Instance, req OutRequest) (_ *teleport.Package, err error) {
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
		id = s.NewID()
	}
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	host := s.Factory.Host()

	// Rollback returns the source to where it was. It must run even when
	// ctx is canceled, so it gets a context of its own.
	wasRunning := false
	rollback := func() {
		if wasRunning && inst.State() == vm.StatePaused {
			if rerr := inst.Resume(context.WithoutCancel(ctx)); rerr != nil {
				err = fmt.Errorf("%w (and resuming the source failed: %v)", err, rerr)
			}
		}
	}

	var md vm.SnapshotMetadata
	var state, memory vm.Payload
	if full {
		if err := vm.CheckTransition(inst.ID(), vm.OpSnapshot, inst.State()); err != nil {
			return nil, fmt.Errorf("teleport out: %w", err)
		}
		t := s.Clock.Now()
		if inst.State() == vm.StateRunning {
			if err := inst.Pause(ctx); err != nil {
				return nil, fmt.Errorf("teleport out: pause: %w", err)
			}
			wasRunning = true
		}
		s.step("pause", t)
		t = s.Clock.Now()
		snap, err := inst.Snapshot(ctx)
		if err != nil {
			rollback()
			return nil, fmt.Errorf("teleport out: snapshot: %w", err)
		}
		defer snap.Close()
		s.step("snapshot", t)
		md, state, memory = snap.Metadata, snap.DeviceState, snap.Memory
		if req.Kind == teleport.KindSuspend && md.HostID == "" {
			md.HostID = host.HostID
		}
	} else {
		now := s.Clock.Now()
		md = vm.SnapshotMetadata{SnapshotID: id + "-checkpoint", CreatedAtMs: now.UnixMilli(), Architecture: host.Arch,
			Layout: vm.LayoutNone, Backend: host.Backend, BackendVersion: host.BackendVersion, HostID: host.HostID,
			BaseImageVersion: host.BaseImageVersion}
		if inst != nil {
			md.VMID = inst.ID()
			md.VCPUCount, md.MemoryMiB = inst.Config().VCPUs, inst.Config().MemoryMiB
		}
	}

	t := s.Clock.Now()
	pkg, err := s.upload(ctx, id, req, md, state, memory)
	if err != nil {
		if inst != nil {
			rollback()
		}
		return nil, fmt.Errorf("teleport out: %w", err)
	}
	s.step("upload", t)

	if inst == nil {
		return pkg, nil
	}
	t = s.Clock.Now()
	settle := context.WithoutCancel(ctx)
	if req.KeepSource || s.Bugs.ResumeSourceAfterMove {
		if wasRunning {
			if err := inst.Resume(settle); err != nil {
				return pkg, fmt.Errorf("package %s: resume source: %v: %w", pkg.ID, err, ErrSourceNotSettled)
			}
		}
		s.step("resume-source", t)
		return pkg, nil
	}
	if err := inst.Stop(settle); err != nil {
		return pkg, fmt.Errorf("package %s: stop source: %v: %w", pkg.ID, err, ErrSourceNotSettled)
	}
	s.step("stop-source", t)
	return pkg, nil
}

// upload packs and commits the package. On failure nothing is visible.
func (s *Service) upload(ctx context.Context, id string, req OutRequest, md vm.SnapshotMetadata, state, memory vm.Payload) (*teleport.Package, error) {
	host := s.Factory.Host()
	md.IsFullSnapshot = req.Kind.FullVM()
	meta, err := md.Marshal()
	if err != nil {
		return nil, err
	}
	pkg := &teleport.Package{
		ID: id, AgentID: req.AgentID, SourceArch: host.Arch, Kind: req.Kind, BaseImageVersion: host.BaseImageVersion,
		CreatedAt: s.Clock.Now(), SourceHostID: host.HostID, Backend: host.Backend, AgentState: req.AgentState, Env: req.Env,
	}
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

	w, err := s.Store.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	committed := false
	wsRef := ""
	defer func() {
		if !committed {
			w.Abort(context.WithoutCancel(ctx))
			if wsRef != "" {
				s.Store.DeleteWorkspace(context.WithoutCancel(ctx), wsRef)
			}
		}
	}()
	var secs [2]blob.Section
	var sums [2]hash.Hash
	for i, p := range []vm.Payload{state, memory} {
		if p == nil {
			continue
		}
		rc, err := p.Open()
		if err != nil {
			return nil, fmt.Errorf("open snapshot payload: %w", err)
		}
		defer rc.Close()
		sums[i] = sha256.New()
		secs[i] = blob.Section{R: io.TeeReader(rc, sums[i]), N: p.Size()}
	}
	if _, err := blob.Encode(w, blob.Section{R: bytes.NewReader(meta), N: int64(len(meta))}, secs[0], secs[1]); err != nil {
		return nil, fmt.Errorf("pack package %s: %w", id, err)
	}
	// Check the bytes just sent against the snapshot's own checksums before
	// the commit: past it a move stops the source, and a payload that
	// changed after its checksum was taken would be the agent's only copy,
	// refused by every restore.
	for i, want := range []string{md.DeviceStateSHA256, md.MemorySHA256} {
		if sums[i] != nil && want != "" && hex.EncodeToString(sums[i].Sum(nil)) != want {
			return nil, fmt.Errorf("pack package %s: %s section differs from its recorded checksum: %w", id, blob.SectionNames[i+1], vm.ErrCorrupt)
		}
	}
	if req.Workspace != nil {
		wsRef = id + ".workspace"
		rc, err := req.Workspace.Open()
		if err != nil {
			return nil, fmt.Errorf("open workspace: %w", err)
		}
		err = s.Store.PutWorkspace(ctx, wsRef, rc, req.Workspace.Size())
		rc.Close()
		if err != nil {
			return nil, fmt.Errorf("store workspace of %s: %w", id, err)
		}
		pkg.WorkspaceRef = wsRef
	}
	if err := w.Commit(ctx, pkg); err != nil {
		// The commit may have taken effect with its answer lost: ask the
		// store before declaring failure, or the agent could end up both
		// resumed here and restorable there.
		if got, serr := s.Store.Stat(context.WithoutCancel(ctx), id); serr == nil && sameUpload(got, pkg) {
			committed = true
			return got, nil
		} else if serr != nil && !errors.Is(serr, teleport.ErrNotFound) {
			// Unknown outcome: make sure it is not visible.
			if derr := s.Store.Delete(context.WithoutCancel(ctx), id); derr != nil && !errors.Is(derr, teleport.ErrNotFound) {
				// The package may be committed, and it would need its
				// workspace: keep it (GC removes it if it is an orphan).
				wsRef = ""
				return nil, fmt.Errorf("commit package %s: %v; removing it failed too (%v): %w", id, err, derr, ErrOutcomeUnknown)
			}
		}
		return nil, fmt.Errorf("commit package %s: %w", id, err)
	}
	committed = true
	return pkg, nil
}

func sameUpload(a, b *teleport.Package) bool {
	return a.ID == b.ID && a.AgentID == b.AgentID && a.Kind == b.Kind && a.CreatedAt.Equal(b.CreatedAt) &&
		a.SourceHostID == b.SourceHostID
}

// InOptions tunes In.
type InOptions struct {
	// RestoreWorkspace, when set and the package has a workspace, is given
	// the workspace archive once the VM runs.
	RestoreWorkspace func(ctx context.Context, inst vm.Instance, r io.Reader) error
}

// In fetches package id, validates it against this host, and returns a
// running VM restored from it. On failure no VM is left behind.
func (s *Service) In(ctx context.Context, id string, cfg vm.Config, opts InOptions) (_ vm.Instance, _ *teleport.Package, err error) {
	t := s.Clock.Now()
	pkg, err := s.Store.Stat(ctx, id)
	if err != nil {
		return nil, nil, fmt.Errorf("teleport in: %w", err)
	}
	host := s.Factory.Host()
	if !s.Bugs.SkipRestoreRules {
		warnings, err := teleport.Check(pkg, host)
		if err != nil {
			return nil, pkg, err
		}
		for _, w := range warnings {
			s.log().Warn("restoring with a caveat", "package", id, "warning", w)
		}
	}
	s.step("validate", t)

	var inst vm.Instance
	defer func() {
		if err != nil && inst != nil {
			inst.Destroy(context.WithoutCancel(ctx))
		}
	}()
	if cfg.VCPUs == 0 && pkg.Snapshot != nil {
		cfg.VCPUs = pkg.Snapshot.VCPUCount
	}
	if cfg.MemoryMiB == 0 && pkg.Snapshot != nil {
		cfg.MemoryMiB = pkg.Snapshot.MemoryMiB
	}

	if pkg.Kind.FullVM() {
		t = s.Clock.Now()
		r, err := s.Store.Open(ctx, id)
		if err != nil {
			return nil, pkg, fmt.Errorf("teleport in: %w", err)
		}
		defer r.Close()
		snap, err := s.snapshotFromBlob(pkg, r)
		if err != nil {
			return nil, pkg, err
		}
		s.step("fetch-verify", t)
		t = s.Clock.Now()
		inst, err = s.Factory.CreateFromSnapshot(ctx, cfg, snap)
		if err != nil {
			inst = nil // the factory cleaned up
			return nil, pkg, fmt.Errorf("teleport in: restore: %w", err)
		}
		s.step("restore", t)
		t = s.Clock.Now()
		if err := inst.Resume(ctx); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: resume: %w", err)
		}
		s.step("resume", t)
	} else {
		t = s.Clock.Now()
		inst, err = s.Factory.Create(ctx, cfg)
		if err != nil {
			inst = nil
			return nil, pkg, fmt.Errorf("teleport in: create: %w", err)
		}
		if err := inst.Start(ctx); err != nil {
			return nil, pkg, fmt.Errorf("teleport in: boot: %w", err)
		}
		s.step("boot", t)
	}
	if pkg.WorkspaceRef != "" && opts.RestoreWorkspace != nil {
		t = s.Clock.Now()
		rc, err := s.Store.GetWorkspace(ctx, pkg.WorkspaceRef)
		if err != nil {
			return nil, pkg, fmt.Errorf("teleport in: workspace: %w", err)
		}
		err = opts.RestoreWorkspace(ctx, inst, rc)
		rc.Close()
		if err != nil {
			return nil, pkg, fmt.Errorf("teleport in: restore workspace: %w", err)
		}
		s.step("workspace", t)
	}
	return inst, pkg, nil
}

// snapshotFromBlob decodes a package's blob into a snapshot whose payloads
// read straight from the store, after checking them against the manifest.
func (s *Service) snapshotFromBlob(pkg *teleport.Package, r teleport.Reader) (*vm.Snapshot, error) {
	refuse := func(format string, args ...any) error {
		return &teleport.RefusalError{PackageID: pkg.ID, Rule: teleport.RuleChecksums,
			Reason: fmt.Sprintf(format, args...), Err: teleport.ErrChecksumMismatch}
	}
	// Only bytes that were read and found wrong make a package corrupt; a
	// read that failed says nothing about the package (the caller may
	// retry), so it must not be reported as a checksum refusal.
	readFailed := func(err error) bool { return !errors.Is(err, vm.ErrCorrupt) && blob.ErrorKind(err) == "" }
	b, err := blob.Open(r, r.Size())
	if err != nil {
		if readFailed(err) {
			return nil, fmt.Errorf("teleport in: fetch package %s: %w", pkg.ID, err)
		}
		return nil, refuse("its blob is unreadable: %v", err)
	}
	md, err := vm.ParseMetadata(b.Metadata())
	if err != nil {
		if readFailed(err) {
			return nil, fmt.Errorf("teleport in: fetch package %s: %w", pkg.ID, err)
		}
		return nil, refuse("its snapshot metadata is unreadable: %v", err)
	}
	// The whole metadata section must be the manifest's copy: the backend
	// restores from the blob's metadata (architecture, layout, host...), so
	// a flipped bit there that left the id and checksums intact would
	// otherwise reach the hypervisor unverified.
	want := pkg.Snapshot
	if !reflect.DeepEqual(md, *want) {
		return nil, refuse("the blob's metadata does not match the manifest (snapshot %s vs %s)", md.SnapshotID, want.SnapshotID)
	}
	var state, memory vm.Payload
	if n := int64(b.Header.SnapshotLen); n > 0 {
		state = &vm.SectionPayload{R: r, Offset: b.SnapshotOffset(), N: n}
	}
	if n := int64(b.Header.MemoryLen); n > 0 {
		memory = &vm.SectionPayload{R: r, Offset: b.MemoryOffset(), N: n}
	}
	snap := vm.NewSnapshot(md, state, memory, nil)
	if !s.Bugs.SkipChecksums {
		if err := vm.VerifyPayloads(snap); err != nil {
			if readFailed(err) {
				return nil, fmt.Errorf("teleport in: fetch package %s: %w", pkg.ID, err)
			}
			return nil, refuse("%v", err)
		}
	} else {
		// The planted bug: restore whatever is there, claiming it verified.
		snap.Metadata.DeviceStateSHA256, snap.Metadata.MemorySHA256 = "", ""
		snap.Metadata.DeviceStateSize, snap.Metadata.MemorySize = vm.PayloadSize(state), vm.PayloadSize(memory)
	}
	return snap, nil
}
