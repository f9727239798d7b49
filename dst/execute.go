package dst

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"strconv"
	"strings"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// workspaceMaxBytes bounds what the simulated agent runtime reads back.
const workspaceMaxBytes = 1 << 20

// execute runs one operation, lets the controller repair what it can, and
// checks every invariant.
func (r *run) execute(op Op) {
	r.step, r.op = op.Step, op
	r.inj.rng = stepStream(r.cfg.Seed, op.Step)
	r.inj.events = r.inj.events[:0]
	r.clock.Advance(stepThinkTime)
	r.tr.linef("%04d %s %s", op.Step, r.clock.Elapsed(), op)
	if op.Host < 0 || op.Host >= len(r.hosts) || op.Target < 0 || op.Target >= len(r.hosts) {
		// A replayed operation from a larger fleet.
		op.Kind = OpIdle
		r.note("skip: no host h%d or h%d in this fleet", op.Host, op.Target)
	}
	switch op.Kind {
	case OpSpawn:
		r.spawn(op)
	case OpExec:
		r.execGuest(op)
	case OpMove, OpCheckpoint:
		r.move(op)
	case OpFork:
		r.fork(op)
	case OpSuspend:
		r.suspend(op)
	case OpResume:
		r.resume(op)
	case OpCrashHost:
		if h := r.hosts[op.Host]; h.alive {
			h.crash(EnvHostCrash, "idle")
		} else {
			r.note("skip: h%d is down", op.Host)
		}
	case OpRestartHost:
		if h := r.hosts[op.Host]; !h.alive {
			h.start()
			r.note("h%d restarted (incarnation %d)", op.Host, h.epoch)
		} else {
			r.note("skip: h%d is up", op.Host)
		}
	case OpCrashVM:
		if a := r.runningAgent(op.Agent); a != nil {
			a.vm.inner.Crash()
			r.crashedVM[a.vm.ID()] = true
			r.inj.fire(EnvVMCrash, a.vm.ID(), "agent "+a.id)
		}
	case OpCorrupt:
		obj, ok := r.store.Peek(op.Pkg)
		if !ok {
			r.note("skip: %s is not committed", op.Pkg)
			break
		}
		if cs := r.chunksOf(op.Pkg); cs != nil && len(cs.ids) > 0 && op.Bit%2 == 1 {
			// Damage a chunk of the package instead of its body: every
			// package that shares the chunk is damaged with it.
			r.corruptChunk(op, cs)
			break
		}
		off, err := r.store.CorruptAtRest(op.Pkg, op.Bit)
		if err != nil {
			r.note("corrupt %s: %v", op.Pkg, err)
			break
		}
		r.rotted[op.Pkg] = true
		r.corrupt[op.Pkg] = r.corrupt[op.Pkg] || r.restoreReads(op.Pkg, obj.Manifest, off)
		r.inj.fire(StoreCorruptAtRest, op.Pkg, "byte "+strconv.FormatInt(off, 10))
	case OpDeletePackages:
		r.deletePackages(op)
	case OpGC:
		n, err := r.store.GC(r.ctx)
		r.note("gc removed %d (err %v); %d uploads pending", n, err, r.store.PendingUploads())
	}
	r.repair()
	r.check()
	r.res.Steps++
}

// corruptChunk flips a bit of a chunk that package op.Pkg refers to.
func (r *run) corruptChunk(op Op, cs *chunkSet) {
	c := cs.ids[int(op.Bit/2%uint64(len(cs.ids)))]
	cr, err := r.store.PeekChunks(r.ctx, cs.packs)
	if err != nil {
		r.note("corrupt a chunk of %s: %v", op.Pkg, err)
		return
	}
	pack, off, n := r.store.ChunkLocation(cr, c)
	if n == 0 {
		r.note("corrupt a chunk of %s: chunk %s not found", op.Pkg, c.Short())
		return
	}
	if r.rottenChunks[chunkCopy{pack, c}] {
		// Once is enough: a second flip could put the first one back.
		r.note("corrupt a chunk of %s: chunk %s in pack %s is damaged already", op.Pkg, c.Short(), pack)
		return
	}
	at, err := r.store.CorruptChunkAtRest(pack, uint64(off)*8+op.Bit/2%(uint64(n)*8))
	if err != nil {
		r.note("corrupt chunk %s of %s: %v", c.Short(), op.Pkg, err)
		return
	}
	r.inj.fire(StoreCorruptAtRest, op.Pkg, fmt.Sprintf("chunk %s, byte %d of pack %s", c.Short(), at, pack))
	// A flipped bit of a compressed chunk can land where the decoder
	// does not look (the frame still decodes to the chunk's bytes): then
	// every reader still gets the right bytes, and nothing is damaged.
	if cr, err = r.store.PeekChunks(r.ctx, cs.packs); err == nil {
		err = cr.FetchChunks(r.ctx, []teleport.ChunkID{c}, func(_ teleport.ChunkID, stored []byte) error {
			return blob.VerifyChunk(cs.hash, cs.refs[c], stored)
		})
	}
	if err == nil {
		r.note("chunk %s still decodes to its bytes: the bit was one the decoder ignores", c.Short())
		return
	}
	r.rottenChunks[chunkCopy{pack, c}] = true
	r.checkChunks() // marks every package that shares it
}

// restoreReads reports whether restoring package id reads (and so
// verifies) the byte at off of its body: all of a VM snapshot's blob, and
// only the workspace section of a checkpoint (whose blob holds metadata
// that a fresh boot does not use).
func (r *run) restoreReads(id string, manifest []byte, off int64) bool {
	m, err := decodeManifest(id, manifest)
	if err != nil {
		return true
	}
	if m.Kind.FullVM() {
		return true
	}
	ws, ok := m.Section(teleport.SectionWorkspace)
	return ok && off >= ws.Offset && off < ws.Offset+ws.Size
}

func (r *run) runningAgent(id string) *agent {
	a := r.byID[id]
	if a == nil || a.status != statusRunning || !a.host.alive {
		r.note("skip: %s is not running", id)
		return nil
	}
	if a.doubt != "" {
		r.note("skip: %s is in doubt (package %s may be committed)", id, a.doubt)
		return nil
	}
	return a
}

func (r *run) spawn(op Op) {
	h := r.hosts[op.Host]
	if !h.alive || r.byID[op.Agent] != nil {
		r.note("skip: h%d down or %s exists", op.Host, op.Agent)
		return
	}
	inst, err := h.svc.Factory().Create(r.ctx, vm.Config{Name: vmName(h, op.Step, 0), VCPUs: 1, MemoryMiB: 64, BaseImageVersion: h.cfg.BaseImage})
	if err != nil {
		r.note("create: %v", err)
		return
	}
	v := inst.(*hostVM)
	if err := v.Start(r.ctx); err != nil {
		r.note("boot: %v", err)
		if err := v.Destroy(r.ctx); err != nil {
			r.note("destroy: %v", err)
		}
		return
	}
	v.agent = op.Agent
	r.addAgent(&agent{id: op.Agent, kv: map[string]string{}, status: statusRunning, host: h, vm: v})
	r.note("%s runs in %s", op.Agent, v)
}

// execGuest runs a guest command and checks its answer against the model.
func (r *run) execGuest(op Op) {
	a := r.runningAgent(op.Agent)
	if a == nil {
		return
	}
	res, err := a.vm.Exec(r.ctx, op.Cmd, op.Args, vm.ExecOptions{Timeout: execTimeout})
	if err != nil {
		r.note("exec: %v", err)
		return
	}
	out, code := applyModel(a.kv, op.Cmd, op.Args)
	got := string(res.Stdout)
	if code != 0 {
		got = string(res.Stderr)
	}
	if res.ExitCode != code || got != out {
		r.violate(InvSnapshotConsistency, "%s: %s %v answered %d %q, the model expects %d %q", a.id, op.Cmd, op.Args, res.ExitCode, got, code, out)
	}
}

// applyModel applies a guest command to the model's state and returns the
// answer the guest must give (the sim's key-value machine).
func applyModel(kv map[string]string, cmd string, args []string) (string, int) {
	switch cmd {
	case "set":
		kv[args[0]] = args[1]
		return "", 0
	case "incr":
		n, _ := strconv.ParseInt(kv[args[0]], 10, 64)
		kv[args[0]] = strconv.FormatInt(n+1, 10)
		return kv[args[0]] + "\n", 0
	case "del":
		delete(kv, args[0])
		return "", 0
	case "get":
		v, ok := kv[args[0]]
		if !ok {
			return "no such key\n", 1
		}
		return v + "\n", 0
	}
	return cmd + ": command not found\n", 127
}

func (r *run) move(op Op) {
	a := r.runningAgent(op.Agent)
	if a == nil {
		return
	}
	dst := r.hosts[op.Target]
	if !dst.alive || dst == a.host {
		r.note("skip: target h%d down or the source", op.Target)
		return
	}
	r.fireMismatch(op, dst)
	pkg := packageName(op.Step)
	if !r.teleportOut(a, op.PkgKind, pkg, "", false) {
		return
	}
	a.status, a.pkg, a.host, a.vm = statusStored, pkg, nil, nil
	r.teleportInto(a, dst, op.Step)
}

func (r *run) fork(op Op) {
	a := r.runningAgent(op.Source)
	if a == nil || r.byID[op.Agent] != nil {
		return
	}
	dst := r.hosts[op.Target]
	if !dst.alive {
		r.note("skip: target h%d down", op.Target)
		return
	}
	r.fireMismatch(op, dst)
	pkg := packageName(op.Step)
	if !r.teleportOut(a, op.PkgKind, pkg, op.Agent, true) {
		return
	}
	b := &agent{id: op.Agent, kv: maps.Clone(r.expect[pkg].kv), status: statusStored, pkg: pkg}
	r.addAgent(b)
	r.teleportInto(b, dst, op.Step)
}

func (r *run) suspend(op Op) {
	a := r.runningAgent(op.Agent)
	if a == nil {
		return
	}
	pkg := packageName(op.Step)
	if r.teleportOut(a, teleport.KindSuspend, pkg, "", false) {
		a.status, a.pkg, a.host, a.vm = statusStored, pkg, nil, nil
	}
}

func (r *run) resume(op Op) {
	a := r.byID[op.Agent]
	if a == nil || a.status != statusStored {
		r.note("skip: %s is not stored", op.Agent)
		return
	}
	dst := r.hosts[op.Target]
	if !dst.alive {
		r.note("skip: target h%d down", op.Target)
		return
	}
	r.fireMismatch(op, dst)
	r.teleportInto(a, dst, op.Step)
}

func (r *run) fireMismatch(op Op, dst *host) {
	switch op.Mismatch {
	case "arch":
		r.inj.fire(TargetArchMismatch, dst.cfg.ID, string(op.PkgKind))
	case "version":
		r.inj.fire(TargetVersionMismatch, dst.cfg.ID, string(op.PkgKind))
	}
}

// teleportOut sends running agent a out as package pkg (for agent newID
// when forking) and reports whether the package is committed. It checks
// what a failed Out must leave behind.
func (r *run) teleportOut(a *agent, kind teleport.SnapshotKind, pkg, newID string, keep bool) bool {
	src, v := a.host, a.vm
	agentID := a.id
	if newID != "" {
		agentID = newID
	}
	e := &pkgExpect{packageFacts: packageFacts{kind: kind, src: src.cfg}, id: pkg, agent: agentID, kv: maps.Clone(a.kv)}
	r.expect[pkg] = e
	req := service.OutRequest{AgentID: agentID, Kind: kind, KeepSource: keep, PackageID: pkg}
	if kind == teleport.KindCheckpoint {
		req.AgentState = []byte(`{"agent":"` + agentID + `"}`)
		req.Workspace = vm.BytesPayload(encodeWorkspace(e.kv))
	}
	wasState := v.State()
	mark := r.inj.mark()
	_, err := src.svc.Out(r.ctx, v, req)
	r.res.Teleports++
	evs := r.inj.since(mark)
	_, committed := r.store.Peek(pkg)
	if committed && hasEvent(evs, VMSnapshotCorrupt, v.ID()) {
		// The payload changed after its checksum was taken: the service
		// must refuse it before the commit, or no host can restore it.
		r.violate(InvSnapshotConsistency, "Out of %s committed package %s from a snapshot that fails its own checksum", a.id, pkg)
	}
	switch {
	case err == nil || errors.Is(err, service.ErrSourceNotSettled):
		if err != nil {
			r.note("out %s: committed %s, but %v", a.id, pkg, err)
		} else {
			r.note("out %s: committed %s", a.id, pkg)
		}
		if !committed {
			r.violate(InvCommitAtomicity, "Out of %s reported package %s committed but the store has no such package", a.id, pkg)
		}
		if !keep && src.alive && (err != nil || v.State() != vm.StateRunning) {
			// The controller frees a moved agent's source; a source the
			// service left running is the service's to answer for.
			r.destroyOrKeep(v, "source of "+a.id)
		}
		return true
	case !src.alive:
		// The host died mid-flight: the controller finds out from the store
		// what happened.
		r.note("out %s: host died; package %s committed=%v", a.id, pkg, committed)
		return committed
	}
	r.note("out %s: %v", a.id, err)
	unknown := errors.Is(err, service.ErrOutcomeUnknown)
	if committed && !unknown {
		r.violate(InvOutAtomicity, "failed Out of %s left package %s visible (%v)", a.id, pkg, err)
	}
	st := v.State()
	switch {
	case r.crashedVM[v.ID()]:
	case unknown && !keep && st == vm.StatePaused:
		// The store cannot say whether the move committed: the source
		// stays paused so the agent cannot run twice, until the controller
		// finds out (resolveDoubt).
		a.doubt = pkg
	case unknown && !keep:
		r.violate(InvOutAtomicity, "the move of %s may have committed package %s (%v), yet its source %s is %s: it could run twice", a.id, pkg, err, v, st)
	case st == vm.StatePaused && wasState == vm.StateRunning && (hasEvent(evs, VMResume, v.ID()) || hasEvent(evs, VMCrash, v.ID())):
		// Rolling back needed a resume that the injector failed: the
		// service must say so, naming the source; the controller retries.
		if !errors.Is(err, service.ErrSourcePaused) || !strings.Contains(err.Error(), v.ID()) {
			r.violate(InvOutAtomicity, "failed Out of %s left its source %s paused, and its error does not say so: %v", a.id, v, err)
		}
	case st != wasState:
		r.violate(InvOutAtomicity, "failed Out of %s left its source %s %s (was %s)", a.id, v, st, wasState)
	case !maps.Equal(v.guest(), a.kv):
		r.violate(InvOutAtomicity, "failed Out of %s changed its guest state", a.id)
	}
	return false
}

// destroyOrKeep destroys v, or keeps it for the controller to retry when
// the hypervisor will not go (a fault).
func (r *run) destroyOrKeep(v *hostVM, what string) {
	if err := v.Destroy(r.ctx); err != nil {
		r.note("destroy %s %s: %v", what, v, err)
		r.leftovers = append(r.leftovers, v)
	}
}

// teleportInto restores stored agent a on dst and updates the registry.
func (r *run) teleportInto(a *agent, dst *host, step int) {
	pkg := a.pkg
	v, ok, corrupt := r.teleportIn(pkg, dst, step)
	switch {
	case ok:
		a.status, a.host, a.vm, a.pkg = statusRunning, dst, v, ""
		v.agent = a.id
		r.note("%s runs in %s", a.id, v)
		r.cleanupPackage(dst, pkg)
	case corrupt && r.rotted[pkg]:
		// Only damage at rest, in the store, loses an agent; a snapshot
		// that was damaged before its commit must never have been
		// committed.
		r.lose(a, "its package "+pkg+" rotted in the store")
	}
}

// teleportIn restores package pkg on dst through the service and checks
// the outcome against the rules, the model and what must be left behind.
// corrupt reports a refusal for a checksum that the model knows is right.
func (r *run) teleportIn(pkg string, dst *host, step int) (v *hostVM, ok, corrupt bool) {
	e := r.expect[pkg]
	r.checkChunks() // a package committed onto a damaged chunk is damaged
	want := verdict(e.packageFacts, dst.cfg, r.corrupt[pkg])
	cfg := vm.Config{Name: vmName(dst, step, 1)}
	if e.kind == teleport.KindCheckpoint {
		cfg.VCPUs, cfg.MemoryMiB = 1, 64
	}
	created, epoch := len(dst.vms), dst.epoch
	mark := r.inj.mark()
	inst, _, err := dst.svc.In(r.ctx, pkg, cfg, service.InOptions{Workspace: &workspaceRuntime{}})
	r.res.Restores++
	faulted := len(r.inj.since(mark)) > 0
	if !dst.alive || dst.epoch != epoch {
		r.note("in %s on %s: host died (%v)", pkg, dst.cfg.ID, err)
		return nil, false, false
	}
	for _, left := range dst.vms[created:] {
		if (err == nil && vm.Instance(left) == inst) || left.gone() {
			continue
		}
		if err != nil && errors.Is(err, vm.ErrLeftBehind) && strings.Contains(err.Error(), left.ID()) && hasEvent(r.inj.since(mark), VMDestroy, left.ID()) {
			// It could not be removed and said so, naming it: the
			// controller removes it later.
			r.leftovers = append(r.leftovers, left)
			continue
		}
		r.violate(InvNoPartialRestore, "In of %s on %s failed (%v) and left VM %s %s behind", pkg, dst.cfg.ID, err, left, left.State())
	}
	var re *teleport.RefusalError
	switch {
	case err == nil:
		v = inst.(*hostVM)
		r.note("in %s on %s: ok", pkg, dst.cfg.ID)
		// A restored VM's memory is the snapshot's, byte for byte: also
		// where the guest does not look (a flipped bit in unused RAM).
		memOK := true
		if e.kind.FullVM() {
			want, _ := sim.EncodeMemory(e.kv, e.src.MemoryBytes)
			if !bytes.Equal(v.inner.MemoryImage(), want) {
				memOK = false
				r.violate(InvSnapshotConsistency, "%s restored from %s on %s: its memory differs from the snapshot's", e.agent, pkg, dst.cfg.ID)
			}
		}
		if want != nil && memOK {
			r.violate(invariantFor(want), "%s %s package %s from %s was restored on %s; the rules imply %s", e.kind, e.agent, pkg, e.src, dst.cfg, categoryName(want))
		}
		if v.State() != vm.StateRunning {
			r.violate(InvNoPartialRestore, "In of %s returned VM %s in state %s", pkg, v, v.State())
		}
		if got := v.guest(); !maps.Equal(got, e.kv) {
			r.violate(InvSnapshotConsistency, "%s restored from %s on %s holds %v, the snapshot held %v", e.agent, pkg, dst.cfg.ID, got, e.kv)
		}
		return v, true, false
	case errors.As(err, &re):
		r.res.RestoresRefused++
		r.note("in %s on %s: refused by rule %s: %s", pkg, dst.cfg.ID, re.Rule, re.Reason)
		if want == nil {
			r.violate(InvRefusalReason, "%s package %s refused on %s by rule %s (%v) but the rules allow it", e.kind, pkg, dst.cfg, re.Rule, err)
		} else if !errors.Is(err, want) {
			r.violate(InvRefusalReason, "%s package %s refused on %s by rule %s (%v); the rules imply %s", e.kind, pkg, dst.cfg, re.Rule, err, categoryName(want))
		}
		return nil, false, want == teleport.ErrChecksumMismatch && errors.Is(err, want)
	default:
		r.note("in %s on %s: %v", pkg, dst.cfg.ID, err)
		if !faulted {
			r.violate(InvRefusalReason, "In of %s package %s on %s failed with no fault injected (%v); the rules imply %s", e.kind, pkg, dst.cfg, err, categoryName(want))
		}
		return nil, false, false
	}
}

// cleanupPackage deletes a package, all its sections, once its agent runs
// again; a failure leaves garbage for delete-packages.
func (r *run) cleanupPackage(h *host, pkg string) {
	if err := h.svc.Store().Delete(r.ctx, pkg); err != nil {
		r.note("delete %s: %v", pkg, err)
	}
}

// deletePackages is the controller's package GC: anything that is not an
// agent's registered home goes.
func (r *run) deletePackages(op Op) {
	h := r.hosts[op.Host]
	if !h.alive {
		r.note("skip: h%d down", op.Host)
		return
	}
	l, err := h.svc.Store().List(r.ctx)
	if err != nil {
		r.note("list: %v", err)
		return
	}
	n := 0
	for _, m := range l {
		if r.isLocation(m.ID) {
			continue
		}
		if err := h.svc.Store().Delete(r.ctx, m.ID); err != nil {
			r.note("delete %s: %v", m.ID, err)
			continue
		}
		n++
	}
	r.note("deleted %d of %d packages", n, len(l))
}

// repair is the controller mending what failed operations left: it
// resolves agents in doubt, resumes agents whose VM a failed operation
// left paused, and removes VMs that could not be removed before.
func (r *run) repair() {
	for _, a := range r.agents {
		switch {
		case a.status != statusRunning || !a.host.alive:
		case a.doubt != "":
			r.resolveDoubt(a)
		case a.vm.State() == vm.StatePaused:
			err := a.vm.Resume(r.ctx)
			r.note("repair: resume %s in %s: %v", a.id, a.vm, err)
		}
	}
	kept := r.leftovers[:0]
	for _, v := range r.leftovers {
		if v.gone() || !v.h.alive || v.epoch != v.h.epoch {
			continue // gone, or gone with its host
		}
		if err := v.Destroy(r.ctx); err != nil {
			r.note("repair: destroy %s: %v", v, err)
			kept = append(kept, v)
		}
	}
	r.leftovers = kept
}

// resolveDoubt asks the store whether the move of agent a, whose commit
// had no known outcome, took effect: if so the agent is in flight in that
// package and its paused source goes; if not the source resumes. While the
// store does not answer the agent stays in doubt, paused.
func (r *run) resolveDoubt(a *agent) {
	pkg := a.doubt
	_, err := a.host.svc.Store().Stat(r.ctx, pkg)
	switch {
	case err == nil:
		r.note("repair: %s's package %s is committed; its source %s goes", a.id, pkg, a.vm)
		r.destroyOrKeep(a.vm, "source of "+a.id)
		a.status, a.pkg, a.host, a.vm, a.doubt = statusStored, pkg, nil, nil, ""
	case errors.Is(err, teleport.ErrNotFound):
		err := a.vm.Resume(r.ctx)
		r.note("repair: %s's package %s was never committed; resume %s: %v", a.id, pkg, a.vm, err)
		if err == nil {
			a.doubt = ""
		}
	default:
		r.note("repair: %s stays in doubt: %v", a.id, err)
	}
}

// workspaceRuntime is the simulated agent runtime on a checkpoint's new
// VM: it takes the workspace (verified by the service as it streams) and
// replays it into the guest.
type workspaceRuntime struct{ staged []byte }

func (w *workspaceRuntime) Stage(rd io.Reader) (err error) {
	w.staged, err = readAllBounded(rd, workspaceMaxBytes)
	return err
}

func (w *workspaceRuntime) Restore(ctx context.Context, inst vm.Instance) error {
	kv, err := decodeWorkspace(w.staged)
	if err != nil {
		return err
	}
	for _, k := range sortedKeys(kv) {
		res, err := inst.Exec(ctx, "set", []string{k, kv[k]}, vm.ExecOptions{Timeout: execTimeout})
		if err != nil {
			return fmt.Errorf("replay workspace: %w", err)
		}
		if res.ExitCode != 0 {
			return fmt.Errorf("replay workspace: set %s exited %d: %w", k, res.ExitCode, vm.ErrGuest)
		}
	}
	return nil
}

// The workspace format: the SHA-256 of the JSON state, a newline, the JSON
// (an archive carries its own checksum, as a tar.gz does).
func encodeWorkspace(kv map[string]string) []byte {
	j, _ := json.Marshal(kv) // map keys are sorted: deterministic
	s := sha256.Sum256(j)
	return append([]byte(hex.EncodeToString(s[:])+"\n"), j...)
}

func decodeWorkspace(b []byte) (map[string]string, error) {
	const sumLen = 64
	if len(b) < sumLen+1 || b[sumLen] != '\n' {
		return nil, fmt.Errorf("workspace is malformed: %w", vm.ErrCorrupt)
	}
	j := b[sumLen+1:]
	s := sha256.Sum256(j)
	if hex.EncodeToString(s[:]) != string(b[:sumLen]) {
		return nil, fmt.Errorf("workspace checksum mismatch: %w", vm.ErrCorrupt)
	}
	kv := map[string]string{}
	if err := json.Unmarshal(j, &kv); err != nil {
		return nil, fmt.Errorf("workspace unreadable: %v: %w", err, vm.ErrCorrupt)
	}
	return kv, nil
}
