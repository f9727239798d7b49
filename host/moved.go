package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/kelpie/teleport/internal/atomicfile"
	"github.com/kelpie/teleport/vm"
)

// A move whose package committed but whose source VM could not be removed
// (its hypervisor would not go) leaves that VM here, paused: the package
// holds the agent now, and the VM must never run again, or the agent
// would run twice. A record in Home/moved/NAME.json, written durably
// before TeleportOut returns, says so; StartVM, ResumeVM, TeleportOut,
// SuspendVM and ForkVM refuse such a VM with one line naming the package,
// and RemoveVM removes the VM and then the record.
type movedRecord struct {
	Name      string    `json:"name"`
	PackageID string    `json:"package_id"`
	Store     string    `json:"store"`
	At        time.Time `json:"at"`
}

func (h *Host) movedPath(name string) string { return filepath.Join(h.o.Home, "moved", name+".json") }

func (h *Host) writeMoved(r movedRecord) error {
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

// refuseMoved fails with vm.ErrInvalidState when VM name is the leftover
// source of a committed move.
func (h *Host) refuseMoved(name string) error {
	b, err := os.ReadFile(h.movedPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vm %s: read its move record: %w", name, err)
	}
	var r movedRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("vm %s: its move record %s is unreadable (%v); remove the vm (kelpie vm rm %s): %w", name, h.movedPath(name), err, name, vm.ErrInvalidState)
	}
	return fmt.Errorf("vm %s was moved out in package %s at %s and must not run here again (its agent lives in the package); remove it: kelpie vm rm %s: %w",
		name, r.PackageID, r.At.UTC().Format(time.RFC3339), name, vm.ErrInvalidState)
}

// movedTo is the package a leftover VM was moved out in ("" if none).
func (h *Host) movedTo(name string) string {
	b, err := os.ReadFile(h.movedPath(name))
	if err != nil {
		return ""
	}
	var r movedRecord
	if json.Unmarshal(b, &r) != nil {
		return "?"
	}
	return r.PackageID
}

func (h *Host) clearMoved(name string) error {
	if err := os.Remove(h.movedPath(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
