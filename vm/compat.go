package vm

import (
	"fmt"
	"slices"
)

// Facts a snapshot's restore can fail on (IncompatibleError.Fact). A
// backend fact (HostInfo.Compat) is named by its key.
const (
	FactBackend      = "backend"
	FactArchitecture = "architecture"
	FactHost         = "host"
	FactLayout       = "layout"
)

// IncompatibleError says which fact of a snapshot a host does not match.
// It matches ErrIncompatible.
type IncompatibleError struct {
	SnapshotID string
	Fact       string
	Reason     string // one line: both values and what differs
}

func (e *IncompatibleError) Error() string {
	return fmt.Sprintf("snapshot %s: %s", e.SnapshotID, e.Reason)
}

// Is makes errors.Is(err, ErrIncompatible) true.
func (e *IncompatibleError) Is(target error) bool { return target == ErrIncompatible }

func incompatible(md SnapshotMetadata, fact, format string, args ...any) error {
	return &IncompatibleError{SnapshotID: md.SnapshotID, Fact: fact, Reason: fmt.Sprintf(format, args...)}
}

// CheckSnapshot is the one comparison of a snapshot with a host that would
// restore it, shared by every backend and by the restore rules
// (teleport.Explain): the backend, the architecture, the host binding, the
// layout and the backend facts, in that order. It returns the first
// mismatch as an *IncompatibleError.
func CheckSnapshot(md SnapshotMetadata, h HostInfo) error {
	for _, check := range []func(SnapshotMetadata, HostInfo) error{CheckBackend, CheckArchitecture, CheckHost, CheckLayout, CheckFacts} {
		if err := check(md, h); err != nil {
			return err
		}
	}
	return nil
}

// CheckBackend: a snapshot restores only on the backend that wrote it.
func CheckBackend(md SnapshotMetadata, h HostInfo) error {
	switch {
	case md.Backend == "":
		return incompatible(md, FactBackend, "the snapshot does not record which backend wrote it")
	case md.Backend != h.Backend:
		return incompatible(md, FactBackend, "written by %s, and this host runs %s; a VM snapshot restores only on the backend that wrote it", md.Backend, h.Backend)
	}
	return nil
}

// CheckArchitecture: a full-memory snapshot restores only on the
// architecture it was taken on.
func CheckArchitecture(md SnapshotMetadata, h HostInfo) error {
	if md.Architecture != h.Arch {
		return incompatible(md, FactArchitecture, "taken on %s, and this host is %s; full-memory snapshots restore only on the same architecture", md.Architecture, h.Arch)
	}
	return nil
}

// CheckHost: a host-bound snapshot restores only on the host that wrote
// it. It is host-bound when its metadata says so, or when the host runs
// the same backend and says that backend's snapshots are (an Apple VZ save
// file is, whatever its metadata lost).
func CheckHost(md SnapshotMetadata, h HostInfo) error {
	bound := md.HostBound || (h.HostBound && md.Backend == h.Backend)
	switch {
	case !bound:
		return nil
	case md.HostID == "":
		return incompatible(md, FactHost, "a host-bound %s snapshot does not record its host", md.Backend)
	case md.HostID != h.HostID:
		return incompatible(md, FactHost, "made on host %s, and this is host %s; %s snapshots restore only on the host that wrote them", md.HostID, h.HostID, md.Backend)
	}
	return nil
}

// CheckLayout: the snapshot holds a VM, in a layout this backend restores.
func CheckLayout(md SnapshotMetadata, h HostInfo) error {
	switch {
	case !md.IsFullSnapshot || md.Layout == LayoutNone || md.Layout == "":
		return incompatible(md, FactLayout, "it holds no VM state (layout %q)", md.Layout)
	case !slices.Contains(h.Layouts, md.Layout):
		return incompatible(md, FactLayout, "its layout is %q, and %s restores %v", md.Layout, h.Backend, h.Layouts)
	}
	return nil
}

// CheckFacts: the snapshot's backend facts and the host's are the same set
// with the same values. A fact the snapshot does not record is a mismatch
// too: nobody can vouch for what was not written down.
func CheckFacts(md SnapshotMetadata, h HostInfo) error {
	keys := make([]string, 0, len(md.Compat)+len(h.Compat))
	for k := range md.Compat {
		keys = append(keys, k)
	}
	for k := range h.Compat {
		if _, ok := md.Compat[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		want, inSnap := md.Compat[k]
		have, onHost := h.Compat[k]
		switch {
		case !inSnap:
			return incompatible(md, k, "%s %s: the snapshot does not record it, this host has %q", h.Backend, k, have)
		case !onHost:
			return incompatible(md, k, "%s %s: the snapshot has %q, this host does not know it", h.Backend, k, want)
		case want != have:
			return incompatible(md, k, "%s %s: the snapshot has %q, this host has %q", h.Backend, k, want, have)
		}
	}
	return nil
}
