package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/vm"
)

// needQEMU skips the test, saying why, unless QEMU and the guest image are
// present. KELPIE_QEMU_TESTS=1 turns a missing QEMU or image into a
// failure (CI installs both), KELPIE_QEMU_TESTS=0 skips.
func needQEMU(t testing.TB) {
	t.Helper()
	mode := os.Getenv("KELPIE_QEMU_TESTS")
	if mode == "0" {
		t.Skip("KELPIE_QEMU_TESTS=0: real-VM tests disabled")
	}
	skip := t.Skipf
	if mode == "1" {
		skip = t.Fatalf
	}
	if _, err := exec.LookPath(binaryDefault); err != nil {
		skip("%s is not installed (run `kelpie image build` or scripts/setup-qemu.sh): %v", binaryDefault, err)
	}
	if _, err := image.CurrentDir(); err != nil {
		skip("guest image missing (run `kelpie image build`): %v", err)
	}
}

// newTestFactory makes a TCG factory on a fresh home (a "host").
func newTestFactory(t testing.TB, hostID string) *Factory {
	t.Helper()
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, err := NewFactory(ctx, Options{Home: t.TempDir(), HostID: hostID, Accel: AccelTCG})
	if err != nil {
		t.Fatalf("NewFactory: %v", err)
	}
	return f
}

func testConfig(name string, memMiB int) vm.Config {
	return vm.Config{Name: name, VCPUs: 1, MemoryMiB: memMiB}
}

// shell runs a guest shell command and returns trimmed stdout.
func shell(ctx context.Context, inst vm.Instance, script string) (string, error) {
	res, err := inst.Exec(ctx, "sh", []string{"-c", script}, vm.ExecOptions{})
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("%q exited %d: %s", script, res.ExitCode, res.Stderr)
	}
	return strings.TrimSpace(string(res.Stdout)), nil
}

func mustShell(t testing.TB, ctx context.Context, inst vm.Instance, script string) string {
	t.Helper()
	out, err := shell(ctx, inst, script)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// bootVM creates and starts a VM destroyed at cleanup.
func bootVM(t testing.TB, ctx context.Context, f *Factory, cfg vm.Config) *Instance {
	t.Helper()
	inst, err := f.create(ctx, cfg)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { inst.Destroy(context.Background()) })
	if err := inst.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	return inst
}
