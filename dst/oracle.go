package dst

import (
	"strings"

	"github.com/kelpie/teleport"
)

// packageFacts is what the model knows about a package from the request
// that made it: its kind and the host it was made on.
type packageFacts struct {
	kind teleport.SnapshotKind
	src  HostConfig
}

// verdict is the model's own statement of the restore rules: nil when a
// package with facts f may be restored on dst, else the refusal category
// the first violated rule implies. corrupt: bytes the restore reads were
// damaged. It is written from the rules' text, not
// by calling teleport.Check, so that a mistake in either shows up as a
// disagreement. The order is the rules' order: architecture, base image,
// host, backend, backend facts, checksums.
func verdict(f packageFacts, dst HostConfig, corrupt bool) error {
	full := f.kind == teleport.KindSuspend || f.kind == teleport.KindTeleport
	switch {
	case full && f.src.Arch != dst.Arch:
		return teleport.ErrArchMismatch
	case majorMinor(f.src.BaseImage) != majorMinor(dst.BaseImage):
		return teleport.ErrVersionMismatch
	case (f.kind == teleport.KindSuspend || (full && f.src.hostBound())) && f.src.ID != dst.ID:
		return teleport.ErrHostMismatch
	case full && f.src.Kind != dst.Kind:
		return teleport.ErrBackendMismatch
	case full && f.src.MemoryBytes != dst.MemoryBytes:
		return teleport.ErrBackendMismatch
	case corrupt:
		return teleport.ErrChecksumMismatch
	}
	return nil
}

// majorMinor is "MAJOR.MINOR" of a MAJOR.MINOR.PATCH version.
func majorMinor(v string) string {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + parts[1]
}

// invariantFor names the invariant a wrongly allowed restore breaks.
func invariantFor(category error) string {
	switch category {
	case teleport.ErrArchMismatch:
		return InvArchitectureValidation
	case teleport.ErrVersionMismatch:
		return InvVersionCompatibility
	}
	return InvRefusalReason
}

func categoryName(err error) string {
	switch err {
	case nil:
		return "none"
	case teleport.ErrArchMismatch:
		return "ErrArchMismatch"
	case teleport.ErrVersionMismatch:
		return "ErrVersionMismatch"
	case teleport.ErrHostMismatch:
		return "ErrHostMismatch"
	case teleport.ErrBackendMismatch:
		return "ErrBackendMismatch"
	case teleport.ErrChecksumMismatch:
		return "ErrChecksumMismatch"
	}
	return err.Error()
}
