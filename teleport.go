// Package teleport is the shared core of Kelpie Teleport: architectures,
// snapshot kinds, the teleport package, the rules deciding where a package
// may be restored, and the package store interface.
//
// Production code and the deterministic simulation use this package
// unchanged. It must never read the wall clock, use global randomness, or
// import a backend or a store implementation.
package teleport

import (
	"errors"
	"fmt"
	"time"

	"github.com/kelpie/teleport/vm"
)

// SnapshotKind says what a package carries and so where it may go.
type SnapshotKind string

// The kinds.
const (
	// KindSuspend: the full VM, memory included; restores only on the host
	// that made it.
	KindSuspend SnapshotKind = "suspend"
	// KindTeleport: the full VM; restores on any host of the same
	// architecture and a compatible hypervisor.
	KindTeleport SnapshotKind = "teleport"
	// KindCheckpoint: application state only (agent state, workspace); a
	// fresh VM boots on arrival, so it may cross architectures.
	KindCheckpoint SnapshotKind = "checkpoint"
)

// ParseKind parses a kind name.
func ParseKind(s string) (SnapshotKind, error) {
	switch k := SnapshotKind(s); k {
	case KindSuspend, KindTeleport, KindCheckpoint:
		return k, nil
	}
	return "", fmt.Errorf("unknown snapshot kind %q (want suspend, teleport or checkpoint): %w", s, ErrInvalidPackage)
}

// FullVM reports whether the kind carries a VM snapshot.
func (k SnapshotKind) FullVM() bool { return k == KindSuspend || k == KindTeleport }

// Package is a teleport package's manifest. The VM snapshot itself is the
// package's blob (KLP1), stored beside the manifest in a Store.
type Package struct {
	ID               string            `json:"id"`
	AgentID          string            `json:"agent_id"`
	SourceArch       vm.Architecture   `json:"source_arch"`
	Kind             SnapshotKind      `json:"kind"`
	BaseImageVersion string            `json:"base_image_version"`
	CreatedAt        time.Time         `json:"created_at"`
	SourceHostID     string            `json:"source_host_id,omitempty"`
	Backend          string            `json:"backend,omitempty"`
	WorkspaceRef     string            `json:"workspace_ref,omitempty"`
	AgentState       []byte            `json:"agent_state,omitempty"`
	Env              map[string]string `json:"env,omitempty"`
	// Snapshot is the blob's metadata section, repeated here so that rules
	// can be checked without reading the blob. Nil for a checkpoint.
	Snapshot *vm.SnapshotMetadata `json:"snapshot,omitempty"`
	// Set by the store on commit: the blob's size and SHA-256 (hex).
	SizeBytes  int64  `json:"size_bytes"`
	BlobSHA256 string `json:"blob_sha256"`
}

// Validate checks a manifest's own consistency (not whether it can be
// restored somewhere: see Check).
func (p *Package) Validate() error {
	if err := ValidateID(p.ID); err != nil {
		return err
	}
	if p.AgentID == "" {
		return fmt.Errorf("package %s: empty agent id: %w", p.ID, ErrInvalidPackage)
	}
	if _, err := ParseKind(string(p.Kind)); err != nil {
		return fmt.Errorf("package %s: %w", p.ID, err)
	}
	if _, err := vm.ParseArchitecture(string(p.SourceArch)); err != nil {
		return fmt.Errorf("package %s: %v: %w", p.ID, err, ErrInvalidPackage)
	}
	if _, err := ParseVersion(p.BaseImageVersion); err != nil {
		return fmt.Errorf("package %s: %w", p.ID, err)
	}
	if p.Kind.FullVM() && p.Snapshot == nil {
		return fmt.Errorf("package %s: a %s package needs VM snapshot metadata: %w", p.ID, p.Kind, ErrInvalidPackage)
	}
	return nil
}

// ID rules: an id becomes an object key and a directory name, so it is
// never a path.
const idLenMaxBytes = 128

// ValidateID checks a package id: 1..128 bytes of [A-Za-z0-9._-], not
// starting with '.' or '-'.
func ValidateID(id string) error {
	if id == "" || len(id) > idLenMaxBytes {
		return fmt.Errorf("package id %q must be 1..%d bytes: %w", truncate(id, 40), idLenMaxBytes, ErrInvalidID)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' ||
			((c == '.' || c == '-') && i > 0)
		if !ok {
			return fmt.Errorf("package id %q: use letters, digits, '_', and '.' or '-' after the first byte: %w", truncate(id, 40), ErrInvalidID)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// Error categories for packages and stores. Restore refusals have their own
// (see rules.go).
var (
	ErrInvalidID      = errors.New("invalid package id")
	ErrInvalidPackage = errors.New("invalid package")
	ErrNotFound       = errors.New("package not found")
	ErrAlreadyExists  = errors.New("package already exists")
	ErrCommitted      = errors.New("writer already committed or aborted")
	// ErrStore: the store failed (I/O, network, server error); may be
	// transient.
	ErrStore = errors.New("package store error")
)
