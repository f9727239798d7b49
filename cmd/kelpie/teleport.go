package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/qemu"
)

func init() {
	register(command{"teleport", "move a VM to a package store (out) and restore it on this host (in)", cmdTeleport})
}

const teleportUsage = `kelpie teleport out NAME --store STORE [--kind teleport|suspend|checkpoint|auto] [--keep-source]
           [--agent-id ID] [--agent-state FILE] [--target-arch A --target-backend B --target-host H --target-cpu C]
       kelpie teleport in PACKAGE_ID --store STORE --name NEW [--accel auto|kvm|tcg] [--memory MIB --cpus N]
           [--agent-state-out FILE]`

func cmdTeleport(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", teleportUsage)
	}
	switch args[0] {
	case "out":
		return teleportOut(ctx, e, args[1:])
	case "in":
		return teleportIn(ctx, e, args[1:])
	}
	return usagef("unknown teleport command %q; usage: %s", args[0], teleportUsage)
}

// teleportOut sends a VM to a store and prints the package id (stdout: the
// id only). Without --keep-source it is a move: the source is stopped and
// removed once the package is committed, and resumed if anything fails.
func teleportOut(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "teleport out")
	storeF := addStoreFlags(fs)
	progressJSON := fs.Bool("json", false, "report upload progress as JSON lines on stderr")
	kindFlag := fs.String("kind", "teleport", "teleport, suspend, checkpoint or auto (choose for the target)")
	keep := fs.Bool("keep-source", false, "copy: keep the source VM running")
	agentID := fs.String("agent-id", "", "agent id recorded in the package (default: the VM name)")
	agentState := fs.String("agent-state", "", "file with the caller's agent state to carry along")
	tArch := fs.String("target-arch", "", "--kind auto: target architecture (default: this host's)")
	tBackend := fs.String("target-backend", "", "--kind auto: target backend (default: this host's)")
	tHost := fs.String("target-host", "", "--kind auto: target host id (default: this host)")
	tCPU := fs.String("target-cpu", "", "--kind auto: target CPU model (default: this host's)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: %s", teleportUsage)
	}
	name := pos[0]
	auto := *kindFlag == "auto"
	if !auto {
		if _, err := teleport.ParseKind(*kindFlag); err != nil {
			return usagef("--kind: %v", err)
		}
		if *tArch != "" || *tBackend != "" || *tHost != "" || *tCPU != "" {
			return usagef("--target-* flags only go with --kind auto")
		}
	}
	st, err := storeF.open(ctx, e, *progressJSON)
	if err != nil {
		return err
	}
	f, inst, err := openVM(ctx, e, name)
	if err != nil {
		return err
	}
	defer inst.Close()

	kind := teleport.SnapshotKind(*kindFlag)
	if auto {
		src := f.Host()
		src.Compat = inst.Compat()
		dst := src
		dst.Compat = cloneCompat(src.Compat)
		if *tArch != "" {
			a, err := vm.ParseArchitecture(*tArch)
			if err != nil {
				return usagef("--target-arch: %v", err)
			}
			dst.Arch = a
		}
		if *tBackend != "" {
			dst.Backend = *tBackend
		}
		if *tHost != "" {
			dst.HostID = *tHost
		}
		if *tCPU != "" {
			dst.Compat["cpu"] = *tCPU
		}
		var why string
		kind, why = teleport.ChooseKind(src, dst)
		fmt.Fprintf(e.stderr, "kelpie: kind %s: %s\n", kind, why)
	}

	req := service.OutRequest{AgentID: *agentID, Kind: kind, KeepSource: *keep}
	if req.AgentID == "" {
		req.AgentID = name
	}
	if *agentState != "" {
		if req.AgentState, err = os.ReadFile(*agentState); err != nil {
			return fmt.Errorf("--agent-state: %w", err)
		}
	}
	if kind == teleport.KindCheckpoint {
		ws, cleanup, err := archiveWorkspace(ctx, e, inst)
		if err != nil {
			return err
		}
		defer cleanup()
		req.Workspace = ws
	}
	svc := newCLIService(e, st, f, "out")
	start := time.Now()
	pkg, err := svc.Out(ctx, inst, req)
	if err != nil {
		return err
	}
	if !*keep {
		// The package holds the agent now; the stopped source goes.
		if err := inst.Destroy(context.WithoutCancel(ctx)); err != nil {
			fmt.Fprintf(e.stderr, "kelpie: warning: package %s committed, removing the stopped source vm %s failed: %v\n", pkg.ID, name, err)
		}
	}
	fmt.Fprintf(e.stderr, "kelpie: %s package %s committed (%s) in %.0f ms; source %s\n", pkg.Kind, pkg.ID, humanBytes(pkg.SizeBytes),
		ms(time.Since(start)), map[bool]string{true: "kept running", false: "removed"}[*keep])
	fmt.Fprintln(e.stdout, pkg.ID)
	return nil
}

func cloneCompat(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// archiveWorkspace tars the guest's /workspace into a temporary file under
// $KELPIE_HOME/tmp.
func archiveWorkspace(ctx context.Context, e *env, inst *qemu.Instance) (vm.Payload, func(), error) {
	dir := filepath.Join(home(e), "tmp")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	f, err := os.CreateTemp(dir, "workspace-*.tgz")
	if err != nil {
		return nil, nil, err
	}
	cleanup := func() { os.Remove(f.Name()) }
	_, err = inst.ArchiveWorkspace(ctx, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	p, err := vm.NewFilePayload(f.Name())
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return p, cleanup, nil
}

// teleportIn restores a package as a new VM of this host.
func teleportIn(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "teleport in")
	storeF := addStoreFlags(fs)
	progressJSON := fs.Bool("json", false, "report download progress as JSON lines on stderr")
	name := fs.String("name", "", "name of the new VM")
	accel := fs.String("accel", "", "accelerator: auto, kvm or tcg (default $KELPIE_ACCEL or auto)")
	mem := fs.Int("memory", 0, "guest memory in MiB (a checkpoint's fresh VM; default 256; full VMs keep theirs)")
	cpus := fs.Int("cpus", 0, "vCPUs (as --memory)")
	stateOut := fs.String("agent-state-out", "", "write the package's agent state to this file")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *name == "" {
		return usagef("usage: %s", teleportUsage)
	}
	st, err := storeF.open(ctx, e, *progressJSON)
	if err != nil {
		return err
	}
	pkg, err := st.Stat(ctx, pos[0])
	if err != nil {
		return err
	}
	f, err := qemuFactory(ctx, e, *accel)
	if err != nil {
		return err
	}
	cfg := vm.Config{Name: *name, MemoryMiB: *mem, VCPUs: *cpus}
	if pkg.Snapshot == nil {
		if cfg.MemoryMiB == 0 {
			cfg.MemoryMiB = vmMemoryMiBDefault
		}
		if cfg.VCPUs == 0 {
			cfg.VCPUs = vmCPUsDefault
		}
	}
	svc := newCLIService(e, st, f, "in")
	start := time.Now()
	inst, got, err := svc.In(ctx, pos[0], cfg, service.InOptions{
		RestoreWorkspace: func(ctx context.Context, inst vm.Instance, r io.Reader) error {
			return inst.(*qemu.Instance).RestoreWorkspace(ctx, r)
		}})
	if err != nil {
		return err
	}
	qi := inst.(*qemu.Instance)
	defer qi.Close()
	if err := qi.WaitReady(ctx); err != nil {
		return err
	}
	if *stateOut != "" {
		if err := os.WriteFile(*stateOut, got.AgentState, 0o600); err != nil {
			return fmt.Errorf("--agent-state-out: %w", err)
		}
	}
	how := "restored"
	if !got.Kind.FullVM() {
		how = "booted fresh with the checkpoint's workspace"
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s %s from %s package %s (%s, from host %s); ready in %.0f ms\n", *name, how, got.Kind, got.ID,
		qi.Accel(), got.SourceHostID, ms(time.Since(start)))
	fmt.Fprintln(e.stdout, *name)
	return nil
}
