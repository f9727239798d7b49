package qemu

import (
	"context"
	"fmt"
	"os"

	"github.com/kelpie/teleport/vm"
)

// QEMU refuses to save a VM a second time until it has run again
// ("paused due to previous migration"). A paused guest that was saved has
// not changed since, so that save is still exact: the instance keeps the
// last stream of a paused guest beside its RAM file and a new snapshot
// reuses it.
func (v *Instance) savedPath(kind string) string { return v.ramPath() + ".saved-" + kind }

// rememberSaved keeps (a link to) the stream just saved while the guest
// stays paused, and drops it once the guest ran.
func (v *Instance) rememberSaved(statePath, kind string, resumed bool) {
	v.forgetSaved()
	if resumed {
		return
	}
	if err := os.Link(statePath, v.savedPath(kind)); err != nil {
		copyFileTo(statePath, v.savedPath(kind))
	}
}

func (v *Instance) forgetSaved() {
	for _, k := range []string{savedDevices, savedFull, savedStripped} {
		os.Remove(v.savedPath(k))
	}
}

// reuseSaved makes the snapshot of a paused guest that QEMU has saved
// already, from the stream it saved then.
func (c *capture) reuseSaved(ctx context.Context) error {
	have := ""
	for _, k := range []string{savedDevices, savedFull, savedStripped} {
		if _, err := os.Stat(c.v.savedPath(k)); err == nil {
			have = k
			break
		}
	}
	switch {
	case have == "":
		return fmt.Errorf("QEMU has saved this paused VM already and refuses again; resume it first: %w", vm.ErrInvalidState)
	case c.layout == vm.LayoutSingle && have != savedFull:
		return fmt.Errorf("this paused VM was saved without its RAM in the stream; resume it before a single-layout snapshot: %w", vm.ErrInvalidState)
	case c.layout == vm.LayoutSplit && have == savedFull:
		// Take the guest RAM pages out of the full stream.
		in, err := os.Open(c.v.savedPath(have))
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(c.statePath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		err = newRAMSplitter(in, nil, c.ramBytes, out).Split()
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		return err
	}
	return copyFileTo(c.v.savedPath(have), c.statePath)
}

// copyFileTo copies a file (a link when both are on one filesystem).
func copyFileTo(from, to string) error {
	os.Remove(to)
	if err := os.Link(from, to); err == nil {
		return nil
	}
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	return vm.FileSink(to)(in)
}
