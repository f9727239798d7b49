//go:build linux

package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/kelpie/teleport/vm"
)

// logTailBytes is how much of a dead process's log an error quotes.
const logTailBytes = 512

// probe finds the binary and reads this host's restore facts.
func probe(ctx context.Context, binary string) (hostFacts, launcher, error) {
	var h hostFacts
	path, err := exec.LookPath(binary)
	if err != nil {
		return h, nil, fmt.Errorf("firecracker binary %q not found (set KELPIE_FIRECRACKER_BIN): %v: %w", binary, err, vm.ErrUnsupported)
	}
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return h, nil, fmt.Errorf("%s --version: %v: %w", path, err, vm.ErrUnsupported)
	}
	if h.Version, err = parseVersionOutput(string(out)); err != nil {
		return h, nil, err
	}
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return h, nil, fmt.Errorf("firecracker needs read/write access to /dev/kvm: %v: %w", err, vm.ErrUnsupported)
	}
	kvm.Close()
	cpu, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return h, nil, fmt.Errorf("firecracker host facts: %w", err)
	}
	h.CPUVendor, h.CPUModel, err = parseCPUInfo(cpu)
	cpu.Close()
	if err != nil {
		return h, nil, err
	}
	rel, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return h, nil, fmt.Errorf("firecracker host facts: %w", err)
	}
	if h.KernelClass, err = kernelClass(string(rel)); err != nil {
		return h, nil, err
	}
	h.Arch = vm.HostArchitecture()
	return h, execLauncher{binary: path}, nil
}

// execLauncher runs the firecracker binary.
type execLauncher struct{ binary string }

func (l execLauncher) launch(ctx context.Context, dir, id string) (process, error) {
	logPath := filepath.Join(dir, logFileName)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("firecracker log: %w", err)
	}
	// Not CommandContext: the VM outlives the call that started it.
	cmd := exec.Command(l.binary, "--api-sock", apiSocketName, "--id", id)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf // serial console and Firecracker's log
	// Its own process group: a ^C at the terminal reaches kelpie, which
	// then stops its VMs in order, not Firecracker directly. Pdeathsig: a
	// VM nobody can reach any more (kelpie died, and there is no re-attach)
	// must not run on as an orphan.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", l.binary, err)
	}
	p := &execProcess{cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return p, nil
}

type execProcess struct {
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error // set before exited is closed
}

func (p *execProcess) done() <-chan struct{} { return p.exited }

func (p *execProcess) kill(ctx context.Context) error {
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for firecracker (pid %d) to exit: %w", p.cmd.Process.Pid, ctx.Err())
	}
}

func (p *execProcess) exitReason() string {
	select {
	case <-p.exited:
	default:
		return "still running"
	}
	why := "exit status 0"
	if p.waitErr != nil {
		why = p.waitErr.Error()
	}
	if b, err := os.ReadFile(p.logPath); err == nil && len(b) > 0 {
		if len(b) > logTailBytes {
			b = b[len(b)-logTailBytes:]
		}
		why += "; log: " + strings.Join(strings.Fields(string(bytes.ToValidUTF8(b, nil))), " ")
	}
	return why
}
