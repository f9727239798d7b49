package teleport

import (
	"errors"
	"strings"
	"testing"

	"github.com/kelpie/teleport/vm"
)

func TestValidateID(t *testing.T) {
	for _, c := range []struct {
		id string
		ok bool
	}{
		{"a", true}, {"pkg-1.2_x", true}, {strings.Repeat("x", 128), true}, {"A9", true},
		{"", false}, {strings.Repeat("x", 129), false}, {"..", false}, {".", false}, {".hidden", false},
		{"-rf", false}, {"a/b", false}, {`a\b`, false}, {"a b", false}, {"a\x00", false}, {"é", false}, {"a:b", false},
	} {
		err := ValidateID(c.id)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrInvalidID)) {
			t.Errorf("ValidateID(%q) = %v, want ok=%v", c.id, err, c.ok)
		}
	}
}

func TestParseVersion(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Version
		ok   bool
	}{
		{"1.0.0", Version{1, 0, 0}, true}, {"10.20.30", Version{10, 20, 30}, true},
		{"1.0", Version{}, false}, {"1.0.0.0", Version{}, false}, {"v1.0.0", Version{}, false},
		{"1.-1.0", Version{}, false}, {"01.0.0", Version{}, false}, {"", Version{}, false}, {"1.x.0", Version{}, false},
	} {
		got, err := ParseVersion(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("ParseVersion(%q) = %v, %v", c.in, got, err)
		}
	}
}

func TestParseKind(t *testing.T) {
	for _, k := range []string{"suspend", "teleport", "checkpoint"} {
		if got, err := ParseKind(k); err != nil || string(got) != k {
			t.Errorf("ParseKind(%q) = %v, %v", k, got, err)
		}
	}
	if _, err := ParseKind("move"); !errors.Is(err, ErrInvalidPackage) {
		t.Errorf("ParseKind(move) = %v", err)
	}
	if !KindSuspend.FullVM() || !KindTeleport.FullVM() || KindCheckpoint.FullVM() {
		t.Error("FullVM wrong")
	}
}

func TestPackageValidate(t *testing.T) {
	good := func() *Package {
		return &Package{ID: "p", AgentID: "a", SourceArch: vm.ArchX86_64, Kind: KindCheckpoint, BaseImageVersion: "1.0.0"}
	}
	if err := good().Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Package){
		"bad id":              func(p *Package) { p.ID = "../p" },
		"no agent":            func(p *Package) { p.AgentID = "" },
		"bad kind":            func(p *Package) { p.Kind = "x" },
		"bad arch":            func(p *Package) { p.SourceArch = "mips" },
		"bad version":         func(p *Package) { p.BaseImageVersion = "1" },
		"teleport without md": func(p *Package) { p.Kind = KindTeleport },
	} {
		p := good()
		mut(p)
		if err := p.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Sections come blob, disk, workspace; a disk section goes with the
// manifest's disk and is the disk it describes; a full VM's manifest says
// what its snapshot says about the network and the disk.
func TestPackageDiskSections(t *testing.T) {
	sum := func(c byte) string { return strings.Repeat(string(c), 64) }
	disk := &vm.DiskMetadata{SizeBytes: 64 << 20, Filesystem: "ext4", Format: "klpqmem1", PayloadBytes: 30, SHA256: sum('d')}
	net := &vm.Network{Mode: vm.NetworkRestricted, MAC: "52:54:00:00:00:01"}
	good := func() *Package {
		md := &vm.SnapshotMetadata{SnapshotID: "s", Architecture: vm.ArchX86_64, IsFullSnapshot: true, Disk: disk, Network: net}
		return &Package{ID: "p", AgentID: "a", SourceArch: vm.ArchX86_64, Kind: KindTeleport, BaseImageVersion: "1.1.0",
			Snapshot: md, Disk: disk, Network: net, SizeBytes: 130, BlobSHA256: sum('b'),
			Sections: []Section{{SectionBlob, 0, 100, sum('a')}, {SectionDisk, 100, 30, sum('d')}}}
	}
	if err := good().Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Package){
		"disk section without a disk": func(p *Package) { p.Disk, p.Snapshot.Disk = nil, nil },
		"disk without a section": func(p *Package) {
			p.Sections, p.SizeBytes = p.Sections[:1], 100
		},
		"another disk's section":   func(p *Package) { p.Sections[1].SHA256 = sum('e') },
		"disk section before blob": func(p *Package) { p.Sections[0], p.Sections[1] = p.Sections[1], p.Sections[0] },
		"two disk sections": func(p *Package) {
			p.Sections = append(p.Sections, Section{SectionDisk, 130, 30, sum('d')})
			p.SizeBytes = 160
		},
		"workspace in a teleport": func(p *Package) {
			p.Sections = append(p.Sections, Section{SectionWorkspace, 130, 1, sum('w')})
			p.SizeBytes = 131
		},
		"manifest disk differs from the snapshot's":    func(p *Package) { p.Disk = &vm.DiskMetadata{SizeBytes: 1} },
		"manifest network differs from the snapshot's": func(p *Package) { p.Network = nil },
	} {
		p := good()
		mut(p)
		if err := p.Validate(); !errors.Is(err, ErrInvalidPackage) {
			t.Errorf("%s: %v, want ErrInvalidPackage", name, err)
		}
	}
	// A checkpoint carries its disk, then (or instead) a workspace.
	cp := good()
	cp.Kind, cp.Snapshot = KindCheckpoint, nil
	cp.Sections = append(cp.Sections, Section{SectionWorkspace, 130, 5, sum('w')})
	cp.SizeBytes = 135
	if err := cp.Validate(); err != nil {
		t.Fatalf("checkpoint with disk and workspace: %v", err)
	}
}

// A backend that declares its snapshots host-bound never gets Teleport to
// another host, whatever its name.
func TestChooseKindHonoursHostBound(t *testing.T) {
	src := vm.HostInfo{Arch: vm.ArchArm64, Backend: "sim", HostID: "mac-1", BaseImageVersion: "1.0.0", HostBound: true, Layouts: []vm.Layout{vm.LayoutSingle}}
	dst := src
	dst.HostID = "mac-2"
	if k, why := ChooseKind(src, dst); k != KindCheckpoint || !strings.Contains(why, "host") {
		t.Fatalf("host-bound source to another host: %s (%s), want checkpoint", k, why)
	}
	src.HostBound, dst.HostBound = false, false
	if k, _ := ChooseKind(src, dst); k != KindTeleport {
		t.Fatalf("unbound source: %s, want teleport", k)
	}
	if k, _ := ChooseKind(src, src); k != KindSuspend {
		t.Fatalf("same host: %s, want suspend", k)
	}
}
