package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
)

func init() {
	register(command{"demo", "run a whole teleport: snapshot, pack, store, fetch, validate, restore", cmdDemo})
}

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
		usable, why, err := qemuDemo(ctx, e)
		if usable || err != nil || *backend == "qemu" {
			if !usable && err == nil {
				return fmt.Errorf("QEMU is not usable here: %s: %w", why, vm.ErrUnsupported)
			}
			return err
		}
		fmt.Fprintf(e.stdout, "demo: using the simulated backend because QEMU is not usable here: %s\n", why)
		return simDemo(ctx, e)
	}
	return usagef("--backend %q: want auto, qemu or sim", *backend)
}

// demoHosts opens two hosts, host-a and host-b, in homes under dir, that
// print each step of a teleport.
func demoHosts(ctx context.Context, e *env, dir string, backends []host.Backend, say func(string, ...any)) (a, b *host.Host, err error) {
	open := func(name string) (*host.Host, error) {
		return host.Open(ctx, host.Options{Home: filepath.Join(dir, name), HostID: name, Backends: backends,
			OnStep: func(op, step string, d time.Duration) { say("   [%s] %-14s %8.1f ms", name, step, ms(d)) }})
	}
	if a, err = open("host-a"); err != nil {
		return nil, nil, err
	}
	if b, err = open("host-b"); err != nil {
		a.Close()
		return nil, nil, err
	}
	return a, b, nil
}

// simDemo teleports a simulated VM between two hosts through a real
// filesystem store, printing each step.
func simDemo(ctx context.Context, e *env) error {
	dir, err := os.MkdirTemp("", "kelpie-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	store := filepath.Join(dir, "packages")
	say := func(format string, args ...any) { fmt.Fprintf(e.stdout, format+"\n", args...) }
	a, b, err := demoHosts(ctx, e, dir, []host.Backend{host.SimBackend()}, say)
	if err != nil {
		return err
	}
	defer a.Close()
	defer b.Close()
	exec := func(h *host.Host, cmd string, args ...string) (string, error) {
		res, err := h.Exec(ctx, "agent-vm", cmd, args, vm.ExecOptions{})
		if err != nil {
			return "", err
		}
		if res.ExitCode != 0 {
			return "", fmt.Errorf("demo: guest %s exited %d: %s", cmd, res.ExitCode, res.Stderr)
		}
		return strings.TrimSpace(string(res.Stdout)), nil
	}

	say("Kelpie Teleport demo (simulated VM backend, real filesystem store at %s)", store)
	info, err := a.CreateVM(ctx, host.VMSpec{Name: "agent-vm", VCPUs: 2, MemoryMiB: 512})
	if err != nil {
		return err
	}
	say("1. host-a: VM %s %s (%s, backend %s)", info.Name, info.State, vm.HostArchitecture(), info.Backend)
	exec(a, "set", "task", "summarise-logs")
	exec(a, "set", "progress", "41")
	progress, err := exec(a, "incr", "progress")
	if err != nil {
		return err
	}
	before, err := exec(a, "hash")
	if err != nil {
		return err
	}
	say("2. host-a: guest state written (progress=%s), guest hash %s", progress, before)

	say("3. host-a: teleport out (pause, snapshot, pack KLP1, upload, stop source)")
	t0 := time.Now()
	out, err := a.TeleportOut(ctx, "agent-vm", host.OutRequest{Store: store, AgentID: "agent-1", AgentState: []byte(`{"conversation":"turn 7"}`)})
	if err != nil {
		return err
	}
	pkg := out.Package
	say("   package %s committed: %s, blob sha256 %s…, %d bytes (%.3f ms); source removed: %v", pkg.ID, pkg.Kind, pkg.BlobSHA256[:12], pkg.SizeBytes, ms(time.Since(t0)), out.SourceRemoved)

	v, err := b.VerifyPackage(ctx, store, pkg.ID)
	if err != nil {
		return err
	}
	say("4. store: package verified (%d sections: %s)", v.SectionsVerified, strings.Join(v.Sections, ", "))

	say("5. host-b: teleport in (fetch, validate rules, verify checksums, restore, resume)")
	t0 = time.Now()
	in, err := b.TeleportIn(ctx, pkg.ID, host.InRequest{Store: store, Name: "agent-vm"})
	if err != nil {
		return err
	}
	say("   VM %s is %s on host-b (%.3f ms); agent state %s", in.VM.Name, in.VM.State, ms(time.Since(t0)), in.Package.AgentState)
	after, err := exec(b, "hash")
	if err != nil {
		return err
	}
	if after != before {
		return fmt.Errorf("demo: restored guest state %s differs from the snapshot's %s", after, before)
	}
	progress, err = exec(b, "incr", "progress")
	if err != nil {
		return err
	}
	say("6. host-b: guest state identical (hash %s); the agent continues: progress=%s", after, progress)

	say("7. a rule the system enforces: the same package on a host of another architecture")
	other, err := b.Info(ctx, "sim")
	if err != nil {
		return err
	}
	other.Arch, other.HostID = otherArch(other.Arch), "host-c"
	if _, err := teleport.Check(pkg, other); err == nil {
		return fmt.Errorf("demo: a cross-architecture restore was not refused")
	} else {
		say("   refused, as it must be: %v", err)
	}
	say("demo complete: the simulated agent moved from host-a to host-b with its memory intact")
	_, err = b.RemoveVM(ctx, "agent-vm")
	return err
}

func otherArch(a vm.Architecture) vm.Architecture {
	if a == vm.ArchArm64 {
		return vm.ArchX86_64
	}
	return vm.ArchArm64
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
