package host

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
)

// KindAuto asks TeleportOut to choose the kind for the target.
const KindAuto = "auto"

// OutRequest says what TeleportOut sends where.
type OutRequest struct {
	// Store is the package store URL ("" for the host's own).
	Store string
	// Kind is teleport, suspend (only as a copy: a suspend that removes
	// its source is SuspendVM), checkpoint, or KindAuto: suspend when
	// Target is this host and the source stays, else teleport when Target
	// can restore the full VM, else checkpoint.
	Kind string
	// Target describes the restoring host for KindAuto; empty fields are
	// this host's, but for the host id: empty is another host.
	Target Target
	// KeepSource makes a copy: the source keeps running. Otherwise it is a
	// move: the source is removed once the package is committed, and
	// resumed if anything fails before.
	KeepSource bool
	// AgentID is recorded in the package (default: the VM name).
	AgentID    string
	AgentState []byte
	// PackageID is optional.
	PackageID string
	// Format is the package's KLP1 version (0: blob.FormatDefault; a
	// version 2 package needs a store with a chunk space).
	Format int
	// Fence, when set, is asked before the commit and before a failed
	// move resumes its source (see service.OutRequest.Fence): the
	// registry's ownership check.
	Fence func(ctx context.Context, action string) error
}

// Target is the host a package is meant for (OutRequest.Kind auto).
type Target struct {
	Arch    string
	Backend string
	HostID  string
	CPU     string // the backend's "cpu" fact
}

// OutResult is what TeleportOut did.
type OutResult struct {
	Package *teleport.Package
	Kind    teleport.SnapshotKind
	// KindReason says why KindAuto chose Kind.
	KindReason string
	// SourceRemoved: a move removed its source.
	SourceRemoved bool
	// NoWorkspace says why a checkpoint carries no workspace ("" if it
	// does, or is no checkpoint).
	NoWorkspace string
	// Warning: the package is committed, but something after it failed.
	Warning string
}

// TeleportOut sends VM name to a store as a package.
func (h *Host) TeleportOut(ctx context.Context, name string, req OutRequest) (*OutResult, error) {
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if req.Kind == "" {
		req.Kind = string(teleport.KindTeleport)
	}
	res := &OutResult{}
	if req.Kind != KindAuto {
		if res.Kind, err = teleport.ParseKind(req.Kind); err != nil {
			return nil, fmt.Errorf("%w: %w", err, ErrInvalidRequest)
		}
		if req.Target != (Target{}) {
			return nil, fmt.Errorf("a target only goes with kind auto: %w", ErrInvalidRequest)
		}
	}
	if err := h.refuseMoved(ctx, name); err != nil {
		return nil, err
	}
	st, err := h.Store(ctx, req.Store)
	if err != nil {
		return nil, err
	}
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	if req.Kind == KindAuto {
		src := vm.SnapshotHost(lv.f, lv.inst)
		dst, err := req.Target.apply(src)
		if err != nil {
			return nil, err
		}
		res.Kind, res.KindReason = teleport.ChooseKind(src, dst)
	}
	if res.Kind == teleport.KindSuspend && !req.KeepSource {
		// A suspend that removes its source is SuspendVM, which keeps a
		// record the VM can be resumed from by name.
		return nil, fmt.Errorf("vm %s: a suspend that removes the VM is `vm suspend` (SuspendVM), which records it; teleport out sends a suspend only as a copy: %w", name, ErrInvalidRequest)
	}
	out := service.OutRequest{AgentID: req.AgentID, AgentState: req.AgentState, Kind: res.Kind, KeepSource: req.KeepSource,
		PackageID: req.PackageID, Format: req.Format, Fence: req.Fence}
	storeURL := cmp.Or(req.Store, h.DefaultStore())
	if !req.KeepSource {
		// A move: just before its commit, the source is recorded as moved
		// out (pending), so that whatever happens next — a crash of this
		// process, a source that will not go — it never runs here again
		// once the package holds the agent (refuseMoved asks the store).
		if out.PackageID == "" {
			out.PackageID = newPackageID(lv.inst.ID())
		}
		rec := movedRecord{Name: name, PackageID: out.PackageID, Store: storeURL}
		fence := req.Fence
		out.Fence = func(ctx context.Context, action string) error {
			if fence != nil {
				if err := fence(ctx, action); err != nil {
					return err
				}
			}
			switch action {
			case "commit":
				rec.At = h.now()
				if err := h.writeMoved(rec); err != nil {
					return fmt.Errorf("record vm %s as moving out: %w", name, err)
				}
			case "resume-source":
				// The commit did not happen: the source is its own again.
				if err := h.clearMoved(name); err != nil {
					return fmt.Errorf("clear the move record of vm %s: %w", name, err)
				}
			}
			return nil
		}
	}
	if out.AgentID == "" {
		out.AgentID = agentID(lv.inst)
	}
	if res.Kind == teleport.KindCheckpoint {
		// A workspace disk travels whole; a workspace in guest RAM as an
		// archive.
		disk, err := exportDisk(ctx, lv)
		if err != nil {
			return nil, err
		}
		if disk != nil {
			defer disk.Close()
			out.Disk = disk
		} else {
			ws, cleanup, why, err := h.archiveWorkspace(ctx, lv)
			if err != nil {
				return nil, err
			}
			defer cleanup()
			out.Workspace, res.NoWorkspace = ws, why
		}
	}
	pkg, err := h.service(ctx, lv.f, st, "out").Out(ctx, lv.inst, out)
	if err != nil && !errors.Is(err, service.ErrSourceNotSettled) {
		if !req.KeepSource && !errors.Is(err, service.ErrOutcomeUnknown) {
			// Not committed and the source is as it was: no record. (An
			// unknown outcome keeps it: refuseMoved asks the store.)
			if cerr := h.clearMoved(name); cerr != nil {
				return nil, fmt.Errorf("%w; clearing the move record of vm %s failed too: %v", err, name, cerr)
			}
		}
		return nil, err
	}
	res.Package = pkg
	var warnings []string
	if err != nil {
		warnings = append(warnings, err.Error())
	} else if req.KeepSource && lv.inst.State() == vm.StateRunning {
		// The source ran on: it answers, its clock set again, before the
		// next command.
		if werr := vm.WaitReady(ctx, lv.inst); werr != nil {
			warnings = append(warnings, fmt.Sprintf("package %s committed, but the source vm %s does not answer: %v", pkg.ID, name, werr))
		}
	}
	if !req.KeepSource {
		// The package holds the agent now; the stopped source goes.
		dctx, cancel := vm.SettleContext(ctx)
		derr := lv.inst.Destroy(dctx)
		cancel()
		if derr != nil {
			// Its move record (written before the commit) keeps it from
			// ever running again: the package holds the agent.
			if merr := h.writeMoved(movedRecord{Name: name, PackageID: pkg.ID, Store: storeURL, At: h.now(), Committed: true}); merr != nil {
				warnings = append(warnings, fmt.Sprintf("marking vm %s moved failed (%v)", name, merr))
			}
			warnings = append(warnings, fmt.Sprintf("package %s committed, but removing the stopped source vm %s failed: %v; it stays here paused and refuses to run (remove it: kelpie vm rm %s)", pkg.ID, name, derr, name))
		} else {
			h.forget(name)
			res.SourceRemoved = true
			if cerr := h.clearMoved(name); cerr != nil {
				warnings = append(warnings, fmt.Sprintf("vm %s removed, but its move record stays (%v): kelpie vm rm %s clears it", name, cerr, name))
			}
		}
	}
	res.Warning = strings.Join(warnings, "; ")
	return res, nil
}

// apply is the host a package for t would be restored on: src's shape
// with t's fields, and, unless t names a host, some other host (a package
// meant for this host is a suspend, and only `vm suspend` makes one that
// removes its source).
func (t Target) apply(src vm.HostInfo) (vm.HostInfo, error) {
	dst := src
	dst.HostID = ""
	dst.Compat = maps.Clone(src.Compat)
	if t.Arch != "" {
		a, err := vm.ParseArchitecture(t.Arch)
		if err != nil {
			return dst, fmt.Errorf("target architecture: %w", err)
		}
		dst.Arch = a
	}
	if t.Backend != "" {
		dst.Backend = t.Backend
	}
	if t.HostID != "" {
		dst.HostID = t.HostID
	}
	if t.CPU != "" {
		if dst.Compat == nil {
			dst.Compat = map[string]string{}
		}
		dst.Compat["cpu"] = t.CPU
	}
	return dst, nil
}

// agentID is the agent a VM runs: the one it was given, else its name.
func agentID(inst vm.Instance) string {
	if id := inst.Config().AgentID; id != "" {
		return id
	}
	return inst.ID()
}

// exportDisk is lv's workspace disk image, or nil when it has none (or
// its backend cannot hand one out).
func exportDisk(ctx context.Context, lv *liveVM) (*vm.DiskImage, error) {
	if !lv.inst.Config().Disk.Present() {
		return nil, nil
	}
	img, err := vm.ExportDisk(ctx, lv.f, lv.inst)
	if errors.Is(err, vm.ErrNoDisk) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("export the workspace disk of vm %s: %w", lv.inst.ID(), err)
	}
	return img, nil
}

// archiveWorkspace packs the guest's workspace into a temporary file
// under Home/tmp, where the backend can (vm.WorkspaceArchiver); why says
// why not otherwise.
func (h *Host) archiveWorkspace(ctx context.Context, lv *liveVM) (ws vm.Payload, cleanup func(), why string, err error) {
	cleanup = func() {}
	if _, ok := lv.inst.(vm.WorkspaceArchiver); !ok {
		return nil, cleanup, fmt.Sprintf("backend %s cannot archive a guest workspace", lv.backend), nil
	}
	dir := filepath.Join(h.o.Home, "tmp")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, cleanup, "", err
	}
	f, err := os.CreateTemp(dir, "workspace-*.tgz")
	if err != nil {
		return nil, cleanup, "", err
	}
	cleanup = func() { os.Remove(f.Name()) }
	_, err = vm.ArchiveWorkspace(ctx, lv.f, lv.inst, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		ws, err = vm.NewFilePayload(f.Name())
	}
	if err != nil {
		cleanup()
		return nil, func() {}, "", fmt.Errorf("archive the workspace of vm %s: %w", lv.inst.ID(), err)
	}
	return ws, cleanup, "", nil
}

// InRequest says how TeleportIn restores a package.
type InRequest struct {
	Store string // "" for the host's own
	Name  string // the new VM's name (required)
	// Backend restores the package; "" for the backend that wrote a VM
	// snapshot, or the host's default for a checkpoint.
	Backend string
	Accel   string
	// VCPUs and MemoryMiB size a checkpoint's fresh VM (0 for the
	// defaults). A full VM keeps its own: for one, they must be 0.
	VCPUs, MemoryMiB int
	// Publish replaces the package's published ports when PublishSet (an
	// empty list: none); otherwise the recorded ones are used.
	Publish    []vm.Publish
	PublishSet bool
	// Fork restores a copy with a new identity: its name as hostname, a
	// new agent id, its kernel RNG reseeded with fresh entropy before its
	// first command, and no published ports unless PublishSet. A package
	// made with KeepSource is restored so in any case (the source lives
	// on), except for the ports.
	Fork bool
	// Fence, when set, is asked after the restore and before the VM runs
	// (see service.InOptions.Fence): the registry's ownership check.
	Fence func(ctx context.Context) error
}

// InResult is what TeleportIn restored.
type InResult struct {
	VM      VMInfo
	Package *teleport.Package
	// Warning: the VM runs, but something of the package could not come
	// with it.
	Warning string
}

// TeleportIn restores package id as a new VM of this host. It returns once
// the guest answers; on failure no VM is left behind, or the error says
// which one is (vm.ErrLeftBehind).
func (h *Host) TeleportIn(ctx context.Context, id string, req InRequest) (*InResult, error) {
	if err := vm.ValidateName(req.Name); err != nil {
		return nil, err
	}
	unlock, err := h.lockVM(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := h.nameFree(ctx, req.Name); err != nil {
		return nil, err
	}
	st, err := h.Store(ctx, req.Store)
	if err != nil {
		return nil, err
	}
	pkg, err := st.Stat(ctx, id)
	if err != nil {
		return nil, err
	}
	backend := req.Backend
	cfg := vm.Config{Name: req.Name, VCPUs: req.VCPUs, MemoryMiB: req.MemoryMiB, AgentID: pkg.AgentID}
	// The network as recorded, with the ports this host is asked for.
	if n := pkg.Network; n != nil {
		cfg.SetNetwork(n)
		switch {
		case req.PublishSet:
			cfg.Publish = req.Publish
		case req.Fork:
			cfg.Publish = nil
		}
	} else if req.PublishSet && len(req.Publish) > 0 {
		return nil, fmt.Errorf("package %s: its VM has no network to publish ports of: %w", id, vm.ErrInvalidConfig)
	}
	var identity *vm.Identity
	if req.Fork || pkg.SourceKept {
		// A second live copy of the agent: its own name, agent id and
		// random numbers. (A move keeps its identity.)
		cfg.Hostname, cfg.AgentID = req.Name, newAgentID(req.Name, pkg.AgentID)
		if pkg.Kind.FullVM() {
			identity = &vm.Identity{Hostname: req.Name, Entropy: freshEntropy()}
		}
	}
	if pkg.Snapshot != nil {
		if cfg.VCPUs != 0 || cfg.MemoryMiB != 0 {
			return nil, fmt.Errorf("package %s holds a whole VM of %d vCPUs and %d MiB, which it keeps; vCPUs and memory size only a checkpoint's fresh VM: %w",
				id, pkg.Snapshot.VCPUCount, pkg.Snapshot.MemoryMiB, ErrInvalidRequest)
		}
		if backend == "" {
			backend = h.backendFor(ctx, pkg.Snapshot.Backend)
		}
	} else {
		if cfg.VCPUs == 0 {
			cfg.VCPUs = VMCPUsDefault
		}
		if cfg.MemoryMiB == 0 {
			cfg.MemoryMiB = VMMemoryMiBDefault
		}
	}
	f, err := h.Factory(ctx, backend, req.Accel)
	if err != nil {
		return nil, err
	}
	if err := h.durable(ctx, f); err != nil {
		return nil, err
	}
	ws := &workspaceFile{dir: filepath.Join(h.o.Home, "tmp"), f: f}
	defer ws.remove()
	inst, got, err := h.service(ctx, f, st, "in").In(ctx, id, cfg, service.InOptions{Workspace: ws, Fence: req.Fence, Identity: identity})
	if err != nil {
		return nil, err
	}
	lv := h.keep(req.Name, inst, f)
	res := &InResult{VM: h.describe(ctx, lv), Package: got, Warning: ws.warning}
	// A move record of an earlier VM of this name is stale (the name was
	// free, so that VM is gone).
	if err := h.clearMoved(req.Name); err != nil {
		res.Warning = strings.TrimPrefix(res.Warning+"; "+fmt.Sprintf("a stale move record of vm %s stays (%v): remove it with kelpie vm rm", req.Name, err), "; ")
	}
	return res, nil
}

// workspaceFile stages a checkpoint's workspace archive in a temporary file
// under the home, then unpacks it into the guest (vm.RestoreWorkspace).
// A backend that cannot do that gets its VM without the workspace, and a
// warning: the package, and the workspace in it, stay in the store.
type workspaceFile struct {
	dir     string
	f       vm.Factory
	path    string
	warning string
}

func (w *workspaceFile) Stage(r io.Reader) error {
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(w.dir, "workspace-in-*.tgz")
	if err != nil {
		return err
	}
	w.path = tmp.Name()
	_, err = io.Copy(tmp, r)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	return err
}

func (w *workspaceFile) Restore(ctx context.Context, inst vm.Instance) error {
	if _, ok := inst.(vm.WorkspaceArchiver); !ok {
		w.warning = fmt.Sprintf("the workspace was not restored: backend %s cannot unpack one into its guest (it stays in the package)", w.f.Host().Backend)
		return nil
	}
	f, err := os.Open(w.path)
	if err != nil {
		return err
	}
	defer f.Close()
	return vm.RestoreWorkspace(ctx, w.f, inst, f)
}

func (w *workspaceFile) remove() {
	if w.path != "" {
		os.Remove(w.path)
	}
}

// newAgentID is the agent id of a copy named name of agent from: its
// name, unless that is the agent's own id.
func newAgentID(name, from string) string {
	if name != from {
		return name
	}
	return newPackageID(name)
}

// freshEntropy is what a copy's guest RNG is reseeded with.
func freshEntropy() []byte {
	b := make([]byte, identityEntropyBytes)
	rand.Read(b)
	return b
}

// identityEntropyBytes is how much entropy a copy's guest gets: two
// ChaCha20 keys' worth.
const identityEntropyBytes = 64

// backendFor is the host's backend of that name, or "" (the default) when
// it has none this caller can use: the restore rules then say why the
// package cannot come here.
func (h *Host) backendFor(ctx context.Context, name string) string {
	for _, b := range h.o.Backends {
		if b.Name != name {
			continue
		}
		if f, err := h.Factory(ctx, name, ""); err == nil && h.durable(ctx, f) == nil {
			return name
		}
	}
	return ""
}
