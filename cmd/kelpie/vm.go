package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/qemu"
)

func init() {
	register(command{"vm", "create, list, drive, snapshot, suspend and remove VMs of this host", cmdVM})
}

const vmUsage = `kelpie vm create NAME [--backend qemu] [--memory MIB] [--cpus N] [--accel auto|kvm|tcg]
       kelpie vm ls [--json]
       kelpie vm exec NAME [--timeout DURATION] [--workdir DIR] -- CMD [ARG...]
       kelpie vm start|pause|resume|stop|rm NAME
       kelpie vm snapshot NAME --out FILE [--layout split|single]
       kelpie vm suspend NAME [--store STORE]`

// Defaults for new VMs.
const (
	vmMemoryMiBDefault = 256
	vmCPUsDefault      = 1
)

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
	case "resume":
		return vmResume(ctx, e, args)
	case "start", "pause", "stop", "rm":
		return vmSimple(ctx, e, sub, args)
	}
	return usagef("unknown vm command %q; usage: %s", sub, vmUsage)
}

func vmCreate(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm create")
	backend := fs.String("backend", "qemu", "VM backend (only qemu keeps VMs between kelpie invocations)")
	mem := fs.Int("memory", vmMemoryMiBDefault, "guest memory in MiB")
	cpus := fs.Int("cpus", vmCPUsDefault, "vCPUs")
	accel := fs.String("accel", "", "accelerator: auto, kvm or tcg (default $KELPIE_ACCEL or auto)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm create NAME [--backend qemu] [--memory MIB] [--cpus N] [--accel auto|kvm|tcg]")
	}
	if *backend != "qemu" {
		return usagef("--backend %q: only the qemu backend keeps VMs between kelpie invocations", *backend)
	}
	f, err := qemuFactory(ctx, e, *accel)
	if err != nil {
		return err
	}
	sayAccel(e, f)
	if _, err := readSuspended(e, pos[0]); err == nil {
		return fmt.Errorf("vm %s is suspended (kelpie vm resume %s, or vm rm it): %w", pos[0], pos[0], vm.ErrAlreadyExists)
	}
	start := time.Now()
	inst, err := f.Create(ctx, vm.Config{Name: pos[0], VCPUs: *cpus, MemoryMiB: *mem})
	if err != nil {
		return err
	}
	if err := inst.Start(ctx); err != nil {
		inst.Destroy(context.WithoutCancel(ctx))
		return err
	}
	inst.(*qemu.Instance).Close()
	fmt.Fprintf(e.stderr, "kelpie: vm %s running (%d MiB, %d vCPU, ready in %.2f s)\n", pos[0], *mem, *cpus, time.Since(start).Seconds())
	fmt.Fprintln(e.stdout, pos[0])
	return nil
}

// vmListEntry is one VM in `vm ls --json`.
type vmListEntry struct {
	qemu.InstanceInfo
	PackageID string `json:"package_id,omitempty"` // suspended VMs
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
	f, err := qemuForExisting(ctx, e)
	if err != nil {
		return err
	}
	infos, err := f.List(ctx)
	if err != nil {
		return err
	}
	out := []vmListEntry{}
	for _, i := range infos {
		out = append(out, vmListEntry{InstanceInfo: i})
	}
	sus, err := listSuspended(e)
	if err != nil {
		return err
	}
	for _, s := range sus {
		out = append(out, vmListEntry{InstanceInfo: qemu.InstanceInfo{Name: s.Name, State: "suspended", VCPUs: s.Config.VCPUs,
			MemoryMiB: s.Config.MemoryMiB, CreatedAt: s.SuspendedAt}, PackageID: s.PackageID})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	if *asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tPID\tMEMORY\tCPUS\tACCEL")
	for _, v := range out {
		pid := "-"
		if v.PID != 0 {
			pid = fmt.Sprint(v.PID)
		}
		accel := string(v.Accel)
		if accel == "" {
			accel = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d MiB\t%d\t%s\n", v.Name, v.State, pid, v.MemoryMiB, v.VCPUs, accel)
	}
	return tw.Flush()
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
	_, inst, err := openVM(ctx, e, pos[0])
	if err != nil {
		return err
	}
	defer inst.Close()
	res, err := inst.Exec(ctx, pos[1], pos[2:], vm.ExecOptions{Timeout: *timeout, Workdir: *workdir})
	if err != nil {
		return err
	}
	e.stdout.Write(res.Stdout)
	e.stderr.Write(res.Stderr)
	if res.OutputTruncated {
		fmt.Fprintln(e.stderr, "kelpie: guest output truncated")
	}
	if res.TimedOut {
		fmt.Fprintf(e.stderr, "kelpie: guest command killed after %v\n", *timeout)
	}
	if res.ExitCode != 0 {
		code := res.ExitCode
		if code < 0 || code > 255 {
			code = 128 + 9 // killed by a signal
		}
		return exitError{code}
	}
	return nil
}

func vmSimple(ctx context.Context, e *env, sub string, args []string) error {
	fs := newFlags(e, "vm "+sub)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm %s NAME", sub)
	}
	name := pos[0]
	_, inst, err := openVM(ctx, e, name)
	if sub == "rm" && errors.Is(err, vm.ErrNotFound) {
		return removeSuspended(ctx, e, name)
	}
	if err != nil {
		return err
	}
	defer inst.Close()
	switch sub {
	case "start":
		err = inst.Start(ctx)
	case "pause":
		err = inst.Pause(ctx)
	case "stop":
		err = inst.Stop(ctx)
	case "rm":
		err = inst.Destroy(ctx)
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
	layout := fs.String("layout", "", "split (device state + sparse RAM, default) or single (one migration stream)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *out == "" {
		return usagef("usage: kelpie vm snapshot NAME --out FILE [--layout split|single]")
	}
	_, inst, err := openVM(ctx, e, pos[0])
	if err != nil {
		return err
	}
	defer inst.Close()
	l := vm.Layout(*layout)
	if l == "" {
		l = inst.SnapshotLayoutDefault()
	}
	snap, err := inst.SnapshotLayout(ctx, l)
	if err != nil {
		return err
	}
	defer snap.Close()
	if err := writeSnapshotBlob(*out, snap); err != nil {
		return fmt.Errorf("write %s: %w", *out, err)
	}
	st := inst.LastSnapshotStats()
	fmt.Fprintf(e.stderr, "kelpie: snapshot %s of vm %s (%s layout): %s, guest paused %.1f ms\n", snap.Metadata.SnapshotID, pos[0], l,
		humanBytes(int64(snap.Metadata.SizeBytes)), float64(st.Downtime.Microseconds())/1000)
	return nil
}

// writeSnapshotBlob packs a snapshot into a KLP1 blob file atomically.
func writeSnapshotBlob(out string, snap *vm.Snapshot) error {
	meta, err := snap.Metadata.Marshal()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(filepath.Dir(out), ".kelpie-snapshot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	mdPath := filepath.Join(dir, "metadata")
	if err := os.WriteFile(mdPath, meta, 0o600); err != nil {
		return err
	}
	path := func(p vm.Payload) string {
		if fp, ok := p.(*vm.FilePayload); ok {
			return fp.Path
		}
		return ""
	}
	return blob.PackFiles(out, mdPath, path(snap.DeviceState), path(snap.Memory))
}

// suspendedRecord remembers a suspended VM: its package in the local
// store and how it was configured ($KELPIE_HOME/suspended/NAME.json).
type suspendedRecord struct {
	Name        string    `json:"name"`
	PackageID   string    `json:"package_id"`
	Store       string    `json:"store"`
	Config      vm.Config `json:"config"`
	SuspendedAt time.Time `json:"suspended_at"`
}

func suspendedPath(e *env, name string) string {
	return filepath.Join(home(e), "suspended", name+".json")
}

func readSuspended(e *env, name string) (*suspendedRecord, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(suspendedPath(e, name))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("vm %s: %w", name, vm.ErrNotFound)
		}
		return nil, err
	}
	var r suspendedRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("suspended vm %s: %v: %w", name, err, vm.ErrCorrupt)
	}
	return &r, nil
}

func listSuspended(e *env) ([]*suspendedRecord, error) {
	ents, err := os.ReadDir(filepath.Join(home(e), "suspended"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*suspendedRecord
	for _, ent := range ents {
		name, ok := strings.CutSuffix(ent.Name(), ".json")
		if !ok {
			continue
		}
		if r, err := readSuspended(e, name); err == nil {
			out = append(out, r)
		}
	}
	return out, nil
}

// vmSuspend stores the whole VM as a suspend package in the local store;
// the QEMU process is gone until `vm resume`.
func vmSuspend(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm suspend")
	storeSpec := fs.String("store", "", storeFlagHelp)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm suspend NAME [--store STORE]")
	}
	name := pos[0]
	f, inst, err := openVM(ctx, e, name)
	if err != nil {
		return err
	}
	defer inst.Close()
	st, err := openStore(ctx, e, *storeSpec)
	if err != nil {
		return err
	}
	spec := *storeSpec
	if spec == "" {
		spec = filepath.Join(home(e), "packages")
	}
	svc := newCLIService(e, st, f, "suspend")
	pkg, err := svc.Out(ctx, inst, service.OutRequest{AgentID: name, Kind: teleport.KindSuspend, PackageID: newPackageID("suspend-" + name)})
	if err != nil {
		return err
	}
	rec := suspendedRecord{Name: name, PackageID: pkg.ID, Store: spec, Config: inst.Config(), SuspendedAt: time.Now().UTC()}
	b, _ := json.MarshalIndent(rec, "", "  ")
	if err := os.MkdirAll(filepath.Dir(suspendedPath(e, name)), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(suspendedPath(e, name), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("vm %s suspended into package %s, but recording it failed: %w", name, pkg.ID, err)
	}
	if err := inst.Destroy(ctx); err != nil {
		return fmt.Errorf("vm %s suspended into package %s; removing its stopped instance: %w", name, pkg.ID, err)
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s suspended into package %s (%s)\n", name, pkg.ID, humanBytes(pkg.SizeBytes))
	return nil
}

// vmResume continues a paused VM, or restores a suspended one under its
// name.
func vmResume(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "vm resume")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: kelpie vm resume NAME")
	}
	name := pos[0]
	_, inst, err := openVM(ctx, e, name)
	if err == nil {
		defer inst.Close()
		if err := inst.Resume(ctx); err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "kelpie: vm %s: resume done\n", name)
		return nil
	}
	if !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	rec, rerr := readSuspended(e, name)
	if rerr != nil {
		return err
	}
	st, err := openStore(ctx, e, rec.Store)
	if err != nil {
		return err
	}
	f, err := qemuFactory(ctx, e, "")
	if err != nil {
		return err
	}
	svc := newCLIService(e, st, f, "resume")
	start := time.Now()
	restored, _, err := svc.In(ctx, rec.PackageID, vm.Config{Name: name, VCPUs: rec.Config.VCPUs, MemoryMiB: rec.Config.MemoryMiB}, service.InOptions{})
	if err != nil {
		return fmt.Errorf("resume suspended vm %s from package %s: %w", name, rec.PackageID, err)
	}
	ri := restored.(*qemu.Instance)
	defer ri.Close()
	if err := ri.WaitReady(ctx); err != nil {
		return err
	}
	os.Remove(suspendedPath(e, name))
	if err := st.Delete(ctx, rec.PackageID); err != nil && !errors.Is(err, teleport.ErrNotFound) {
		fmt.Fprintf(e.stderr, "kelpie: warning: vm %s resumed, but its suspend package %s was not removed: %v\n", name, rec.PackageID, err)
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s resumed from package %s (ready in %.0f ms)\n", name, rec.PackageID, ms(time.Since(start)))
	return nil
}

func removeSuspended(ctx context.Context, e *env, name string) error {
	rec, err := readSuspended(e, name)
	if err != nil {
		return err
	}
	if st, err := openStore(ctx, e, rec.Store); err == nil {
		if err := st.Delete(ctx, rec.PackageID); err != nil && !errors.Is(err, teleport.ErrNotFound) {
			return err
		}
	}
	if err := os.Remove(suspendedPath(e, name)); err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s: removed (and its suspend package %s)\n", name, rec.PackageID)
	return nil
}

// newCLIService is the teleport service of this host, printing each step
// with its duration on stderr.
func newCLIService(e *env, st teleport.Store, f vm.Factory, prefix string) *service.Service {
	return &service.Service{Store: st, Factory: f, Clock: wallClock{}, NewID: func() string { return newPackageID("pkg") },
		OnStep: func(step string, d time.Duration) {
			fmt.Fprintf(e.stderr, "kelpie: %s: %-14s %8.1f ms\n", prefix, step, ms(d))
		}}
}
