package dst

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// check compares the model with the real objects after a step.
func (r *run) check() {
	// First, so that a package committed onto a chunk damaged at rest
	// counts as damaged below.
	r.checkChunks()
	// Live VMs per agent, from the hosts themselves. A paused leftover
	// (a VM a committed move or a failed restore could not remove, and
	// said so, naming it) is condemned: nothing resumes it (a host
	// refuses to run a moved-out source: host.refuseMoved), and the
	// controller destroys it as soon as the hypervisor lets it. One that
	// runs counts.
	condemned := map[*hostVM]bool{}
	for _, v := range r.leftovers {
		condemned[v] = v.State() != vm.StateRunning
	}
	live := map[string][]*hostVM{}
	for _, h := range r.hosts {
		if !h.alive {
			continue
		}
		for _, v := range h.vms {
			if v.agent != "" && v.live() && !condemned[v] {
				live[v.agent] = append(live[v.agent], v)
			}
		}
	}
	for _, a := range r.agents {
		vs := live[a.id]
		switch a.status {
		case statusRunning:
			r.checkRunning(a)
			if a.status == statusRunning {
				for _, v := range vs {
					if v != a.vm {
						r.violate(InvSingleActivation, "agent %s runs in %s on %s and also in %s on %s", a.id, a.vm, a.host.cfg.ID, v, v.h.cfg.ID)
					}
				}
			} else if len(vs) > 0 {
				r.violate(InvSingleActivation, "agent %s is lost yet runs in %s", a.id, vs[0])
			}
		case statusStored:
			for _, v := range vs {
				r.violate(InvSingleActivation, "agent %s is in flight in package %s yet runs in %s on %s", a.id, a.pkg, v, v.h.cfg.ID)
			}
			t := r.truth(a.pkg)
			if !t.holds(a.kv) && !r.rotted[a.pkg] {
				r.violate(InvNoLoss, "agent %s is not running and its package %s cannot restore it: %s", a.id, a.pkg, t.why)
			}
		case statusLost:
			for _, v := range vs {
				r.violate(InvSingleActivation, "agent %s was lost yet runs in %s", a.id, v)
			}
		}
	}
	for _, id := range r.store.Committed() {
		if t := r.truth(id); !t.blobOK && !r.rotted[id] {
			r.violate(InvCommitAtomicity, "committed package %s is incomplete: %s", id, t.blobWhy)
		}
	}
}

// chunkCopy is a chunk as one pack holds it.
type chunkCopy struct {
	pack string
	id   teleport.ChunkID
}

// chunkSet is what a committed version 2 package refers to, worked out
// from its body.
type chunkSet struct {
	version uint64
	packs   []string
	ids     []teleport.ChunkID
	refs    map[teleport.ChunkID]blob.ChunkRef
	hash    blob.HashID
	err     error
}

func (r *run) chunksOf(id string) *chunkSet {
	obj, ok := r.store.Peek(id)
	if !ok {
		return nil
	}
	if cs := r.chunkSets[id]; cs != nil && cs.version == obj.Version {
		return cs
	}
	cs := &chunkSet{version: obj.Version}
	r.chunkSets[id] = cs
	m, err := decodeManifest(id, obj.Manifest)
	if err != nil || m.Format != blob.Version2 {
		return cs
	}
	cs.packs = m.ChunkPacks
	sec, ok := m.Section(teleport.SectionBlob)
	if !ok || sec.Offset+sec.Size > int64(len(obj.Blob)) {
		cs.err = fmt.Errorf("no blob section")
		return cs
	}
	b, err := blob.OpenV2(bytes.NewReader(obj.Blob[sec.Offset:sec.Offset+sec.Size]), sec.Size, blob.OpenOptions{Workers: 1})
	if err != nil {
		cs.err = err
		return cs
	}
	cs.refs, cs.hash = map[teleport.ChunkID]blob.ChunkRef{}, b.Header().Hash
	add := func(r blob.ChunkRef) {
		if _, ok := cs.refs[r.ID]; !ok {
			cs.refs[r.ID] = r
			cs.ids = append(cs.ids, r.ID)
		}
	}
	for _, ref := range b.DeviceStateRefs() {
		add(ref)
	}
	for _, e := range slices.Concat(b.PageMap(), b.DiskPageMap()) {
		add(e.Ref)
	}
	return cs
}

// checkChunks: every chunk a committed package refers to is in the
// store (ChunkSafety); a package that refers to a chunk damaged at rest
// is damaged too.
func (r *run) checkChunks() {
	for _, id := range r.store.Committed() {
		cs := r.chunksOf(id)
		if cs == nil || len(cs.ids) == 0 {
			continue
		}
		cr, err := r.store.PeekChunks(r.ctx, cs.packs)
		for _, c := range cs.ids {
			if err != nil || r.rotted[id] {
				break
			}
			if pack, _, _ := r.store.ChunkLocation(cr, c); r.rottenChunks[chunkCopy{pack, c}] {
				r.rotted[id], r.corrupt[id] = true, true
				r.note("package %s refers to chunk %s, damaged at rest in pack %s", id, c.Short(), pack)
			}
		}
		if err == nil {
			err = cr.FetchChunks(r.ctx, cs.ids, func(teleport.ChunkID, []byte) error { return nil })
		}
		if err != nil {
			r.violate(InvChunkSafety, "committed package %s refers to chunks that are not in the store: %v", id, err)
			return
		}
	}
}

// checkRunning checks a running agent's VM, and retires the agent when an
// injected fault killed it.
func (r *run) checkRunning(a *agent) {
	v := a.vm
	st := v.State()
	switch {
	case !a.host.alive || v.epoch != a.host.epoch:
		r.lose(a, "host "+a.host.cfg.ID+" crashed")
	case st == vm.StateCrashed && r.crashedVM[v.ID()]:
		r.lose(a, "VM "+v.ID()+" crashed")
	case v.gone() || !isLive(st):
		r.violate(InvNoLoss, "agent %s should run in %s on %s, which is %s (destroyed=%v) with no injected crash", a.id, v, a.host.cfg.ID, st, v.gone())
	default:
		if got := v.guest(); !maps.Equal(got, a.kv) {
			r.violate(InvSnapshotConsistency, "agent %s in %s holds %v, the model says %v", a.id, v, got, a.kv)
		}
	}
}

// pkgTruth is what a committed package really holds, worked out from the
// store's bytes without faults. It is cached per object version.
type pkgTruth struct {
	version   uint64
	blobOK    bool   // the blob is the one the manifest describes
	blobWhy   string // why not
	kvHash    string // the guest state it restores to ("" if it cannot)
	why       string // why it cannot restore its agent
	somewhere bool   // some host of the fleet may restore it
}

// holds reports whether the package restores exactly kv somewhere.
func (t *pkgTruth) holds(kv map[string]string) bool {
	return t.kvHash != "" && t.somewhere && t.kvHash == sim.GuestHash(kv)
}

func (r *run) truth(id string) *pkgTruth {
	obj, ok := r.store.Peek(id)
	if !ok {
		return &pkgTruth{why: "no such package in the store", blobWhy: "not committed"}
	}
	if t := r.truths[id]; t != nil && t.version == obj.Version {
		return t
	}
	t := &pkgTruth{version: obj.Version}
	r.truths[id] = t
	m, err := decodeManifest(id, obj.Manifest)
	if err != nil {
		t.blobWhy, t.why = err.Error(), err.Error()
		return t
	}
	sum := sha256.Sum256(obj.Blob)
	switch {
	case m.SizeBytes != int64(len(obj.Blob)):
		t.blobWhy = fmt.Sprintf("blob has %d bytes, manifest says %d", len(obj.Blob), m.SizeBytes)
	case m.BlobSHA256 != hex.EncodeToString(sum[:]):
		t.blobWhy = "blob sha256 differs from the manifest"
	default:
		t.blobOK = true
	}
	e := r.expect[id]
	if e == nil {
		t.why = "the model did not make this package"
		return t
	}
	for _, h := range r.hosts {
		if verdict(e.packageFacts, h.cfg, false) == nil {
			t.somewhere = true
			break
		}
	}
	if !t.somewhere {
		t.why = "no host of the fleet may restore it"
	}
	var kv map[string]string
	if e.kind == teleport.KindCheckpoint {
		ws, ok := m.Section(teleport.SectionWorkspace)
		if !ok || ws.Offset+ws.Size > int64(len(obj.Blob)) {
			t.why = "its workspace section is missing"
			return t
		}
		if kv, err = decodeWorkspace(obj.Blob[ws.Offset : ws.Offset+ws.Size]); err != nil {
			t.why = err.Error()
			return t
		}
	} else if kv, err = r.probeRestore(e, m, obj.Blob); err != nil {
		t.why = err.Error()
		return t
	}
	t.kvHash = sim.GuestHash(kv)
	if t.why == "" && !maps.Equal(kv, e.kv) {
		t.why = fmt.Sprintf("it restores %v, not the %v snapshotted", kv, e.kv)
	}
	return t
}

// probeRestore restores a full-VM package the way a correct host would,
// on a fault-free factory shaped like its source host, and returns the
// guest state.
func (r *run) probeRestore(e *pkgExpect, m *teleport.Package, b []byte) (map[string]string, error) {
	if m.Snapshot == nil {
		return nil, fmt.Errorf("manifest has no snapshot metadata")
	}
	o := blob.OpenOptions{Workers: 1}
	if m.Format == blob.Version2 {
		cr, err := r.store.PeekChunks(r.ctx, m.ChunkPacks)
		if err != nil {
			return nil, err
		}
		o.Chunks = cr
	}
	snap, err := blob.OpenPackage(m, bytes.NewReader(b), int64(len(b)), o)
	if err != nil {
		return nil, err
	}
	if err := vm.VerifyPayloads(snap); err != nil {
		return nil, err
	}
	f := r.probes[e.src.ID]
	if f == nil {
		f = sim.NewFactory(e.src.simOptions())
		r.probes[e.src.ID] = f
	}
	inst, err := f.CreateFromSnapshot(r.ctx, vm.Config{VCPUs: 1, MemoryMiB: 64}, snap)
	if err != nil {
		return nil, err
	}
	kv := inst.(*sim.VM).GuestState()
	inst.Destroy(r.ctx)
	return kv, nil
}
