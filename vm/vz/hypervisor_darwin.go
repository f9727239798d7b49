//go:build darwin && arm64 && cgo

package vz

// The only file that touches Virtualization.framework (via
// github.com/Code-Hex/vz/v3 v3.7.1). Everything it does is a direct call;
// the order of calls and all checks live in vz.go and vm/hostvm.

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"syscall"

	vzfw "github.com/Code-Hex/vz/v3"

	"github.com/kelpie/teleport/vm"
)

func newHypervisor(dir string) (hypervisor, error) { return &appleVZ{dir: dir}, nil }

type appleVZ struct{ dir string }

func (a *appleVZ) facts() (hostFacts, error) {
	v, err := syscall.Sysctl("kern.osproductversion")
	if err != nil {
		return hostFacts{}, fmt.Errorf("vz: read the macOS version: %w", err)
	}
	return hostFacts{MacOSVersion: v}, nil
}

func (a *appleVZ) machineID() (*vzfw.GenericMachineIdentifier, error) {
	b, err := loadOrCreateID(filepath.Join(a.dir, machineIDFile), func() ([]byte, error) {
		id, err := vzfw.NewGenericMachineIdentifier()
		if err != nil {
			return nil, err
		}
		return id.DataRepresentation(), nil
	})
	if err != nil {
		return nil, err
	}
	return vzfw.NewGenericMachineIdentifierWithData(b)
}

func (a *appleVZ) newMachine(ctx context.Context, s machineSpec) (vzMachine, error) {
	c := s.Config
	boot, err := vzfw.NewLinuxBootLoader(c.Kernel, vzfw.WithCommandLine(s.BootArgs), vzfw.WithInitrd(c.Initrd))
	if err != nil {
		return nil, err
	}
	conf, err := vzfw.NewVirtualMachineConfiguration(boot, uint(c.VCPUs), uint64(c.MemoryMiB)<<20)
	if err != nil {
		return nil, err
	}
	id, err := a.machineID()
	if err != nil {
		return nil, fmt.Errorf("machine identifier: %w", err)
	}
	platform, err := vzfw.NewGenericPlatformConfiguration(vzfw.WithGenericMachineIdentifier(id))
	if err != nil {
		return nil, err
	}
	conf.SetPlatformVirtualMachineConfiguration(platform)
	console, err := vzfw.NewFileSerialPortAttachment(s.ConsoleLog, true)
	if err != nil {
		return nil, err
	}
	serial, err := vzfw.NewVirtioConsoleDeviceSerialPortConfiguration(console)
	if err != nil {
		return nil, err
	}
	conf.SetSerialPortsVirtualMachineConfiguration([]*vzfw.VirtioConsoleDeviceSerialPortConfiguration{serial})
	entropy, err := vzfw.NewVirtioEntropyDeviceConfiguration()
	if err != nil {
		return nil, err
	}
	conf.SetEntropyDevicesVirtualMachineConfiguration([]*vzfw.VirtioEntropyDeviceConfiguration{entropy})
	sock, err := vzfw.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return nil, err
	}
	conf.SetSocketDevicesVirtualMachineConfiguration([]vzfw.SocketDeviceConfiguration{sock})
	if c.RootDisk != "" {
		// Read-only: the save file does not carry the disk.
		att, err := vzfw.NewDiskImageStorageDeviceAttachment(c.RootDisk, true)
		if err != nil {
			return nil, err
		}
		blk, err := vzfw.NewVirtioBlockDeviceConfiguration(att)
		if err != nil {
			return nil, err
		}
		conf.SetStorageDevicesVirtualMachineConfiguration([]vzfw.StorageDeviceConfiguration{blk})
	}
	if ok, err := conf.Validate(); !ok || err != nil {
		return nil, fmt.Errorf("invalid configuration (%v): %w", err, vm.ErrInvalidConfig)
	}
	if ok, err := conf.ValidateSaveRestoreSupport(); !ok || err != nil {
		return nil, fmt.Errorf("this configuration cannot be saved and restored (%v): %w", err, vm.ErrUnsupported)
	}
	v, err := vzfw.NewVirtualMachine(conf)
	if err != nil {
		return nil, err
	}
	m := &appleMachine{v: v, exited: make(chan struct{})}
	go m.watch()
	return m, nil
}

type appleMachine struct {
	v      *vzfw.VirtualMachine
	once   sync.Once
	exited chan struct{}
}

func (m *appleMachine) finish() { m.once.Do(func() { close(m.exited) }) }

// watch finishes the machine when the VM is gone (see vmWatch).
func (m *appleMachine) watch() {
	var w vmWatch
	states := m.v.StateChangedNotify()
	for {
		select {
		case <-m.exited:
			return
		case s := <-states:
			if w.gone(event(s)) {
				m.finish()
				return
			}
		}
	}
}

func event(s vzfw.VirtualMachineState) vmEvent {
	switch s {
	case vzfw.VirtualMachineStateRunning, vzfw.VirtualMachineStatePaused:
		return eventActive
	case vzfw.VirtualMachineStateStopped:
		return eventStopped
	case vzfw.VirtualMachineStateError:
		return eventError
	}
	return eventTransient
}

func (m *appleMachine) done() <-chan struct{} { return m.exited }

func (m *appleMachine) start(ctx context.Context) error {
	return call(ctx, func() error { return m.v.Start() })
}

// stop force-stops the VM; the machine is finished whatever the result
// (a VM that never ran has nothing to stop).
func (m *appleMachine) stop(ctx context.Context) error {
	defer m.finish()
	return call(ctx, m.v.Stop)
}

func (m *appleMachine) pause(ctx context.Context) error  { return call(ctx, m.v.Pause) }
func (m *appleMachine) resume(ctx context.Context) error { return call(ctx, m.v.Resume) }

func (m *appleMachine) save(ctx context.Context, path string) error {
	return call(ctx, func() error { return m.v.SaveMachineStateToPath(path) })
}

func (m *appleMachine) restore(ctx context.Context, path string) error {
	return call(ctx, func() error { return m.v.RestoreMachineStateFromURL(path) })
}

func (m *appleMachine) connect(ctx context.Context, port uint32) (io.ReadWriteCloser, error) {
	devs := m.v.SocketDevices()
	if len(devs) == 0 {
		return nil, fmt.Errorf("the VM has no virtio socket device: %w", vm.ErrUnsupported)
	}
	type result struct {
		conn *vzfw.VirtioSocketConnection
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := devs[0].Connect(port)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		return r.conn, nil
	case <-ctx.Done():
		// A connect that completes after we gave up must not leak.
		go func() {
			if r := <-ch; r.err == nil && r.conn != nil {
				r.conn.Close()
			}
		}()
		return nil, ctx.Err()
	}
}
