package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

func init() {
	register(command{"demo", "run a whole teleport: snapshot, pack, store, fetch, validate, restore", cmdDemo})
}

// qemuDemo is set by the QEMU backend's file: it reports whether a real VM
// can run here (and why not), and runs the real demo when it can.
var qemuDemo func(ctx context.Context, e *env) (usable bool, why string, err error)

func cmdDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "demo")
	backend := fs.String("backend", "auto", "auto (qemu when usable, else sim), qemu or sim")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: kelpie demo [--backend auto|qemu|sim]")
	}
	switch *backend {
	case "sim":
		return simDemo(ctx, e)
	case "qemu", "auto":
		if qemuDemo == nil {
			if *backend == "qemu" {
				return fmt.Errorf("this build has no QEMU backend: %w", vm.ErrUnsupported)
			}
			fmt.Fprintln(e.stdout, "demo: using the simulated backend (this build has no QEMU backend)")
			return simDemo(ctx, e)
		}
		usable, why, err := qemuDemo(ctx, e)
		if usable || err != nil || *backend == "qemu" {
			if !usable && err == nil {
				return fmt.Errorf("QEMU is not usable here: %s", why)
			}
			return err
		}
		fmt.Fprintf(e.stdout, "demo: using the simulated backend because QEMU is not usable here: %s\n", why)
		return simDemo(ctx, e)
	}
	return usagef("--backend %q: want auto, qemu or sim", *backend)
}

type wallClock struct{}

func (wallClock) Now() time.Time { return time.Now() }

// simDemo teleports a simulated VM between two hosts through a real
// filesystem store, printing each step.
func simDemo(ctx context.Context, e *env) error {
	dir, err := os.MkdirTemp("", "kelpie-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	store, err := fs.Open(filepath.Join(dir, "packages"))
	if err != nil {
		return err
	}
	say := func(format string, args ...any) { fmt.Fprintf(e.stdout, format+"\n", args...) }
	stepper := func(host string) func(string, time.Duration) {
		return func(step string, d time.Duration) {
			say("  [%s] %-14s %8.3f ms", host, step, float64(d.Microseconds())/1000)
		}
	}
	arch := vm.HostArchitecture()
	mk := func(host string) (*sim.Factory, *service.Service) {
		f := sim.NewFactory(sim.Options{HostID: host, Arch: arch, BaseImageVersion: baseImageVersion, Clock: wallClock{}})
		return f, &service.Service{Store: store, Factory: f, Clock: wallClock{}, NewID: func() string { return newPackageID("demo") }, OnStep: stepper(host)}
	}
	fa, a := mk("host-a")
	_, b := mk("host-b")

	say("Kelpie Teleport demo (simulated VM backend, real filesystem store at %s)", store.Root())
	src, err := fa.Create(ctx, vm.Config{Name: "agent-vm", VCPUs: 2, MemoryMiB: 512})
	if err != nil {
		return err
	}
	if err := src.Start(ctx); err != nil {
		return err
	}
	say("1. host-a: VM %s running (%s, backend sim)", src.ID(), arch)
	for _, kv := range [][2]string{{"task", "summarise-logs"}, {"progress", "41"}} {
		if _, err := src.Exec(ctx, "set", kv[:], vm.ExecOptions{}); err != nil {
			return err
		}
	}
	res, err := src.Exec(ctx, "incr", []string{"progress"}, vm.ExecOptions{})
	if err != nil {
		return err
	}
	before := src.(*sim.VM).GuestState()
	say("2. host-a: guest state written (progress=%s), guest hash %s", strings.TrimSpace(string(res.Stdout)), sim.GuestHash(before))

	say("3. host-a: teleport out (pause, snapshot, pack KLP1, upload, stop source)")
	t0 := time.Now()
	pkg, err := a.Out(ctx, src, service.OutRequest{AgentID: "agent-1", AgentState: []byte(`{"conversation":"turn 7"}`), Kind: teleport.KindTeleport})
	if err != nil {
		return err
	}
	say("   package %s committed: %s, blob sha256 %s…, %d bytes (%.3f ms); source is %s", pkg.ID, pkg.Kind, pkg.BlobSHA256[:12], pkg.SizeBytes, ms(time.Since(t0)), src.State())

	res2, err := verifyPackage(ctx, store, pkg.ID)
	if err != nil {
		return err
	}
	say("4. store: package verified (%d sections, checksums match)", res2.Sections)

	say("5. host-b: teleport in (fetch, validate rules, verify checksums, restore, resume)")
	t0 = time.Now()
	dst, got, err := b.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if err != nil {
		return err
	}
	after := dst.(*sim.VM).GuestState()
	say("   VM %s is %s on host-b (%.3f ms); agent state %s", dst.ID(), dst.State(), ms(time.Since(t0)), got.AgentState)
	if sim.GuestHash(after) != sim.GuestHash(before) {
		return fmt.Errorf("demo: restored guest state %v differs from the snapshot's %v", after, before)
	}
	res, err = dst.Exec(ctx, "incr", []string{"progress"}, vm.ExecOptions{})
	if err != nil {
		return err
	}
	say("6. host-b: guest state identical (hash %s); the agent continues: progress=%s", sim.GuestHash(after), strings.TrimSpace(string(res.Stdout)))

	say("7. a rule the system enforces: the same package on an arm64 host")
	other := sim.NewFactory(sim.Options{HostID: "host-c", Arch: otherArch(arch), BaseImageVersion: baseImageVersion})
	if _, err := teleport.Check(pkg, other.Host()); err != nil {
		say("   refused, as it must be: %v", err)
	} else {
		return fmt.Errorf("demo: a cross-architecture restore was not refused")
	}
	say("demo complete: the simulated agent moved from host-a to host-b with its memory intact")
	return dst.Destroy(ctx)
}

func otherArch(a vm.Architecture) vm.Architecture {
	if a == vm.ArchArm64 {
		return vm.ArchX86_64
	}
	return vm.ArchArm64
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
