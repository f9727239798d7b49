// Package firecracker is the Firecracker backend (Linux, KVM). A VM is one
// Firecracker process driven over its API socket with a small typed client
// (client.go); the guest agent is reached over Firecracker's vsock. A
// snapshot is Firecracker's state file (the KLP1 snapshot section) plus its
// memory file (the memory section), restored only into a fresh process.
//
// Lifecycle, file staging, validation and cleanup live in vm/hostvm; this
// package is the driver: the order of API calls and the process. The
// process launcher is the only platform-specific part (launch_linux.go);
// elsewhere NewFactory returns vm.ErrUnsupported.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/hostvm"
)

// BackendName is the backend's name in snapshots and on the command line.
const BackendName = "firecracker"

// Files a Firecracker process uses in its VM directory. They are relative
// to the process's working directory (the VM directory), because
// Firecracker records device paths in the snapshot and a restored process
// must find them "at the same relative paths" in its own directory.
const (
	apiSocketName = "api.sock"
	vsockName     = "v.sock"
	rootfsLink    = "rootfs"
	logFileName   = "firecracker.log"
)

// guestCID is the guest's vsock context id; each VM has its own device.
const guestCID = 3

// bootArgsDefault is used when vm.Config.KernelArgs is empty.
const bootArgsDefault = "console=ttyS0 reboot=k panic=1 pci=off quiet"

// unixPathMaxBytes is sun_path's size on Linux, including the NUL.
const unixPathMaxBytes = 108

// Backoff while waiting for a new process to serve its API.
const (
	apiWaitBackoffMin = 5 * time.Millisecond
	apiWaitBackoffMax = 100 * time.Millisecond
)

// loadExitGrace is how long a load whose answer was lost waits for the
// process to exit, which tells a refused snapshot from a broken socket.
const loadExitGrace = time.Second

// killWaitTimeout bounds waiting for a killed process to be reaped when
// cleaning up after a failure whose context has already ended.
const killWaitTimeout = 10 * time.Second

// vcpusMax is Firecracker's limit (MachineConfiguration.vcpu_count).
const vcpusMax = 32

// cpuTemplates are MachineConfiguration.cpu_template's values.
var cpuTemplates = []string{"None", "C3", "T2", "T2S", "T2CL", "T2A", "V1N1"}

// Options configure the backend.
type Options struct {
	// Binary is the firecracker executable; "" means "firecracker" in PATH.
	Binary string
	// Dir holds VM directories and snapshot files (see hostvm.Options).
	Dir              string
	HostID           string
	BaseImageVersion string
	// CPUTemplate is a static CPU template name; "" means "None". It is a
	// restore fact: snapshots restore only under the same template.
	CPUTemplate string
	// Clock stamps snapshots; nil means the system clock.
	Clock hostvm.Clock
}

// NewFactory probes the firecracker binary and this host (version, CPU,
// kernel, /dev/kvm) and returns a factory. It fails with vm.ErrUnsupported
// off Linux or when Firecracker cannot run here.
func NewFactory(ctx context.Context, o Options) (*hostvm.Factory, error) {
	if o.Binary == "" {
		o.Binary = "firecracker"
	}
	facts, l, err := probe(ctx, o.Binary)
	if err != nil {
		return nil, err
	}
	return newFactory(o, facts, l)
}

func newFactory(o Options, facts hostFacts, l launcher) (*hostvm.Factory, error) {
	tmpl := o.CPUTemplate
	if tmpl == "" {
		tmpl = "None"
	}
	ok := false
	for _, t := range cpuTemplates {
		ok = ok || t == tmpl
	}
	if !ok {
		return nil, fmt.Errorf("firecracker: CPU template %q (want one of %s): %w", tmpl, strings.Join(cpuTemplates, ", "), vm.ErrInvalidConfig)
	}
	spec := hostvm.Spec{
		Backend: BackendName, BackendVersion: facts.Version, Arch: facts.Arch, HostID: o.HostID,
		BaseImageVersion: o.BaseImageVersion, Layout: vm.LayoutSplit, RequireBoot: true,
		Compat: facts.compat(tmpl),
	}
	return hostvm.NewFactory(hostvm.Options{Spec: spec, Driver: &driver{launch: l, cpuTemplate: tmpl}, Dir: o.Dir, Clock: o.Clock})
}

// launcher starts Firecracker processes; tests substitute a fake one.
type launcher interface {
	// launch starts a process whose working directory is dir and whose
	// API listens on dir/api.sock. The process lives until kill, not until
	// ctx ends.
	launch(ctx context.Context, dir, id string) (process, error)
}

// process is one running Firecracker.
type process interface {
	// done is closed when the process has exited.
	done() <-chan struct{}
	// kill ends the process and waits for it (or for ctx).
	kill(ctx context.Context) error
	// exitReason says why the process ended (exit status, log tail).
	exitReason() string
}

type driver struct {
	launch      launcher
	cpuTemplate string
}

var (
	_ hostvm.Driver        = (*driver)(nil)
	_ hostvm.ConfigChecker = (*driver)(nil)
	_ hostvm.Machine       = (*machine)(nil)
)

// CheckConfig refuses what Firecracker cannot run.
func (d *driver) CheckConfig(cfg vm.Config) error {
	if cfg.Network.HasDevice() {
		return fmt.Errorf("firecracker has no user-mode network (only TAP devices, which Kelpie does not set up yet); use network %q: %w", vm.NetworkNone, vm.ErrUnsupported)
	}
	if cfg.Disk.Present() {
		return fmt.Errorf("firecracker: workspace disks are not supported yet (the qemu backend has them): %w", vm.ErrUnsupported)
	}
	if cfg.VCPUs > vcpusMax {
		return fmt.Errorf("firecracker runs 1..%d vCPUs, not %d: %w", vcpusMax, cfg.VCPUs, vm.ErrInvalidConfig)
	}
	return nil
}

// Boot starts a process and configures and boots the VM:
// machine-config, boot-source, the read-only root drive (if any), vsock,
// InstanceStart; then waits for the guest agent.
func (d *driver) Boot(ctx context.Context, ms hostvm.MachineSpec) (_ hostvm.Machine, err error) {
	cfg := ms.Config
	kernel, err := filepath.Abs(cfg.Kernel)
	if err != nil {
		return nil, err
	}
	initrd, err := filepath.Abs(cfg.Initrd)
	if err != nil {
		return nil, err
	}
	if err := linkRootDisk(ms); err != nil {
		return nil, err
	}
	m, err := d.start(ctx, ms)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.cleanup(ctx)
		}
	}()
	mc := MachineConfig{VCPUCount: cfg.VCPUs, MemSizeMiB: cfg.MemoryMiB}
	if d.cpuTemplate != "None" {
		mc.CPUTemplate = d.cpuTemplate
	}
	args := cfg.KernelArgs
	if args == "" {
		args = bootArgsDefault
	}
	steps := []struct {
		what string
		call func() error
	}{
		{"configure the machine", func() error { return m.api.PutMachineConfig(ctx, mc) }},
		{"set the boot source", func() error {
			return m.api.PutBootSource(ctx, BootSource{KernelImagePath: kernel, InitrdPath: initrd, BootArgs: args})
		}},
		{"attach the root disk", func() error {
			if cfg.RootDisk == "" {
				return nil
			}
			// Read-only: a snapshot does not carry disk contents, so a
			// writable disk would not match the memory restored over it.
			return m.api.PutDrive(ctx, Drive{DriveID: rootfsLink, PathOnHost: rootfsLink, IsRootDevice: true, IsReadOnly: true})
		}},
		{"attach the vsock device", func() error { return m.api.PutVsock(ctx, Vsock{GuestCID: guestCID, UDSPath: vsockName}) }},
		{"start the instance", func() error { return m.api.StartInstance(ctx) }},
	}
	for _, s := range steps {
		if err := s.call(); err != nil {
			return nil, m.explain(s.what, err)
		}
	}
	if _, err := m.guest.Connect(ctx); err != nil {
		return nil, m.explain("reach the guest agent", err)
	}
	return m, nil
}

// Restore starts a fresh process and loads the staged snapshot into it;
// the VM stays paused. Firecracker ends the process when a load fails.
func (d *driver) Restore(ctx context.Context, ms hostvm.MachineSpec, f hostvm.Files) (_ hostvm.Machine, err error) {
	if err := linkRootDisk(ms); err != nil {
		return nil, err
	}
	m, err := d.start(ctx, ms)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.cleanup(ctx)
		}
	}()
	err = m.api.LoadSnapshot(ctx, SnapshotLoadParams{SnapshotPath: f.State,
		MemBackend: &MemoryBackend{BackendType: MemoryBackendFile, BackendPath: f.Memory}})
	if err != nil {
		if isAPIError(err) {
			return nil, fmt.Errorf("firecracker refused the snapshot: %w: %w", err, vm.ErrIncompatible)
		}
		// A failed load ends the process; if the answer was lost with it,
		// the exit is the answer.
		if m.waitExit(ctx, loadExitGrace) {
			return nil, fmt.Errorf("firecracker exited while loading the snapshot (%s): %w: %w", m.proc.exitReason(), err, vm.ErrIncompatible)
		}
		return nil, m.explain("load the snapshot", err)
	}
	info, err := m.api.DescribeInstance(ctx)
	if err != nil {
		return nil, m.explain("check the loaded VM", err)
	}
	if info.State != InstancePaused {
		return nil, fmt.Errorf("firecracker reports a loaded VM as %q, want %q", info.State, InstancePaused)
	}
	return m, nil
}

// linkRootDisk points <dir>/rootfs at the configured root disk: the drive
// is attached by that relative name so a snapshot restores in another
// directory, or on another host with the disk elsewhere.
func linkRootDisk(ms hostvm.MachineSpec) error {
	link := filepath.Join(ms.Dir, rootfsLink)
	if err := os.Remove(link); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if ms.Config.RootDisk == "" {
		return nil
	}
	disk, err := filepath.Abs(ms.Config.RootDisk)
	if err != nil {
		return err
	}
	return os.Symlink(disk, link)
}

// start launches a process and waits until it serves its API.
func (d *driver) start(ctx context.Context, ms hostvm.MachineSpec) (*machine, error) {
	api := filepath.Join(ms.Dir, apiSocketName)
	if len(api) >= unixPathMaxBytes {
		return nil, fmt.Errorf("firecracker: socket path %s is longer than %d bytes; use a shorter KELPIE_HOME: %w", api, unixPathMaxBytes-1, vm.ErrInvalidConfig)
	}
	// A socket left by an earlier process would make Firecracker fail
	// to bind ("Address in use").
	for _, n := range []string{apiSocketName, vsockName} {
		if err := os.Remove(filepath.Join(ms.Dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	p, err := d.launch.launch(ctx, ms.Dir, instanceID(ms.ID))
	if err != nil {
		return nil, err
	}
	m := &machine{dir: ms.Dir, proc: p, api: NewClient(api)}
	m.guest = hostvm.NewAgentGuest(m.dialAgent)
	if err := m.waitAPI(ctx); err != nil {
		m.cleanup(ctx)
		return nil, err
	}
	return m, nil
}

var instanceIDBad = regexp.MustCompile(`[^A-Za-z0-9-]`)

// instanceID makes Firecracker's --id (alphanumerics and '-', at most 64
// bytes) from a VM id.
func instanceID(id string) string {
	s := instanceIDBad.ReplaceAllString(id, "-")
	if len(s) > 64 {
		s = s[:64]
	}
	return s
}

// machine is one Firecracker process and its guest.
type machine struct {
	dir   string
	proc  process
	api   *Client
	guest *hostvm.AgentGuest
}

func (m *machine) Done() <-chan struct{} { return m.proc.done() }

func (m *machine) exited() bool {
	select {
	case <-m.proc.done():
		return true
	default:
		return false
	}
}

// explain wraps a failed step; if the process is gone, says why.
func (m *machine) explain(what string, err error) error {
	if m.exited() {
		return fmt.Errorf("firecracker: %s: %w: the process exited (%s): %w", what, err, m.proc.exitReason(), vm.ErrCrashed)
	}
	return fmt.Errorf("firecracker: %s: %w", what, err)
}

// waitExit reports whether the process exits within grace.
func (m *machine) waitExit(ctx context.Context, grace time.Duration) bool {
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-m.proc.done():
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return m.exited()
}

func (m *machine) waitAPI(ctx context.Context) error {
	backoff := apiWaitBackoffMin
	for {
		_, err := m.api.DescribeInstance(ctx)
		if err == nil {
			return nil
		}
		if m.exited() {
			return fmt.Errorf("firecracker exited before serving its API (%s): %w", m.proc.exitReason(), vm.ErrCrashed)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("firecracker API did not answer: %w: %w (last error: %v)", vm.ErrTimeout, ctx.Err(), err)
		case <-m.proc.done():
			t.Stop()
		case <-t.C:
		}
		backoff = min(2*backoff, apiWaitBackoffMax)
	}
}

func (m *machine) dialAgent(ctx context.Context) (io.ReadWriteCloser, error) {
	if m.exited() {
		return nil, fmt.Errorf("firecracker exited (%s): %w", m.proc.exitReason(), vm.ErrCrashed)
	}
	return dialVsock(ctx, filepath.Join(m.dir, vsockName), hostvm.AgentVsockPort)
}

// Pause is PATCH /vm Paused.
func (m *machine) Pause(ctx context.Context) error {
	if err := m.api.PauseVM(ctx); err != nil {
		return m.explain("pause", err)
	}
	return nil
}

// Resume is PATCH /vm Resumed.
func (m *machine) Resume(ctx context.Context) error {
	if err := m.api.ResumeVM(ctx); err != nil {
		return m.explain("resume", err)
	}
	return nil
}

// Save is PUT /snapshot/create of a full snapshot. Firecracker resets the
// vsock transport on snapshot creation, closing every open connection, so
// the agent stream is dropped and redialed on the next Exec.
func (m *machine) Save(ctx context.Context, f hostvm.Files) error {
	defer m.guest.Disconnect()
	if f.Memory == "" {
		return fmt.Errorf("firecracker: a snapshot needs a memory file path: %w", vm.ErrInvalidConfig)
	}
	err := m.api.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotType: SnapshotFull, SnapshotPath: f.State, MemFilePath: f.Memory})
	if err != nil {
		return m.explain("create snapshot", err)
	}
	return nil
}

// Exec runs a command through the guest agent over vsock.
func (m *machine) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	return m.guest.Exec(ctx, cmd, args, opts)
}

// Shutdown kills the process. Firecracker has no graceful power-off on
// every architecture, and the guest's memory is discarded either way.
func (m *machine) Shutdown(ctx context.Context) error {
	return m.stop(ctx)
}

// stop kills the process first: that also ends any agent connection
// attempt in flight (its dials fail once the process is gone).
func (m *machine) stop(ctx context.Context) error {
	m.api.Close()
	err := m.proc.kill(ctx)
	m.guest.Close()
	for _, n := range []string{apiSocketName, vsockName} {
		os.Remove(filepath.Join(m.dir, n))
	}
	if err != nil {
		return fmt.Errorf("firecracker: kill: %w", err)
	}
	return nil
}

// cleanup stops a machine whose start failed, even if ctx has ended.
func (m *machine) cleanup(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killWaitTimeout)
	defer cancel()
	m.stop(cctx)
}
