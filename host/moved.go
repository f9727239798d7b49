package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/internal/atomicfile"
	"github.com/kelpie/teleport/vm"
)

// A move records its source as moved out (Home/moved/NAME.json, written
// durably) just before its package's commit: from then on the package may
// hold the agent, and the source must never run here again, or the agent
// would run twice. TeleportOut removes the record when the commit did not
// happen (the source resumed) or when the source is gone; it stays when
// the source could not be removed (its hypervisor would not go), when the
// commit's outcome is unknown, or when the process died in between.
// StartVM, ResumeVM, TeleportOut, SuspendVM and ForkVM refuse a VM with a
// record, with one line naming the package; a record of a commit that
// never happened (the package is not in its store, and the process that
// wrote the record is gone) is dropped. RemoveVM removes VM and record.
type movedRecord struct {
	Name      string    `json:"name"`
	PackageID string    `json:"package_id"`
	Store     string    `json:"store"`
	At        time.Time `json:"at"`
	// Committed: the package is known to be committed; otherwise the
	// store is asked.
	Committed bool `json:"committed,omitempty"`
	// PID is the process that wrote the record (the move's).
	PID int `json:"pid"`
}

func (h *Host) movedPath(name string) string { return filepath.Join(h.o.Home, "moved", name+".json") }

func (h *Host) writeMoved(r movedRecord) error {
	if r.PID == 0 {
		r.PID = os.Getpid()
	}
	if err := os.MkdirAll(filepath.Dir(h.movedPath(r.Name)), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(h.movedPath(r.Name), append(b, '\n'), 0o644, atomicfile.Sync); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(h.movedPath(r.Name)))
}

func (h *Host) readMoved(name string) (*movedRecord, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(h.movedPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("vm %s: read its move record: %w", name, err)
	}
	var r movedRecord
	if err := json.Unmarshal(b, &r); err != nil || r.Name != name {
		return nil, fmt.Errorf("vm %s: its move record %s is unreadable (%v); remove the vm (kelpie vm rm %s): %w", name, h.movedPath(name), err, name, vm.ErrInvalidState)
	}
	return &r, nil
}

// refuseMoved fails with vm.ErrInvalidState when VM name was moved out
// (or may have been: its move's commit is in flight, or its outcome
// cannot be told now). Call with the VM's lock held.
func (h *Host) refuseMoved(ctx context.Context, name string) error {
	r, err := h.readMoved(name)
	if err != nil || r == nil {
		return err
	}
	if !r.Committed {
		if r.PID != os.Getpid() && processAlive(r.PID) {
			return fmt.Errorf("vm %s is being moved out in package %s by process %d; wait for it: %w", name, r.PackageID, r.PID, vm.ErrInvalidState)
		}
		committed, err := h.packageExists(ctx, r.Store, r.PackageID)
		if err != nil {
			return fmt.Errorf("vm %s: its move to package %s did not finish, and the store cannot say whether the package holds the agent (%v); try again: %w", name, r.PackageID, err, vm.ErrInvalidState)
		}
		if !committed {
			// The commit never happened: the VM is its agent's again.
			return h.clearMoved(name)
		}
		r.Committed = true
		h.writeMoved(*r) // the store answers the same next time
	}
	return fmt.Errorf("vm %s was moved out in package %s at %s and must not run here again (its agent lives in the package); remove it: kelpie vm rm %s: %w",
		name, r.PackageID, r.At.UTC().Format(time.RFC3339), name, vm.ErrInvalidState)
}

func (h *Host) packageExists(ctx context.Context, url, id string) (bool, error) {
	st, err := h.Store(ctx, url)
	if err != nil {
		return false, err
	}
	if _, err := st.Stat(ctx, id); err != nil {
		if errors.Is(err, teleport.ErrNotFound) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// movedTo is the package a VM was (or is being) moved out in ("" if
// none).
func (h *Host) movedTo(name string) string {
	r, err := h.readMoved(name)
	switch {
	case err != nil:
		return "?"
	case r == nil:
		return ""
	}
	return r.PackageID
}

func (h *Host) clearMoved(name string) error {
	if err := vm.ValidateName(name); err != nil {
		return err
	}
	if err := os.Remove(h.movedPath(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
