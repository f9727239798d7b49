package hostvm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// fakeDriver is a hypervisor in memory: its guest is a small key-value
// machine whose state is written to real snapshot files in the layout of
// the backend it imitates (Firecracker-like split, VZ-like single file).
type fakeDriver struct {
	layout vm.Layout
	// memBytes is the size of the fake guest RAM written to snapshots.
	memBytes int

	mu       sync.Mutex
	boots    int
	restores int
	machines []*fakeMachine
	// Injected failures, consumed by the next call of that kind.
	failBoot, failSave, failRestore, failResume error
	// blockPause, when set, makes Pause wait until it is closed.
	blockPause chan struct{}
}

func newFakeDriver(layout vm.Layout) *fakeDriver {
	return &fakeDriver{layout: layout, memBytes: 64 << 10}
}

func take(p *error) error {
	err := *p
	*p = nil
	return err
}

func (d *fakeDriver) Boot(ctx context.Context, m MachineSpec) (Machine, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.boots++
	if err := take(&d.failBoot); err != nil {
		return nil, err
	}
	if _, err := os.Stat(m.Dir); err != nil {
		return nil, fmt.Errorf("fake: VM directory missing: %w", err)
	}
	fm := &fakeMachine{d: d, running: true, kv: map[string]string{}, done: make(chan struct{})}
	d.machines = append(d.machines, fm)
	return fm, nil
}

func (d *fakeDriver) Restore(ctx context.Context, m MachineSpec, f Files) (Machine, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.restores++
	if err := take(&d.failRestore); err != nil {
		return nil, err
	}
	kv, err := d.load(f)
	if err != nil {
		return nil, err
	}
	fm := &fakeMachine{d: d, running: false, kv: kv, done: make(chan struct{})}
	d.machines = append(d.machines, fm)
	return fm, nil
}

const fakeStateMagic = "FAKESTATE1"

type fakeState struct {
	Magic string `json:"magic"`
	Keys  int    `json:"keys"`
}

// save writes the snapshot files for the driver's layout: split puts the
// device state and the RAM in two files, single puts both in one.
func (d *fakeDriver) save(kv map[string]string, f Files) error {
	mem, err := sim.EncodeMemory(kv, d.memBytes)
	if err != nil {
		return err
	}
	state, _ := json.Marshal(fakeState{Magic: fakeStateMagic, Keys: len(kv)})
	switch d.layout {
	case vm.LayoutSplit:
		if f.Memory == "" {
			return errors.New("fake: split layout needs a memory file")
		}
		if err := writeNew(f.State, state); err != nil {
			return err
		}
		return writeNew(f.Memory, mem)
	default:
		if f.Memory != "" {
			return errors.New("fake: single layout got a memory file")
		}
		var b bytes.Buffer
		binary.Write(&b, binary.LittleEndian, uint32(len(state)))
		b.Write(state)
		b.Write(mem)
		return writeNew(f.State, b.Bytes())
	}
}

func writeNew(path string, b []byte) error {
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := fh.Write(b); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}

func (d *fakeDriver) load(f Files) (map[string]string, error) {
	var state, mem []byte
	raw, err := os.ReadFile(f.State)
	if err != nil {
		return nil, err
	}
	if d.layout == vm.LayoutSplit {
		state = raw
		if mem, err = os.ReadFile(f.Memory); err != nil {
			return nil, err
		}
	} else {
		if len(raw) < 4 {
			return nil, errors.New("fake: save file too short")
		}
		n := binary.LittleEndian.Uint32(raw)
		if uint64(n) > uint64(len(raw)-4) {
			return nil, errors.New("fake: save file malformed")
		}
		state, mem = raw[4:4+n], raw[4+n:]
	}
	var st fakeState
	if err := json.Unmarshal(state, &st); err != nil || st.Magic != fakeStateMagic {
		return nil, errors.New("fake: state unreadable")
	}
	if len(mem) != d.memBytes {
		return nil, fmt.Errorf("fake: memory is %d bytes, want %d", len(mem), d.memBytes)
	}
	kv, err := sim.DecodeMemory(mem)
	if err != nil {
		return nil, err
	}
	if len(kv) != st.Keys {
		return nil, errors.New("fake: state and memory disagree")
	}
	return kv, nil
}

type fakeMachine struct {
	d *fakeDriver

	mu       sync.Mutex
	running  bool
	kv       map[string]string
	done     chan struct{}
	shutdown int
}

func (m *fakeMachine) Done() <-chan struct{} { return m.done }

// crash makes the hypervisor vanish, as a killed process does.
func (m *fakeMachine) crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !isDone(m.done) {
		close(m.done)
	}
}

func (m *fakeMachine) alive() error {
	if isDone(m.done) {
		return errors.New("fake: hypervisor gone")
	}
	return nil
}

func (m *fakeMachine) Pause(ctx context.Context) error {
	m.d.mu.Lock()
	block := m.d.blockPause
	m.d.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.alive(); err != nil {
		return err
	}
	if !m.running {
		return errors.New("fake: pause of a paused VM")
	}
	m.running = false
	return nil
}

func (m *fakeMachine) Resume(ctx context.Context) error {
	m.d.mu.Lock()
	err := take(&m.d.failResume)
	m.d.mu.Unlock()
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.alive(); err != nil {
		return err
	}
	if m.running {
		return errors.New("fake: resume of a running VM")
	}
	m.running = true
	return nil
}

func (m *fakeMachine) Save(ctx context.Context, f Files) error {
	m.d.mu.Lock()
	err := take(&m.d.failSave)
	m.d.mu.Unlock()
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.alive(); err != nil {
		return err
	}
	if m.running {
		// Both Firecracker and VZ refuse to save a running VM.
		return errors.New("fake: save needs a paused VM")
	}
	return m.d.save(m.kv, f)
}

func (m *fakeMachine) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.shutdown++
	if !isDone(m.done) {
		close(m.done)
	}
	return nil
}

func (m *fakeMachine) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.alive(); err != nil {
		return vm.ExecResult{}, err
	}
	if !m.running {
		return vm.ExecResult{}, errors.New("fake: exec in a paused guest")
	}
	out, code := m.run(cmd, args, opts)
	res := vm.ExecResult{ExitCode: code}
	if code == 0 {
		res.Stdout = []byte(out)
	} else {
		res.Stderr = []byte(out)
	}
	return res, nil
}

func (m *fakeMachine) run(cmd string, args []string, opts vm.ExecOptions) (string, int) {
	switch cmd {
	case "set":
		if len(args) != 2 {
			return "usage: set K V\n", 2
		}
		m.kv[args[0]] = args[1]
		return "", 0
	case "get":
		if len(args) != 1 {
			return "usage: get K\n", 2
		}
		v, ok := m.kv[args[0]]
		if !ok {
			return "no such key\n", 1
		}
		return v + "\n", 0
	case "echo":
		return strings.Join(args, " ") + "\n", 0
	case "env":
		return envListString(opts.Env), 0
	case "pwd":
		return opts.Workdir + "\n", 0
	case "exit":
		n, _ := strconv.Atoi(strings.Join(args, ""))
		return "", n
	}
	return cmd + ": command not found\n", 127
}

// envListString renders env for the fake "env" command.
func envListString(env map[string]string) string { return strings.Join(envList(env), "\n") + "\n" }
