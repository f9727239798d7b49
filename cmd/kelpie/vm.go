package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/server"
	"github.com/kelpie/teleport/vm"
)

func init() {
	register(command{"vm", "create, list, drive, snapshot, suspend and remove VMs of this host", cmdVM})
}

const vmCreateUsage = `kelpie vm create NAME [--backend qemu] [--memory MIB] [--cpus N] [--accel auto|kvm|tcg]
           [--network none|restricted|full] [--publish 127.0.0.1:HOSTPORT:GUESTPORT]... [--forward GUESTPORT:127.0.0.1:HOSTPORT]...
           [--disk SIZE] [--registry URL]`

const vmUsage = vmCreateUsage + `
       kelpie vm ls [--json]
       kelpie vm fork NAME --count N [--prefix P] [--publish 127.0.0.1:0:GUESTPORT]... [--registry URL] [--json]
       kelpie vm time NAME [--json]
       kelpie vm exec NAME [--timeout DURATION] [--workdir DIR] -- CMD [ARG...]
       kelpie vm start|pause|resume|stop|rm NAME [--registry URL]
       kelpie vm snapshot NAME --out FILE [--layout split|single] [--format v1|v2]
       kelpie vm suspend NAME [--store STORE] [--registry URL]`

func cmdVM(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", vmUsage)
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		return vmCreate(ctx, e, args)
	case "ls", "list":
		return vmList(ctx, e, args)
	case "exec":
		return vmExec(ctx, e, args)
	case "snapshot":
		return vmSnapshot(ctx, e, args)
	case "suspend":
		return vmSuspend(ctx, e, args)
	case "fork":
		return vmFork(ctx, e, args)
	case "time":
		return vmTime(ctx, e, args)
	case "resume":
		return vmResume(ctx, e, args)
	case "start", "pause", "stop", "rm":
		return vmSimple(ctx, e, sub, args)
	}
	return usagef("unknown vm command %q; usage: %s", sub, vmUsage)
}

func vmCreate(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm create")
	backend := fs.String("backend", "", "VM backend (default $KELPIE_BACKEND, else the first that runs here: qemu)")
	mem := fs.Int("memory", host.VMMemoryMiBDefault, "guest memory in MiB")
	cpus := fs.Int("cpus", host.VMCPUsDefault, "vCPUs")
	accel := fs.String("accel", "", "accelerator: auto, kvm or tcg (default $KELPIE_ACCEL or auto)")
	regFlag := fs.String("registry", "", registryFlagHelp)
	network := fs.String("network", string(host.VMNetworkDefault), "none; restricted: no egress but the --forward ports; full: full egress (production use; reaches the host's loopback too)")
	var nf netFlags
	addPublishFlag(fs, &nf, "")
	addForwardFlag(fs, &nf)
	disk := fs.String("disk", "", "a workspace disk of this size (ext4 at /workspace; sparse on the host), like 1G or 512M; default: /workspace in guest RAM")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: %s", vmCreateUsage)
	}
	if e.server != "" {
		// The network only when asked for: the daemon has its default.
		net := ""
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "network" {
				net = *network
			}
		})
		return agentCreateRemote(ctx, e, server.CreateRequest{Name: pos[0], MemoryMiB: *mem, VCPUs: *cpus, Backend: *backend}, net, &nf, *disk)
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	spec := host.VMSpec{Name: pos[0], Backend: *backend, Accel: *accel, VCPUs: *cpus, MemoryMiB: *mem}
	if spec.Network, err = checkNetworkFlag(*network); err != nil {
		return err
	}
	if spec.Publish, err = nf.published(); err != nil {
		return err
	}
	if spec.Forwards, err = nf.forwarded(); err != nil {
		return err
	}
	if *disk != "" {
		if spec.DiskBytes, err = parseSize(*disk); err != nil {
			return err
		}
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL)
	if err != nil {
		return err
	}
	start := time.Now()
	_, info, err := f.Create(ctx, spec)
	if err != nil {
		return err
	}
	sayAccel(ctx, e, h.Host, info.Backend, *accel)
	fmt.Fprintf(e.stderr, "kelpie: vm %s running (%s, %d MiB, %d vCPU, network %s%s, disk %s, ready in %.2f s)\n", info.Name, info.Backend,
		info.MemoryMiB, info.VCPUs, orNone(info.Network), portsNote(info.Ports), humanDisk(info.DiskBytes), time.Since(start).Seconds())
	fmt.Fprintln(e.stdout, info.Name)
	return nil
}

func vmList(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm ls")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: kelpie vm ls [--json]")
	}
	var vms []host.VMInfo
	if e.server != "" {
		c, err := e.client()
		if err != nil {
			return err
		}
		if vms, err = c.VMs(ctx); err != nil {
			return err
		}
	} else {
		h, err := openHost(ctx, e, false, false)
		if err != nil {
			return err
		}
		defer h.Close()
		if vms, err = h.VMs(ctx); err != nil {
			return err
		}
	}
	if *asJSON {
		return json.NewEncoder(e.stdout).Encode(vms)
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tBACKEND\tSTATE\tPID\tMEMORY\tCPUS\tACCEL\tNETWORK\tPORTS\tDISK")
	for _, v := range vms {
		state := v.State
		if v.MovedTo != "" {
			state += " (moved to " + v.MovedTo + ": rm it)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d MiB\t%d\t%s\t%s\t%s\t%s\n", v.Name, v.Backend, state, dash(v.PID), v.MemoryMiB, v.VCPUs, orDash(v.Accel),
			orDash(v.Network), humanPorts(v.Ports), humanDisk(v.DiskBytes))
	}
	return tw.Flush()
}

func portsNote(ps []vm.PortBinding) string {
	if len(ps) == 0 {
		return ""
	}
	return ", ports " + humanPorts(ps)
}

// vmFork snapshots a VM once and restores copies of it; stdout lists the
// copies' names, one a line.
func vmFork(ctx context.Context, e *env, args []string) error {
	if e.server != "" {
		return usagef("vm fork is not served through a daemon yet; run it on the host")
	}
	const usage = "usage: kelpie vm fork NAME --count N [--prefix P] [--publish 127.0.0.1:0:GUESTPORT]... [--registry URL] [--json]"
	fs := newFlags(e, "vm fork")
	count := fs.Int("count", 0, "how many copies")
	prefix := fs.String("prefix", "", "name the copies PREFIX1..PREFIXN (default NAME-)")
	asJSON := fs.Bool("json", false, "print the copies as JSON")
	regFlag := fs.String("registry", "", registryFlagHelp+"; each copy becomes a new agent of this host")
	var nf netFlags
	addPublishFlag(fs, &nf, "; copies get none unless given, and several copies need HOSTPORT 0")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *count < 1 {
		return usagef(usage)
	}
	req := host.ForkRequest{Count: *count, Prefix: *prefix}
	if req.Publish, err = nf.published(); err != nil {
		return err
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL, pos[0])
	if err != nil {
		return err
	}
	e.unenforced = false // the copies are new agents: nothing moved
	start := time.Now()
	res, _, err := f.Fork(ctx, pos[0], req)
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(e.stdout).Encode(res.VMs)
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s forked into %d copies in %.0f ms; source kept running\n", pos[0], len(res.VMs), ms(time.Since(start)))
	for _, v := range res.VMs {
		fmt.Fprintln(e.stdout, v.Name)
	}
	return nil
}

// vmTime reads a guest's clocks to the nanosecond and compares its wall
// clock with this host's.
func vmTime(ctx context.Context, e *env, args []string) error {
	if e.server != "" {
		return usagef("vm time is not served through a daemon yet; run it on the host")
	}
	fs := newFlags(e, "vm time")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm time NAME [--json]")
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	gt, err := h.GuestTime(ctx, pos[0])
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(e.stdout).Encode(map[string]any{
			"guest_realtime_ns": gt.Realtime.UnixNano(), "guest_monotonic_ns": gt.Monotonic.Nanoseconds(),
			"guest_boottime_ns": gt.Boottime.Nanoseconds(), "host_realtime_ns": gt.Host.UnixNano(),
			"offset_ns": gt.Offset().Nanoseconds(), "round_trip_ns": gt.RoundTrip.Nanoseconds()})
	}
	fmt.Fprintf(e.stdout, "guest %s (monotonic %.6f s); host %s; guest ahead by %s (read in %.3f ms)\n",
		gt.Realtime.UTC().Format(time.RFC3339Nano), gt.Monotonic.Seconds(), gt.Host.UTC().Format(time.RFC3339Nano),
		fmtOffset(float64(gt.Offset().Nanoseconds())/1e6), ms(gt.RoundTrip))
	return nil
}

// sayAccel tells the user which accelerator a backend with a choice
// picked, and why.
func sayAccel(ctx context.Context, e *env, h *host.Host, backend, accel string) {
	f, err := h.Factory(ctx, backend, accel)
	if err != nil {
		return
	}
	if r, ok := f.(vm.AccelReporter); ok {
		name, why := r.Accelerator()
		fmt.Fprintf(e.stderr, "kelpie: accelerator %s (%s)\n", name, why)
	}
}

func dash(n int) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func vmExec(ctx context.Context, e *env, args []string) error {
	const usage = "usage: kelpie vm exec NAME [--timeout DURATION] [--workdir DIR] -- CMD [ARG...]"
	fs := newFlags(e, "vm exec")
	timeout := fs.Duration("timeout", 0, "kill the guest command after this long (0: no limit)")
	workdir := fs.String("workdir", "", "guest working directory (default /workspace)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) < 2 {
		return usagef(usage)
	}
	if e.server != "" {
		return agentExecRemote(ctx, e, pos[0], pos[1], pos[2:], *timeout, *workdir)
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	res, err := h.Exec(ctx, pos[0], pos[1], pos[2:], vm.ExecOptions{Timeout: *timeout, Workdir: *workdir})
	if err != nil {
		return err
	}
	return printExec(e, res.Stdout, res.Stderr, res.OutputTruncated, res.TimedOut, *timeout, res.ExitCode)
}

// printExec prints a guest command's output and passes its exit code on.
func printExec(e *env, stdout, stderr []byte, truncated, timedOut bool, timeout time.Duration, exitCode int) error {
	e.stdout.Write(stdout)
	e.stderr.Write(stderr)
	if truncated {
		fmt.Fprintln(e.stderr, "kelpie: guest output truncated")
	}
	if timedOut {
		fmt.Fprintf(e.stderr, "kelpie: guest command killed after %v\n", timeout)
	}
	if exitCode != 0 {
		code := exitCode
		if code < 0 || code > 255 {
			code = 128 + 9 // killed by a signal
		}
		return exitError{code}
	}
	return nil
}

func vmSimple(ctx context.Context, e *env, sub string, args []string) error {
	fs := newFlags(e, "vm "+sub)
	regFlag := fs.String("registry", "", registryFlagHelp)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm %s NAME [--registry URL]", sub)
	}
	name := pos[0]
	if e.server != "" {
		return agentActRemote(ctx, e, sub, name)
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL, name)
	if err != nil {
		return err
	}
	switch sub {
	case "start":
		if f.Enforced() {
			return usagef("vm start with a registry: a stopped agent's memory is gone; vm rm it and create it again")
		}
		err = h.StartVM(ctx, name)
	case "pause":
		err = f.Pause(ctx, name)
	case "stop":
		err = f.Stop(ctx, name)
	case "rm":
		var res *host.RemoveResult
		if res, err = f.Remove(ctx, name); err == nil && res.PackageID != "" {
			fmt.Fprintf(e.stderr, "kelpie: vm %s: removed (and its suspend package %s)\n", name, res.PackageID)
			return nil
		}
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s: %s done\n", name, sub)
	return nil
}

func vmSnapshot(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm snapshot")
	out := fs.String("out", "", "output KLP1 blob file")
	layout := fs.String("layout", "", "split (device state + sparse RAM) or single (one migration stream); default the backend's")
	format := fs.String("format", "v2", "blob format: v1, or v2 (page-aligned, chunked, compressed)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *out == "" {
		return usagef("usage: kelpie vm snapshot NAME --out FILE [--layout split|single] [--format v1|v2]")
	}
	ver, err := blob.ParseFormat(*format)
	if err != nil {
		return usagef("--format: %v", err)
	}
	switch l := vm.Layout(*layout); l {
	case "", vm.LayoutSplit, vm.LayoutSingle:
	default:
		return usagef("--layout %q: want split or single", *layout)
	}
	h, err := openHost(ctx, e, false, false)
	if err != nil {
		return err
	}
	defer h.Close()
	res, err := h.SnapshotVM(ctx, pos[0], *out, vm.Layout(*layout), ver)
	if err != nil {
		return err
	}
	paused := ""
	if res.DowntimeKnown {
		paused = fmt.Sprintf(", guest paused %.1f ms", ms(res.Downtime))
	}
	fmt.Fprintf(e.stderr, "kelpie: snapshot %s of vm %s (%s layout, KLP1 v%d): %s for %s%s\n", res.SnapshotID, pos[0], res.Layout, res.Format,
		humanBytes(res.SizeBytes), humanBytes(res.LogicalBytes), paused)
	if res.NoDisk != "" {
		fmt.Fprintf(e.stderr, "kelpie: warning: %s\n", res.NoDisk)
	}
	return nil
}

// vmSuspend stores the whole VM as a suspend package; no hypervisor runs
// until `vm resume`.
func vmSuspend(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm suspend")
	storeF := addStoreFlags(fs)
	regFlag := fs.String("registry", "", registryFlagHelp)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm suspend NAME [--store STORE] [--registry URL]")
	}
	url, err := storeF.url()
	if err != nil {
		return err
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	h, err := openHost(ctx, e, false, true)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL, pos[0])
	if err != nil {
		return err
	}
	pkg, err := f.Suspend(ctx, pos[0], url)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s suspended into package %s (%s)\n", pos[0], pkg.ID, humanBytes(pkg.SizeBytes))
	return nil
}

// vmResume continues a paused VM, or restores a suspended one under its
// name.
func vmResume(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm resume")
	regFlag := fs.String("registry", "", registryFlagHelp)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm resume NAME [--registry URL]")
	}
	if e.server != "" {
		return agentActRemote(ctx, e, "resume", pos[0])
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	h, err := openHost(ctx, e, false, true)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL, pos[0])
	if err != nil {
		return err
	}
	start := time.Now()
	res, err := f.Resume(ctx, pos[0])
	if err != nil {
		return err
	}
	if res.Warning != "" {
		fmt.Fprintf(e.stderr, "kelpie: warning: %s\n", res.Warning)
	}
	if res.PackageID == "" {
		fmt.Fprintf(e.stderr, "kelpie: vm %s: resume done\n", pos[0])
		return nil
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s resumed from package %s (ready in %.0f ms)\n", pos[0], res.PackageID, ms(time.Since(start)))
	return nil
}
