package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/internal/atomicfile"
	"github.com/kelpie/teleport/vm"
)

// Files in an instance directory.
const (
	recordFile  = "instance.json" // instanceRecord, written once
	runFile     = "state.json"    // runRecord, rewritten on every transition
	qmpSock     = "qmp.sock"
	agentSock   = "agent.sock"
	memFile     = "mem"         // guest RAM, or a symlink to it (see ramDirDefault)
	consoleFile = "console.log" // guest serial console
	qemuLog     = "qemu.log"    // QEMU's stdout and stderr
	stagedState = "restore.state"
)

// stopGraceTimeout is how long Stop waits for QEMU to quit before killing
// it.
const stopGraceTimeout = 5 * time.Second

// instanceRecord is what an instance was created with (instance.json).
type instanceRecord struct {
	Name             string    `json:"name"`
	Config           vm.Config `json:"config"`
	Accel            Accel     `json:"accel"`
	CPU              string    `json:"cpu"`
	Machine          string    `json:"machine"`
	TSCKHz           int       `json:"tsc_khz,omitempty"`
	Binary           string    `json:"binary"`
	Layout           vm.Layout `json:"layout"`
	QEMUVersion      string    `json:"qemu_version"`
	HostID           string    `json:"host_id"`
	BaseImageVersion string    `json:"base_image_version"`
	CreatedAt        time.Time `json:"created_at"`
	// RAMPath is the guest RAM file (memory-backend-file, share=on).
	RAMPath string `json:"ram_path"`
}

// runRecord is where the instance is in its lifecycle (state.json).
type runRecord struct {
	State string `json:"state"`
	Proc  *proc  `json:"proc,omitempty"`
	// Ports are the published ports as the running QEMU bound them.
	Ports []vm.PortBinding `json:"ports,omitempty"`
	// ClockStale: the guest ran again after a pause or a restore (or
	// booted, with the RTC's one-second resolution) and its wall clock has
	// not been set from the host since. The next agent connection sets it
	// before anything else; it is kept here because `vm resume` and the
	// next `vm exec` are different processes.
	ClockStale bool `json:"clock_stale,omitempty"`
	// PrivateRAM: the running QEMU maps its guest RAM copy-on-write from
	// the capture it was forked from (clone.go), not from its RAM file.
	PrivateRAM bool `json:"private_ram,omitempty"`
}

// Instance is one QEMU VM.
type Instance struct {
	f   *Factory
	dir string
	rec instanceRecord

	mu    sync.Mutex // serialises operations on this handle
	stmu  sync.Mutex // guards run
	run   runRecord
	qmp   *qmpClient
	agent *agent.Client
	// agentReady: the agent answered on this connection. A connection
	// made before the guest runs (after a restore) is not yet.
	agentReady bool
	destroyed  bool

	lastSnap    SnapshotStats
	lastRestore RestoreStats
	// forceStream (tests) makes split snapshots go through the migration
	// stream splitter whatever the accelerator.
	forceStream bool
	// hookAfterStateSaved, when set (tests), runs after the device state
	// of a snapshot is written and before the guest RAM is captured.
	hookAfterStateSaved func()
	// launchBase, when set, is the file the next QEMU maps guest RAM from
	// copy-on-write (share=off) instead of the RAM file: a fork's capture.
	launchBase string
}

var (
	_ vm.Instance          = (*Instance)(nil)
	_ vm.Detacher          = (*Instance)(nil)
	_ vm.ReadyWaiter       = (*Instance)(nil)
	_ vm.WorkspaceArchiver = (*Instance)(nil)
	_ vm.LayoutSnapshotter = (*Instance)(nil)
	_ vm.FactsReporter     = (*Instance)(nil)
	_ vm.DowntimeReporter  = (*Instance)(nil)
	_ vm.Reidentifier      = (*Instance)(nil)
	_ vm.DiskExporter      = (*Instance)(nil)
	_ vm.TimeReader        = (*Instance)(nil)
	_ vm.Cloner            = (*Instance)(nil)
)

// ID is the VM's name.
func (v *Instance) ID() string { return v.rec.Name }

// Config is the configuration the VM was created with.
func (v *Instance) Config() vm.Config { return v.rec.Config }

// Dir is the instance directory.
func (v *Instance) Dir() string { return v.dir }

// Accel is the accelerator the VM runs under.
func (v *Instance) Accel() Accel { return v.rec.Accel }

// PID is the QEMU process id, or 0 when none runs.
func (v *Instance) PID() int {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	if v.run.Proc != nil && v.run.Proc.alive() {
		return v.run.Proc.PID
	}
	return 0
}

func (v *Instance) path(name string) string { return filepath.Join(v.dir, name) }

// ramPath is the guest RAM file.
func (v *Instance) ramPath() string {
	if v.rec.RAMPath != "" {
		return v.rec.RAMPath
	}
	return v.path(memFile)
}

func (v *Instance) saveRecord() error {
	b, err := json.MarshalIndent(v.rec, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(v.path(recordFile), append(b, '\n'), 0o644, atomicfile.Crash)
}

// saveRun persists the run record; call with stmu held or before sharing.
func (v *Instance) saveRun() error {
	b, err := json.MarshalIndent(v.run, "", "  ")
	if err != nil {
		return err
	}
	// A crash of the machine loses the VM with the record: no sync.
	if err := atomicfile.WriteFile(v.path(runFile), append(b, '\n'), 0o644, atomicfile.Crash); err != nil {
		return fmt.Errorf("vm %s: save state: %w", v.rec.Name, err)
	}
	return nil
}

func (v *Instance) loadRun() error {
	b, err := os.ReadFile(v.path(runFile))
	if err != nil {
		return fmt.Errorf("vm %s: %w", v.rec.Name, err)
	}
	if err := json.Unmarshal(b, &v.run); err != nil {
		return fmt.Errorf("vm %s: %s unreadable: %v: %w", v.rec.Name, runFile, err, vm.ErrCorrupt)
	}
	if v.run.Proc != nil {
		v.run.Proc = adopt(v.run.Proc.PID, v.run.Proc.StartTicks)
	}
	return nil
}

// setState records a new state (and process) durably. Without a process
// there are no bound ports.
func (v *Instance) setState(s vm.State, p *proc) error {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	v.run.State = s.String()
	v.run.Proc = p
	if p == nil {
		v.run.Ports, v.run.PrivateRAM = nil, false
	}
	return v.saveRun()
}

// privateRAM says whether the guest RAM is a fork's copy-on-write map
// rather than the RAM file.
func (v *Instance) privateRAM() bool {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	return v.run.PrivateRAM
}

// setStatePorts is setState for a QEMU just started, with its ports.
func (v *Instance) setStatePorts(s vm.State, p *proc, ports []vm.PortBinding) error {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	v.run.State, v.run.Proc, v.run.Ports = s.String(), p, ports
	return v.saveRun()
}

// setClockStale records that the guest's wall clock needs setting.
func (v *Instance) setClockStale(stale bool) error {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	if v.run.ClockStale == stale {
		return nil
	}
	v.run.ClockStale = stale
	return v.saveRun()
}

func (v *Instance) clockStale() bool {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	return v.run.ClockStale
}

// State reports the lifecycle state. A VM whose QEMU process is gone
// without Stop having been called is Crashed, and stays so until Stop.
func (v *Instance) State() vm.State {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	s, err := vm.ParseState(v.run.State)
	if err != nil {
		return vm.StateCrashed
	}
	switch s {
	case vm.StateStarting, vm.StateRunning, vm.StatePaused:
		if !v.run.Proc.alive() {
			v.run.State = vm.StateCrashed.String()
			v.saveRun()
			return vm.StateCrashed
		}
	}
	return s
}

// check refuses op unless it is legal now.
func (v *Instance) check(ctx context.Context, op string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if v.destroyed {
		return fmt.Errorf("vm %s: destroyed: %w", v.rec.Name, vm.ErrNotFound)
	}
	s := v.State()
	if s == vm.StateCrashed && op != vm.OpStop {
		return v.crashedErr(op)
	}
	return vm.CheckTransition(v.rec.Name, op, s)
}

func (v *Instance) crashedErr(op string) error {
	why := tailFile(v.path(qemuLog), 600)
	if why == "" {
		why = "the QEMU process is gone"
	}
	return fmt.Errorf("vm %s: %s: QEMU exited unexpectedly (%s): %w", v.rec.Name, op, why, vm.ErrCrashed)
}

// failed turns an error during an operation into ErrCrashed when the QEMU
// process died underneath it.
func (v *Instance) failed(op string, err error) error {
	if v.State() == vm.StateCrashed {
		return fmt.Errorf("%w (during %s: %v)", v.crashedErr(op), op, err)
	}
	if errors.Is(err, errTimeout) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, agent.ErrTimeout) {
		return fmt.Errorf("vm %s: %s: %w: %w", v.rec.Name, op, err, vm.ErrTimeout)
	}
	return fmt.Errorf("vm %s: %s: %w", v.rec.Name, op, err)
}

// qmpConn returns a QMP connection to the running QEMU, connecting if
// needed.
func (v *Instance) qmpConn(ctx context.Context) (*qmpClient, error) {
	if v.qmp != nil {
		select {
		case <-v.qmp.Done():
			v.qmp = nil
		default:
			return v.qmp, nil
		}
	}
	q, err := dialQMP(ctx, v.path(qmpSock))
	if err != nil {
		return nil, err
	}
	v.qmp = q
	return q, nil
}

// agentConn returns a ready guest agent client, connecting if needed. A
// guest whose wall clock went stale (it ran again after a pause or a
// restore) has it set from the host first, so no command sees it stale.
func (v *Instance) agentConn(ctx context.Context) (*agent.Client, error) {
	c, err := v.readyAgent(ctx)
	if err != nil {
		return nil, err
	}
	if v.clockStale() {
		if err := syncClock(ctx, c); err != nil {
			return nil, fmt.Errorf("guest agent: set the guest clock: %w", err)
		}
		if err := v.setClockStale(false); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (v *Instance) readyAgent(ctx context.Context) (*agent.Client, error) {
	if v.agent != nil && v.agent.Err() == nil && v.agentReady {
		return v.agent, nil
	}
	if v.agent != nil && v.agent.Err() != nil {
		v.agent.Close()
		v.agent = nil
	}
	// Stop waiting the moment QEMU dies (for processes we started).
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	v.stmu.Lock()
	p := v.run.Proc
	v.stmu.Unlock()
	go func() {
		select {
		case <-p.done():
			cancel()
		case <-ctx.Done():
		}
	}()
	c := v.agent
	if c == nil {
		conn, err := dialUnix(ctx, v.path(agentSock))
		if err != nil {
			return nil, fmt.Errorf("guest agent: %w", err)
		}
		c = agent.NewClient(conn)
		v.agent = c
	}
	if _, err := c.WaitReady(ctx); err != nil {
		c.Close()
		v.agent = nil
		return nil, fmt.Errorf("guest agent: %w", err)
	}
	v.agentReady = true
	return c, nil
}

// syncClock sets the guest's wall clock from the host's: to the host's
// time plus the one-way delay of the agent channel, estimated as half the
// round trip of a clock read just before (the first request a guest
// answers after a resume is its slowest, so it is the probe's).
func syncClock(ctx context.Context, c *agent.Client) error {
	t0 := time.Now()
	if _, err := c.Time(ctx); err != nil {
		return err
	}
	oneWay := time.Since(t0) / 2
	return c.SetTime(ctx, time.Now().Add(oneWay))
}

// GuestTime reads the guest's clocks (vm.TimeReader), with the host's
// time at the middle of the round trip to compare them with.
func (v *Instance) GuestTime(ctx context.Context) (vm.GuestTime, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpExec); err != nil {
		return vm.GuestTime{}, err
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return vm.GuestTime{}, v.failed("read guest time", err)
	}
	// The reading with the shortest round trip is the most exact: the
	// host's midpoint is off the guest's instant by at most half of it.
	var best vm.GuestTime
	for i := 0; i < guestTimeReads; i++ {
		t0 := time.Now()
		r, err := c.Time(ctx)
		if err != nil {
			return vm.GuestTime{}, v.guestErr("read guest time", err)
		}
		rtt := time.Since(t0)
		if i == 0 || rtt < best.RoundTrip {
			best = vm.GuestTime{Realtime: r.Realtime(), Monotonic: time.Duration(r.MonotonicNs), Boottime: time.Duration(r.BoottimeNs),
				Host: t0.Add(rtt / 2), RoundTrip: rtt}
		}
	}
	return best, nil
}

// guestTimeReads is how many readings GuestTime takes.
const guestTimeReads = 3

// Reidentify gives the running guest a new identity (vm.Reidentifier):
// the host's entropy into its pool and a CRNG reseed (RNDADDENTROPY, then
// RNDRESEEDCRNG), then its new hostname.
func (v *Instance) Reidentify(ctx context.Context, id vm.Identity) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpExec); err != nil {
		return err
	}
	if err := vm.ValidateName(id.Hostname); err != nil {
		return fmt.Errorf("hostname: %w", err)
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return v.failed("reidentify", err)
	}
	// Both at once (the agent serves requests side by side); both are done
	// before Reidentify returns, so before the copy's next command.
	rerr := make(chan error, 1)
	go func() { rerr <- c.Call(ctx, agent.OpReseedRNG, agent.ReseedRNGRequest{Data: id.Entropy}, nil) }()
	herr := c.SetHostname(ctx, id.Hostname)
	if err := <-rerr; err != nil {
		return v.guestErr("reseed the guest RNG", err)
	}
	if herr != nil {
		return v.guestErr("set the guest hostname", herr)
	}
	v.rec.Config.Hostname = id.Hostname
	return v.saveRecord()
}

// preconnectAgent opens the agent socket of a VM that is not running yet.
// Once the guest runs, its agent finds a host already connected and keeps
// reading, instead of seeing EOF and backing off; the first request after
// a restore is then answered at once.
func (v *Instance) preconnectAgent(ctx context.Context) {
	conn, err := dialUnix(ctx, v.path(agentSock))
	if err != nil {
		return // agentConn will try again when needed
	}
	v.agent, v.agentReady = agent.NewClient(conn), false
}

// Detach releases this handle's connections; the VM keeps running
// (vm.Detacher). Other kelpie processes can drive the VM only while no
// handle holds them (a QEMU socket serves one client at a time).
func (v *Instance) Detach() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.dropConns()
	return nil
}

func (v *Instance) dropConns() {
	if v.agent != nil {
		v.agent.Close()
		v.agent = nil
	}
	v.agentReady = false
	if v.qmp != nil {
		v.qmp.Close()
		v.qmp = nil
	}
}

// qemuArgs is the QEMU command line. Sockets are relative to the instance
// directory (QEMU runs there) so long homes do not overflow sun_path.
func (v *Instance) qemuArgs(incoming bool) []string {
	c := v.rec.Config
	tsc := 0
	if v.rec.Accel == AccelTCG {
		tsc = v.rec.TSCKHz
	}
	cpu := "qemu64"
	if v.rec.Accel == AccelKVM {
		cpu = "host"
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-name", "kelpie-" + v.rec.Name,
		"-accel", string(v.rec.Accel),
		"-cpu", cpu,
		"-M", machineType + ",x-option-roms=off,rtc=on,isa-serial=on,memory-backend=mem",
		"-m", fmt.Sprintf("%dM", c.MemoryMiB),
		"-smp", strconv.Itoa(c.VCPUs),
		"-object", v.memoryBackend(),
		"-serial", "file:" + consoleFile,
		"-device", "virtio-serial-device,max_ports=2",
		"-chardev", "socket,id=agent,path=" + agentSock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + image.AgentPortName,
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
	}
	// The network and disk devices, in this order (deviceSet).
	if n := c.NetworkSpec(); n != nil {
		args = append(args, "-netdev", netdevArg(n, v.f.forwardBinary()),
			"-device", "virtio-net-device,netdev="+netDevID+",mac="+c.MAC)
	}
	if c.Disk.Present() {
		args = append(args, "-drive", "file="+diskFile+",format=raw,if=none,id="+diskDriveID+",cache=writeback,discard=unmap",
			"-device", "virtio-blk-device,drive="+diskDriveID)
	}
	if incoming {
		// A restored guest's kernel is in its RAM already: skip loading
		// (and parsing) the 50 MB kernel image, the biggest part of QEMU's
		// start-up. QEMU never writes boot images into RAM while waiting
		// for a migration anyway.
		return append(args, "-S", "-incoming", "defer")
	}
	return append(args, "-kernel", c.Kernel, "-initrd", c.Initrd, "-append", image.KernelCmdline(tsc, guestCmdline(c)))
}

// memoryBackend is guest RAM: the RAM file, shared (so snapshots read it
// and restores write it), or a fork's capture mapped copy-on-write.
func (v *Instance) memoryBackend() string {
	path, share := v.ramPath(), "on"
	if v.launchBase != "" {
		path, share = v.launchBase, "off"
	}
	return fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", v.rec.Config.MemoryMiB, path, share)
}

// guestCmdline is what the guest's rcS reads from the kernel command
// line: its hostname, its workspace disk and its network.
func guestCmdline(c vm.Config) string {
	args := []string{"kelpie.hostname=" + c.GuestHostname()}
	if c.Disk.Present() {
		args = append(args, "kelpie.disk="+guestDiskDev)
	}
	if c.Network.HasDevice() {
		args = append(args, guestNetCmdline())
	}
	if c.KernelArgs != "" {
		args = append(args, c.KernelArgs)
	}
	return strings.Join(args, " ")
}

// clearRuntime removes what a previous QEMU left: sockets and guest RAM.
func (v *Instance) clearRuntime() {
	for _, n := range []string{qmpSock, agentSock, stagedState} {
		os.Remove(v.path(n))
	}
	v.forgetSaved()
	os.Remove(v.ramPath())
	os.Remove(v.ramPath() + stagingSuffix)
}

// launch starts QEMU (incoming: paused, waiting for a migration stream) and
// connects QMP.
func (v *Instance) launch(ctx context.Context, incoming bool) (*proc, *qmpClient, error) {
	for _, n := range []string{qmpSock, agentSock} {
		os.Remove(v.path(n))
	}
	p, err := spawn(v.rec.Binary, v.qemuArgs(incoming), v.dir, v.path(qemuLog))
	if err != nil {
		return nil, nil, err
	}
	qctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-p.done():
			cancel()
		case <-qctx.Done():
		}
	}()
	q, err := dialQMP(qctx, v.path(qmpSock))
	if err != nil {
		p.kill(context.WithoutCancel(ctx))
		if !p.alive() && ctx.Err() == nil {
			return nil, nil, fmt.Errorf("QEMU exited at start: %s", tailFile(v.path(qemuLog), 600))
		}
		return nil, nil, err
	}
	return p, q, nil
}

func bootContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, bootTimeoutDefault)
}

// Start boots a Created or Stopped VM and returns when the guest agent
// answers.
func (v *Instance) Start(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpStart); err != nil {
		return err
	}
	ctx, cancel := bootContext(ctx)
	defer cancel()
	v.dropConns()
	v.clearRuntime()
	if err := v.setState(vm.StateStarting, nil); err != nil {
		return err
	}
	p, q, err := v.launch(ctx, false)
	if err != nil {
		v.setState(vm.StateStopped, nil)
		return fmt.Errorf("vm %s: start: %w", v.rec.Name, err)
	}
	v.qmp = q
	ports, err := boundPorts(ctx, q, v.rec.Config.Publish)
	if err == nil {
		err = v.setStatePorts(vm.StateStarting, p, ports)
	}
	if err != nil {
		v.dropConns()
		p.kill(context.WithoutCancel(ctx))
		v.clearRuntime()
		v.setState(vm.StateStopped, nil)
		return fmt.Errorf("vm %s: start: %w", v.rec.Name, err)
	}
	// The RTC the guest boots from has whole seconds only.
	if err := v.setClockStale(true); err != nil {
		return err
	}
	if _, err := v.agentConn(ctx); err != nil {
		dead := !p.alive()
		v.dropConns()
		p.kill(context.WithoutCancel(ctx))
		v.clearRuntime()
		v.setState(vm.StateStopped, nil)
		if dead {
			return fmt.Errorf("vm %s: boot: QEMU exited (%s): %w", v.rec.Name, tailFile(v.path(qemuLog), 600), vm.ErrCrashed)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("vm %s: boot: the guest agent did not answer (console: %s): %w", v.rec.Name, tailFile(v.path(consoleFile), 400), vm.ErrTimeout)
		}
		return fmt.Errorf("vm %s: boot: %w", v.rec.Name, err)
	}
	return v.setStatePorts(vm.StateRunning, p, ports)
}

// WaitReady returns once the guest agent of a Running VM answers (after a
// restore, the first answer is the moment the guest is usable again).
func (v *Instance) WaitReady(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpExec); err != nil {
		return err
	}
	// A guest that never answers must not hang a caller without a
	// deadline.
	ctx, cancel := bootContext(ctx)
	defer cancel()
	if _, err := v.agentConn(ctx); err != nil {
		return v.failed("wait ready", err)
	}
	return nil
}

// Stop powers the VM off: QEMU quits (or is killed) and guest RAM is
// discarded. Stopping a Stopped VM does nothing.
func (v *Instance) Stop(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.destroyed {
		return fmt.Errorf("vm %s: destroyed: %w", v.rec.Name, vm.ErrNotFound)
	}
	if v.State() == vm.StateStopped {
		return nil
	}
	return v.stopLocked(ctx)
}

func (v *Instance) stopLocked(ctx context.Context) error {
	v.stmu.Lock()
	p := v.run.Proc
	v.stmu.Unlock()
	if v.agent != nil {
		v.agent.Close()
		v.agent = nil
	}
	if p.alive() {
		gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopGraceTimeout)
		if q, err := v.qmpConn(gctx); err == nil {
			q.Call(gctx, "quit", nil, nil) // the reply may be lost as QEMU exits
		}
		err := p.wait(gctx)
		cancel()
		if err != nil {
			if err := p.kill(context.WithoutCancel(ctx)); err != nil {
				return fmt.Errorf("vm %s: stop: %w", v.rec.Name, err)
			}
		}
	}
	v.dropConns()
	v.clearRuntime()
	return v.setState(vm.StateStopped, nil)
}

// Pause stops the guest's vCPUs.
func (v *Instance) Pause(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpPause); err != nil {
		return err
	}
	q, err := v.qmpConn(ctx)
	if err == nil {
		err = q.Call(ctx, "stop", nil, nil)
	}
	if err != nil {
		return v.failed(vm.OpPause, err)
	}
	return v.setState(vm.StatePaused, v.run.Proc)
}

// Resume continues a Paused VM.
func (v *Instance) Resume(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpResume); err != nil {
		return err
	}
	// The guest's wall clock stood still while it was paused: it is set
	// from the host before the next command (agentConn).
	if err := v.setClockStale(true); err != nil {
		return err
	}
	q, err := v.qmpConn(ctx)
	if err == nil {
		err = q.Call(ctx, "cont", nil, nil)
	}
	if err != nil {
		return v.failed(vm.OpResume, err)
	}
	v.forgetSaved()
	return v.setStatePorts(vm.StateRunning, v.run.Proc, v.run.Ports)
}

// Destroy stops the VM and removes its directory.
func (v *Instance) Destroy(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.destroyed {
		return nil
	}
	if s := v.State(); s != vm.StateStopped && s != vm.StateCreated {
		// A QEMU that would not die keeps its record: the VM is still
		// here, and a later Destroy tries again.
		if err := v.stopLocked(ctx); err != nil {
			return err
		}
	}
	v.dropConns()
	v.clearRuntime()
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("vm %s: remove %s: %w", v.rec.Name, v.dir, err)
	}
	v.destroyed = true
	return nil
}

// execNotFound tells the agent's "no such command" apart from other
// not-found errors (a missing workdir).
func execNotFound(err error) bool {
	var re *agent.RemoteError
	return errors.As(err, &re) && re.Code == agent.CodeNotFound && strings.Contains(re.Message, "executable file not found")
}

// Exec runs a command in the guest through the agent. A command that does
// not exist exits 127, as in a shell.
func (v *Instance) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(ctx, vm.OpExec); err != nil {
		return vm.ExecResult{}, err
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return vm.ExecResult{}, v.failed(vm.OpExec, err)
	}
	req := agent.ExecRequest{Cmd: cmd, Args: args, Workdir: opts.Workdir, Stdin: opts.Stdin, Timeout: opts.Timeout}
	if req.Workdir == "" {
		req.Workdir = v.rec.Config.Workdir
	}
	req.Env = envList(v.rec.Config.Env, opts.Env)
	if opts.OutputLimitBytes > 0 {
		req.OutputLimit = min(opts.OutputLimitBytes, agent.MaxOutputLimit)
	}
	res, err := c.Exec(ctx, req)
	if err != nil {
		if execNotFound(err) {
			return vm.ExecResult{ExitCode: 127, Stderr: []byte(cmd + ": command not found\n")}, nil
		}
		var re *agent.RemoteError
		if errors.As(err, &re) {
			return vm.ExecResult{}, fmt.Errorf("vm %s: exec %s: %v: %w", v.rec.Name, cmd, err, vm.ErrGuest)
		}
		return vm.ExecResult{}, v.failed(vm.OpExec, err)
	}
	return vm.ExecResult{ExitCode: res.ExitCode, Stdout: res.Stdout, Stderr: res.Stderr, TimedOut: res.TimedOut,
		OutputTruncated: res.StdoutTruncated || res.StderrTruncated}, nil
}

// envList merges the VM's and the call's environment into sorted K=V.
func envList(base, extra map[string]string) []string {
	m := map[string]string{}
	for k, val := range base {
		m[k] = val
	}
	for k, val := range extra {
		m[k] = val
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, k+"="+m[k])
	}
	return out
}
