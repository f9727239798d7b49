package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Accel is a QEMU accelerator choice.
type Accel string

// Accelerators. Auto uses KVM only where a probe showed it can run a guest.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// ParseAccel parses --accel.
func ParseAccel(s string) (Accel, error) {
	switch a := Accel(s); a {
	case AccelAuto, AccelKVM, AccelTCG:
		return a, nil
	case "":
		return AccelAuto, nil
	}
	return "", fmt.Errorf("accelerator %q (want auto, kvm or tcg): %w", s, vm.ErrInvalidConfig)
}

// accelProbeTimeout bounds the KVM probe. Under working KVM the probe
// guest prints its first console line within a second; a nested KVM that
// cannot run guests (this project's CI: kvm_pvm) accepts -accel kvm and then
// never prints at all.
const accelProbeTimeout = 6 * time.Second

// accelCacheFile, under $KELPIE_HOME, holds the probe verdict so that only
// the first kelpie on a host pays for it.
const accelCacheFile = "accel.json"

// accelVerdict is the cached probe result.
type accelVerdict struct {
	Key       string `json:"key"` // what the verdict depends on; a change re-probes
	KVMUsable bool   `json:"kvm_usable"`
	Reason    string `json:"reason"`
	ProbeMs   int64  `json:"probe_ms"`
}

// accelInputs is what resolveAccel needs.
type accelInputs struct {
	home, binary, qemuVersion string
	kernel, initrd            string
}

// resolveAccel turns a requested accelerator into the one to use and says
// why. An explicit kvm is refused (not silently replaced) when this host's
// KVM is known not to run guests.
func resolveAccel(ctx context.Context, in accelInputs, want Accel) (Accel, string, error) {
	if want == AccelTCG {
		return AccelTCG, "requested", nil
	}
	if err := kvmDeviceUsable(); err != nil {
		if want == AccelKVM {
			return "", "", fmt.Errorf("--accel kvm: %v: %w", err, vm.ErrUnsupported)
		}
		return AccelTCG, err.Error(), nil
	}
	v, err := kvmVerdict(ctx, in)
	if err != nil {
		return "", "", err
	}
	if !v.KVMUsable {
		if want == AccelKVM {
			return "", "", fmt.Errorf("--accel kvm: KVM on this host cannot run guests (%s); use --accel tcg or auto: %w", v.Reason, vm.ErrUnsupported)
		}
		return AccelTCG, v.Reason, nil
	}
	return AccelKVM, v.Reason, nil
}

func kvmDeviceUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable (%v)", errors.Unwrap(err))
	}
	f.Close()
	return nil
}

// kvmVerdict returns the cached verdict for this host, probing once.
func kvmVerdict(ctx context.Context, in accelInputs) (accelVerdict, error) {
	key := accelKey(in.qemuVersion)
	path := filepath.Join(in.home, accelCacheFile)
	if b, err := os.ReadFile(path); err == nil {
		var v accelVerdict
		if json.Unmarshal(b, &v) == nil && v.Key == key {
			return v, nil
		}
	}
	start := time.Now()
	ok, reason, err := probeKVM(ctx, in)
	if err != nil {
		return accelVerdict{}, err
	}
	v := accelVerdict{Key: key, KVMUsable: ok, Reason: reason, ProbeMs: time.Since(start).Milliseconds()}
	b, _ := json.MarshalIndent(v, "", "  ")
	if err := os.MkdirAll(in.home, 0o755); err == nil {
		writeFileAtomic(path, append(b, '\n'))
	}
	return v, nil
}

// accelKey names what a verdict depends on: the QEMU build, the host
// kernel and the CPU.
func accelKey(qemuVersion string) string {
	return strings.Join([]string{"qemu " + qemuVersion, "kernel " + kernelRelease(), "cpu " + cpuModel()}, "; ")
}

// cpuModel is /proc/cpuinfo's first "model name".
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// qemuError is the gist of a QEMU log for a one-line reason.
func qemuError(logPath string) string {
	var keep []string
	for _, l := range strings.Split(tailFile(logPath, 2000), " | ") {
		if l != "" && !strings.Contains(l, "QEMU waiting for connection") && !strings.Contains(l, "warning:") {
			keep = append(keep, strings.TrimPrefix(l, "qemu-system-x86_64: "))
		}
	}
	if len(keep) == 0 {
		return "no error logged"
	}
	return strings.Join(keep, "; ")
}

// probeKVM boots the guest kernel under KVM with its serial port on a
// socket that QEMU waits for, and reads: any console output means KVM runs
// guests; an exit, an internal error or silence until the deadline means
// it does not.
func probeKVM(ctx context.Context, in accelInputs) (bool, string, error) {
	dir, err := os.MkdirTemp(in.home, "accel-probe-")
	if err != nil {
		return false, "", err
	}
	defer os.RemoveAll(dir)
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", "kvm", "-cpu", "host",
		"-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on",
		"-m", "128M", "-smp", "1",
		"-kernel", in.kernel, "-initrd", in.initrd,
		"-append", "console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1",
		"-chardev", "socket,id=ser,path=serial.sock,server=on,wait=on",
		"-serial", "chardev:ser",
	}
	p, err := spawn(in.binary, args, dir, filepath.Join(dir, "qemu.log"))
	if err != nil {
		return false, "", err
	}
	defer p.kill(context.WithoutCancel(ctx))
	pctx, cancel := context.WithTimeout(ctx, accelProbeTimeout)
	defer cancel()
	conn, err := dialUnix(pctx, filepath.Join(dir, "serial.sock"))
	if err != nil {
		if ctx.Err() != nil {
			return false, "", ctx.Err()
		}
		return false, fmt.Sprintf("QEMU -accel kvm did not start (%s)", qemuError(filepath.Join(dir, "qemu.log"))), nil
	}
	defer conn.Close()
	got := make(chan error, 1)
	go func() {
		var b [64]byte
		n, err := conn.Read(b[:])
		if n > 0 {
			err = nil
		} else if err == nil {
			err = errors.New("no output")
		}
		got <- err
	}()
	select {
	case err := <-got:
		if err == nil {
			return true, "the KVM probe guest booted", nil
		}
		return false, fmt.Sprintf("the KVM probe guest died before printing anything (%s)", qemuError(filepath.Join(dir, "qemu.log"))), nil
	case <-p.done():
		return false, fmt.Sprintf("QEMU exited under KVM (%s)", qemuError(filepath.Join(dir, "qemu.log"))), nil
	case <-pctx.Done():
		if ctx.Err() != nil {
			return false, "", ctx.Err()
		}
		return false, fmt.Sprintf("QEMU accepts -accel kvm but the guest printed nothing in %v (a nested KVM that cannot run guests)", accelProbeTimeout), nil
	}
}

// writeFileAtomic writes path through a temporary sibling and a rename.
func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}
