package teleport

import (
	"errors"
	"fmt"
	"sort"

	"github.com/kelpie/teleport/vm"
)

// Restore refusals. Each has its own category so callers (and the
// simulation's invariant checker) can tell them apart with errors.Is.
var (
	ErrArchMismatch     = errors.New("architecture mismatch")
	ErrVersionMismatch  = errors.New("base image version mismatch")
	ErrHostMismatch     = errors.New("host mismatch")
	ErrBackendMismatch  = errors.New("backend mismatch")
	ErrChecksumMismatch = errors.New("checksum mismatch")
)

// Rule names, as printed by `kelpie package show --can-restore-here`.
const (
	RuleManifest     = "manifest"
	RuleArchitecture = "architecture"
	RuleBaseImage    = "base-image"
	RuleHost         = "host"
	RuleBackend      = "backend"
	RuleBackendFacts = "backend-facts"
	RuleChecksums    = "checksums"
)

// RefusalError is why a package cannot be restored on a target. It matches
// its category (ErrArchMismatch, ...) with errors.Is.
type RefusalError struct {
	PackageID string
	Rule      string
	Reason    string
	Err       error
}

func (e *RefusalError) Error() string {
	return fmt.Sprintf("package %s cannot be restored here: %s", e.PackageID, e.Reason)
}

// Unwrap returns the category.
func (e *RefusalError) Unwrap() error { return e.Err }

// RuleResult is one rule's verdict.
type RuleResult struct {
	Rule   string `json:"rule"`
	OK     bool   `json:"ok"`
	Reason string `json:"reason"`
	// Warning is set when the rule passes with a caveat (a PATCH
	// difference in the base image).
	Warning string `json:"warning,omitempty"`
	err     error
}

// Explain evaluates every restore rule for pkg on target, in a fixed order,
// and says why each passes or fails.
func Explain(pkg *Package, t vm.HostInfo) []RuleResult {
	var out []RuleResult
	add := func(rule string, err error, okReason string) {
		r := RuleResult{Rule: rule, OK: err == nil, Reason: okReason, err: err}
		if err != nil {
			r.Reason = err.Error()
		}
		out = append(out, r)
	}
	if err := pkg.Validate(); err != nil {
		add(RuleManifest, fmt.Errorf("the manifest is invalid (%v): %w", err, ErrInvalidPackage), "")
		return out
	}
	add(RuleManifest, nil, "manifest is well formed")

	full := pkg.Kind.FullVM()
	md := pkg.Snapshot

	// Architecture.
	switch {
	case !full:
		add(RuleArchitecture, nil, fmt.Sprintf("a checkpoint may cross architectures (%s -> %s)", pkg.SourceArch, t.Arch))
	case pkg.SourceArch != t.Arch:
		add(RuleArchitecture, fmt.Errorf("a %s snapshot was taken on %s and this host is %s; full-memory snapshots restore only on the same architecture (use a checkpoint to cross): %w", pkg.Kind, pkg.SourceArch, t.Arch, ErrArchMismatch), "")
	default:
		add(RuleArchitecture, nil, fmt.Sprintf("same architecture (%s)", t.Arch))
	}

	// Base image MAJOR.MINOR.
	pv, _ := ParseVersion(pkg.BaseImageVersion)
	tv, err := ParseVersion(t.BaseImageVersion)
	switch {
	case err != nil:
		add(RuleBaseImage, fmt.Errorf("this host's base image version %q is unusable (%v): %w", t.BaseImageVersion, err, ErrVersionMismatch), "")
	case pv.Major != tv.Major || pv.Minor != tv.Minor:
		add(RuleBaseImage, fmt.Errorf("package needs base image %d.%d.x and this host has %s; MAJOR.MINOR must match: %w", pv.Major, pv.Minor, tv, ErrVersionMismatch), "")
	default:
		add(RuleBaseImage, nil, fmt.Sprintf("base image %s compatible with %s", pv, tv))
		if pv.Patch != tv.Patch {
			out[len(out)-1].Warning = fmt.Sprintf("base image patch differs (%s vs %s); allowed", pv, tv)
		}
	}

	// Host: Suspend always, and any payload its backend ties to one host.
	// A host-bound backend's snapshot is host-bound even if its metadata
	// lost the flag (a VZ save file cannot be decrypted elsewhere).
	hostBound := pkg.Kind == KindSuspend || (full && (md.HostBound || isHostBoundBackend(md.Backend)))
	srcHost := pkg.SourceHostID
	if srcHost == "" && md != nil {
		srcHost = md.HostID
	}
	switch {
	case !hostBound:
		add(RuleHost, nil, "not tied to a host")
	case srcHost == "":
		add(RuleHost, fmt.Errorf("a host-bound %s package does not record its host: %w", pkg.Kind, ErrHostMismatch), "")
	case srcHost != t.HostID:
		why := "a suspend restores only on the host that made it"
		if pkg.Kind != KindSuspend {
			why = fmt.Sprintf("%s snapshots restore only on the host that wrote them (use a checkpoint to move)", md.Backend)
		}
		add(RuleHost, fmt.Errorf("package was made on host %s and this is host %s; %s: %w", srcHost, t.HostID, why, ErrHostMismatch), "")
	default:
		add(RuleHost, nil, fmt.Sprintf("same host (%s)", t.HostID))
	}

	// Backend kind and the facts the backend says must match.
	switch {
	case !full:
		add(RuleBackend, nil, "a checkpoint boots a fresh VM on any backend")
	case md.Backend == "":
		add(RuleBackend, fmt.Errorf("the snapshot does not record which backend wrote it: %w", ErrBackendMismatch), "")
	case md.Backend != t.Backend:
		add(RuleBackend, fmt.Errorf("the snapshot was written by %s and this host runs %s; a VM snapshot restores only on the backend that wrote it: %w", md.Backend, t.Backend, ErrBackendMismatch), "")
	default:
		add(RuleBackend, nil, fmt.Sprintf("same backend (%s)", t.Backend))
	}
	if full && md.Backend == t.Backend {
		keys := make([]string, 0, len(md.Compat))
		for k := range md.Compat {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var bad error
		for _, k := range keys {
			want, have := md.Compat[k], t.Compat[k]
			if want != have {
				if have == "" {
					have = "(unknown)"
				}
				bad = fmt.Errorf("%s %s: snapshot has %q, this host has %q: %w", t.Backend, k, want, have, ErrBackendMismatch)
				break
			}
		}
		add(RuleBackendFacts, bad, fmt.Sprintf("%d backend facts match", len(keys)))
	}
	return out
}

// Check returns nil when pkg may be restored on t, or the first refusal as
// a *RefusalError. Warnings (a PATCH difference) are returned separately
// so the caller can log them.
func Check(pkg *Package, t vm.HostInfo) (warnings []string, err error) {
	for _, r := range Explain(pkg, t) {
		if r.Warning != "" {
			warnings = append(warnings, r.Warning)
		}
		if !r.OK {
			return warnings, &RefusalError{PackageID: pkg.ID, Rule: r.Rule, Reason: r.Reason, Err: r.err}
		}
	}
	return warnings, nil
}

// ChooseKind picks the kind to send from a VM on src to dst: Teleport when
// a full snapshot taken on src can be restored on dst, Suspend when dst is
// src itself, and Checkpoint otherwise; the reason says why.
func ChooseKind(src, dst vm.HostInfo) (SnapshotKind, string) {
	probe := &Package{ID: "probe", AgentID: "probe", SourceArch: src.Arch, BaseImageVersion: src.BaseImageVersion,
		SourceHostID: src.HostID, Kind: KindTeleport,
		Snapshot: &vm.SnapshotMetadata{Backend: src.Backend, HostID: src.HostID, Compat: src.Compat, HostBound: src.HostBound || isHostBoundBackend(src.Backend)}}
	if src.HostID != "" && src.HostID == dst.HostID {
		probe.Kind = KindSuspend
		if _, err := Check(probe, dst); err == nil {
			return KindSuspend, "the target is this host: suspend keeps the whole VM"
		}
	}
	probe.Kind = KindTeleport
	if _, err := Check(probe, dst); err != nil {
		var re *RefusalError
		// The base image rule binds checkpoints too, and it may hide
		// behind an earlier refusal (another architecture as well).
		cp := &Package{ID: probe.ID, AgentID: probe.AgentID, SourceArch: src.Arch, BaseImageVersion: src.BaseImageVersion,
			SourceHostID: src.HostID, Kind: KindCheckpoint}
		if _, cerr := Check(cp, dst); errors.As(cerr, &re) && re.Rule == RuleBaseImage {
			return KindCheckpoint, "base image versions differ; a checkpoint cannot fix that either: " + re.Reason
		}
		reason := err.Error()
		if errors.As(err, &re) {
			reason = re.Reason
		}
		return KindCheckpoint, "a full VM snapshot cannot be restored there (" + reason + "); sending application state only"
	}
	return KindTeleport, fmt.Sprintf("the target runs %s on %s with matching backend facts: the full VM can move", dst.Backend, dst.Arch)
}

// HostBoundBackends lists backends whose snapshots never leave their host.
var hostBoundBackends = []string{"vz"}

func isHostBoundBackend(b string) bool {
	for _, x := range hostBoundBackends {
		if x == b {
			return true
		}
	}
	return false
}
