// Package qemu is the QEMU backend of the VM contract: each VM is a QEMU
// process (microvm, guest RAM in a shared file on tmpfs, the Kelpie guest
// image, the guest agent on a virtio-serial port) with an instance
// directory under $KELPIE_HOME/vms/NAME, so separate kelpie invocations can
// find and drive it. Snapshots are QEMU migration streams: split (device
// state + sparse guest RAM, the default) or single (RAM inside the stream).
//
// It never reads a whole snapshot into memory, never modifies a snapshot's
// payloads, and never leaves a QEMU process it started without a record of
// it in the instance directory.
package qemu

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/vm"
)

// Backend identity recorded in snapshots.
const (
	BackendName = "qemu"
	// machineType is the QEMU machine every VM uses.
	machineType = "microvm"
	// deviceSet names the devices a VM has; source and destination of a
	// migration must agree on it. Bump the suffix when the device list in
	// qemuArgs changes.
	// The network and disk devices are there when the snapshot's metadata
	// says so (Network, Disk), in this order, and a restore recreates them.
	deviceSet = "kelpie-microvm-2:isa-serial,rtc,virtio-serial-device,virtserialport=" + image.AgentPortName +
		"[,virtio-net-device:user][,virtio-blk-device:raw]"
	// binaryDefault is the QEMU system emulator for x86_64 guests.
	binaryDefault = "qemu-system-x86_64"
	// bootTimeoutDefault bounds a boot when the caller's context has no
	// deadline: TCG boots take 3-10 s on a busy 2-core host.
	bootTimeoutDefault = 2 * time.Minute
)

// Options configure a Factory.
type Options struct {
	// Home is $KELPIE_HOME; instances live in Home/vms.
	Home string
	// HostID identifies this host in snapshots (Suspend restores only here).
	HostID string
	// Binary is the QEMU binary (default qemu-system-x86_64 from PATH).
	Binary string
	// ImageDir holds vmlinux, initramfs.cpio.gz and manifest.json
	// (default: the current image from `kelpie image build`).
	ImageDir string
	// Accel is auto (default), kvm or tcg.
	Accel Accel
	// AccelCache is the file holding the machine's KVM verdict (default
	// $KELPIE_ACCEL_CACHE, else ~/.cache/kelpie/accel.json). It is shared
	// by every home on the machine, so only the first kelpie probes.
	AccelCache string
	// Layout of snapshots: split (default) or single.
	Layout vm.Layout
	// BaseImageVersion overrides the image manifest's version.
	BaseImageVersion string
	// RAMDir holds guest RAM files (default: /dev/shm when it is a
	// tmpfs, else each instance directory). "-" means the instance
	// directory.
	RAMDir string
}

// ramDirDefault is where guest RAM lives: a tmpfs. Guest RAM in a file on
// a disk filesystem is written back to the disk every few seconds for
// nothing, and freeing it when a VM stops costs ~100 ms of filesystem work;
// on tmpfs it is plain shared memory that is still a file, so split
// snapshots and restores work the same. The instance directory holds a
// symlink to it.
const ramDirDefault = "/dev/shm"

// stagingSuffix names a RAM file being staged for a restore.
const stagingSuffix = ".staging"

// Factory creates and finds QEMU VMs of one Kelpie home.
type Factory struct {
	opts        Options
	qemuVersion string
	accelIn     accelInputs
	accelMu     sync.Mutex // guards accel, accelWhy, cpu, tscKHz
	accel       Accel      // "" until settled
	accelWhy    string
	cpu         string
	tscKHz      int
	imageVer    string
}

var (
	_ vm.Factory       = (*Factory)(nil)
	_ vm.Attacher      = (*Factory)(nil)
	_ vm.Lister        = (*Factory)(nil)
	_ vm.AccelReporter = (*Factory)(nil)
)

// NewFactory checks QEMU and the guest image, and settles the accelerator
// (probing KVM once per machine unless Accel is tcg).
func NewFactory(ctx context.Context, o Options) (*Factory, error) {
	if o.Home == "" {
		return nil, fmt.Errorf("qemu: home directory is empty: %w", vm.ErrInvalidConfig)
	}
	if o.Binary == "" {
		o.Binary = binaryDefault
	}
	bin, err := exec.LookPath(o.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %s not found (run `kelpie image build` or scripts/setup-qemu.sh): %w", o.Binary, vm.ErrUnsupported)
	}
	o.Binary = bin
	if o.ImageDir == "" {
		dir, err := image.CurrentDir()
		if err != nil {
			return nil, fmt.Errorf("qemu: %v (run `kelpie image build`): %w", err, vm.ErrUnsupported)
		}
		o.ImageDir = dir
	}
	if o.Layout == "" {
		o.Layout = vm.LayoutSplit
	}
	if o.Layout != vm.LayoutSplit && o.Layout != vm.LayoutSingle {
		return nil, fmt.Errorf("qemu: snapshot layout %q (want split or single): %w", o.Layout, vm.ErrInvalidConfig)
	}
	if o.Accel == "" {
		o.Accel = AccelAuto
	}
	if o.AccelCache == "" {
		o.AccelCache = accelCacheDefault()
	}
	switch {
	case o.RAMDir == "-":
		o.RAMDir = ""
	case o.RAMDir == "" && isTmpfs(ramDirDefault):
		o.RAMDir = ramDirDefault
	}
	f := &Factory{opts: o}
	if f.imageVer = o.BaseImageVersion; f.imageVer == "" {
		m, err := image.LoadManifest(o.ImageDir)
		if err != nil {
			return nil, fmt.Errorf("qemu: guest image %s: %w", o.ImageDir, err)
		}
		f.imageVer = m.Version
	}
	if f.qemuVersion, err = qemuVersion(ctx, bin); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(o.Home, "vms"), 0o755); err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	removeOrphanSnapshots(f.tmpDir())
	f.removeOrphanRAM()
	f.accelIn = accelInputs{home: o.Home, cache: o.AccelCache, binary: bin, qemuVersion: f.qemuVersion,
		kernel: filepath.Join(o.ImageDir, image.VmlinuxFile), initrd: filepath.Join(o.ImageDir, image.InitramfsFile)}
	// An explicit accelerator is settled (and refused) now; auto waits
	// until a VM is made or the host described: driving existing VMs,
	// which keep the accelerator they were made with, needs no probe.
	if o.Accel != AccelAuto {
		if err := f.settleAccel(ctx); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// settleAccel resolves the accelerator once (resolveAccel).
func (f *Factory) settleAccel(ctx context.Context) error {
	f.accelMu.Lock()
	defer f.accelMu.Unlock()
	if f.accel != "" {
		return nil
	}
	a, why, err := resolveAccel(ctx, f.accelIn, f.opts.Accel)
	if err != nil {
		return err
	}
	cpu, tsc := cpuFor(a), 0
	if a == AccelTCG {
		// microvm under TCG hangs in a third of boots calibrating the TSC
		// unless told its frequency.
		if tsc, err = image.HostTSCKHz(); err != nil {
			return fmt.Errorf("qemu: host TSC frequency: %w", err)
		}
	}
	f.accel, f.accelWhy, f.cpu, f.tscKHz = a, why, cpu, tsc
	return nil
}

// accelNow settles the accelerator where no context is at hand (Host):
// the probe bounds itself, and its verdict is cached for the machine.
func (f *Factory) accelNow() (Accel, string, string, int) {
	if err := f.settleAccel(context.Background()); err != nil {
		return "", "unsettled: " + err.Error(), "", 0
	}
	f.accelMu.Lock()
	defer f.accelMu.Unlock()
	return f.accel, f.accelWhy, f.cpu, f.tscKHz
}

// isTmpfs reports whether dir is a writable tmpfs.
func isTmpfs(dir string) bool {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil || st.Type != tmpfsMagic {
		return false
	}
	return syscall.Access(dir, 2 /* W_OK */) == nil
}

const tmpfsMagic = 0x01021994

var qemuVersionRE = regexp.MustCompile(`version (\d+\.\d+\.\d+)`)

func qemuVersion(ctx context.Context, bin string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("qemu: %s --version: %v: %w", bin, err, vm.ErrUnsupported)
	}
	m := qemuVersionRE.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("qemu: cannot read the version from %q: %w", strings.TrimSpace(string(out)), vm.ErrUnsupported)
	}
	return string(m[1]), nil
}

// cpuFor is the CPU model for an accelerator. Under KVM the guest sees the
// host CPU, so the model name is part of what a restore must match.
func cpuFor(a Accel) string {
	if a == AccelKVM {
		return "host:" + cpuModel()
	}
	return "qemu64"
}

// Accel reports the accelerator this factory's new VMs use and why.
func (f *Factory) Accel() (Accel, string) {
	a, why, _, _ := f.accelNow()
	return a, why
}

// Accelerator is Accel as plain strings (vm.AccelReporter).
func (f *Factory) Accelerator() (string, string) {
	a, why := f.Accel()
	return string(a), why
}

// Home is the factory's Kelpie home.
func (f *Factory) Home() string { return f.opts.Home }

// QEMUVersion is the QEMU version, "7.2.22".
func (f *Factory) QEMUVersion() string { return f.qemuVersion }

// Host describes this host and backend for restore rules.
func (f *Factory) Host() vm.HostInfo {
	return vm.HostInfo{Arch: vm.HostArchitecture(), Backend: BackendName, BackendVersion: f.qemuVersion,
		HostID: f.opts.HostID, BaseImageVersion: f.imageVer, Compat: f.compat(), Layouts: []vm.Layout{vm.LayoutSplit, vm.LayoutSingle}}
}

// compat is what this factory's new VMs' snapshots record.
func (f *Factory) compat() map[string]string {
	a, _, cpu, _ := f.accelNow()
	return compat(f.qemuVersion, a, cpu)
}

// compat lists the facts a snapshot and the restoring host must share.
func compat(qemuVersion string, a Accel, cpu string) map[string]string {
	return map[string]string{
		"qemu_version":  qemuVersion,
		"machine":       machineType,
		"cpu":           cpu,
		"accel":         string(a),
		"devices":       deviceSet,
		"memory_format": memFormat,
	}
}

func (f *Factory) vmsDir() string { return filepath.Join(f.opts.Home, "vms") }

// tmpDir holds snapshots' payload files until they are closed: the RAM
// directory when there is one (writing a memory section to tmpfs is
// several times faster than to a disk filesystem), else $KELPIE_HOME/tmp.
func (f *Factory) tmpDir() string {
	if f.opts.RAMDir != "" {
		return f.opts.RAMDir
	}
	return filepath.Join(f.opts.Home, "tmp")
}

// snapDirPrefix names snapshot directories; the pid of the kelpie that
// made one lets a later kelpie remove those whose owner died.
func snapDirPrefix(pid int) string { return fmt.Sprintf("kelpie-snap-%d-", pid) }

// ramPrefix names this home's RAM files: one name per home and VM, since
// two homes on one machine are two hosts and may have VMs of one name.
func (f *Factory) ramPrefix() string {
	h := sha256.Sum256([]byte(f.opts.Home))
	return fmt.Sprintf("kelpie-%x-", h[:6])
}

// removeOrphanRAM deletes this home's RAM files whose instance directory
// is gone (removed by hand): on tmpfs they would hold memory forever.
func (f *Factory) removeOrphanRAM() {
	if f.opts.RAMDir == "" {
		return
	}
	ents, _ := os.ReadDir(f.opts.RAMDir)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), f.ramPrefix())
		if !ok {
			continue
		}
		name, _, _ := strings.Cut(rest, ".mem")
		if _, err := os.Stat(f.instDir(name)); errors.Is(err, fs.ErrNotExist) {
			os.Remove(filepath.Join(f.opts.RAMDir, e.Name()))
		}
	}
}

// removeOrphanSnapshots deletes snapshot directories of dead processes:
// in a RAM directory they hold memory until removed.
func removeOrphanSnapshots(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), "kelpie-snap-")
		if !ok || !e.IsDir() {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 || syscall.Kill(pid, 0) == nil || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue
		}
		os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}
func (f *Factory) instDir(name string) string { return filepath.Join(f.vmsDir(), name) }

// Create makes a new instance (state Created) and its directory.
func (f *Factory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	return f.create(ctx, cfg)
}

func (f *Factory) create(ctx context.Context, cfg vm.Config) (*Instance, error) {
	return f.createInstance(ctx, cfg, true, false)
}

// createInstance makes an instance (state Created) and its directory;
// newDisk makes its workspace disk (a restore stages one instead), and
// restoring checks the network as a guest that uses it already needs it.
func (f *Factory) createInstance(ctx context.Context, cfg vm.Config, newDisk, restoring bool) (*Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		var b [4]byte
		rand.Read(b[:])
		cfg.Name = "vm-" + hex.EncodeToString(b[:])
	}
	if err := f.completeConfig(&cfg); err != nil {
		return nil, err
	}
	if newDisk {
		if err := checkDiskTools(cfg); err != nil {
			return nil, err
		}
	}
	if err := f.checkNetwork(ctx, cfg, restoring); err != nil {
		return nil, err
	}
	if err := f.settleAccel(ctx); err != nil {
		return nil, err
	}
	accel, _, cpu, tsc := f.accelNow()
	dir := f.instDir(cfg.Name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, vm.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("vm %s: create directory: %w", cfg.Name, err)
	}
	rec := instanceRecord{Name: cfg.Name, Config: cfg, Accel: accel, CPU: cpu, Machine: machineType,
		TSCKHz: tsc, Binary: f.opts.Binary, Layout: f.opts.Layout, QEMUVersion: f.qemuVersion,
		HostID: f.opts.HostID, BaseImageVersion: f.imageVer, CreatedAt: time.Now().UTC()}
	if f.opts.RAMDir != "" {
		rec.RAMPath = filepath.Join(f.opts.RAMDir, f.ramPrefix()+cfg.Name+".mem")
		os.Remove(rec.RAMPath) // a leftover of a VM of this name whose directory was deleted by hand
		os.Symlink(rec.RAMPath, filepath.Join(dir, memFile))
	}
	v := &Instance{f: f, dir: dir, rec: rec, run: runRecord{State: vm.StateCreated.String()}}
	if err := v.saveRecord(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := v.saveRun(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if newDisk && cfg.Disk.Present() {
		if err := createDisk(ctx, v.diskPath(), cfg.Disk); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
	}
	return v, nil
}

// completeConfig validates cfg and fills in the guest image's kernel and
// initramfs.
func (f *Factory) completeConfig(cfg *vm.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if cfg.Network.HasDevice() && cfg.MAC == "" {
		cfg.MAC = newMAC()
	}
	if cfg.Disk.Present() && cfg.Disk.Filesystem == "" {
		cfg.Disk.Filesystem = vm.DiskFilesystemExt4
	}
	if cfg.RootDisk != "" {
		return fmt.Errorf("vm %s: root disks: the qemu backend boots the Kelpie initramfs only: %w", cfg.Name, vm.ErrUnsupported)
	}
	if cfg.Kernel == "" {
		cfg.Kernel = filepath.Join(f.opts.ImageDir, image.VmlinuxFile)
	}
	if cfg.Initrd == "" {
		cfg.Initrd = filepath.Join(f.opts.ImageDir, image.InitramfsFile)
	}
	if cfg.BaseImageVersion == "" {
		cfg.BaseImageVersion = f.imageVer
	}
	if err := cfg.RequireBoot(); err != nil {
		return err
	}
	for _, p := range []string{cfg.Kernel, cfg.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("vm %s: %v: %w", cfg.Name, err, vm.ErrInvalidConfig)
		}
	}
	return nil
}

// CreateFromSnapshot makes an instance and restores snap into it; it is
// Paused on success. Memory size and vCPUs come from the snapshot when cfg
// leaves them zero. On failure nothing is left behind.
func (f *Factory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	if snap == nil {
		return nil, fmt.Errorf("restore: no snapshot: %w", vm.ErrInvalidConfig)
	}
	cfg = vm.ConfigFor(cfg, snap.Metadata)
	// Refuse a foreign snapshot before anything is created.
	if err := f.checkSnapshot(snap.Metadata, cfg); err != nil {
		return nil, err
	}
	if err := restoreDevices(&cfg, snap.Metadata); err != nil {
		return nil, err
	}
	v, err := f.createInstance(ctx, cfg, false, true)
	if err != nil {
		return nil, err
	}
	if err := v.restore(ctx, snap); err != nil {
		return nil, vm.RemoveFailed(ctx, v, err)
	}
	return v, nil
}

// Attach finds an existing instance of this home by name
// (vm.Attacher): QEMU VMs outlive the kelpie that started them.
func (f *Factory) Attach(ctx context.Context, name string) (vm.Instance, error) {
	return f.open(ctx, name)
}

func (f *Factory) open(ctx context.Context, name string) (*Instance, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, err
	}
	dir := f.instDir(name)
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("vm %s: %w", name, vm.ErrNotFound)
		}
		return nil, fmt.Errorf("vm %s: %w", name, err)
	}
	v := &Instance{f: f, dir: dir}
	if err := json.Unmarshal(b, &v.rec); err != nil {
		return nil, fmt.Errorf("vm %s: %s is unreadable: %v: %w", name, recordFile, err, vm.ErrCorrupt)
	}
	if err := v.loadRun(); err != nil {
		return nil, err
	}
	return v, nil
}

// List describes every instance of this home, sorted by name
// (vm.Lister).
func (f *Factory) List(ctx context.Context) ([]vm.Info, error) {
	ents, err := os.ReadDir(f.vmsDir())
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return []vm.Info{}, nil
		}
		return nil, err
	}
	out := []vm.Info{}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		v, err := f.open(ctx, e.Name())
		if err != nil {
			continue // a directory being created or removed right now
		}
		c := v.rec.Config
		info := vm.Info{Name: v.rec.Name, Backend: BackendName, State: v.State(), VCPUs: c.VCPUs,
			MemoryMiB: c.MemoryMiB, Accel: string(v.rec.Accel), Dir: v.dir, CreatedAt: v.rec.CreatedAt,
			Network: c.Network, Forwards: c.Forwards, DiskBytes: c.Disk.SizeBytes, Hostname: c.GuestHostname(), AgentID: c.AgentID}
		if v.run.Proc != nil && v.run.Proc.alive() {
			info.PID = v.run.Proc.PID
			info.Ports = v.run.Ports
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
