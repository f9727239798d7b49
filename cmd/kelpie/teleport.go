package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/host"
)

func init() {
	register(command{"teleport", "move a VM to a package store (out) and restore it on this host (in)", cmdTeleport})
}

const teleportUsage = `kelpie teleport out NAME --store STORE [--kind teleport|suspend|checkpoint|auto] [--keep-source] [--format v1|v2] [--json]
           [--agent-id ID] [--agent-state FILE] [--target-arch A --target-backend B --target-host H --target-cpu C] [--registry URL]
       kelpie teleport in PACKAGE_ID --store STORE --name NEW [--backend B] [--accel auto|kvm|tcg] [--memory MIB --cpus N]
           [--agent-state-out FILE] [--registry URL]   (with a registry the VM keeps its agent's name)
           [--publish 127.0.0.1:HOSTPORT:GUESTPORT|none]... [--fork]`

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
// id only; with --json one JSON object: the id and the package's sizes).
// Without --keep-source it is a move: the source is stopped and removed
// once the package is committed, and resumed if anything fails.
func teleportOut(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "teleport out")
	storeF := addStoreFlags(fs)
	progressJSON := fs.Bool("json", false, "print the result as one JSON object on stdout, and progress as JSON lines on stderr")
	format := fs.String("format", "v2", "package format: v1, or v2 (chunked, compressed, only chunks the store lacks are uploaded)")
	kindFlag := fs.String("kind", "teleport", "teleport, suspend, checkpoint or auto (choose for the target)")
	keep := fs.Bool("keep-source", false, "copy: keep the source VM running")
	agentID := fs.String("agent-id", "", "agent id recorded in the package (default: the VM name)")
	agentState := fs.String("agent-state", "", "file with the caller's agent state to carry along")
	var t host.Target
	fs.StringVar(&t.Arch, "target-arch", "", "--kind auto: target architecture (default: this host's)")
	fs.StringVar(&t.Backend, "target-backend", "", "--kind auto: target backend (default: this host's)")
	fs.StringVar(&t.HostID, "target-host", "", "--kind auto: target host id (default: this host)")
	fs.StringVar(&t.CPU, "target-cpu", "", "--kind auto: target CPU model (default: this host's)")
	regFlag := fs.String("registry", "", registryFlagHelp)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("usage: %s", teleportUsage)
	}
	ver, err := blob.ParseFormat(*format)
	if err != nil {
		return usagef("--format: %v", err)
	}
	url, err := storeF.url()
	if err != nil {
		return err
	}
	req := host.OutRequest{Store: url, Kind: *kindFlag, Target: t, KeepSource: *keep, AgentID: *agentID, Format: ver}
	if *agentState != "" {
		if req.AgentState, err = os.ReadFile(*agentState); err != nil {
			return fmt.Errorf("--agent-state: %w", err)
		}
	}
	if e.server != "" {
		return teleportOutRemote(ctx, e, pos[0], url, *keep, *agentID, *format)
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	h, err := openHost(ctx, e, *progressJSON, true)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL, pos[0])
	if err != nil {
		return err
	}
	start := time.Now()
	res, a, err := f.TeleportOut(ctx, pos[0], req)
	if err != nil {
		return err
	}
	if a != nil && a.Name != pos[0] {
		fmt.Fprintf(e.stderr, "kelpie: the copy is a new agent, %s, in flight in its package (epoch %d)\n", a.Name, a.Epoch)
	} else if a != nil {
		fmt.Fprintf(e.stderr, "kelpie: agent %s is in flight (epoch %d): restore it once with teleport in\n", a.Name, a.Epoch)
	}
	if res.KindReason != "" {
		fmt.Fprintf(e.stderr, "kelpie: kind %s: %s\n", res.Kind, res.KindReason)
	}
	if res.NoWorkspace != "" {
		fmt.Fprintf(e.stderr, "kelpie: the checkpoint carries no workspace: %s\n", res.NoWorkspace)
	}
	if res.Warning != "" {
		fmt.Fprintf(e.stderr, "kelpie: warning: %s\n", res.Warning)
	}
	source := "kept running"
	if !*keep {
		source = "removed"
		if !res.SourceRemoved {
			source = "stopped, not removed"
		}
	}
	pkg := res.Package
	fmt.Fprintf(e.stderr, "kelpie: %s package %s committed (KLP1 v%d, %s for %s, %s new) in %.0f ms; source %s\n", pkg.Kind, pkg.ID,
		max(pkg.Format, 1), humanBytes(pkg.StoredBytes), humanBytes(pkg.LogicalBytes), humanBytes(pkg.NewBytes), ms(time.Since(start)), source)
	if *progressJSON {
		return json.NewEncoder(e.stdout).Encode(outResult{ID: pkg.ID, Kind: pkg.Kind, Format: max(pkg.Format, 1), LogicalBytes: pkg.LogicalBytes,
			StoredBytes: pkg.StoredBytes, NewBytes: pkg.NewBytes, Chunks: pkg.Chunks, NewChunks: pkg.NewChunks, SizeBytes: pkg.SizeBytes,
			SourceRemoved: res.SourceRemoved, Warning: res.Warning, DurationMs: ms(time.Since(start))})
	}
	fmt.Fprintln(e.stdout, pkg.ID)
	return nil
}

// outResult is what `teleport out --json` prints on stdout.
type outResult struct {
	ID            string                `json:"id"`
	Kind          teleport.SnapshotKind `json:"kind"`
	Format        int                   `json:"format"`
	LogicalBytes  int64                 `json:"logical_bytes"`
	StoredBytes   int64                 `json:"stored_bytes"`
	NewBytes      int64                 `json:"new_bytes"`
	Chunks        int                   `json:"chunks"`
	NewChunks     int                   `json:"new_chunks"`
	SizeBytes     int64                 `json:"size_bytes"` // the package's body in the store
	SourceRemoved bool                  `json:"source_removed"`
	Warning       string                `json:"warning,omitempty"`
	DurationMs    float64               `json:"duration_ms"`
}

// teleportIn restores a package as a new VM of this host.
func teleportIn(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "teleport in")
	storeF := addStoreFlags(fs)
	progressJSON := fs.Bool("json", false, "report download progress as JSON lines on stderr")
	name := fs.String("name", "", "name of the new VM")
	backend := fs.String("backend", "", "backend to restore with (default: the one that wrote the snapshot; a checkpoint: this host's default)")
	accel := fs.String("accel", "", "accelerator: auto, kvm or tcg (default $KELPIE_ACCEL or auto)")
	mem := fs.Int("memory", 0, "guest memory in MiB of a checkpoint's fresh VM (default 256); a full VM keeps its own, so leave it unset")
	cpus := fs.Int("cpus", 0, "vCPUs of a checkpoint's fresh VM (default 1); as --memory")
	stateOut := fs.String("agent-state-out", "", "write the package's agent state to this file")
	regFlag := fs.String("registry", "", registryFlagHelp)
	fork := fs.Bool("fork", false, "restore a copy with a new identity (its name as hostname, a new agent id, a reseeded RNG; no published ports unless --publish)")
	var nf netFlags
	addPublishFlag(fs, &nf, "; replaces the package's ports on this host (default: the recorded ones; none: no ports)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	if len(pos) != 1 || (*name == "" && regURL == "" && e.server == "") {
		return usagef("usage: %s", teleportUsage)
	}
	url, err := storeF.url()
	if err != nil {
		return err
	}
	publish, err := nf.published()
	if err != nil {
		return err
	}
	if (e.server != "" || regURL != "") && (*fork || nf.publish.set) {
		return usagef("--fork and --publish are not served through a daemon or a registry yet; run teleport in on the host without them")
	}
	if e.server != "" {
		return teleportInRemote(ctx, e, pos[0], url, *name)
	}
	h, err := openHost(ctx, e, *progressJSON, true)
	if err != nil {
		return err
	}
	defer h.Close()
	f, err := h.join(ctx, e, regURL)
	if err != nil {
		return err
	}
	start := time.Now()
	res, _, err := f.TeleportIn(ctx, pos[0], host.InRequest{Store: url, Name: *name, Backend: *backend, Accel: *accel, VCPUs: *cpus, MemoryMiB: *mem,
		Fork: *fork, Publish: publish, PublishSet: nf.publish.set})
	if err != nil {
		return err
	}
	*name = res.VM.Name
	got := res.Package
	if res.Warning != "" {
		fmt.Fprintf(e.stderr, "kelpie: warning: %s\n", res.Warning)
	}
	if *stateOut != "" {
		if err := os.WriteFile(*stateOut, got.AgentState, 0o600); err != nil {
			return fmt.Errorf("vm %s runs, but --agent-state-out failed: %w", *name, err)
		}
	}
	how := "restored"
	if !got.Kind.FullVM() {
		how = "booted fresh with the checkpoint's workspace"
	}
	accelNote := ""
	if res.VM.Accel != "" {
		accelNote = ", " + res.VM.Accel
	}
	if *fork || got.SourceKept {
		how += " as a copy with its own identity"
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s %s from %s package %s (%s%s, from host %s%s); ready in %.0f ms\n", *name, how, got.Kind, got.ID,
		res.VM.Backend, accelNote, got.SourceHostID, portsNote(res.VM.Ports), ms(time.Since(start)))
	fmt.Fprintln(e.stdout, *name)
	return nil
}
