// Package vz is the Apple Virtualization.framework backend (macOS 14 or
// later on Apple silicon, through github.com/Code-Hex/vz/v3). A snapshot is
// one VZ save file in the KLP1 snapshot section; the memory section stays
// empty.
//
// A save file is encrypted with a key of the Mac that wrote it and restores
// only there: every snapshot is host-bound (SnapshotMetadata.HostBound), so
// a VZ VM can be suspended and resumed on its Mac, but leaving the Mac is
// always a checkpoint, never a teleport.
//
// Lifecycle, file staging, validation and cleanup live in vm/hostvm; the
// driver here orders the framework's calls; the framework itself is behind
// the small hypervisor interface, implemented in hypervisor_darwin.go
// (darwin && arm64 && cgo) and refused with vm.ErrUnsupported elsewhere.
package vz

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/hostvm"
)

// BackendName is the backend's name in snapshots and on the command line.
const BackendName = "vz"

// CompatMacOSVersion is the restore fact: the macOS version that wrote the
// save file. Apple documents that a save file restores only on the Mac
// that wrote it, not whether it survives a macOS update, so Kelpie refuses
// rather than guesses.
const CompatMacOSVersion = "macos_version"

// macOSMajorMin is the first macOS with save and restore.
const macOSMajorMin = 14

// bootArgsDefault is used when vm.Config.KernelArgs is empty (the VZ
// virtio console is hvc0).
const bootArgsDefault = "console=hvc0 reboot=k panic=-1 quiet"

// consoleLogName is the guest console's file in the VM directory.
const consoleLogName = "console.log"

// connectAttemptTimeout bounds one vsock connect: the framework may never
// complete a connect to a port no guest process listens on yet.
const connectAttemptTimeout = 2 * time.Second

// Options configure the backend.
type Options struct {
	// Dir holds VM directories, snapshot files and the host's generic
	// machine identifier.
	Dir              string
	HostID           string
	BaseImageVersion string
	Clock            hostvm.Clock
}

// NewFactory returns a VZ factory. It fails with vm.ErrUnsupported unless
// built for darwin/arm64 with cgo and run on macOS 14 or later.
func NewFactory(ctx context.Context, o Options) (*hostvm.Factory, error) {
	hv, err := newHypervisor(o.Dir)
	if err != nil {
		return nil, err
	}
	return newFactory(o, hv)
}

func newFactory(o Options, hv hypervisor) (*hostvm.Factory, error) {
	facts, err := hv.facts()
	if err != nil {
		return nil, err
	}
	if err := checkMacOS(facts.MacOSVersion); err != nil {
		return nil, err
	}
	spec := hostvm.Spec{
		Backend: BackendName, BackendVersion: facts.MacOSVersion, Arch: vm.ArchArm64, HostID: o.HostID,
		BaseImageVersion: o.BaseImageVersion, Layout: vm.LayoutSingle, HostBound: true, RequireBoot: true,
		Compat: map[string]string{CompatMacOSVersion: facts.MacOSVersion},
	}
	return hostvm.NewFactory(hostvm.Options{Spec: spec, Driver: &driver{hv: hv}, Dir: o.Dir, Clock: o.Clock})
}

func checkMacOS(v string) error {
	major, err := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	if err != nil {
		return fmt.Errorf("vz: macOS version %q unreadable: %w", v, vm.ErrUnsupported)
	}
	if major < macOSMajorMin {
		return fmt.Errorf("vz: macOS %s cannot save or restore a VM (needs %d or later): %w", v, macOSMajorMin, vm.ErrUnsupported)
	}
	return nil
}

// hostFacts is what this Mac offers a snapshot.
type hostFacts struct {
	MacOSVersion string // e.g. "14.5"
}

// hypervisor is the framework, as little of it as the driver needs.
type hypervisor interface {
	facts() (hostFacts, error)
	// newMachine configures a VM without starting it. The configuration
	// depends only on s and this host, because a save file restores only
	// into an identically configured VM.
	newMachine(ctx context.Context, s machineSpec) (vzMachine, error)
}

type machineSpec struct {
	Config     vm.Config
	BootArgs   string
	ConsoleLog string
}

// vzMachine is one VZVirtualMachine. Each call follows the framework's
// rules: start needs a stopped VM, save a paused one, restore a stopped
// one that never ran (and leaves it paused).
type vzMachine interface {
	start(ctx context.Context) error
	pause(ctx context.Context) error
	resume(ctx context.Context) error
	stop(ctx context.Context) error
	save(ctx context.Context, path string) error
	restore(ctx context.Context, path string) error
	connect(ctx context.Context, port uint32) (io.ReadWriteCloser, error)
	// done is closed when the VM stopped or failed after it ran.
	done() <-chan struct{}
}

type driver struct{ hv hypervisor }

var (
	_ hostvm.Driver        = (*driver)(nil)
	_ hostvm.ConfigChecker = (*driver)(nil)
	_ hostvm.Machine       = (*machine)(nil)
)

// CheckConfig refuses a user-mode network: its virtio-net MAC is part of
// the configuration a save file must match, and Kelpie has no per-VM MAC
// that would survive a restore into a new VM yet.
func (d *driver) CheckConfig(cfg vm.Config) error {
	if cfg.Network.HasDevice() {
		return fmt.Errorf("vz: a network is not supported yet (a save file pins the MAC address); use network %q: %w", vm.NetworkNone, vm.ErrUnsupported)
	}
	if cfg.Disk.Present() {
		return fmt.Errorf("vz: workspace disks are not supported yet (the qemu backend has them): %w", vm.ErrUnsupported)
	}
	return nil
}

func (d *driver) spec(ms hostvm.MachineSpec) machineSpec {
	args := ms.Config.KernelArgs
	if args == "" {
		args = bootArgsDefault
	}
	return machineSpec{Config: ms.Config, BootArgs: args, ConsoleLog: filepath.Join(ms.Dir, consoleLogName)}
}

// Boot configures and starts a VM and waits for its guest agent.
func (d *driver) Boot(ctx context.Context, ms hostvm.MachineSpec) (hostvm.Machine, error) {
	vzm, err := d.hv.newMachine(ctx, d.spec(ms))
	if err != nil {
		return nil, fmt.Errorf("vz: configure: %w", err)
	}
	if err := vzm.start(ctx); err != nil {
		return nil, fmt.Errorf("vz: start: %w", err)
	}
	m := newMachine(vzm)
	if _, err := m.guest.Connect(ctx); err != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		m.Shutdown(cctx)
		return nil, fmt.Errorf("vz: %w", err)
	}
	return m, nil
}

// Restore configures a fresh VM and restores the save file into it; the
// framework leaves it paused.
func (d *driver) Restore(ctx context.Context, ms hostvm.MachineSpec, f hostvm.Files) (hostvm.Machine, error) {
	if f.Memory != "" {
		return nil, fmt.Errorf("vz: a save file is one file, got a memory file: %w", vm.ErrCorrupt)
	}
	vzm, err := d.hv.newMachine(ctx, d.spec(ms))
	if err != nil {
		return nil, fmt.Errorf("vz: configure: %w", err)
	}
	if err := vzm.restore(ctx, f.State); err != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		vzm.stop(cctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("vz: restore: %w", err)
		}
		return nil, fmt.Errorf("vz: the framework refused the save file: %w: %w", err, vm.ErrIncompatible)
	}
	return newMachine(vzm), nil
}

type machine struct {
	vzm   vzMachine
	guest *hostvm.AgentGuest
}

func newMachine(vzm vzMachine) *machine {
	m := &machine{vzm: vzm}
	m.guest = hostvm.NewAgentGuest(m.dialAgent)
	return m
}

func (m *machine) dialAgent(ctx context.Context) (io.ReadWriteCloser, error) {
	select {
	case <-m.vzm.done():
		return nil, fmt.Errorf("vz: the VM stopped: %w", vm.ErrCrashed)
	default:
	}
	actx, cancel := context.WithTimeout(ctx, connectAttemptTimeout)
	defer cancel()
	return m.vzm.connect(actx, hostvm.AgentVsockPort)
}

func (m *machine) Done() <-chan struct{} { return m.vzm.done() }

func (m *machine) Pause(ctx context.Context) error  { return m.vzm.pause(ctx) }
func (m *machine) Resume(ctx context.Context) error { return m.vzm.resume(ctx) }

// Save writes one save file; the VM is paused (the core paused it).
func (m *machine) Save(ctx context.Context, f hostvm.Files) error {
	if f.Memory != "" {
		return fmt.Errorf("vz: a save file is one file, asked for a memory file: %w", vm.ErrInvalidConfig)
	}
	return m.vzm.save(ctx, f.State)
}

func (m *machine) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	return m.guest.Exec(ctx, cmd, args, opts)
}

// Shutdown force-stops the VM (its memory is discarded either way), then
// ends the agent connection and any attempt to make one.
func (m *machine) Shutdown(ctx context.Context) error {
	defer m.guest.Close()
	select {
	case <-m.vzm.done():
		return nil
	default:
	}
	return m.vzm.stop(ctx)
}

// stopTimeout bounds stopping a VM after a failure whose context ended.
const stopTimeout = 30 * time.Second

func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
}

// machineIDFile holds this host's generic machine identifier. A save file
// restores only into a VM configured identically, identifier included; the
// identifier is per host because save files are (see the package doc).
const machineIDFile = "machine-identifier"

// loadOrCreateID returns the identifier stored at path, or makes one with
// create and stores it. Link, not rename: if another process stored one
// first, both use theirs.
func loadOrCreateID(path string, create func() ([]byte, error)) ([]byte, error) {
	if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
		return b, nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	b, err := create()
	if err != nil {
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, path); err != nil {
		if theirs, rerr := os.ReadFile(path); rerr == nil && len(theirs) > 0 {
			return theirs, nil
		}
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	return b, nil
}

// vmEvent is a VZ state change as the driver cares about it.
type vmEvent int

const (
	eventTransient vmEvent = iota // starting, pausing, saving, ...
	eventActive                   // running or paused
	eventStopped
	eventError
)

// vmWatch decides from state changes when a VM is gone: on an error, or on
// a stop after it was active. A fresh VM is stopped too, and a failed
// restore returns to stopped; neither means a VM went away.
type vmWatch struct{ ran bool }

func (w *vmWatch) gone(e vmEvent) bool {
	switch e {
	case eventActive:
		w.ran = true
	case eventError:
		return true
	case eventStopped:
		return w.ran
	}
	return false
}

// call runs a blocking framework call, returning when it finishes or ctx
// ends. The framework's calls take no context; one abandoned by ctx runs
// to completion in the background.
func call(ctx context.Context, f func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
