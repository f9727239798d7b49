//go:build linux

package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/vmtest"
)

// kvmGetAPIVersion is the KVM_GET_API_VERSION ioctl; KVM's API version has
// been 12 since Linux 2.6.22.
const (
	kvmGetAPIVersion = 0xAE00
	kvmAPIVersion    = 12
)

// TestRealFirecracker runs the conformance suite against a real Firecracker
// when KELPIE_FIRECRACKER_BIN names a binary and /dev/kvm is usable. The
// guest is KELPIE_FIRECRACKER_KERNEL and KELPIE_FIRECRACKER_INITRD, or the
// Kelpie guest image (scripts/build-image.sh); its agent must listen on
// vsock port hostvm.AgentVsockPort.
func TestRealFirecracker(t *testing.T) {
	bin := os.Getenv("KELPIE_FIRECRACKER_BIN")
	if bin == "" {
		t.Skip("KELPIE_FIRECRACKER_BIN is not set: no real Firecracker run (TestConformanceAgainstFakeFirecracker covers the driver against the API contract)")
	}
	if err := usableKVM(); err != nil {
		t.Skipf("no usable KVM for Firecracker: %v", err)
	}
	kernel, initrd := os.Getenv("KELPIE_FIRECRACKER_KERNEL"), os.Getenv("KELPIE_FIRECRACKER_INITRD")
	if kernel == "" || initrd == "" {
		dir, err := image.CurrentDir()
		if err != nil {
			t.Skipf("no guest kernel: set KELPIE_FIRECRACKER_KERNEL and KELPIE_FIRECRACKER_INITRD or build the image (%v)", err)
		}
		kernel, initrd = filepath.Join(dir, image.VmlinuxFile), filepath.Join(dir, image.InitramfsFile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	home := shortTempDir(t)
	f, err := NewFactory(ctx, Options{Binary: bin, Dir: home, HostID: "integration", BaseImageVersion: "1.0.0"})
	if err != nil {
		t.Fatalf("firecracker backend: %v", err)
	}
	t.Logf("firecracker %s, facts %v", f.Host().BackendVersion, f.Host().Compat)
	vmtest.Run(t, vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return f },
		Config: func(t *testing.T) vm.Config {
			return vm.Config{VCPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: initrd}
		},
		Write: func(ctx context.Context, inst vm.Instance, k, v string) error {
			_, err := inst.Exec(ctx, "sh", []string{"-c", `mkdir -p /tmp/kv && printf %s "$2" > /tmp/kv/"$1"`, "sh", k, v}, vm.ExecOptions{})
			return err
		},
		Read: func(ctx context.Context, inst vm.Instance, k string) (string, error) {
			res, err := inst.Exec(ctx, "cat", []string{"/tmp/kv/" + k}, vm.ExecOptions{})
			return strings.TrimSpace(string(res.Stdout)), err
		},
		Timeout: 2 * time.Minute,
	})
}

func usableKVM() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	v, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), kvmGetAPIVersion, 0)
	if errno != 0 {
		return errno
	}
	if v != kvmAPIVersion {
		return syscall.EINVAL
	}
	return nil
}
