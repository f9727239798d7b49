package teleport_test

import (
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// The restore rules (`kelpie package show --can-restore-here`, Explain and
// Check) and the kind chooser (`--kind auto`, ChooseKind) across the rule
// matrix: architecture × backend × host × base image version × backend
// facts × kind. The expected verdicts come from the documented rules, not
// from the code under test:
//
//   - a full-memory snapshot (suspend, teleport) restores only on the same
//     architecture; a checkpoint boots a fresh VM, so it may cross;
//   - the base image MAJOR.MINOR must match for every kind; a PATCH
//     difference is allowed with a warning;
//   - a suspend restores only on the host that made it, and so does any
//     snapshot of a host-bound backend (Apple VZ save files are encrypted
//     with a key of the Mac that wrote them);
//   - a VM snapshot restores only on the backend that wrote it, and only
//     where the backend's facts (hypervisor version, CPU model, ...) are
//     the same;
//   - the first refusal, in the order manifest, architecture, base image,
//     host, backend, backend facts, is the reason given.

const srcVersion = "1.2.3"

var (
	archs    = []vm.Architecture{vm.ArchX86_64, vm.ArchArm64}
	backends = []string{"firecracker", "vz", "sim"}
	kinds    = []teleport.SnapshotKind{teleport.KindSuspend, teleport.KindTeleport, teleport.KindCheckpoint}
	// Base image versions of a target relative to srcVersion.
	versions = []struct {
		name, v  string
		mmEqual  bool // MAJOR.MINOR equal
		patchDif bool
	}{
		{"same", "1.2.3", true, false},
		{"patch", "1.2.9", true, true},
		{"minor", "1.3.3", false, false},
		{"major", "2.2.3", false, false},
	}
)

// hostBoundBackend is the documented list: VZ save files never leave their
// Mac.
func hostBoundBackend(b string) bool { return b == "vz" }

func facts(backend, variant string) map[string]string {
	switch backend {
	case "firecracker":
		return map[string]string{"firecracker_version": "1.7.0" + variant, "cpu_model": "AMD EPYC (family 25 model 1)", "host_kernel": "6.1", "cpu_template": "None"}
	case "vz":
		return map[string]string{"macos_version": "14.5" + variant}
	}
	return map[string]string{"sim_version": "1" + variant, "memory_bytes": "16384"}
}

// layouts are the snapshot layouts each backend writes and restores.
func layouts(backend string) []vm.Layout {
	switch backend {
	case "firecracker":
		return []vm.Layout{vm.LayoutSplit}
	case "vz":
		return []vm.Layout{vm.LayoutSingle}
	}
	return []vm.Layout{vm.LayoutSplit, vm.LayoutSingle}
}

func hostInfo(id string, arch vm.Architecture, backend, version, factVariant string) vm.HostInfo {
	return vm.HostInfo{Arch: arch, Backend: backend, BackendVersion: "x", HostID: id,
		BaseImageVersion: version, Compat: facts(backend, factVariant), HostBound: hostBoundBackend(backend),
		Layouts: layouts(backend)}
}

// packageFrom builds the manifest teleport/service writes for a package of
// kind made on src.
func packageFrom(src vm.HostInfo, kind teleport.SnapshotKind) *teleport.Package {
	p := &teleport.Package{ID: "pkg-1", AgentID: "agent-1", SourceArch: src.Arch, Kind: kind,
		BaseImageVersion: src.BaseImageVersion, CreatedAt: time.Unix(1700000000, 0).UTC(), SourceHostID: src.HostID,
		Backend: src.Backend}
	if kind.FullVM() {
		p.Snapshot = &vm.SnapshotMetadata{SnapshotID: "snap-1", VMID: "vm-1", Architecture: src.Arch, IsFullSnapshot: true,
			Backend: src.Backend, BackendVersion: src.BackendVersion, HostID: src.HostID, BaseImageVersion: src.BaseImageVersion,
			Compat: maps.Clone(src.Compat), HostBound: src.HostBound, Layout: src.Layouts[0]}
	}
	return p
}

// expected is the documented verdict: the first rule that refuses, or "".
func expected(kind teleport.SnapshotKind, src, dst vm.HostInfo) (rule string, category error) {
	full := kind.FullVM()
	sv, _ := teleport.ParseVersion(src.BaseImageVersion)
	dv, _ := teleport.ParseVersion(dst.BaseImageVersion)
	switch {
	case full && src.Arch != dst.Arch:
		return teleport.RuleArchitecture, teleport.ErrArchMismatch
	case sv.Major != dv.Major || sv.Minor != dv.Minor:
		return teleport.RuleBaseImage, teleport.ErrVersionMismatch
	case (kind == teleport.KindSuspend || (full && hostBoundBackend(src.Backend))) && src.HostID != dst.HostID:
		return teleport.RuleHost, teleport.ErrHostMismatch
	case full && src.Backend != dst.Backend:
		return teleport.RuleBackend, teleport.ErrBackendMismatch
	case full && !maps.Equal(src.Compat, dst.Compat):
		return teleport.RuleBackendFacts, teleport.ErrBackendMismatch
	}
	return "", nil
}

type matrixCase struct {
	src, dst vm.HostInfo
	name     string
	patchDif bool
}

// matrix yields every source (architecture × backend) and target
// (architecture × backend × same/other host × version × same/other facts).
func matrix() []matrixCase {
	var out []matrixCase
	for _, sa := range archs {
		for _, sb := range backends {
			src := hostInfo("host-src", sa, sb, srcVersion, "")
			for _, da := range archs {
				for _, db := range backends {
					for _, sameHost := range []bool{true, false} {
						for _, v := range versions {
							for _, sameFacts := range []bool{true, false} {
								id, variant := "host-dst", ""
								if sameHost {
									id = "host-src"
								}
								if !sameFacts {
									variant = "-other"
								}
								out = append(out, matrixCase{
									src: src, dst: hostInfo(id, da, db, v.v, variant), patchDif: v.patchDif,
									name: fmt.Sprintf("%s/%s->%s/%s/sameHost=%v/version=%s/sameFacts=%v", sa, sb, da, db, sameHost, v.name, sameFacts),
								})
							}
						}
					}
				}
			}
		}
	}
	return out
}

// ruleOrder is the order Explain reports rules in.
var ruleOrder = []string{teleport.RuleManifest, teleport.RuleArchitecture, teleport.RuleBaseImage, teleport.RuleHost,
	teleport.RuleBackend, teleport.RuleBackendFacts}

func TestRestoreRulesMatrix(t *testing.T) {
	n := 0
	for _, c := range matrix() {
		for _, kind := range kinds {
			n++
			pkg := packageFrom(c.src, kind)
			wantRule, wantErr := expected(kind, c.src, c.dst)
			warnings, err := teleport.Check(pkg, c.dst)
			name := string(kind) + "/" + c.name
			if wantRule == "" {
				if err != nil {
					t.Errorf("%s: refused (%v), want restorable", name, err)
					continue
				}
				if c.patchDif != (len(warnings) == 1) {
					t.Errorf("%s: warnings %q, want a PATCH warning=%v", name, warnings, c.patchDif)
				}
			} else {
				var re *teleport.RefusalError
				if !errors.As(err, &re) || re.Rule != wantRule || !errors.Is(err, wantErr) {
					t.Errorf("%s: got %v, want refusal by rule %s (%v)", name, err, wantRule, wantErr)
					continue
				}
				if re.PackageID != pkg.ID || !strings.Contains(err.Error(), "cannot be restored here") {
					t.Errorf("%s: refusal %q does not name the package", name, err)
				}
			}

			// Explain lists every rule once, in order; exactly the expected
			// one fails (Explain does not stop at the first refusal).
			results := teleport.Explain(pkg, c.dst)
			var got []string
			for _, r := range results {
				got = append(got, r.Rule)
				if r.Reason == "" {
					t.Errorf("%s: rule %s has no reason", name, r.Rule)
				}
				if !r.OK && r.Rule == wantRule {
					wantRule = "" // seen
				}
			}
			if wantRule != "" {
				t.Errorf("%s: Explain did not fail rule %s: %+v", name, wantRule, results)
			}
			want := ruleOrder[:5]
			if kind.FullVM() && c.src.Backend == c.dst.Backend {
				want = ruleOrder
			}
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Errorf("%s: Explain rules %v, want %v", name, got, want)
			}
		}
	}
	if n != 6*96*3 {
		t.Fatalf("matrix has %d cases", n)
	}
}

func TestChooseKindMatrix(t *testing.T) {
	for _, c := range matrix() {
		kind, reason := teleport.ChooseKind(c.src, c.dst)
		var want teleport.SnapshotKind
		switch {
		case c.src.HostID == c.dst.HostID && ruleOK(teleport.KindSuspend, c.src, c.dst):
			want = teleport.KindSuspend
		case ruleOK(teleport.KindTeleport, c.src, c.dst):
			want = teleport.KindTeleport
		default:
			want = teleport.KindCheckpoint
		}
		if kind != want || reason == "" {
			t.Errorf("%s: ChooseKind = %s (%q), want %s", c.name, kind, reason, want)
			continue
		}
		// --kind auto never picks what --can-restore-here would refuse,
		// except where nothing can be restored: then the reason says so.
		_, err := teleport.Check(packageFrom(c.src, kind), c.dst)
		switch {
		case err == nil:
		case errors.Is(err, teleport.ErrVersionMismatch):
			if kind != teleport.KindCheckpoint || !strings.Contains(reason, "cannot fix that either") {
				t.Errorf("%s: chose %s (%q) but it is refused: %v", c.name, kind, reason, err)
			}
		default:
			t.Errorf("%s: chose %s (%q) but it is refused: %v", c.name, kind, reason, err)
		}
		// A checkpoint says which rule ruled out the full VM; when the base
		// image differs, that is the reason whatever else differs too,
		// since a checkpoint cannot be restored there either.
		if kind == teleport.KindCheckpoint {
			rule, _ := expected(teleport.KindTeleport, c.src, c.dst)
			if c.src.HostID == c.dst.HostID && rule == "" {
				rule, _ = expected(teleport.KindSuspend, c.src, c.dst)
			}
			if r, _ := expected(teleport.KindCheckpoint, c.src, c.dst); r != "" {
				rule = r
			}
			if !reasonMentions(reason, rule) {
				t.Errorf("%s: checkpoint reason %q does not explain the %s rule", c.name, reason, rule)
			}
		}
	}
}

func ruleOK(kind teleport.SnapshotKind, src, dst vm.HostInfo) bool {
	r, _ := expected(kind, src, dst)
	return r == ""
}

// reasonMentions checks a reason carries the words of a rule's refusal.
func reasonMentions(reason, rule string) bool {
	words := map[string]string{
		teleport.RuleArchitecture: "architecture",
		teleport.RuleBaseImage:    "base image",
		teleport.RuleHost:         "host",
		teleport.RuleBackend:      "backend",
		teleport.RuleBackendFacts: "this host has",
	}
	return strings.Contains(reason, words[rule])
}

// Named cases pin what a user reads.
func TestRestoreRulesReasons(t *testing.T) {
	fc := func(id string, arch vm.Architecture, v string) vm.HostInfo {
		return hostInfo(id, arch, "firecracker", v, "")
	}
	mac := func(id string) vm.HostInfo { return hostInfo(id, vm.ArchArm64, "vz", srcVersion, "") }
	for _, c := range []struct {
		name     string
		pkg      *teleport.Package
		dst      vm.HostInfo
		rule     string // "" = restorable
		category error
		reason   string // substring of the failing rule's (or the OK verdict's) reason
		warning  string
	}{
		{"teleport to an identical host", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			fc("b", vm.ArchX86_64, srcVersion), "", nil, "", ""},
		{"teleport across architectures", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			fc("b", vm.ArchArm64, srcVersion), teleport.RuleArchitecture, teleport.ErrArchMismatch,
			"taken on x86_64, and this host is arm64; full-memory snapshots restore only on the same architecture (use a checkpoint to cross)", ""},
		{"checkpoint across architectures", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindCheckpoint),
			fc("b", vm.ArchArm64, srcVersion), "", nil, "a checkpoint may cross architectures (x86_64 -> arm64)", ""},
		{"suspend to another host", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindSuspend),
			fc("b", vm.ArchX86_64, srcVersion), teleport.RuleHost, teleport.ErrHostMismatch,
			"package was made on host a and this is host b; a suspend restores only on the host that made it", ""},
		{"vz teleport to another Mac", packageFrom(mac("mac-a"), teleport.KindTeleport),
			mac("mac-b"), teleport.RuleHost, teleport.ErrHostMismatch,
			"vz snapshots restore only on the host that wrote them (use a checkpoint to move)", ""},
		{"vz suspend on its Mac", packageFrom(mac("mac-a"), teleport.KindSuspend), mac("mac-a"), "", nil, "same host (mac-a)", ""},
		{"firecracker upgraded", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			hostInfo("b", vm.ArchX86_64, "firecracker", srcVersion, "-other"), teleport.RuleBackendFacts, teleport.ErrBackendMismatch,
			`firecracker firecracker_version: the snapshot has "1.7.0", this host has "1.7.0-other"`, ""},
		{"another backend", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			hostInfo("b", vm.ArchX86_64, "sim", srcVersion, ""), teleport.RuleBackend, teleport.ErrBackendMismatch,
			"written by firecracker, and this host runs sim", ""},
		{"base image patch", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			fc("b", vm.ArchX86_64, "1.2.9"), "", nil, "", "base image patch differs (1.2.3 vs 1.2.9); allowed"},
		{"base image minor", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindCheckpoint),
			fc("b", vm.ArchX86_64, "1.3.0"), teleport.RuleBaseImage, teleport.ErrVersionMismatch,
			"package needs base image 1.2.x and this host has 1.3.0; MAJOR.MINOR must match", ""},
		{"target without a usable version", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindCheckpoint),
			fc("b", vm.ArchX86_64, "latest"), teleport.RuleBaseImage, teleport.ErrVersionMismatch, `base image version "latest" is unusable`, ""},
		{"target does not know a fact", packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport),
			func() vm.HostInfo {
				h := fc("b", vm.ArchX86_64, srcVersion)
				delete(h.Compat, "cpu_model")
				return h
			}(), teleport.RuleBackendFacts, teleport.ErrBackendMismatch, `cpu_model: the snapshot has "AMD EPYC (family 25 model 1)", this host does not know it`, ""},
		{"host-bound package without its host", func() *teleport.Package {
			p := packageFrom(mac("mac-a"), teleport.KindTeleport)
			p.SourceHostID, p.Snapshot.HostID = "", ""
			return p
		}(), mac("mac-b"), teleport.RuleHost, teleport.ErrHostMismatch, "does not record its host", ""},
		// VZ save files are host-bound whatever the metadata says (the
		// target's HostInfo says so): a manifest that lost the flag must
		// not pass.
		{"vz package without the host-bound flag", func() *teleport.Package {
			p := packageFrom(mac("mac-a"), teleport.KindTeleport)
			p.Snapshot.HostBound = false
			return p
		}(), mac("mac-b"), teleport.RuleHost, teleport.ErrHostMismatch, "vz snapshots restore only on the host that wrote them", ""},
		{"snapshot without its backend", func() *teleport.Package {
			p := packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport)
			p.Snapshot.Backend = ""
			return p
		}(), fc("b", vm.ArchX86_64, srcVersion), teleport.RuleBackend, teleport.ErrBackendMismatch, "does not record which backend", ""},
		{"invalid manifest", func() *teleport.Package {
			p := packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindTeleport)
			p.AgentID = ""
			return p
		}(), fc("b", vm.ArchX86_64, srcVersion), teleport.RuleManifest, teleport.ErrInvalidPackage, "the manifest is invalid", ""},
		{"full snapshot without metadata", func() *teleport.Package {
			p := packageFrom(fc("a", vm.ArchX86_64, srcVersion), teleport.KindSuspend)
			p.Snapshot = nil
			return p
		}(), fc("a", vm.ArchX86_64, srcVersion), teleport.RuleManifest, teleport.ErrInvalidPackage, "needs VM snapshot metadata", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			warnings, err := teleport.Check(c.pkg, c.dst)
			if c.rule == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if strings.Join(warnings, "|") != c.warning {
					t.Fatalf("warnings %q, want %q", warnings, c.warning)
				}
				if c.reason != "" && !explained(c.pkg, c.dst, c.reason) {
					t.Fatalf("no rule reason says %q: %+v", c.reason, teleport.Explain(c.pkg, c.dst))
				}
				return
			}
			var re *teleport.RefusalError
			if !errors.As(err, &re) || re.Rule != c.rule || !errors.Is(err, c.category) || !strings.Contains(re.Reason, c.reason) {
				t.Fatalf("got %v (rule %v), want rule %s %v saying %q", err, ruleOf(re), c.rule, c.category, c.reason)
			}
			if c.rule == teleport.RuleManifest && len(teleport.Explain(c.pkg, c.dst)) != 1 {
				t.Fatal("Explain went on past an invalid manifest")
			}
		})
	}
}

func ruleOf(re *teleport.RefusalError) string {
	if re == nil {
		return "none"
	}
	return re.Rule
}

func explained(pkg *teleport.Package, dst vm.HostInfo, s string) bool {
	for _, r := range teleport.Explain(pkg, dst) {
		if strings.Contains(r.Reason, s) {
			return true
		}
	}
	return false
}

func TestChooseKindReasons(t *testing.T) {
	fc := func(id string, arch vm.Architecture, v, variant string) vm.HostInfo {
		return hostInfo(id, arch, "firecracker", v, variant)
	}
	for _, c := range []struct {
		name     string
		src, dst vm.HostInfo
		want     teleport.SnapshotKind
		reason   string
	}{
		{"this host", fc("a", vm.ArchX86_64, srcVersion, ""), fc("a", vm.ArchX86_64, srcVersion, ""),
			teleport.KindSuspend, "the target is this host: suspend keeps the whole VM"},
		{"identical host", fc("a", vm.ArchX86_64, srcVersion, ""), fc("b", vm.ArchX86_64, "1.2.7", ""),
			teleport.KindTeleport, "the target runs firecracker on x86_64 with matching backend facts"},
		{"other architecture", fc("a", vm.ArchX86_64, srcVersion, ""), fc("b", vm.ArchArm64, srcVersion, ""),
			teleport.KindCheckpoint, "full-memory snapshots restore only on the same architecture"},
		{"other Mac", hostInfo("mac-a", vm.ArchArm64, "vz", srcVersion, ""), hostInfo("mac-b", vm.ArchArm64, "vz", srcVersion, ""),
			teleport.KindCheckpoint, "vz snapshots restore only on the host that wrote them"},
		{"same Mac", hostInfo("mac-a", vm.ArchArm64, "vz", srcVersion, ""), hostInfo("mac-a", vm.ArchArm64, "vz", srcVersion, ""),
			teleport.KindSuspend, "the target is this host"},
		{"this host after a hypervisor upgrade", fc("a", vm.ArchX86_64, srcVersion, ""), fc("a", vm.ArchX86_64, srcVersion, "-other"),
			teleport.KindCheckpoint, `firecracker_version: the snapshot has "1.7.0", this host has "1.7.0-other"`},
		{"other backend", fc("a", vm.ArchX86_64, srcVersion, ""), hostInfo("b", vm.ArchX86_64, "sim", srcVersion, ""),
			teleport.KindCheckpoint, "a VM snapshot restores only on the backend that wrote it"},
		{"base image minor", fc("a", vm.ArchX86_64, srcVersion, ""), fc("b", vm.ArchX86_64, "1.3.0", ""),
			teleport.KindCheckpoint, "base image versions differ; a checkpoint cannot fix that either"},
		// The base image refusal must not hide behind the architecture one:
		// a checkpoint sent there would be refused on arrival.
		{"other architecture and base image", fc("a", vm.ArchX86_64, srcVersion, ""), fc("b", vm.ArchArm64, "2.0.0", ""),
			teleport.KindCheckpoint, "a checkpoint cannot fix that either: package needs base image 1.2.x and this host has 2.0.0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			kind, reason := teleport.ChooseKind(c.src, c.dst)
			if kind != c.want || !strings.Contains(reason, c.reason) {
				t.Fatalf("ChooseKind = %s %q, want %s saying %q", kind, reason, c.want, c.reason)
			}
		})
	}
}
