package teleport

import (
	"errors"
	"fmt"

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
// its category (ErrArchMismatch, ...) with errors.Is, and the error that
// revealed it (Cause, if any) too.
type RefusalError struct {
	PackageID string
	Rule      string
	Reason    string
	Err       error
	Cause     error
}

func (e *RefusalError) Error() string {
	return fmt.Sprintf("package %s cannot be restored here: %s", e.PackageID, e.Reason)
}

// Unwrap returns the category and the cause.
func (e *RefusalError) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Err}
	}
	return []error{e.Err, e.Cause}
}

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
	// The rules a VM snapshot must pass are the backends' own comparison
	// (vm.CheckSnapshot), one aspect per rule, so that a verdict here is
	// what the backend will decide.
	vmRule := func(rule string, category error, err error, okReason string) {
		var ie *vm.IncompatibleError
		if errors.As(err, &ie) {
			err = fmt.Errorf("%s: %w", ie.Reason, category)
		}
		add(rule, err, okReason)
	}

	// Architecture.
	if full {
		vmRule(RuleArchitecture, ErrArchMismatch, hint(vm.CheckArchitecture(*md, t), " (use a checkpoint to cross)"), fmt.Sprintf("same architecture (%s)", t.Arch))
	} else {
		add(RuleArchitecture, nil, fmt.Sprintf("a checkpoint may cross architectures (%s -> %s)", pkg.SourceArch, t.Arch))
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

	// Host: a suspend always; a VM snapshot when its metadata or its
	// backend on this host says it is host-bound.
	switch {
	case pkg.Kind == KindSuspend && pkg.SourceHostID == "":
		add(RuleHost, fmt.Errorf("a suspend package does not record its host: %w", ErrHostMismatch), "")
	case pkg.Kind == KindSuspend && pkg.SourceHostID != t.HostID:
		add(RuleHost, fmt.Errorf("package was made on host %s and this is host %s; a suspend restores only on the host that made it: %w", pkg.SourceHostID, t.HostID, ErrHostMismatch), "")
	case pkg.Kind == KindSuspend:
		add(RuleHost, nil, fmt.Sprintf("same host (%s)", t.HostID))
	case full:
		vmRule(RuleHost, ErrHostMismatch, hint(vm.CheckHost(*md, t), " (use a checkpoint to move)"), "not tied to another host")
	default:
		add(RuleHost, nil, "not tied to a host")
	}

	// Backend kind and the facts the backend says must match.
	if !full {
		add(RuleBackend, nil, "a checkpoint boots a fresh VM on any backend")
		return out
	}
	berr := vm.CheckBackend(*md, t)
	vmRule(RuleBackend, ErrBackendMismatch, berr, fmt.Sprintf("same backend (%s)", t.Backend))
	if berr == nil {
		ferr := vm.CheckLayout(*md, t)
		if ferr == nil {
			ferr = vm.CheckFacts(*md, t)
		}
		vmRule(RuleBackendFacts, ErrBackendMismatch, ferr, fmt.Sprintf("layout %s and %d backend facts match", md.Layout, len(md.Compat)))
	}
	return out
}

// hint appends advice to an incompatibility's reason.
func hint(err error, advice string) error {
	var ie *vm.IncompatibleError
	if errors.As(err, &ie) {
		c := *ie
		c.Reason += advice
		return &c
	}
	return err
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
		Snapshot: &vm.SnapshotMetadata{Architecture: src.Arch, Backend: src.Backend, HostID: src.HostID, Compat: src.Compat,
			HostBound: src.HostBound, IsFullSnapshot: true, Layout: probeLayout(src)}}
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

// probeLayout is the layout a full snapshot taken on src would have.
func probeLayout(src vm.HostInfo) vm.Layout {
	if len(src.Layouts) > 0 {
		return src.Layouts[0]
	}
	return vm.LayoutSplit
}
