package firecracker

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/kelpie/teleport/vm"
)

// Compat keys: the facts a Firecracker snapshot must match to be restored.
// Firecracker supports restore only on an identical software and hardware
// configuration: same Firecracker version, same CPU model, same host kernel
// class, same CPU template.
const (
	CompatFirecrackerVersion = "firecracker_version"
	CompatCPUVendor          = "cpu_vendor"
	CompatCPUModel           = "cpu_model"
	CompatHostKernel         = "host_kernel"
	CompatCPUTemplate        = "cpu_template"
)

// hostFacts is what a Firecracker host offers a snapshot.
type hostFacts struct {
	Arch        vm.Architecture
	Version     string // Firecracker's version without the "v"
	CPUVendor   string
	CPUModel    string
	KernelClass string // host kernel MAJOR.MINOR
}

func (h hostFacts) compat(cpuTemplate string) map[string]string {
	return map[string]string{
		CompatFirecrackerVersion: h.Version,
		CompatCPUVendor:          h.CPUVendor,
		CompatCPUModel:           h.CPUModel,
		CompatHostKernel:         h.KernelClass,
		CompatCPUTemplate:        cpuTemplate,
	}
}

// versionMin is the oldest Firecracker whose /snapshot/load takes
// mem_backend (added in 1.1.0; mem_file_path is deprecated since).
var versionMin = [3]int{1, 1, 0}

// parseVersionOutput reads `firecracker --version`, whose first line is
// "Firecracker v1.7.0".
func parseVersionOutput(out string) (string, error) {
	first, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	name, v, ok := strings.Cut(strings.TrimSpace(first), " ")
	if !ok || name != "Firecracker" || !strings.HasPrefix(v, "v") {
		return "", fmt.Errorf("firecracker --version printed %q, not \"Firecracker vX.Y.Z\": %w", truncate([]byte(first)), vm.ErrUnsupported)
	}
	v = strings.TrimPrefix(v, "v")
	n, err := semver(v)
	if err != nil {
		return "", err
	}
	if cmpVersion(n, versionMin) < 0 {
		return "", fmt.Errorf("firecracker %s is older than %d.%d.%d (Kelpie loads snapshots with mem_backend): %w", v, versionMin[0], versionMin[1], versionMin[2], vm.ErrUnsupported)
	}
	return v, nil
}

// semver parses MAJOR.MINOR.PATCH with an optional "-suffix".
func semver(v string) ([3]int, error) {
	var n [3]int
	core, _, _ := strings.Cut(v, "-")
	parts := strings.Split(core, ".")
	if len(parts) != 3 {
		return n, fmt.Errorf("firecracker version %q is not MAJOR.MINOR.PATCH: %w", v, vm.ErrUnsupported)
	}
	for i, p := range parts {
		x, err := strconv.Atoi(p)
		if err != nil || x < 0 {
			return n, fmt.Errorf("firecracker version %q is not MAJOR.MINOR.PATCH: %w", v, vm.ErrUnsupported)
		}
		n[i] = x
	}
	return n, nil
}

func cmpVersion(a, b [3]int) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

// parseCPUInfo reads the first processor of /proc/cpuinfo. On x86 the model
// is the model name with family and model numbers (two hosts selling the
// same name with different steppings stay compatible; different families
// do not); on arm64 it is the implementer and part numbers.
func parseCPUInfo(r io.Reader) (vendor, model string, err error) {
	fields := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			if len(fields) > 0 {
				break // end of the first processor
			}
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		k = strings.TrimSpace(k)
		if _, seen := fields[k]; !seen {
			fields[k] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("read cpuinfo: %w", err)
	}
	if v := fields["vendor_id"]; v != "" {
		name, fam, mod := fields["model name"], fields["cpu family"], fields["model"]
		if fam == "" || mod == "" {
			return "", "", fmt.Errorf("cpuinfo has vendor %s but no cpu family/model: %w", v, vm.ErrUnsupported)
		}
		return v, fmt.Sprintf("%s (family %s model %s)", name, fam, mod), nil
	}
	if impl := fields["CPU implementer"]; impl != "" {
		part := fields["CPU part"]
		if part == "" {
			return "", "", fmt.Errorf("cpuinfo has CPU implementer %s but no CPU part: %w", impl, vm.ErrUnsupported)
		}
		return "arm implementer " + impl, "part " + part + " variant " + fields["CPU variant"], nil
	}
	return "", "", fmt.Errorf("cpuinfo names no CPU vendor: %w", vm.ErrUnsupported)
}

// kernelClass turns a kernel release ("6.1.102-fc.1") into MAJOR.MINOR.
func kernelClass(release string) (string, error) {
	parts := strings.SplitN(strings.TrimSpace(release), ".", 3)
	if len(parts) < 2 {
		return "", fmt.Errorf("kernel release %q has no MAJOR.MINOR: %w", release, vm.ErrUnsupported)
	}
	minor := parts[1]
	if i := strings.IndexFunc(minor, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		minor = minor[:i]
	}
	if _, err := strconv.Atoi(parts[0]); err != nil || minor == "" {
		return "", fmt.Errorf("kernel release %q has no MAJOR.MINOR: %w", release, vm.ErrUnsupported)
	}
	return parts[0] + "." + minor, nil
}
