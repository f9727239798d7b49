package host

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/internal/atomicfile"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
)

// A suspended VM is a suspend package in a store plus a record in
// Home/suspended/NAME.json that says where. The record is written, durably
// and atomically, before the suspend starts ("suspending") and again when
// the package is committed ("suspended"), so a crash at any step leaves a
// record from which `vm resume` finds the VM again: in its paused
// instance, or in its package.
type suspendRecord struct {
	Name        string    `json:"name"`
	State       string    `json:"state"` // recordSuspending, then recordSuspended
	Backend     string    `json:"backend"`
	PackageID   string    `json:"package_id"`
	Store       string    `json:"store"`
	Config      vm.Config `json:"config"`
	SuspendedAt time.Time `json:"suspended_at"`
}

const (
	recordSuspending = "suspending"
	recordSuspended  = StateSuspended
)

func (r *suspendRecord) info() VMInfo {
	return VMInfo{Name: r.Name, Backend: r.Backend, State: r.State, VCPUs: r.Config.VCPUs, MemoryMiB: r.Config.MemoryMiB,
		CreatedAt: r.SuspendedAt, PackageID: r.PackageID, Store: r.Store}
}

func (h *Host) suspendedDir() string { return filepath.Join(h.o.Home, "suspended") }

func (h *Host) suspendedPath(name string) string {
	return filepath.Join(h.suspendedDir(), name+".json")
}

func (h *Host) writeSuspended(r *suspendRecord) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(h.suspendedPath(r.Name), append(b, '\n'), 0o644, atomicfile.Sync); err != nil {
		return fmt.Errorf("record suspended vm %s: %w", r.Name, err)
	}
	return nil
}

func (h *Host) readSuspended(name string) (*suspendRecord, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(h.suspendedPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("vm %s: %w", name, vm.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	var r suspendRecord
	if err := json.Unmarshal(b, &r); err != nil || r.Name != name {
		return nil, fmt.Errorf("suspended vm %s: record %s is unreadable (%v): %w", name, h.suspendedPath(name), err, vm.ErrCorrupt)
	}
	return &r, nil
}

func (h *Host) listSuspended() ([]*suspendRecord, error) {
	ents, err := os.ReadDir(h.suspendedDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*suspendRecord
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || vm.ValidateName(name) != nil {
			continue
		}
		r, err := h.readSuspended(name)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func (h *Host) dropSuspended(name string) error {
	if err := os.Remove(h.suspendedPath(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return atomicfile.SyncDir(h.suspendedDir())
}

func newPackageID(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// SuspendVM stores VM name whole, memory included, as a suspend package in
// the store at url ("" for the host's own) and removes its instance: no
// hypervisor runs until ResumeVM. The package restores only on this host.
func (h *Host) SuspendVM(ctx context.Context, name, url string) (*teleport.Package, error) {
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if url == "" {
		url = h.DefaultStore()
	}
	if err := h.refuseMoved(ctx, name); err != nil {
		return nil, err
	}
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	st, err := h.Store(ctx, url)
	if err != nil {
		return nil, err
	}
	rec := &suspendRecord{Name: name, State: recordSuspending, Backend: lv.backend, PackageID: newPackageID("suspend-" + name),
		Store: url, Config: lv.inst.Config(), SuspendedAt: h.now().UTC()}
	if err := h.writeSuspended(rec); err != nil {
		return nil, err
	}
	pkg, err := h.service(ctx, lv.f, st, "suspend").Out(ctx, lv.inst, service.OutRequest{AgentID: name, Kind: teleport.KindSuspend, PackageID: rec.PackageID})
	switch {
	case errors.Is(err, service.ErrOutcomeUnknown):
		// The package may be committed: keep the record, so that `vm
		// resume` finds the VM wherever it is.
		return nil, fmt.Errorf("%w (kelpie vm resume %s sorts it out)", err, name)
	case err != nil && !errors.Is(err, service.ErrSourceNotSettled):
		if derr := h.dropSuspended(name); derr != nil {
			return nil, fmt.Errorf("%w; removing the record of the suspend failed too: %v", err, derr)
		}
		return nil, err
	}
	rec.State = recordSuspended
	if err := h.writeSuspended(rec); err != nil {
		return pkg, fmt.Errorf("vm %s suspended into package %s, but recording it failed: %w", name, pkg.ID, err)
	}
	if err := lv.inst.Destroy(ctx); err != nil {
		return pkg, fmt.Errorf("vm %s suspended into package %s; removing its stopped instance failed: %w", name, pkg.ID, err)
	}
	h.forget(name)
	return pkg, nil
}

// ResumeResult says how ResumeVM brought a VM back.
type ResumeResult struct {
	Name string
	// PackageID is the suspend package it was restored from ("" when a
	// paused VM just continued).
	PackageID string
	// Warning: the VM runs, but its package could not be removed.
	Warning string
}

// resumeSuspended brings back a suspended VM: its instance if a crash
// left it alive mid-suspend, else its package, which is then removed.
func (h *Host) resumeSuspended(ctx context.Context, rec *suspendRecord) (*ResumeResult, error) {
	res := &ResumeResult{Name: rec.Name, PackageID: rec.PackageID}
	st, err := h.Store(ctx, rec.Store)
	if err != nil {
		return nil, err
	}
	if rec.State == recordSuspending {
		// A suspend that did not finish: the instance may still hold the
		// VM, paused (or running if the suspend never began). Its package,
		// if one was committed, goes first: the VM must not run on while a
		// package that restores it exists.
		if lv, err := h.attach(ctx, rec.Name); err == nil {
			switch lv.inst.State() {
			case vm.StatePaused, vm.StateRunning:
				if err := st.Delete(ctx, rec.PackageID); err != nil && !errors.Is(err, teleport.ErrNotFound) {
					return nil, fmt.Errorf("vm %s: its unfinished suspend may have committed package %s, which could not be removed (%w); the VM stays as it is", rec.Name, rec.PackageID, err)
				}
				if lv.inst.State() == vm.StatePaused {
					if err := lv.inst.Resume(ctx); err != nil {
						return nil, err
					}
				}
				return h.finishResume(ctx, st, rec, res, false)
			}
			dctx, cancel := vm.SettleContext(ctx)
			err := lv.inst.Destroy(dctx)
			cancel()
			if err != nil {
				return nil, fmt.Errorf("vm %s: remove the stopped instance of an unfinished suspend: %w", rec.Name, err)
			}
			h.forget(rec.Name)
		}
	}
	f, err := h.Factory(ctx, rec.Backend, "")
	if err != nil {
		return nil, err
	}
	inst, _, err := h.service(ctx, f, st, "resume").In(ctx, rec.PackageID, vm.Config{Name: rec.Name, VCPUs: rec.Config.VCPUs,
		MemoryMiB: rec.Config.MemoryMiB, Env: rec.Config.Env, Workdir: rec.Config.Workdir, AgentID: rec.Config.AgentID}, service.InOptions{})
	if err != nil {
		return nil, fmt.Errorf("resume suspended vm %s from package %s: %w", rec.Name, rec.PackageID, err)
	}
	h.keep(rec.Name, inst, f)
	return h.finishResume(ctx, st, rec, res, true)
}

// finishResume drops the record and the package of a VM that runs again.
func (h *Host) finishResume(ctx context.Context, st teleport.Store, rec *suspendRecord, res *ResumeResult, fromPackage bool) (*ResumeResult, error) {
	if !fromPackage {
		res.PackageID = ""
	}
	if err := h.dropSuspended(rec.Name); err != nil {
		return res, fmt.Errorf("vm %s runs again, but its suspend record could not be removed: %w", rec.Name, err)
	}
	if err := st.Delete(ctx, rec.PackageID); err != nil && !errors.Is(err, teleport.ErrNotFound) {
		res.Warning = fmt.Sprintf("vm %s runs again, but its suspend package %s was not removed: %v", rec.Name, rec.PackageID, err)
	}
	return res, nil
}

// removeSuspended deletes a suspended VM: its package, then its record.
func (h *Host) removeSuspended(ctx context.Context, rec *suspendRecord) error {
	st, err := h.Store(ctx, rec.Store)
	if err != nil {
		return err
	}
	if err := st.Delete(ctx, rec.PackageID); err != nil && !errors.Is(err, teleport.ErrNotFound) {
		return err
	}
	return h.dropSuspended(rec.Name)
}
