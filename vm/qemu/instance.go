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
}

var (
	_ vm.Instance          = (*Instance)(nil)
	_ vm.Detacher          = (*Instance)(nil)
	_ vm.ReadyWaiter       = (*Instance)(nil)
	_ vm.WorkspaceArchiver = (*Instance)(nil)
	_ vm.LayoutSnapshotter = (*Instance)(nil)
	_ vm.FactsReporter     = (*Instance)(nil)
	_ vm.DowntimeReporter  = (*Instance)(nil)
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

// setState records a new state (and process) durably.
func (v *Instance) setState(s vm.State, p *proc) error {
	v.stmu.Lock()
	defer v.stmu.Unlock()
	v.run.State = s.String()
	v.run.Proc = p
	return v.saveRun()
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

// agentConn returns a ready guest agent client, connecting if needed.
func (v *Instance) agentConn(ctx context.Context) (*agent.Client, error) {
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
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=on", c.MemoryMiB, v.ramPath()),
		"-serial", "file:" + consoleFile,
		"-device", "virtio-serial-device,max_ports=2",
		"-chardev", "socket,id=agent,path=" + agentSock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + image.AgentPortName,
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
	}
	if incoming {
		// A restored guest's kernel is in its RAM already: skip loading
		// (and parsing) the 50 MB kernel image, the biggest part of QEMU's
		// start-up. QEMU never writes boot images into RAM while waiting
		// for a migration anyway.
		return append(args, "-S", "-incoming", "defer")
	}
	return append(args, "-kernel", c.Kernel, "-initrd", c.Initrd, "-append", image.KernelCmdline(tsc, c.KernelArgs))
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
	if err := v.setState(vm.StateStarting, p); err != nil {
		p.kill(context.WithoutCancel(ctx))
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
	return v.setState(vm.StateRunning, p)
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
	q, err := v.qmpConn(ctx)
	if err == nil {
		err = q.Call(ctx, "cont", nil, nil)
	}
	if err != nil {
		return v.failed(vm.OpResume, err)
	}
	v.forgetSaved()
	return v.setState(vm.StateRunning, v.run.Proc)
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
