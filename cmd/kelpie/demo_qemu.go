package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/qemu"
)

func init() { qemuDemo = runQEMUDemo }

// demoCounter counts in a guest shell's memory and publishes the count to
// tmpfs every 100 ms.
// readCounterScript reads the counter, retrying the instant when the
// counter's shell has truncated the file and not yet written it.
const readCounterScript = `c=; while [ -z "$c" ]; do c=$(cat /tmp/counter 2>/dev/null || echo 0); done; echo $c`

const demoCounter = `setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`

// runQEMUDemo teleports a real VM between two Kelpie homes (two hosts) on
// this machine through a filesystem store, and shows that a guest process
// kept counting. It reports usable=false (with the reason) when QEMU or
// the guest image is missing, so the demo can fall back to the simulation.
func runQEMUDemo(ctx context.Context, e *env) (bool, string, error) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return false, "qemu-system-x86_64 is not installed (run `kelpie image build`)", nil
	}
	if _, err := image.CurrentDir(); err != nil {
		return false, fmt.Sprintf("the guest image is not built (%v)", err), nil
	}
	// Settle the accelerator once in this host's home (the KVM probe is
	// cached there), then use it for both demo hosts.
	f0, err := qemuFactory(ctx, e, "")
	if err != nil {
		if errors.Is(err, vm.ErrUnsupported) {
			return false, err.Error(), nil
		}
		return false, "", err
	}
	accel, why := f0.Accel()

	dir, err := os.MkdirTemp("", "kelpie-qemu-demo-")
	if err != nil {
		return true, "", err
	}
	defer os.RemoveAll(dir)
	store, err := fs.Open(filepath.Join(dir, "store"))
	if err != nil {
		return true, "", err
	}
	say := func(format string, args ...any) { fmt.Fprintf(e.stdout, format+"\n", args...) }
	mk := func(host string) (*qemu.Factory, *service.Service, error) {
		f, err := qemu.NewFactory(ctx, qemu.Options{Home: filepath.Join(dir, host), HostID: host, Accel: accel})
		if err != nil {
			return nil, nil, err
		}
		svc := &service.Service{Store: store, Factory: f, Clock: wallClock{}, NewID: func() string { return newPackageID("demo") },
			OnStep: func(step string, d time.Duration) { say("   [%s] %-14s %8.1f ms", host, step, ms(d)) }}
		return f, svc, nil
	}
	fa, a, err := mk("host-a")
	if err != nil {
		return true, "", err
	}
	_, b, err := mk("host-b")
	if err != nil {
		return true, "", err
	}

	say("Kelpie Teleport demo: a real QEMU VM (%s: %s) moves between two hosts", accel, why)
	say("   host-a = %s, host-b = %s, store = %s", fa.Home(), filepath.Join(dir, "host-b"), store.Root())
	t0 := time.Now()
	src, err := fa.Create(ctx, vm.Config{Name: "agent-vm", VCPUs: 1, MemoryMiB: 256})
	if err != nil {
		return true, "", err
	}
	defer src.Destroy(context.WithoutCancel(ctx))
	if err := src.Start(ctx); err != nil {
		return true, "", err
	}
	say("1. host-a: VM %s booted, guest agent ready in %.0f ms (QEMU %s, microvm, 256 MiB)", src.ID(), ms(time.Since(t0)), fa.QEMUVersion())

	run := func(inst vm.Instance, script string) (string, error) {
		res, err := inst.Exec(ctx, "sh", []string{"-c", script}, vm.ExecOptions{})
		if err != nil {
			return "", err
		}
		if res.ExitCode != 0 {
			return "", fmt.Errorf("guest %q exited %d: %s", script, res.ExitCode, strings.TrimSpace(string(res.Stderr)))
		}
		return strings.TrimSpace(string(res.Stdout)), nil
	}
	count := func(inst vm.Instance) (int, error) {
		out, err := run(inst, readCounterScript)
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(out)
	}
	pid, err := run(src, demoCounter)
	if err != nil {
		return true, "", err
	}
	bootA, err := run(src, "cat /proc/sys/kernel/random/boot_id")
	if err != nil {
		return true, "", err
	}
	var before int
	for before < 10 {
		// Let the guest count for a second.
		select {
		case <-ctx.Done():
			return true, "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if before, err = count(src); err != nil {
			return true, "", err
		}
	}
	say("2. host-a: guest process %s counts in its own memory; counter = %d", pid, before)

	say("3. host-a: teleport out (pause, snapshot device state + sparse RAM, pack KLP1, commit, stop source)")
	t0 = time.Now()
	pkg, err := a.Out(ctx, src, service.OutRequest{AgentID: "demo-agent", Kind: teleport.KindTeleport})
	if err != nil {
		return true, "", err
	}
	say("   package %s: %s, %s (RAM section %s of %d MiB guest RAM); source is %s (%.0f ms)", pkg.ID, pkg.Kind, humanBytes(pkg.SizeBytes),
		humanBytes(pkg.Snapshot.MemorySize), pkg.Snapshot.MemoryMiB, src.State(), ms(time.Since(t0)))

	say("4. host-b: teleport in (validate rules, verify checksums, stage RAM, start QEMU, load, resume)")
	t1 := time.Now()
	dst, _, err := b.In(ctx, pkg.ID, vm.Config{Name: "agent-vm"}, service.InOptions{})
	if err != nil {
		return true, "", err
	}
	defer dst.Destroy(context.WithoutCancel(ctx))
	if err := dst.(*qemu.Instance).WaitReady(ctx); err != nil {
		return true, "", err
	}
	say("   guest ready on host-b %.0f ms after teleport in began; %.0f ms after the pause on host-a", ms(time.Since(t1)), ms(time.Since(t0)))

	after, err := count(dst)
	if err != nil {
		return true, "", err
	}
	alive, err := run(dst, "kill -0 "+pid+" && echo running")
	if err != nil {
		return true, "", fmt.Errorf("demo: the counter process did not survive the teleport: %w", err)
	}
	bootB, err := run(dst, "cat /proc/sys/kernel/random/boot_id")
	if err != nil {
		return true, "", err
	}
	if after < before || bootB != bootA {
		return true, "", fmt.Errorf("demo: counter %d -> %d, boot id %s -> %s: guest memory was not carried over", before, after, bootA, bootB)
	}
	select {
	case <-ctx.Done():
		return true, "", ctx.Err()
	case <-time.After(time.Second):
	}
	later, err := count(dst)
	if err != nil {
		return true, "", err
	}
	if later <= after {
		return true, "", fmt.Errorf("demo: the counter stopped at %d on host-b", after)
	}
	say("5. host-b: process %s is %s, same boot (%s…); counter %d before, %d right after, %d a second later", pid, alive, bootB[:8], before, after, later)
	say("demo complete: a running guest moved from host-a to host-b with its memory intact")
	return true, "", nil
}
