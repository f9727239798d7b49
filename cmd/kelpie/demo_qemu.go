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

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
)

// demoCounter counts in a guest shell's memory and publishes the count to
// tmpfs every 100 ms.
// readCounterScript reads the counter, retrying the instant when the
// counter's shell has truncated the file and not yet written it.
const readCounterScript = `c=; while [ -z "$c" ]; do c=$(cat /tmp/counter 2>/dev/null || echo 0); done; echo $c`

const demoCounter = `setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`

// qemuDemo teleports a real VM between two Kelpie homes (two hosts) on
// this machine through a filesystem store, and shows that a guest process
// kept counting. It reports usable=false (with the reason) when QEMU or
// the guest image is missing, so the demo can fall back to the simulation.
func qemuDemo(ctx context.Context, e *env) (bool, string, error) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return false, "qemu-system-x86_64 is not installed (run `kelpie image build`)", nil
	}
	if _, err := image.CurrentDir(); err != nil {
		return false, fmt.Sprintf("the guest image is not built (%v)", err), nil
	}
	dir, err := os.MkdirTemp("", "kelpie-qemu-demo-")
	if err != nil {
		return true, "", err
	}
	defer os.RemoveAll(dir)
	store := filepath.Join(dir, "store")
	say := func(format string, args ...any) { fmt.Fprintf(e.stdout, format+"\n", args...) }
	cfg := host.BackendConfigFromEnv(e.getenv)
	a, b, err := demoHosts(ctx, e, dir, []host.Backend{host.QEMUBackend(cfg)}, say)
	if err != nil {
		return true, "", err
	}
	defer a.Close()
	defer b.Close()
	f, err := a.Factory(ctx, "qemu", "")
	if err != nil {
		if errors.Is(err, vm.ErrUnsupported) {
			return false, err.Error(), nil
		}
		return false, "", err
	}
	accel, why := "", ""
	if r, ok := f.(vm.AccelReporter); ok {
		accel, why = r.Accelerator()
	}

	say("Kelpie Teleport demo: a real QEMU VM (%s: %s) moves between two hosts", accel, why)
	say("   host-a = %s, host-b = %s, store = %s", a.Home(), b.Home(), store)
	t0 := time.Now()
	if _, err := a.CreateVM(ctx, host.VMSpec{Name: "agent-vm", VCPUs: 1, MemoryMiB: 256}); err != nil {
		return true, "", err
	}
	defer a.RemoveVM(context.WithoutCancel(ctx), "agent-vm")
	say("1. host-a: VM agent-vm booted, guest agent ready in %.0f ms (QEMU %s, microvm, 256 MiB)", ms(time.Since(t0)), f.Host().BackendVersion)

	run := func(h *host.Host, script string) (string, error) {
		res, err := h.Exec(ctx, "agent-vm", "sh", []string{"-c", script}, vm.ExecOptions{})
		if err != nil {
			return "", err
		}
		if res.ExitCode != 0 {
			return "", fmt.Errorf("guest %q exited %d: %s", script, res.ExitCode, strings.TrimSpace(string(res.Stderr)))
		}
		return strings.TrimSpace(string(res.Stdout)), nil
	}
	count := func(h *host.Host) (int, error) {
		out, err := run(h, readCounterScript)
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(out)
	}
	pid, err := run(a, demoCounter)
	if err != nil {
		return true, "", err
	}
	bootA, err := run(a, "cat /proc/sys/kernel/random/boot_id")
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
		if before, err = count(a); err != nil {
			return true, "", err
		}
	}
	say("2. host-a: guest process %s counts in its own memory; counter = %d", pid, before)

	say("3. host-a: teleport out (pause, snapshot, pack KLP1 v2: chunk, hash, compress; upload new chunks, commit, stop source)")
	t0 = time.Now()
	out, err := a.TeleportOut(ctx, "agent-vm", host.OutRequest{Store: store, AgentID: "demo-agent"})
	if err != nil {
		return true, "", err
	}
	pkg := out.Package
	if pkg.Format == blob.Version2 {
		say("   package %s: %s, KLP1 v2: %s stored in %d chunks (%s new) for %s of device state and guest RAM; source removed: %v (%.0f ms)",
			pkg.ID, pkg.Kind, humanBytes(pkg.StoredBytes), pkg.Chunks, humanBytes(pkg.NewBytes), humanBytes(pkg.LogicalBytes), out.SourceRemoved, ms(time.Since(t0)))
	} else {
		say("   package %s: %s, KLP1 v1: %s (RAM section %s of %d MiB guest RAM); source removed: %v (%.0f ms)", pkg.ID, pkg.Kind, humanBytes(pkg.SizeBytes),
			humanBytes(pkg.Snapshot.MemorySize), pkg.Snapshot.MemoryMiB, out.SourceRemoved, ms(time.Since(t0)))
	}

	say("4. host-b: teleport in (validate rules, fetch and verify chunks, stage RAM, start QEMU, load, resume)")
	t1 := time.Now()
	if _, err := b.TeleportIn(ctx, pkg.ID, host.InRequest{Store: store, Name: "agent-vm"}); err != nil {
		return true, "", err
	}
	defer b.RemoveVM(context.WithoutCancel(ctx), "agent-vm")
	say("   guest ready on host-b %.0f ms after teleport in began; %.0f ms after the pause on host-a", ms(time.Since(t1)), ms(time.Since(t0)))

	after, err := count(b)
	if err != nil {
		return true, "", err
	}
	alive, err := run(b, "kill -0 "+pid+" && echo running")
	if err != nil {
		return true, "", fmt.Errorf("demo: the counter process did not survive the teleport: %w", err)
	}
	bootB, err := run(b, "cat /proc/sys/kernel/random/boot_id")
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
	later, err := count(b)
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
