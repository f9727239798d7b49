package vm

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckTransition(t *testing.T) {
	all := []State{StateCreated, StateStarting, StateRunning, StatePaused, StateStopped, StateCrashed}
	legal := map[string][]State{
		OpStart:    {StateCreated, StateStopped},
		OpStop:     all,
		OpPause:    {StateRunning},
		OpResume:   {StatePaused},
		OpExec:     {StateRunning},
		OpSnapshot: {StateRunning, StatePaused},
		OpRestore:  {StateCreated, StateStopped},
	}
	for _, op := range []string{OpStart, OpStop, OpPause, OpResume, OpExec, OpSnapshot, OpRestore} {
		for _, s := range all {
			want := false
			for _, l := range legal[op] {
				want = want || l == s
			}
			err := CheckTransition("vm-1", op, s)
			if (err == nil) != want {
				t.Errorf("%s from %s: %v, want legal=%v", op, s, err, want)
			}
			var se *StateError
			if err != nil && (!errors.Is(err, ErrInvalidState) || !errors.As(err, &se) || !strings.Contains(err.Error(), s.String())) {
				t.Errorf("%s from %s: error %v is not a StateError naming the state", op, s, err)
			}
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{VCPUs: 2, MemoryMiB: 512, Kernel: "/k", Initrd: "/i", Name: "vm-1.a"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := ok.RequireBoot(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Config){
		"zero vcpus":    func(c *Config) { c.VCPUs = 0 },
		"many vcpus":    func(c *Config) { c.VCPUs = VCPUsMax + 1 },
		"tiny memory":   func(c *Config) { c.MemoryMiB = MemoryMiBMin - 1 },
		"absurd memory": func(c *Config) { c.MemoryMiB = MemoryMiBMax + 1 },
		"blank kernel":  func(c *Config) { c.Kernel = " " },
		"nul in initrd": func(c *Config) { c.Initrd = "/a\x00b" },
		"slash in name": func(c *Config) { c.Name = "a/b" },
		"dot name":      func(c *Config) { c.Name = ".." },
		"bad network":   func(c *Config) { c.Network = "bridged" },
		"bad env":       func(c *Config) { c.Env = map[string]string{"A=B": "c"} },
	} {
		c := ok
		mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: %v, want ErrInvalidConfig", name, err)
		}
	}
	for name, mut := range map[string]func(*Config){
		"empty kernel": func(c *Config) { c.Kernel = "" },
		"empty initrd": func(c *Config) { c.Initrd = "" },
	} {
		c := ok
		mut(&c)
		if err := c.RequireBoot(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: %v, want ErrInvalidConfig", name, err)
		}
	}
}

func TestParseMetadataKelpieFields(t *testing.T) {
	const kelpie = `{"snapshot_id":"snap-1","vm_id":"vm-1","created_at_ms":1700000000000,"size_bytes":14,"checksum":0,"architecture":"x86_64","vcpu_count":2,"memory_mib":512,"is_full_snapshot":true}`
	md, err := ParseMetadata(strings.NewReader(kelpie))
	if err != nil {
		t.Fatal(err)
	}
	if md.SnapshotID != "snap-1" || md.VMID != "vm-1" || md.CreatedAtMs != 1700000000000 || md.SizeBytes != 14 ||
		md.Architecture != ArchX86_64 || md.VCPUCount != 2 || md.MemoryMiB != 512 || !md.IsFullSnapshot {
		t.Fatalf("parsed %+v", md)
	}
	b, _ := md.Marshal()
	if string(b) != kelpie {
		t.Fatalf("re-encoded metadata differs from Kelpie's:\n%s\n%s", b, kelpie)
	}
	for _, bad := range []string{"", "   ", "{", strings.Repeat(" ", metadataMaxBytes+1)} {
		if _, err := ParseMetadata(strings.NewReader(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("ParseMetadata(%.10q): %v", bad, err)
		}
	}
}
