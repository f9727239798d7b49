// Package teleport is the shared core of Kelpie Teleport: architectures,
// snapshot kinds, the teleport package, the rules deciding where a package
// may be restored, and the package store interface.
//
// Production code and the deterministic simulation use this package
// unchanged. It must never read the wall clock, use global randomness, or
// import a backend or a store implementation.
package teleport

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
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

// Package is a teleport package's manifest. The package's body, stored
// beside the manifest in a Store, is its sections back to back: first the
// VM snapshot as a KLP1 blob, then (a checkpoint's) workspace archive.
type Package struct {
	ID               string          `json:"id"`
	AgentID          string          `json:"agent_id"`
	SourceArch       vm.Architecture `json:"source_arch"`
	Kind             SnapshotKind    `json:"kind"`
	BaseImageVersion string          `json:"base_image_version"`
	CreatedAt        time.Time       `json:"created_at"`
	SourceHostID     string          `json:"source_host_id,omitempty"`
	Backend          string          `json:"backend,omitempty"`
	AgentState       []byte          `json:"agent_state,omitempty"`
	// AgentStateSHA256 (hex) is checked before the agent state is handed
	// out: it is most of what a checkpoint carries.
	AgentStateSHA256 string            `json:"agent_state_sha256,omitempty"`
	Env              map[string]string `json:"env,omitempty"`
	// UploadID is unique to the upload that made the package, so a writer
	// whose commit went unanswered can tell its own package from another
	// writer's of the same id.
	UploadID string `json:"upload_id,omitempty"`
	// Snapshot is the blob's metadata section, repeated here so that rules
	// can be checked without reading the blob. Nil for a checkpoint.
	Snapshot *vm.SnapshotMetadata `json:"snapshot,omitempty"`
	// Sections locate the parts of the body, in order and back to back
	// from offset 0: SectionBlob always, SectionDisk for a VM with a
	// workspace disk that is not in the blob (a version 2 blob carries a
	// raw disk image itself, chunked like memory), SectionWorkspace for a checkpoint that carries an
	// archive of /workspace instead. Each has its own size and SHA-256,
	// verified before it is used. The store checks that they add up to
	// the body.
	Sections []Section `json:"sections,omitempty"`
	// Network is the VM's network as it left (mode, MAC, published ports,
	// forwards); nil for none. A restore recreates it, with the published
	// ports the restoring host asks for (default these).
	Network *vm.Network `json:"network,omitempty"`
	// Disk describes the workspace disk the disk section carries (size,
	// filesystem, and the section's encoding, size and SHA-256).
	Disk *vm.DiskMetadata `json:"disk,omitempty"`
	// SourceKept: the source VM ran on after the package was made (a
	// copy), so restoring it makes a second live copy of the agent, which
	// must get an identity of its own.
	SourceKept bool `json:"source_kept,omitempty"`
	// Set by the store on commit: the whole body's size and SHA-256 (hex).
	SizeBytes  int64  `json:"size_bytes"`
	BlobSHA256 string `json:"blob_sha256"`

	// Format is the KLP1 version of the blob section (0 means 1). A
	// version 2 blob in a store carries no chunk data: its chunks live in
	// the store's chunk space (see ChunkStore).
	Format int `json:"format,omitempty"`
	// LogicalBytes is what the package stands for, set by its writer: the
	// guest memory size plus the device state.
	LogicalBytes int64 `json:"logical_bytes"`
	// Set by the store on commit. StoredBytes: the stored size of the
	// body and of the distinct chunks the package refers to, each counted
	// once; NewBytes: what this package added to the store (the body and
	// the chunks it put); Chunks and NewChunks count distinct chunks.
	StoredBytes int64 `json:"stored_bytes"`
	NewBytes    int64 `json:"new_bytes"`
	Chunks      int   `json:"chunks"`
	NewChunks   int   `json:"new_chunks"`
	// ChunkPacks names the store's packs that hold the package's chunks,
	// sorted (set by the store).
	ChunkPacks []string `json:"chunk_packs,omitempty"`
}

// Section names.
const (
	SectionBlob      = "blob"      // the KLP1 snapshot blob
	SectionDisk      = "disk"      // the workspace disk's allocated blocks
	SectionWorkspace = "workspace" // a checkpoint's workspace archive
)

// sectionOrder is the order sections come in; each at most once.
var sectionOrder = []string{SectionBlob, SectionDisk, SectionWorkspace}

// Section is one part of a package's body.
type Section struct {
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// SealAgentState records the SHA-256 of the agent state.
func (p *Package) SealAgentState() {
	p.AgentStateSHA256 = ""
	if len(p.AgentState) > 0 {
		sum := sha256.Sum256(p.AgentState)
		p.AgentStateSHA256 = hex.EncodeToString(sum[:])
	}
}

// CheckAgentState fails with ErrChecksumMismatch unless the agent state
// is the one SealAgentState recorded.
func (p *Package) CheckAgentState() error {
	if len(p.AgentState) == 0 && p.AgentStateSHA256 == "" {
		return nil
	}
	sum := sha256.Sum256(p.AgentState)
	if got := hex.EncodeToString(sum[:]); got != p.AgentStateSHA256 {
		return fmt.Errorf("package %s: its agent state has sha256 %.12s, the manifest says %.12s: %w", p.ID, got, p.AgentStateSHA256, ErrChecksumMismatch)
	}
	return nil
}

// Section returns the section called name, if the package has one.
func (p *Package) Section(name string) (Section, bool) {
	for _, s := range p.Sections {
		if s.Name == name {
			return s, true
		}
	}
	return Section{}, false
}

// Validate checks a manifest's own consistency (not whether it can be
// restored somewhere: see Check). Once the store has set SizeBytes and
// BlobSHA256, the sections must exactly fill the body.
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
		return fmt.Errorf("package %s: %w: %w", p.ID, err, ErrInvalidPackage)
	}
	if _, err := ParseVersion(p.BaseImageVersion); err != nil {
		return fmt.Errorf("package %s: %w", p.ID, err)
	}
	if p.Kind.FullVM() {
		if p.Snapshot == nil {
			return fmt.Errorf("package %s: a %s package needs VM snapshot metadata: %w", p.ID, p.Kind, ErrInvalidPackage)
		}
		if p.Snapshot.Architecture != p.SourceArch {
			return fmt.Errorf("package %s: the manifest says %s, its snapshot %s: %w", p.ID, p.SourceArch, p.Snapshot.Architecture, ErrInvalidPackage)
		}
		// The snapshot's copy of the devices is what the backend restores:
		// the manifest's must say the same.
		if !reflect.DeepEqual(p.Snapshot.Network, p.Network) || !reflect.DeepEqual(p.Snapshot.Disk, p.Disk) {
			return fmt.Errorf("package %s: the manifest's network or disk differs from its snapshot's: %w", p.ID, ErrInvalidPackage)
		}
	}
	if err := p.validateChunks(); err != nil {
		return err
	}
	return p.validateSections()
}

func (p *Package) validateChunks() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("package %s: "+format+": %w", append(append([]any{p.ID}, args...), ErrInvalidPackage)...)
	}
	switch {
	case p.Format != 0 && p.Format != 1 && p.Format != 2:
		return bad("unknown blob format %d", p.Format)
	case p.Chunks < 0 || p.NewChunks < 0 || p.NewChunks > p.Chunks:
		return bad("%d new chunks of %d", p.NewChunks, p.Chunks)
	case p.LogicalBytes < 0 || p.StoredBytes < 0 || p.NewBytes < 0:
		return bad("negative sizes")
	case p.Format != 2 && (p.Chunks != 0 || len(p.ChunkPacks) != 0):
		return bad("a version %d package refers to chunks", max(p.Format, 1))
	}
	for i, n := range p.ChunkPacks {
		if err := ValidatePackName(n); err != nil {
			return fmt.Errorf("package %s: %w", p.ID, err)
		}
		if i > 0 && p.ChunkPacks[i-1] >= n {
			return bad("chunk packs are not sorted and distinct")
		}
	}
	return nil
}

func (p *Package) validateSections() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("package %s: "+format+": %w", append(append([]any{p.ID}, args...), ErrInvalidPackage)...)
	}
	var end int64
	prev := -1
	for i, s := range p.Sections {
		k := slices.Index(sectionOrder, s.Name)
		switch {
		case k < 0:
			return bad("unknown section %q", s.Name)
		case (i == 0) != (s.Name == SectionBlob):
			return bad("the %s section must come first, once", SectionBlob)
		case k <= prev:
			return bad("section %s is out of order or repeated (the order is %v)", s.Name, sectionOrder)
		case s.Name == SectionWorkspace && p.Kind != KindCheckpoint:
			return bad("only a checkpoint carries a %s section", SectionWorkspace)
		case s.Offset != end || s.Size < 0 || s.Offset > math.MaxInt64-s.Size:
			return bad("section %s at %d+%d does not follow the previous one (which ends at %d)", s.Name, s.Offset, s.Size, end)
		case len(s.SHA256) != 64:
			return bad("section %s has no SHA-256", s.Name)
		}
		end, prev = s.Offset+s.Size, k
	}
	if len(p.Sections) > 0 {
		ds, ok := p.Section(SectionDisk)
		apart := p.Disk != nil && !p.Disk.InBlob() // a raw image travels in the blob
		switch {
		case p.Disk.InBlob() && p.Format != 2:
			return bad("a raw disk image goes only in a version 2 blob, and this package is version %d", max(p.Format, 1))
		case p.Disk.InBlob() && !p.Kind.FullVM():
			return bad("a %s carries its disk in a %s section, not in a blob", p.Kind, SectionDisk)
		case ok != apart:
			return bad("a %s section goes with a disk in the manifest that is not in the blob, and the manifest has %s", SectionDisk, hasNot(apart, "one", "none"))
		case ok && (ds.Size != p.Disk.PayloadBytes || ds.SHA256 != p.Disk.SHA256):
			return bad("the %s section (%d bytes, sha256 %.12s) is not the disk the manifest describes (%d bytes, sha256 %.12s)", SectionDisk, ds.Size, ds.SHA256, p.Disk.PayloadBytes, p.Disk.SHA256)
		}
	}
	if p.BlobSHA256 != "" && len(p.Sections) > 0 && end != p.SizeBytes {
		return bad("its sections cover %d bytes, its body has %d", end, p.SizeBytes)
	}
	return nil
}

func hasNot(b bool, yes, no string) string {
	if b {
		return yes
	}
	return no
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
	// ErrInvalidStore: a store's address or settings are malformed: a
	// mistake in how the store was named, not a failure of it. It also
	// matches ErrStore.
	ErrInvalidStore error = &subcategory{"invalid store address", ErrStore}
)

// subcategory is an error category that also matches a broader one.
type subcategory struct {
	msg    string
	parent error
}

func (e *subcategory) Error() string        { return e.msg }
func (e *subcategory) Is(target error) bool { return target == e.parent }
