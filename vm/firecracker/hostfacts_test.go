package firecracker

import (
	"errors"
	"strings"
	"testing"

	"github.com/kelpie/teleport/vm"
)

func TestParseVersionOutput(t *testing.T) {
	for _, c := range []struct {
		out, want string
		ok        bool
	}{
		{"Firecracker v1.7.0\n\n", "1.7.0", true},
		{"Firecracker v1.10.1\n\nSupported snapshot data format versions: v1.0.0 v2.0.0\n", "1.10.1", true},
		{"Firecracker v1.12.0-dev\n", "1.12.0-dev", true},
		{"Firecracker v1.1.0\n", "1.1.0", true},
		{"Firecracker v1.0.0\n", "", false}, // no mem_backend
		{"Firecracker v0.25.2\n", "", false},
		{"firecracker 1.7.0\n", "", false},
		{"Firecracker v1.7\n", "", false},
		{"", "", false},
		{"Jailer v1.7.0\n", "", false},
	} {
		got, err := parseVersionOutput(c.out)
		if c.ok && (err != nil || got != c.want) {
			t.Errorf("%q: %q %v, want %q", c.out, got, err, c.want)
		}
		if !c.ok && (err == nil || !errors.Is(err, vm.ErrUnsupported)) {
			t.Errorf("%q: accepted as %q (%v)", c.out, got, err)
		}
	}
}

const cpuinfoAMD = `processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7R13 Processor
stepping	: 1

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7R13 Processor
stepping	: 1
`

const cpuinfoGraviton = `processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd0c
CPU revision	: 1
`

func TestParseCPUInfo(t *testing.T) {
	for _, c := range []struct {
		name, in            string
		wantVendor, wantMod string
	}{
		{"x86", cpuinfoAMD, "AuthenticAMD", "AMD EPYC 7R13 Processor (family 25 model 1)"},
		{"arm64", cpuinfoGraviton, "arm implementer 0x41", "part 0xd0c variant 0x1"},
		{"no vendor", "processor : 0\nflags : x\n", "", ""},
		{"x86 without model", "vendor_id : GenuineIntel\n", "", ""},
	} {
		v, m, err := parseCPUInfo(strings.NewReader(c.in))
		if c.wantVendor == "" {
			if !errors.Is(err, vm.ErrUnsupported) {
				t.Errorf("%s: %q %q %v", c.name, v, m, err)
			}
			continue
		}
		if err != nil || v != c.wantVendor || m != c.wantMod {
			t.Errorf("%s: %q %q %v", c.name, v, m, err)
		}
	}
}

func TestKernelClass(t *testing.T) {
	for in, want := range map[string]string{
		"6.1.102-111.182.amzn2023.x86_64\n": "6.1",
		"5.10.223-211.872.amzn2.x86_64":     "5.10",
		"6.18.44-fc-v595":                   "6.18",
		"6.9-rc3":                           "6.9",
		"4":                                 "",
		"x.y.z":                             "",
	} {
		got, err := kernelClass(in)
		if want == "" {
			if err == nil {
				t.Errorf("%q accepted as %q", in, got)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("%q: %q %v, want %q", in, got, err, want)
		}
	}
}
