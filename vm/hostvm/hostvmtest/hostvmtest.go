// Package hostvmtest holds test doubles for backends built on vm/hostvm: a
// guest whose memory is a key-value map and which serves the Kelpie guest
// agent protocol (guest/agent) over any byte stream, as the real agent does
// over vsock. Fake hypervisors in the backends' tests save its memory into
// their snapshot files and load it back, so a conformance run proves that
// a restored VM holds exactly the state it had.
//
// For tests only: nothing here touches a real VM.
package hostvmtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/vm/sim"
)

// KVGuest is a guest: commands set, get, echo and true over a key-value
// memory. Any other command is "not found", as the agent reports a missing
// executable. A paused guest answers nothing until it is resumed; a stopped
// one never again.
type KVGuest struct {
	mu      sync.Mutex
	cond    *sync.Cond
	kv      map[string]string
	paused  bool
	stopped bool
}

// NewKVGuest returns a running guest with empty memory.
func NewKVGuest() *KVGuest {
	g := &KVGuest{kv: map[string]string{}}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// SetPaused freezes or thaws the guest.
func (g *KVGuest) SetPaused(p bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.paused = p
	g.cond.Broadcast()
}

// Stop ends the guest; Serve returns.
func (g *KVGuest) Stop() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.stopped = true
	g.cond.Broadcast()
}

// WaitRunning blocks while the guest is paused and reports whether it
// runs (false once stopped).
func (g *KVGuest) WaitRunning() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.paused && !g.stopped {
		g.cond.Wait()
	}
	return !g.stopped
}

// Memory is the guest's RAM image (vm/sim's memory format), padded with
// zeros to size bytes (a size of 0 means no padding).
func (g *KVGuest) Memory(size int) ([]byte, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return sim.EncodeMemory(g.kv, size)
}

// LoadMemory replaces the guest's memory with an image from Memory.
func (g *KVGuest) LoadMemory(mem []byte) error {
	kv, err := sim.DecodeMemory(mem)
	if err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.kv = kv
	return nil
}

// Serve answers agent requests read from rw until rw fails or the guest
// stops. Each request waits while the guest is paused.
func (g *KVGuest) Serve(rw io.ReadWriter) error {
	fr := agent.NewFrameReader(rw, 0)
	for {
		payload, err := fr.ReadFrame()
		if err != nil {
			return err
		}
		var req agent.Request
		if json.Unmarshal(payload, &req) != nil || req.ID == 0 {
			continue
		}
		if !g.WaitRunning() {
			return errors.New("guest stopped")
		}
		b, err := json.Marshal(g.handle(&req))
		if err != nil {
			return err
		}
		frame, err := agent.AppendFrame(nil, b)
		if err != nil {
			return err
		}
		if _, err := rw.Write(frame); err != nil {
			return err
		}
	}
}

func (g *KVGuest) handle(req *agent.Request) *agent.Response {
	resp := &agent.Response{ID: req.ID}
	fail := func(code, msg string) *agent.Response {
		resp.Error = &agent.RemoteError{Op: req.Op, Code: code, Message: msg}
		return resp
	}
	var result any
	switch req.Op {
	case agent.OpPing:
		result = agent.PingResult{Version: agent.Version, Protocol: agent.ProtocolVersion}
	case agent.OpExec:
		var a agent.ExecRequest
		if err := json.Unmarshal(req.Args, &a); err != nil {
			return fail(agent.CodeInvalid, err.Error())
		}
		out, code, found := g.run(a.Cmd, a.Args)
		if !found {
			return fail(agent.CodeNotFound, fmt.Sprintf("exec: %q: executable file not found in $PATH", a.Cmd))
		}
		r := agent.ExecResult{ExitCode: code}
		if code == 0 {
			r.Stdout = []byte(out)
		} else {
			r.Stderr = []byte(out)
		}
		result = r
	default:
		return fail(agent.CodeUnsupported, "unknown op "+req.Op)
	}
	resp.Result, _ = json.Marshal(result)
	return resp
}

func (g *KVGuest) run(cmd string, args []string) (string, int, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch cmd {
	case "set":
		if len(args) != 2 {
			return "usage: set KEY VALUE\n", 2, true
		}
		g.kv[args[0]] = args[1]
		return "", 0, true
	case "get":
		if len(args) != 1 {
			return "usage: get KEY\n", 2, true
		}
		v, ok := g.kv[args[0]]
		if !ok {
			return "no such key\n", 1, true
		}
		return v + "\n", 0, true
	case "echo":
		return strings.Join(args, " ") + "\n", 0, true
	case "true":
		return "", 0, true
	}
	return "", 0, false
}
