// Package image locates the Kelpie guest image built by
// scripts/build-image.sh and knows the QEMU command line it was verified
// with (see QEMUConfig.Args and boot_test.go).
package image

import (
	"bufio"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Files inside an image directory.
const (
	VmlinuxFile   = "vmlinux"           // uncompressed kernel, PVH entry (-M microvm)
	BzImageFile   = "bzImage"           // compressed kernel (-M pc)
	InitramfsFile = "initramfs.cpio.gz" // busybox + kelpie-agent
	ManifestFile  = "manifest.json"
	// ForwardFile is the host-side relay QEMU runs for each guest
	// connection to a forwarded port (vm/qemu/cmd/kelpie-forward).
	ForwardFile = "kelpie-forward"
)

//go:embed VERSION
var versionFile string

// Version is the base image version this build makes and boots
// (guest/image/VERSION): what packages record and restores compare.
func Version() string { return strings.TrimSpace(versionFile) }

// AgentPortName is the virtio-serial port name the guest agent serves on
// (same as agent.PortName).
const AgentPortName = "org.kelpie.agent"

// Manifest is manifest.json of a built image.
type Manifest struct {
	Version       string   `json:"version"` // base image version, guest/image/VERSION
	KernelVersion string   `json:"kernel_version"`
	Arch          string   `json:"arch"`
	AgentSHA256   string   `json:"agent_sha256"`
	InitramfsSHA  string   `json:"initramfs_sha256"`
	AgentVersion  string   `json:"agent_version"`
	ForwardSHA256 string   `json:"forward_sha256,omitempty"`
	BuiltAt       string   `json:"built_at"`
	InputsHash    string   `json:"inputs_hash"`
	KernelPackage string   `json:"kernel_package"`
	BusyboxPkg    string   `json:"busybox_package"`
	Modules       []string `json:"modules"` // load order
}

// CacheDir returns $KELPIE_CACHE or ~/.cache/kelpie.
func CacheDir() string {
	if d := os.Getenv("KELPIE_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/root"
	}
	return filepath.Join(home, ".cache", "kelpie")
}

// CurrentDir returns the resolved directory of the current image
// (<cache>/image/current) after checking its files exist.
func CurrentDir() (string, error) {
	dir, err := filepath.EvalSymlinks(filepath.Join(CacheDir(), "image", "current"))
	if err != nil {
		return "", fmt.Errorf("guest image not built (run scripts/setup-qemu.sh): %w", err)
	}
	for _, f := range []string{VmlinuxFile, InitramfsFile, ManifestFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return "", fmt.Errorf("guest image %s incomplete: %w", dir, err)
		}
	}
	return dir, nil
}

// LoadManifest reads dir/manifest.json.
func LoadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestFile), err)
	}
	return &m, nil
}

// HostTSCKHz returns the host TSC frequency in kHz, from /proc/cpuinfo
// ("cpu MHz" of the first CPU). Under TCG the guest TSC ticks at the host
// TSC rate, and microvm guests need tsc_early_khz to skip calibration.
func HostTSCKHz() (int, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return 0, fmt.Errorf("bad cpu MHz %q", v)
		}
		return int(mhz*1000 + 0.5), nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("no cpu MHz in /proc/cpuinfo")
}

// KernelCmdline is the verified guest kernel command line. tscKHz > 0 adds
// tsc_early_khz (needed for microvm under TCG) and tsc=reliable: under TCG
// the guest's TSC is the host's constant TSC plus an offset, but on a busy
// host the guest kernel's clocksource watchdog, comparing it with jiffies
// that lose ticks, marks it unstable and falls back to jiffies, and the
// guest's clock then falls behind (by 170 ms in 25 s on this project's
// 2-core CI machine). extra is appended.
func KernelCmdline(tscKHz int, extra string) string {
	s := "console=ttyS0 reboot=t panic=-1 quiet"
	if tscKHz > 0 {
		s += " tsc_early_khz=" + strconv.Itoa(tscKHz) + " tsc=reliable"
	}
	if extra != "" {
		s += " " + extra
	}
	return s
}

// QEMUConfig describes one microvm guest. Source and destination of a
// snapshot/migration must use the same config except sockets, ConsoleLog,
// MemPath and Incoming.
type QEMUConfig struct {
	Binary      string // default "qemu-system-x86_64"
	ImageDir    string // directory with vmlinux and initramfs.cpio.gz
	MemoryMiB   int    // default 256
	CPUs        int    // default 1
	MemPath     string // guest RAM file (memory-backend-file); required
	MemPrivate  bool   // map MemPath share=off (copy-on-write, file untouched)
	AgentSocket string // unix socket path of the agent chardev (QEMU listens)
	QMPSocket   string // unix socket path of QMP (QEMU listens)
	ConsoleLog  string // guest serial console output file ("" = discard)
	TSCKHz      int    // tsc_early_khz; 0 = HostTSCKHz()
	Incoming    bool   // add -S -incoming defer (restore target)
	ExtraAppend string // appended to the kernel command line
}

// Args returns the QEMU argv (without the binary).
func (c QEMUConfig) Args() ([]string, error) {
	if c.ImageDir == "" || c.MemPath == "" || c.AgentSocket == "" || c.QMPSocket == "" {
		return nil, errors.New("image: QEMUConfig needs ImageDir, MemPath, AgentSocket and QMPSocket")
	}
	mem := c.MemoryMiB
	if mem == 0 {
		mem = 256
	}
	cpus := c.CPUs
	if cpus == 0 {
		cpus = 1
	}
	tsc := c.TSCKHz
	if tsc == 0 {
		var err error
		if tsc, err = HostTSCKHz(); err != nil {
			return nil, err
		}
	}
	share := "on"
	if c.MemPrivate {
		share = "off"
	}
	serial := "null"
	if c.ConsoleLog != "" {
		serial = "file:" + c.ConsoleLog
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", "tcg",
		"-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=mem",
		"-m", fmt.Sprintf("%dM", mem),
		"-smp", strconv.Itoa(cpus),
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", mem, c.MemPath, share),
		"-kernel", filepath.Join(c.ImageDir, VmlinuxFile),
		"-initrd", filepath.Join(c.ImageDir, InitramfsFile),
		"-append", KernelCmdline(tsc, c.ExtraAppend),
		"-serial", serial,
		// Entropy for the guest CRNG (qemu64 has no RDRAND under TCG;
		// without it getrandom() may block early after boot).
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-device,rng=rng0",
		"-device", "virtio-serial-device,max_ports=2",
		"-chardev", fmt.Sprintf("socket,id=agent,path=%s,server=on,wait=off", c.AgentSocket),
		"-device", "virtserialport,chardev=agent,name=" + AgentPortName,
		"-qmp", fmt.Sprintf("unix:%s,server=on,wait=off", c.QMPSocket),
	}
	if c.Incoming {
		args = append(args, "-S", "-incoming", "defer")
	}
	return args, nil
}

// BinaryPath returns c.Binary or the default QEMU binary name.
func (c QEMUConfig) BinaryPath() string {
	if c.Binary != "" {
		return c.Binary
	}
	return "qemu-system-x86_64"
}
