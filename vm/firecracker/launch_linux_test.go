//go:build linux

package firecracker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/hostvm"
	"github.com/kelpie/teleport/vm/vmtest"
)

// fakeBinary makes this test binary the firecracker executable for the
// factory under test (see main_test.go).
func fakeBinary(t *testing.T) string {
	t.Helper()
	if err := usableKVM(); err != nil {
		t.Skipf("the host probe needs /dev/kvm: %v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fakeBinaryEnv, "1")
	return exe
}

// The production launcher and host probe: real processes started with
// exec, their log, kill and reaping; the process is the fake Firecracker.
func TestConformanceWithLaunchedProcesses(t *testing.T) {
	bin := fakeBinary(t)
	vmtest.Run(t, vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory {
			f, err := NewFactory(context.Background(), Options{Binary: bin, Dir: shortTempDir(t), HostID: "h", BaseImageVersion: "1.0.0"})
			if err != nil {
				t.Fatal(err)
			}
			return f
		},
		Config:  func(t *testing.T) vm.Config { return guestConfig(t) },
		Write:   set,
		Read:    get,
		Timeout: 30 * time.Second,
	})
}

func TestProbe(t *testing.T) {
	bin := fakeBinary(t)
	ctx := context.Background()
	f, err := NewFactory(ctx, Options{Binary: bin, Dir: shortTempDir(t), HostID: "h", BaseImageVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	h := f.Host()
	rel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	if h.Backend != BackendName || h.BackendVersion != fakeBinaryVersion || h.Arch != vm.HostArchitecture() ||
		h.Compat[CompatFirecrackerVersion] != fakeBinaryVersion || h.Compat[CompatCPUVendor] == "" ||
		h.Compat[CompatCPUModel] == "" || !strings.HasPrefix(string(rel), h.Compat[CompatHostKernel]+".") {
		t.Fatalf("host %+v", h)
	}
	if _, err := NewFactory(ctx, Options{Binary: "no-such-firecracker-kelpie", Dir: t.TempDir(), HostID: "h"}); !errors.Is(err, vm.ErrUnsupported) ||
		!strings.Contains(err.Error(), "KELPIE_FIRECRACKER_BIN") {
		t.Fatalf("missing binary: %v", err)
	}
	notFC := filepath.Join(t.TempDir(), "firecracker")
	os.WriteFile(notFC, []byte("#!/bin/sh\necho 'Cloud Hypervisor v40.0'\n"), 0o755)
	if _, err := NewFactory(ctx, Options{Binary: notFC, Dir: t.TempDir(), HostID: "h"}); !errors.Is(err, vm.ErrUnsupported) {
		t.Fatalf("not firecracker: %v", err)
	}
}

// The launcher's process: served API, log, kill and reaping, and the
// reason a process gives when it ends.
func TestExecLauncher(t *testing.T) {
	bin := fakeBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dir := shortTempDir(t)
	p, err := execLauncher{binary: bin}.launch(ctx, dir, "vm-1")
	if err != nil {
		t.Fatal(err)
	}
	m := &machine{dir: dir, proc: p, api: NewClient(filepath.Join(dir, apiSocketName))}
	if err := m.waitAPI(ctx); err != nil {
		t.Fatal(err)
	}
	if p.exitReason() != "still running" {
		t.Fatalf("reason %q", p.exitReason())
	}
	// The fake announces itself just after its socket answers: wait for
	// the line, or a loaded machine kills it before it is written.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if b, _ := os.ReadFile(filepath.Join(dir, logFileName)); strings.Contains(string(b), "serving api.sock") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fake firecracker never said it serves")
		}
	}
	if err := p.kill(ctx); err != nil {
		t.Fatal(err)
	}
	if why := p.exitReason(); !strings.Contains(why, "signal: killed") || !strings.Contains(why, "fake firecracker: serving api.sock") {
		t.Fatalf("reason %q", why)
	}
	if err := p.kill(ctx); err != nil {
		t.Fatalf("second kill: %v", err)
	}

	// A binary that dies at once: waitAPI says so, with its words.
	boom := filepath.Join(t.TempDir(), "firecracker")
	os.WriteFile(boom, []byte("#!/bin/sh\necho 'Error: KVM_CREATE_VM failed' >&2\nexit 3\n"), 0o755)
	dir2 := shortTempDir(t)
	p2, err := execLauncher{binary: boom}.launch(ctx, dir2, "vm-2")
	if err != nil {
		t.Fatal(err)
	}
	m2 := &machine{dir: dir2, proc: p2, api: NewClient(filepath.Join(dir2, apiSocketName))}
	err = m2.waitAPI(ctx)
	if !errors.Is(err, vm.ErrCrashed) || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "KVM_CREATE_VM failed") {
		t.Fatalf("waitAPI: %v", err)
	}
}

// A Firecracker killed behind Kelpie's back makes the VM Crashed.
func TestLaunchedProcessDeath(t *testing.T) {
	bin := fakeBinary(t)
	ctx := context.Background()
	f, err := NewFactory(ctx, Options{Binary: bin, Dir: shortTempDir(t), HostID: "h", BaseImageVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	inst, err := f.Create(ctx, guestConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	dir := inst.(*hostvm.Instance).Dir()
	cwds, _ := filepath.Glob("/proc/[0-9]*/cwd")
	killed := 0
	for _, c := range cwds {
		if target, err := os.Readlink(c); err == nil && target == dir {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(c)))
			if proc, err := os.FindProcess(pid); err == nil && proc.Kill() == nil {
				killed++
			}
		}
	}
	if killed != 1 {
		t.Fatalf("%d processes run in the VM directory, want 1", killed)
	}
	deadline := time.Now().Add(10 * time.Second)
	for inst.State() != vm.StateCrashed && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := inst.Exec(ctx, "echo", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("exec after kill: %v", err)
	}
	if err := inst.Stop(ctx); err != nil || inst.State() != vm.StateStopped {
		t.Fatalf("stop: %v %s", err, inst.State())
	}
	if err := inst.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
}
