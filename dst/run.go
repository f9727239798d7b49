package dst

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"sort"
	"time"

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/internal/plant"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// The invariants, checked after every step.
const (
	// InvSnapshotConsistency: a restored VM's guest state equals the state
	// at the moment of its snapshot (and a running agent's guest state
	// equals the model's).
	InvSnapshotConsistency = "SnapshotConsistency"
	// InvArchitectureValidation: no suspend/teleport snapshot is restored on
	// another architecture.
	InvArchitectureValidation = "ArchitectureValidation"
	// InvVersionCompatibility: no restore across a base image MAJOR.MINOR
	// difference.
	InvVersionCompatibility = "VersionCompatibility"
	// InvNoPartialRestore: a restore either yields a running, usable VM or
	// leaves no VM behind.
	InvNoPartialRestore = "NoPartialRestore"
	// InvNoLoss: every agent is running on some host or restorable from a
	// committed package, unless an injected fault destroyed its last copy.
	InvNoLoss = "NoLoss"
	// InvSingleActivation: an agent never runs in two places at once, nor
	// while its move is in flight.
	InvSingleActivation = "SingleActivation"
	// InvRefusalReason: every refused restore carries the category the
	// rules imply, and no restore fails without a fault or a rule.
	InvRefusalReason = "RefusalReason"
	// InvOutAtomicity: a failed teleport out leaves the source as it was
	// and no package visible (unless the service reported that it could not
	// remove it).
	InvOutAtomicity = "OutAtomicity"
	// InvCommitAtomicity: a committed package is complete: its blob is the
	// one its manifest describes, unless corruption at rest was injected.
	InvCommitAtomicity = "CommitAtomicity"
	// InvChunkSafety: GC never removes a chunk that a committed package,
	// or an upload in flight that may still commit, refers to.
	InvChunkSafety = "ChunkSafety"
)

// Invariants lists every invariant.
var Invariants = []string{InvSnapshotConsistency, InvArchitectureValidation, InvVersionCompatibility,
	InvNoPartialRestore, InvNoLoss, InvSingleActivation, InvRefusalReason, InvOutAtomicity, InvCommitAtomicity, InvChunkSafety}

// Violation is one broken invariant.
type Violation struct {
	Seed      uint64 `json:"seed"`
	Step      int    `json:"step"`
	Invariant string `json:"invariant"`
	Detail    string `json:"detail"`
	Op        string `json:"op"`
	Replay    string `json:"replay"`
}

func (v Violation) String() string {
	return fmt.Sprintf("seed %d step %d: %s violated: %s (op: %s); replay: %s", v.Seed, v.Step, v.Invariant, v.Detail, v.Op, v.Replay)
}

// Result is what one run did.
type Result struct {
	Seed            uint64
	Steps           int // steps executed
	Teleports       int // teleport outs attempted
	Restores        int // teleport ins attempted
	RestoresRefused int
	FaultsInjected  int
	FaultCounts     [numPoints]int
	AgentsLost      int // agents whose last copy an injected fault destroyed
	Violations      []Violation
	TraceHash       string
	// Ops is the operation sequence executed, for Replay and Shrink.
	Ops []Op
}

type agentStatus int

const (
	statusRunning agentStatus = iota
	statusStored
	statusLost
)

// agent is the model's record of one agent: the registry entry (where it
// is) and its expected guest state.
type agent struct {
	id     string
	kv     map[string]string
	status agentStatus
	host   *host   // running: where
	vm     *hostVM // running: in which VM
	pkg    string  // stored: the package holding it
	// doubt, while running: a move's package whose commit had no known
	// outcome; the source is paused until the controller finds out.
	doubt string
}

// pkgExpect is what the model expects a package to hold.
type pkgExpect struct {
	packageFacts
	id, agent string
	kv        map[string]string
}

type run struct {
	cfg   Config
	ctx   context.Context
	clock *Clock
	store *Store
	inj   *injector
	tr    *tracer
	hosts []*host
	step  int
	op    Op

	agents    []*agent // in creation order
	byID      map[string]*agent
	maxAgents int
	expect    map[string]*pkgExpect
	corrupt   map[string]bool // packages whose bytes an injected fault damaged (in the snapshot or at rest)
	rotted    map[string]bool // packages damaged at rest: an environment loss, not the service's
	crashedVM map[string]bool // VMs an injected fault crashed
	truths    map[string]*pkgTruth
	probes    map[string]*sim.Factory
	// rottenChunks are the copies of chunks damaged at rest (a chunk id
	// in a pack): every package whose reader finds a chunk there is
	// damaged too. A copy of the chunk in another pack (uploaded again
	// after its pack was condemned) is sound.
	rottenChunks map[chunkCopy]bool
	chunkSets    map[string]*chunkSet
	autoIDs      int
	// leftovers are VMs a failed operation could not remove (and said
	// so); the controller retries.
	leftovers []*hostVM

	objectLimit int64
	res         Result
}

func newRun(cfg Config) (*run, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	r := &run{
		cfg: cfg, ctx: context.Background(), clock: NewClock(), byID: map[string]*agent{},
		expect: map[string]*pkgExpect{}, corrupt: map[string]bool{}, rotted: map[string]bool{}, crashedVM: map[string]bool{},
		truths: map[string]*pkgTruth{}, probes: map[string]*sim.Factory{}, objectLimit: objectLimitBytes,
		rottenChunks: map[chunkCopy]bool{}, chunkSets: map[string]*chunkSet{},
		maxAgents: 2 * cfg.Hosts,
	}
	r.tr = newTracer(cfg.Trace)
	r.inj = &injector{prof: &r.cfg.profile, clock: r.clock, tr: r.tr, rng: Stream(cfg.Seed, "setup")}
	r.store = NewStore(StoreOptions{Clock: r.clock, Faults: r.inj, ObjectSizeMaxBytes: r.objectLimit, Bugs: cfg.storeBugs(),
		OnChunkViolation: func(d string) { r.violate(InvChunkSafety, "%s", d) }})
	plant.SetChunkBugs(r.store.space, cfg.chunkBugs())
	r.inj.gc = func() {
		n, err := r.store.GC(r.ctx)
		r.note("    gc (racing) removed %d (err %v)", n, err)
		r.checkChunks()
	}
	r.res.Seed = cfg.Seed
	r.tr.linef("dst seed=%d steps=%d hosts=%d faults=%s bug=%s", cfg.Seed, cfg.Steps, cfg.Hosts, cfg.Faults, bugName(cfg.Bug))
	formats := Stream(cfg.Seed, "formats")
	for i, hc := range topology(cfg.Seed, cfg.Hosts) {
		// Most hosts write the compact format; some keep version 1, so
		// both are written, read and mixed.
		hc.Format = blob.Version2
		if formats.IntN(4) == 0 {
			hc.Format = blob.Version1
		}
		h := newHost(r, hc)
		h.idx = i
		r.hosts = append(r.hosts, h)
		r.tr.linef("host h%d %s", i, hc)
	}
	return r, nil
}

func bugName(b Bug) string {
	if b == BugNone {
		return "none"
	}
	return string(b)
}

// topology draws the fleet: architectures, base images (mostly
// compatible, some a MINOR apart), backend kinds and, rarely, a host whose
// backend facts differ.
func topology(seed uint64, n int) []HostConfig {
	g := Stream(seed, "topology")
	images := []string{"1.2.0", "1.2.0", "1.2.3", "1.2.3", "1.3.0"}
	out := make([]HostConfig, n)
	for i := range out {
		c := HostConfig{ID: fmt.Sprintf("h%d", i), Arch: vm.ArchX86_64, BaseImage: images[g.IntN(len(images))], Kind: KindFC, MemoryBytes: simMemoryBytes}
		if g.IntN(2) == 0 {
			c.Arch = vm.ArchArm64
		}
		if g.IntN(10) < 3 {
			c.Kind = KindVZ
		}
		if g.IntN(10) == 0 {
			c.MemoryBytes = 2 * simMemoryBytes
		}
		out[i] = c
	}
	return out
}

// Run runs one seed: it generates and executes cfg.Steps operations,
// checking every invariant after each, and stops at the first step that
// breaks one.
func Run(cfg Config) (*Result, error) {
	r, err := newRun(cfg)
	if err != nil {
		return nil, err
	}
	gen := Stream(r.cfg.Seed, "scenario")
	for step := 0; step < r.cfg.Steps && len(r.res.Violations) == 0; step++ {
		op := r.generate(gen, step)
		r.res.Ops = append(r.res.Ops, op)
		r.execute(op)
	}
	return r.finish(), nil
}

// Replay executes a recorded operation sequence (or a subset of one) under
// cfg. Operations whose agent or host is not in the state they need are
// skipped; faults are drawn per operation from its original step, so the
// operations that remain see the same faults.
func Replay(cfg Config, ops []Op) (*Result, error) {
	r, err := newRun(cfg)
	if err != nil {
		return nil, err
	}
	for _, op := range ops {
		if len(r.res.Violations) > 0 {
			break
		}
		r.res.Ops = append(r.res.Ops, op)
		r.execute(op)
	}
	return r.finish(), nil
}

func (r *run) finish() *Result {
	r.res.FaultsInjected = r.inj.total
	r.res.FaultCounts = r.inj.counts
	r.tr.linef("end steps=%d teleports=%d restores=%d refused=%d faults=%d lost=%d violations=%d", r.res.Steps, r.res.Teleports,
		r.res.Restores, r.res.RestoresRefused, r.res.FaultsInjected, r.res.AgentsLost, len(r.res.Violations))
	r.res.TraceHash = r.tr.sum()
	res := r.res // a copy: the result must not keep the whole run alive
	return &res
}

func (r *run) autoPackageID() string {
	r.autoIDs++
	return fmt.Sprintf("pkg-auto-%d", r.autoIDs)
}

func (r *run) onServiceStep(step string, d time.Duration) {
	r.tr.linef("    . %s %s", step, d)
}

func (r *run) violate(inv, format string, args ...any) {
	v := Violation{Seed: r.cfg.Seed, Step: r.step, Invariant: inv, Detail: fmt.Sprintf(format, args...), Op: r.op.String(), Replay: r.cfg.ReplayCommand()}
	r.res.Violations = append(r.res.Violations, v)
	r.tr.linef("    VIOLATION %s: %s", inv, v.Detail)
}

func (r *run) note(format string, args ...any) { r.tr.linef("    "+format, args...) }

// Registry queries. Every list is in a fixed order (hosts by index,
// agents by creation), never in map order.

func (r *run) aliveHosts() []*host {
	var out []*host
	for _, h := range r.hosts {
		if h.alive {
			out = append(out, h)
		}
	}
	return out
}

func (r *run) deadHosts() []*host {
	var out []*host
	for _, h := range r.hosts {
		if !h.alive {
			out = append(out, h)
		}
	}
	return out
}

func (r *run) agentsWith(s agentStatus) []*agent {
	var out []*agent
	for _, a := range r.agents {
		if a.status == s && (s != statusRunning || a.host.alive) {
			out = append(out, a)
		}
	}
	return out
}

func (r *run) addAgent(a *agent) {
	r.agents = append(r.agents, a)
	r.byID[a.id] = a
}

func (r *run) lose(a *agent, why string) {
	a.status, a.vm, a.host = statusLost, nil, nil
	r.res.AgentsLost++
	r.note("agent %s lost to injected faults: %s", a.id, why)
}

// isLocation reports whether a package is some agent's registered home.
func (r *run) isLocation(id string) bool {
	for _, a := range r.agents {
		if a.status == statusStored && a.pkg == id {
			return true
		}
	}
	return false
}

// tracer writes the trace and hashes it.
type tracer struct {
	h   hash.Hash
	w   io.Writer
	buf []byte
}

func newTracer(w io.Writer) *tracer { return &tracer{h: sha256.New(), w: w} }

func (t *tracer) linef(format string, args ...any) {
	t.buf = fmt.Appendf(t.buf[:0], format, args...)
	t.buf = append(t.buf, '\n')
	t.h.Write(t.buf)
	if t.w != nil {
		t.w.Write(t.buf)
	}
}

func (t *tracer) sum() string { return hex.EncodeToString(t.h.Sum(nil)) }

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
