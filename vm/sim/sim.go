// Package sim is a deterministic simulated VM backend. Its guest memory is
// real bytes that Exec changes deterministically (a small key-value machine:
// set, get, incr, del, keys, hash), so a test can prove that a restored VM
// holds exactly the state it had at snapshot time.
//
// Nothing here reads the wall clock, uses global randomness or depends on map
// order: time comes from an injected Clock and faults from an injected
// Faults hook, so the simulation (dst/) can drive it from a seed.
package sim

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Backend identity recorded in every snapshot.
const (
	BackendName    = "sim"
	BackendVersion = "1"
	// MemoryBytesDefault is the simulated guest RAM. It is deliberately
	// small (whatever Config.MemoryMiB says) so simulations stay fast.
	MemoryBytesDefault = 16 << 10
	memMagic           = "SIMM"
	singleMagic        = "SIMS"
)

// Clock tells simulated time.
type Clock interface{ Now() time.Time }

// Faults decides whether an operation fails. Point names are the vm.Op*
// constants plus "boot"; a nil error lets the operation proceed.
type Faults interface {
	Inject(point, vmID string) error
}

// Options configure a Factory.
type Options struct {
	Arch             vm.Architecture
	HostID           string
	Layout           vm.Layout // LayoutSplit (default) or LayoutSingle
	BaseImageVersion string
	MemoryBytes      int
	Clock            Clock  // default: a clock fixed at 2023-11-14, stepping 1 ms per reading
	Faults           Faults // default: none
	// HostBound marks snapshots as restorable only on this host (VZ-like).
	HostBound bool
	// Backend names the backend in snapshots and HostInfo (default
	// BackendName), so a simulation can run kinds of backends that must
	// not restore each other's snapshots.
	Backend string
	// OnCreate, when set, is told of every VM the factory makes, also one
	// that CreateFromSnapshot makes and removes again (so a simulation sees
	// a VM that a failed restore could not remove).
	OnCreate func(*VM)
}

// Factory creates simulated VMs on one simulated host.
type Factory struct {
	opts Options
	mu   sync.Mutex
	next int
}

var _ vm.Factory = (*Factory)(nil)
var (
	_ vm.Instance     = (*VM)(nil)
	_ vm.Reidentifier = (*VM)(nil)
)

// Keys of the simulated guest's memory that Reidentify writes, as a real
// guest's kernel keeps its hostname and RNG state in its RAM.
const (
	KeyHostname = "hostname"
	KeyRNG      = "rng"
)

// Reidentify gives the simulated guest a new identity: its hostname, and
// an RNG state mixed from the old one and the entropy (vm.Reidentifier).
func (v *VM) Reidentify(ctx context.Context, id vm.Identity) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.transition(ctx, vm.OpExec); err != nil {
		return err
	}
	h := sha256.New()
	h.Write([]byte(v.kv[KeyRNG]))
	h.Write(id.Entropy)
	v.kv[KeyHostname], v.kv[KeyRNG] = id.Hostname, hex.EncodeToString(h.Sum(nil))
	v.restored = nil // the guest's memory changed
	return nil
}

// NewFactory returns a factory for one simulated host.
func NewFactory(o Options) *Factory {
	if o.Arch == "" {
		o.Arch = vm.ArchX86_64
	}
	if o.HostID == "" {
		o.HostID = "sim-host"
	}
	if o.Layout == "" {
		o.Layout = vm.LayoutSplit
	}
	if o.Backend == "" {
		o.Backend = BackendName
	}
	if o.BaseImageVersion == "" {
		o.BaseImageVersion = "1.0.0"
	}
	if o.MemoryBytes <= 0 {
		o.MemoryBytes = MemoryBytesDefault
	}
	if o.Clock == nil {
		o.Clock = &StepClock{T: time.UnixMilli(1700000000000).UTC(), Step: time.Millisecond}
	}
	return &Factory{opts: o}
}

// Host describes the simulated host. It restores both layouts.
func (f *Factory) Host() vm.HostInfo {
	return vm.HostInfo{Arch: f.opts.Arch, Backend: f.opts.Backend, BackendVersion: BackendVersion, HostID: f.opts.HostID,
		BaseImageVersion: f.opts.BaseImageVersion, Compat: f.compat(), HostBound: f.opts.HostBound,
		Layouts: []vm.Layout{vm.LayoutSplit, vm.LayoutSingle}}
}

func (f *Factory) compat() map[string]string {
	return map[string]string{"sim_version": BackendVersion, "memory_bytes": strconv.Itoa(f.opts.MemoryBytes)}
}

// Options returns the factory's options.
func (f *Factory) Options() Options { return f.opts }

// Create makes a VM in state Created.
func (f *Factory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	return f.create(ctx, cfg)
}

func (f *Factory) create(ctx context.Context, cfg vm.Config) (*VM, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.next++
	id := fmt.Sprintf("%s-vm-%d", f.opts.HostID, f.next)
	f.mu.Unlock()
	if cfg.Name != "" {
		id = cfg.Name
	}
	v := &VM{f: f, id: id, cfg: cfg, state: vm.StateCreated, kv: map[string]string{}}
	if f.opts.OnCreate != nil {
		f.opts.OnCreate(v)
	}
	return v, nil
}

// CreateFromSnapshot makes a VM and restores snap into it (Paused). A
// snapshot this host cannot restore is refused before anything is made.
func (f *Factory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	if snap == nil {
		return nil, fmt.Errorf("restore: no snapshot: %w", vm.ErrInvalidConfig)
	}
	cfg = vm.ConfigFor(cfg, snap.Metadata)
	if err := vm.CheckSnapshot(snap.Metadata, f.Host()); err != nil {
		return nil, err
	}
	if err := vm.CheckShape(snap.Metadata, cfg); err != nil {
		return nil, err
	}
	v, err := f.create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := v.restore(ctx, snap); err != nil {
		return nil, vm.RemoveFailed(ctx, v, err)
	}
	return v, nil
}

// VM is one simulated VM.
type VM struct {
	f     *Factory
	id    string
	cfg   vm.Config
	mu    sync.Mutex
	state vm.State
	kv    map[string]string
	execs uint64
	// restored is the memory image a restore loaded, until the guest
	// changes it (then the image is kv's encoding again).
	restored []byte
	// destroyed: Destroy succeeded; the VM accepts nothing more.
	destroyed bool
	// crashPending: a Crash came while an operation held mu.
	crashPending atomic.Bool
}

// ID returns the VM id.
func (v *VM) ID() string { return v.id }

// Config returns the VM's configuration.
func (v *VM) Config() vm.Config { return v.cfg }

// State returns the VM's state.
func (v *VM) State() vm.State {
	v.mu.Lock()
	defer v.unlock()
	return v.state
}

func (v *VM) fault(point string) error {
	if v.f.opts.Faults == nil {
		return nil
	}
	return v.f.opts.Faults.Inject(point, v.id)
}

// transition checks legality and the fault hook; call with v.mu held.
func (v *VM) transition(ctx context.Context, op string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if v.destroyed {
		return fmt.Errorf("vm %s: %s: destroyed: %w", v.id, op, vm.ErrNotFound)
	}
	if v.state == vm.StateCrashed && op != vm.OpStop {
		return fmt.Errorf("vm %s: %s: %w", v.id, op, vm.ErrCrashed)
	}
	if err := vm.CheckTransition(v.id, op, v.state); err != nil {
		return err
	}
	return v.fault(op)
}

// Start boots the VM. A fresh boot has empty guest state.
func (v *VM) Start(ctx context.Context) error {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpStart); err != nil {
		return err
	}
	v.state = vm.StateStarting
	if err := v.fault("boot"); err != nil {
		v.state = vm.StateStopped
		return fmt.Errorf("vm %s: boot: %w", v.id, err)
	}
	v.state = vm.StateRunning
	return nil
}

// Stop stops the VM; guest memory is lost.
func (v *VM) Stop(ctx context.Context) error {
	v.mu.Lock()
	defer v.unlock()
	if v.state == vm.StateStopped {
		return nil
	}
	if err := v.transition(ctx, vm.OpStop); err != nil {
		return err
	}
	v.state = vm.StateStopped
	v.kv, v.restored = map[string]string{}, nil
	return nil
}

// Pause freezes the VM.
func (v *VM) Pause(ctx context.Context) error {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpPause); err != nil {
		return err
	}
	v.state = vm.StatePaused
	return nil
}

// Resume continues a paused VM.
func (v *VM) Resume(ctx context.Context) error {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpResume); err != nil {
		return err
	}
	v.state = vm.StateRunning
	return nil
}

// Crash simulates the hypervisor dying: guest memory is gone. Called while
// an operation on the VM is in progress (a simulated host dying inside a
// restore that reads from the store), it lands when that operation
// returns.
func (v *VM) Crash() {
	if !v.mu.TryLock() {
		v.crashPending.Store(true)
		return
	}
	defer v.unlock()
	v.crashLocked()
}

func (v *VM) crashLocked() {
	v.state = vm.StateCrashed
	v.kv, v.restored = map[string]string{}, nil
}

// unlock ends an operation, landing a crash that came during it.
func (v *VM) unlock() {
	if v.crashPending.Swap(false) && !v.destroyed {
		v.crashLocked()
	}
	v.mu.Unlock()
}

// OpDestroy is the fault point of Destroy.
const OpDestroy = "destroy"

// Destroy removes the VM. An injected fault fails it and leaves the VM as
// it was, as a hypervisor that will not die would.
func (v *VM) Destroy(ctx context.Context) error {
	v.mu.Lock()
	defer v.unlock()
	if v.destroyed {
		return nil
	}
	if err := v.fault(OpDestroy); err != nil {
		return fmt.Errorf("vm %s: destroy: %w", v.id, err)
	}
	v.state, v.destroyed = vm.StateStopped, true
	v.kv = map[string]string{}
	return nil
}

// Exec runs one command of the simulated guest:
//
//	set K V | get K | incr K | del K | keys | hash | echo ARGS... | exit N
func (v *VM) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpExec); err != nil {
		return vm.ExecResult{}, err
	}
	v.execs++
	switch cmd {
	case "set", "incr", "del":
		v.restored = nil // the guest wrote its memory
	}
	out, code := v.run(cmd, args)
	res := vm.ExecResult{ExitCode: code}
	if code == 0 {
		res.Stdout = []byte(out)
	} else {
		res.Stderr = []byte(out)
	}
	if opts.OutputLimitBytes > 0 && len(res.Stdout) > opts.OutputLimitBytes {
		res.Stdout, res.OutputTruncated = res.Stdout[:opts.OutputLimitBytes], true
	}
	if len(v.encodeMemory()) > v.f.opts.MemoryBytes {
		// The guest ran out of memory: undo is not possible, the VM dies
		// as a real one would.
		v.state = vm.StateCrashed
		v.kv = map[string]string{}
		return res, fmt.Errorf("vm %s: guest out of memory: %w", v.id, vm.ErrCrashed)
	}
	return res, nil
}

func (v *VM) run(cmd string, args []string) (string, int) {
	need := func(n int) bool { return len(args) == n }
	switch cmd {
	case "set":
		if !need(2) {
			return "usage: set KEY VALUE\n", 2
		}
		v.kv[args[0]] = args[1]
		return "", 0
	case "get":
		if !need(1) {
			return "usage: get KEY\n", 2
		}
		val, ok := v.kv[args[0]]
		if !ok {
			return "no such key\n", 1
		}
		return val + "\n", 0
	case "incr":
		if !need(1) {
			return "usage: incr KEY\n", 2
		}
		n, _ := strconv.ParseInt(v.kv[args[0]], 10, 64)
		n++
		v.kv[args[0]] = strconv.FormatInt(n, 10)
		return v.kv[args[0]] + "\n", 0
	case "del":
		if !need(1) {
			return "usage: del KEY\n", 2
		}
		delete(v.kv, args[0])
		return "", 0
	case "keys":
		return strings.Join(sortedKeys(v.kv), "\n") + "\n", 0
	case "hash":
		return GuestHash(v.kv) + "\n", 0
	case "echo":
		return strings.Join(args, " ") + "\n", 0
	case "exit":
		n := 0
		if len(args) > 0 {
			n, _ = strconv.Atoi(args[0])
		}
		return "", n
	}
	return cmd + ": command not found\n", 127
}

// GuestState returns a copy of the guest's key-value state (for checks).
func (v *VM) GuestState() map[string]string {
	v.mu.Lock()
	defer v.unlock()
	out := make(map[string]string, len(v.kv))
	for k, val := range v.kv {
		out[k] = val
	}
	return out
}

// GuestHash is a stable digest of a guest key-value state.
func GuestHash(kv map[string]string) string {
	h := sha256.New()
	for _, k := range sortedKeys(kv) {
		fmt.Fprintf(h, "%d:%s=%d:%s;", len(k), k, len(kv[k]), kv[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// encodeMemory is the guest's current RAM image, unpadded.
func (v *VM) encodeMemory() []byte {
	b, _ := EncodeMemory(v.kv, 0)
	return b
}

// EncodeMemory lays a key-value guest state out as RAM bytes:
// "SIMM" | u32 count | (u32 len, key, u32 len, value)* in key order, zero
// padded to size bytes (size 0: no padding). It is the memory format of
// every simulated or fake guest, so they agree on what "guest state" is.
func EncodeMemory(kv map[string]string, size int) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(memMagic)
	binary.Write(&b, binary.LittleEndian, uint32(len(kv)))
	for _, k := range sortedKeys(kv) {
		binary.Write(&b, binary.LittleEndian, uint32(len(k)))
		b.WriteString(k)
		binary.Write(&b, binary.LittleEndian, uint32(len(kv[k])))
		b.WriteString(kv[k])
	}
	if size > 0 {
		if b.Len() > size {
			return nil, fmt.Errorf("guest memory image of %d bytes exceeds the %d-byte RAM: %w", b.Len(), size, vm.ErrCrashed)
		}
		b.Write(make([]byte, size-b.Len()))
	}
	return b.Bytes(), nil
}

// DecodeMemory parses an EncodeMemory image; a malformed one is ErrCorrupt.
// What follows the entries is unused RAM: like a hypervisor, it restores
// whatever is there without reading it (only a checksum can vouch for it).
func DecodeMemory(mem []byte) (map[string]string, error) {
	bad := fmt.Errorf("guest memory image is malformed: %w", vm.ErrCorrupt)
	if len(mem) < 8 || string(mem[:4]) != memMagic {
		return nil, bad
	}
	n := binary.LittleEndian.Uint32(mem[4:8])
	p := mem[8:]
	next := func() (string, bool) {
		if len(p) < 4 {
			return "", false
		}
		l := binary.LittleEndian.Uint32(p)
		if uint64(l) > uint64(len(p)-4) {
			return "", false
		}
		s := string(p[4 : 4+l])
		p = p[4+l:]
		return s, true
	}
	kv := map[string]string{}
	for i := uint32(0); i < n; i++ {
		k, ok1 := next()
		val, ok2 := next()
		if !ok1 || !ok2 {
			return nil, bad
		}
		kv[k] = val
	}
	return kv, nil
}

type cpuState struct {
	VMID  string `json:"vm_id"`
	Execs uint64 `json:"execs"`
}

// Snapshot captures the VM from Running or Paused. The VM keeps its state.
func (v *VM) Snapshot(ctx context.Context) (*vm.Snapshot, error) {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpSnapshot); err != nil {
		return nil, err
	}
	mem, err := EncodeMemory(v.kv, v.f.opts.MemoryBytes)
	if err != nil {
		return nil, fmt.Errorf("vm %s: snapshot: %w", v.id, err)
	}
	if v.restored != nil {
		mem = bytes.Clone(v.restored)
	}
	cpu, _ := json.Marshal(cpuState{VMID: v.id, Execs: v.execs})
	var state, memory []byte
	if v.f.opts.Layout == vm.LayoutSingle {
		var b bytes.Buffer
		b.WriteString(singleMagic)
		binary.Write(&b, binary.LittleEndian, uint32(len(cpu)))
		b.Write(cpu)
		b.Write(mem)
		state = b.Bytes()
	} else {
		state, memory = cpu, mem
	}
	now := v.f.opts.Clock.Now()
	md := vm.SnapshotMetadata{
		SnapshotID:  fmt.Sprintf("%s-snap-%d", v.id, now.UnixNano()),
		VMID:        v.id,
		CreatedAtMs: now.UnixMilli(),
		SizeBytes:   uint64(len(state) + len(memory)),
		Checksum:    crc32.Checksum(state, crc32.MakeTable(crc32.Castagnoli)),
		// Kelpie's field names.
		Architecture: v.f.opts.Arch, VCPUCount: v.cfg.VCPUs, MemoryMiB: v.cfg.MemoryMiB, IsFullSnapshot: true,
		Backend: v.f.opts.Backend, BackendVersion: BackendVersion, HostID: v.f.opts.HostID, Layout: v.f.opts.Layout,
		BaseImageVersion:  v.f.opts.BaseImageVersion,
		DeviceStateSHA256: sum(state), DeviceStateSize: int64(len(state)),
		Compat: v.f.compat(), HostBound: v.f.opts.HostBound,
	}
	if memory != nil {
		md.MemorySHA256, md.MemorySize = sum(memory), int64(len(memory))
	}
	var memP vm.Payload
	if memory != nil {
		memP = vm.BytesPayload(memory)
	}
	return vm.NewSnapshot(md, vm.BytesPayload(state), memP, nil), nil
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// restore loads a snapshot into a Created VM, leaving it Paused. The
// payloads go through vm.Stage, the one stage-and-verify path: nothing is
// decoded from bytes that failed their checksum.
func (v *VM) restore(ctx context.Context, snap *vm.Snapshot) error {
	v.mu.Lock()
	defer v.unlock()
	if err := v.transition(ctx, vm.OpRestore); err != nil {
		return err
	}
	md := snap.Metadata
	var state, mem []byte
	memSink := vm.Sink(func(r io.Reader) (err error) { mem, err = readBounded(r, payloadMaxBytes); return err })
	if md.Layout == vm.LayoutSingle {
		memSink = nil
	}
	if err := vm.Stage(snap, func(r io.Reader) (err error) { state, err = readBounded(r, payloadMaxBytes); return err }, memSink); err != nil {
		return fmt.Errorf("vm %s: restore: %w", v.id, err)
	}
	var cpu []byte
	if md.Layout == vm.LayoutSingle {
		if len(state) < 8 || string(state[:4]) != singleMagic {
			return fmt.Errorf("vm %s: single-file snapshot is malformed: %w", v.id, vm.ErrCorrupt)
		}
		n := binary.LittleEndian.Uint32(state[4:8])
		if uint64(n) > uint64(len(state)-8) {
			return fmt.Errorf("vm %s: single-file snapshot is malformed: %w", v.id, vm.ErrCorrupt)
		}
		cpu, mem = state[8:8+n], state[8+n:]
	} else {
		cpu = state
	}
	if len(mem) != v.f.opts.MemoryBytes {
		return fmt.Errorf("vm %s: snapshot has %d bytes of guest memory, this host gives %d: %w", v.id, len(mem), v.f.opts.MemoryBytes, vm.ErrCorrupt)
	}
	var cs cpuState
	if err := json.Unmarshal(cpu, &cs); err != nil {
		return fmt.Errorf("vm %s: device state unreadable: %w", v.id, vm.ErrCorrupt)
	}
	kv, err := DecodeMemory(mem)
	if err != nil {
		return fmt.Errorf("vm %s: %w", v.id, err)
	}
	v.kv, v.execs, v.state, v.restored = kv, cs.Execs, vm.StatePaused, mem
	return nil
}

// Destroyed reports whether Destroy succeeded.
func (v *VM) Destroyed() bool {
	v.mu.Lock()
	defer v.unlock()
	return v.destroyed
}

// MemoryImage is the guest's RAM as a snapshot would capture it: byte for
// byte what a restore loaded, until the guest writes.
func (v *VM) MemoryImage() []byte {
	v.mu.Lock()
	defer v.unlock()
	if v.restored != nil {
		return bytes.Clone(v.restored)
	}
	b, _ := EncodeMemory(v.kv, v.f.opts.MemoryBytes)
	return b
}

// payloadMaxBytes bounds what the simulator reads into memory.
const payloadMaxBytes = 1 << 30

func readBounded(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("payload larger than the simulator's %d bytes: %w", limit, vm.ErrCorrupt)
	}
	return b, nil
}

// StepClock is a deterministic clock: each reading advances it by Step.
type StepClock struct {
	mu   sync.Mutex
	T    time.Time
	Step time.Duration
}

// Now returns the current simulated time and advances it.
func (c *StepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.T
	c.T = c.T.Add(c.Step)
	return t
}
