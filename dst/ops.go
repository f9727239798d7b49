package dst

import (
	"fmt"
	"math/rand/v2"
	"strings"

	"github.com/kelpie/teleport"
)

// OpKind is what one step does.
type OpKind int

// The operations. The first group is the workload, the second the
// environment (faults that are whole steps), the third housekeeping.
const (
	OpSpawn          OpKind = iota // boot a new agent on a host
	OpExec                         // run a guest command that changes the agent's state
	OpMove                         // teleport an agent to another host
	OpFork                         // copy an agent to a host as a new agent
	OpSuspend                      // suspend an agent to its own host
	OpResume                       // restore a stored agent on a host
	OpCheckpoint                   // move an agent as a checkpoint (crosses architectures)
	OpCrashHost                    // an idle host dies
	OpRestartHost                  // a dead host comes back
	OpCrashVM                      // an agent's VM dies
	OpCorrupt                      // a bit flips in a committed blob
	OpDeletePackages               // the controller deletes packages nothing needs
	OpGC                           // the store removes orphaned uploads
	OpIdle                         // nothing applicable
	numOpKinds
)

var opNames = [numOpKinds]string{"spawn", "exec", "move", "fork", "suspend", "resume", "checkpoint",
	"crash-host", "restart-host", "crash-vm", "corrupt", "delete-packages", "gc", "idle"}

func (k OpKind) String() string {
	if k >= 0 && k < numOpKinds {
		return opNames[k]
	}
	return fmt.Sprintf("op(%d)", int(k))
}

// Op is one step of a scenario. It names everything it touches, so a
// recorded sequence can be replayed (and shrunk) without the generator;
// names of what it creates derive from Step, so dropping other operations
// never renames them.
type Op struct {
	Step     int
	Kind     OpKind
	Agent    string // the agent acted on (the new agent for spawn and fork)
	Source   string // fork: the agent copied
	Host     int    // spawn, crash-host, restart-host, delete-packages: the host
	Target   int    // move, fork, resume, checkpoint: the destination host
	PkgKind  teleport.SnapshotKind
	Mismatch string // "arch" or "version": the target was chosen to be refused
	Cmd      string
	Args     []string
	Pkg      string // corrupt: the package
	Bit      uint64 // corrupt: which bit (modulo the blob's bits)
}

func (o Op) String() string {
	var b strings.Builder
	b.WriteString(o.Kind.String())
	switch o.Kind {
	case OpSpawn:
		fmt.Fprintf(&b, " %s on h%d", o.Agent, o.Host)
	case OpExec:
		fmt.Fprintf(&b, " %s: %s %s", o.Agent, o.Cmd, strings.Join(o.Args, " "))
	case OpMove, OpCheckpoint, OpResume:
		fmt.Fprintf(&b, " %s to h%d as %s", o.Agent, o.Target, o.PkgKind)
	case OpFork:
		fmt.Fprintf(&b, " %s as %s to h%d as %s", o.Source, o.Agent, o.Target, o.PkgKind)
	case OpSuspend:
		fmt.Fprintf(&b, " %s", o.Agent)
	case OpCrashHost, OpRestartHost, OpDeletePackages:
		fmt.Fprintf(&b, " h%d", o.Host)
	case OpCrashVM:
		fmt.Fprintf(&b, " of %s", o.Agent)
	case OpCorrupt:
		fmt.Fprintf(&b, " %s bit %d", o.Pkg, o.Bit)
	}
	if o.Mismatch != "" {
		fmt.Fprintf(&b, " (deliberate %s mismatch)", o.Mismatch)
	}
	return b.String()
}

func agentName(step int) string   { return fmt.Sprintf("a%d", step) }
func packageName(step int) string { return fmt.Sprintf("pkg-s%d", step) }
func vmName(h *host, step, n int) string {
	return fmt.Sprintf("%s-s%d-%d", h.cfg.ID, step, n)
}

const (
	guestKeys   = 6 // the workload touches keys k0..k5: guest state stays small
	valueMaxLen = 12
)

// generate picks the operation of one step from the scenario stream and the
// registry. Environment events come first at their per-step probability;
// otherwise a weighted choice among the workload operations that apply.
func (r *run) generate(g *rand.Rand, step int) Op {
	op := Op{Step: step, Kind: OpIdle}
	p := &r.cfg.profile
	alive := r.aliveHosts()
	running, stored := r.agentsWith(statusRunning), r.agentsWith(statusStored)

	if len(alive) > 0 && g.Float64() < p.P[EnvHostCrash] {
		op.Kind, op.Host = OpCrashHost, alive[g.IntN(len(alive))].idx
		return op
	}
	if len(running) > 0 && g.Float64() < p.P[EnvVMCrash] {
		op.Kind, op.Agent = OpCrashVM, running[g.IntN(len(running))].id
		return op
	}
	if g.Float64() < p.P[StoreCorruptAtRest] {
		if pkg := r.pickCorruptTarget(g, stored); pkg != "" {
			op.Kind, op.Pkg, op.Bit = OpCorrupt, pkg, g.Uint64()
			return op
		}
	}
	if dead := r.deadHosts(); len(dead) > 0 && g.IntN(4) == 0 {
		op.Kind, op.Host = OpRestartHost, dead[g.IntN(len(dead))].idx
		return op
	}

	total := len(running) + len(stored)
	var weights [numOpKinds]int
	if len(alive) > 0 && total < r.maxAgents {
		weights[OpSpawn] = 2
		if total == 0 {
			weights[OpSpawn] = 8
		}
	}
	if len(running) > 0 {
		weights[OpExec] = 8
		weights[OpSuspend] = 1
		weights[OpMove] = 3
		weights[OpCheckpoint] = 1
		if total < r.maxAgents {
			weights[OpFork] = 1
		}
	}
	if len(stored) > 0 {
		weights[OpResume] = 4
	}
	weights[OpDeletePackages] = 1
	weights[OpGC] = 1
	sum := 0
	for _, w := range weights {
		sum += w
	}
	x := g.IntN(sum)
	kind := OpKind(0)
	for k, w := range weights {
		if x < w {
			kind = OpKind(k)
			break
		}
		x -= w
	}
	switch kind {
	case OpSpawn:
		op.Kind, op.Agent, op.Host = OpSpawn, agentName(step), alive[g.IntN(len(alive))].idx
	case OpExec:
		a := running[g.IntN(len(running))]
		op.Kind, op.Agent = OpExec, a.id
		key := fmt.Sprintf("k%d", g.IntN(guestKeys))
		switch g.IntN(8) {
		case 0, 1, 2:
			op.Cmd, op.Args = "set", []string{key, randValue(g)}
		case 3, 4, 5:
			op.Cmd, op.Args = "incr", []string{key}
		case 6:
			op.Cmd, op.Args = "del", []string{key}
		default:
			op.Cmd, op.Args = "get", []string{key}
		}
	case OpSuspend:
		a := running[g.IntN(len(running))]
		op.Kind, op.Agent, op.Target, op.PkgKind = OpSuspend, a.id, a.host.idx, teleport.KindSuspend
	case OpMove, OpFork, OpCheckpoint:
		a := running[g.IntN(len(running))]
		if !r.pickTarget(g, &op, a, kind) {
			return op
		}
		op.Kind = kind
		op.Agent = a.id
		if kind == OpFork {
			op.Source, op.Agent = a.id, agentName(step)
		}
	case OpResume:
		a := stored[g.IntN(len(stored))]
		if !r.pickResumeTarget(g, &op, a) {
			return op
		}
		op.Kind, op.Agent = OpResume, a.id
	case OpDeletePackages:
		if len(alive) > 0 {
			op.Kind, op.Host = OpDeletePackages, alive[g.IntN(len(alive))].idx
		}
	case OpGC:
		op.Kind = OpGC
	}
	return op
}

func randValue(g *rand.Rand) string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 1+g.IntN(valueMaxLen))
	for i := range b {
		b[i] = letters[g.IntN(len(letters))]
	}
	return string(b)
}

// pickTarget chooses the destination and kind of a move, fork or
// checkpoint of agent a: a host the controller expects to accept it, or,
// at the profile's target.* probabilities, one chosen to be refused.
func (r *run) pickTarget(g *rand.Rand, op *Op, a *agent, kind OpKind) bool {
	src := a.host
	p := &r.cfg.profile
	var cands []*host
	other := func(keep func(h *host) bool) []*host {
		var out []*host
		for _, h := range r.aliveHosts() {
			if (h != src || kind == OpFork) && keep(h) {
				out = append(out, h)
			}
		}
		return out
	}
	if kind != OpCheckpoint && g.Float64() < p.P[TargetArchMismatch] {
		if cands = other(func(h *host) bool { return h.cfg.Arch != src.cfg.Arch }); len(cands) > 0 {
			t := cands[g.IntN(len(cands))]
			op.Target, op.PkgKind, op.Mismatch = t.idx, teleport.KindTeleport, "arch"
			return true
		}
	}
	if g.Float64() < p.P[TargetVersionMismatch] {
		if cands = other(func(h *host) bool { return majorMinor(h.cfg.BaseImage) != majorMinor(src.cfg.BaseImage) }); len(cands) > 0 {
			t := cands[g.IntN(len(cands))]
			op.Target, op.Mismatch = t.idx, "version"
			op.PkgKind = r.controllerKind(src, t)
			if kind == OpCheckpoint {
				op.PkgKind = teleport.KindCheckpoint
			}
			return true
		}
	}
	if kind == OpCheckpoint {
		// A checkpoint is how an agent crosses architectures: prefer that.
		same := other(func(h *host) bool { return majorMinor(h.cfg.BaseImage) == majorMinor(src.cfg.BaseImage) })
		cands = nil
		for _, h := range same {
			if h.cfg.Arch != src.cfg.Arch {
				cands = append(cands, h)
			}
		}
		if len(cands) == 0 {
			cands = same
		}
		if len(cands) == 0 {
			return false
		}
		op.Target, op.PkgKind = cands[g.IntN(len(cands))].idx, teleport.KindCheckpoint
		return true
	}
	cands = other(func(h *host) bool {
		return verdict(packageFacts{kind: r.controllerKind(src, h), src: src.cfg}, h.cfg, false) == nil
	})
	if len(cands) == 0 {
		return false
	}
	t := cands[g.IntN(len(cands))]
	op.Target, op.PkgKind = t.idx, r.controllerKind(src, t)
	return true
}

// pickResumeTarget chooses where a stored agent is restored: a host the
// rules allow, or, at the target.* probabilities, one they forbid.
func (r *run) pickResumeTarget(g *rand.Rand, op *Op, a *agent) bool {
	e := r.expect[a.pkg]
	if e == nil {
		return false
	}
	p := &r.cfg.profile
	pick := func(mismatch string, keep func(h *host) bool) bool {
		var cands []*host
		for _, h := range r.aliveHosts() {
			if keep(h) {
				cands = append(cands, h)
			}
		}
		if len(cands) == 0 {
			return false
		}
		op.Target, op.PkgKind, op.Mismatch = cands[g.IntN(len(cands))].idx, e.kind, mismatch
		return true
	}
	if e.kind.FullVM() && g.Float64() < p.P[TargetArchMismatch] &&
		pick("arch", func(h *host) bool { return h.cfg.Arch != e.src.Arch }) {
		return true
	}
	if g.Float64() < p.P[TargetVersionMismatch] &&
		pick("version", func(h *host) bool { return majorMinor(h.cfg.BaseImage) != majorMinor(e.src.BaseImage) }) {
		return true
	}
	return pick("", func(h *host) bool { return verdict(e.packageFacts, h.cfg, false) == nil })
}

// pickCorruptTarget prefers packages that are some agent's only copy:
// corrupting garbage proves little.
func (r *run) pickCorruptTarget(g *rand.Rand, stored []*agent) string {
	if len(stored) > 0 && g.IntN(5) != 0 {
		return stored[g.IntN(len(stored))].pkg
	}
	ids := r.store.Committed()
	if len(ids) == 0 {
		return ""
	}
	return ids[g.IntN(len(ids))]
}

// controllerKind is the kind the controller sends from src to dst: what
// teleport.ChooseKind says, except that a host-bound simulated backend is
// never asked to send a full snapshot elsewhere (ChooseKind cannot see that
// a "sim" backend is host-bound; see the report).
func (r *run) controllerKind(src, dst *host) teleport.SnapshotKind {
	k, _ := teleport.ChooseKind(src.fac.Host(), dst.fac.Host())
	if src.cfg.hostBound() && src != dst && k != teleport.KindCheckpoint {
		return teleport.KindCheckpoint
	}
	return k
}
