package hostvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/vm"
)

// AgentVsockPort is the vsock port the Kelpie guest agent listens on in
// guests whose host channel is a virtio socket (Firecracker, Apple VZ).
const AgentVsockPort uint32 = 1024

// Backoff between attempts to reach a guest agent that is not listening yet.
const (
	agentDialBackoffMin = 10 * time.Millisecond
	agentDialBackoffMax = 250 * time.Millisecond
)

// exitCommandNotFound is the shell's exit status for a missing command; the
// agent reports that case as an error, the vm contract as an exit code.
const exitCommandNotFound = 127

// AgentDialer opens one byte stream to the guest agent. It is called again
// after a stream failed or was dropped (a Firecracker snapshot closes every
// vsock connection). An error matching vm.ErrCrashed stops the retries.
type AgentDialer func(ctx context.Context) (io.ReadWriteCloser, error)

// AgentGuest runs commands through the Kelpie guest agent (guest/agent)
// over streams from an AgentDialer, reconnecting when a stream is gone.
type AgentGuest struct {
	dial AgentDialer

	connecting sync.Mutex // one connection attempt at a time

	mu        sync.Mutex
	c         *agent.Client
	closed    chan struct{}
	closeOnce sync.Once
}

var _ Guest = (*AgentGuest)(nil)

// NewAgentGuest returns a guest that dials lazily.
func NewAgentGuest(dial AgentDialer) *AgentGuest {
	return &AgentGuest{dial: dial, closed: make(chan struct{})}
}

// errGuestClosed: the machine is shutting down.
var errGuestClosed = fmt.Errorf("guest agent: the VM is shutting down: %w", vm.ErrInvalidState)

// current returns the working client, or nil.
func (g *AgentGuest) current() *agent.Client {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c != nil && g.c.Err() != nil {
		g.c.Close()
		g.c = nil
	}
	return g.c
}

// Connect returns a client whose agent answered a ping, dialing (and
// retrying while the agent is not listening yet) until ctx ends or the
// guest is closed.
func (g *AgentGuest) Connect(ctx context.Context) (*agent.Client, error) {
	if c := g.current(); c != nil {
		return c, nil
	}
	g.connecting.Lock()
	defer g.connecting.Unlock()
	if c := g.current(); c != nil {
		return c, nil // another call connected meanwhile
	}
	// Close interrupts a connection attempt.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-g.closed:
			cancel()
		case <-cctx.Done():
		}
	}()
	backoff := agentDialBackoffMin
	for {
		rw, err := g.dial(cctx)
		if err == nil {
			c := agent.NewClient(rw)
			if _, err = c.WaitReady(cctx); err == nil {
				g.mu.Lock()
				defer g.mu.Unlock()
				if isDone(g.closed) {
					c.Close()
					return nil, errGuestClosed
				}
				g.c = c
				return c, nil
			}
			c.Close()
		}
		switch {
		case isDone(g.closed):
			return nil, errGuestClosed
		case errors.Is(err, vm.ErrCrashed):
			return nil, fmt.Errorf("guest agent: %w", err)
		case ctx.Err() != nil:
			return nil, fmt.Errorf("guest agent did not answer: %w: %w (last error: %v)", vm.ErrTimeout, ctx.Err(), err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-cctx.Done():
			t.Stop()
		case <-t.C:
		}
		backoff = min(2*backoff, agentDialBackoffMax)
	}
}

// Disconnect drops the current stream; the next call dials again.
func (g *AgentGuest) Disconnect() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c != nil {
		g.c.Close()
		g.c = nil
	}
}

// Close drops the stream for good and stops any connection attempt; later
// calls fail. Machines call it when their hypervisor goes away.
func (g *AgentGuest) Close() {
	g.closeOnce.Do(func() { close(g.closed) })
	g.Disconnect()
}

func (g *AgentGuest) drop(c *agent.Client) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == c {
		g.c.Close()
		g.c = nil
	}
}

// Exec runs cmd through the agent. A command the guest cannot find is exit
// status 127 with the agent's message on stderr, as a shell reports it.
func (g *AgentGuest) Exec(ctx context.Context, cmd string, args []string, opts vm.ExecOptions) (vm.ExecResult, error) {
	c, err := g.Connect(ctx)
	if err != nil {
		return vm.ExecResult{}, err
	}
	limit := opts.OutputLimitBytes
	if limit > agent.MaxOutputLimit {
		limit = agent.MaxOutputLimit
	}
	r, err := c.Exec(ctx, agent.ExecRequest{Cmd: cmd, Args: args, Env: envList(opts.Env), Workdir: opts.Workdir,
		Stdin: opts.Stdin, Timeout: opts.Timeout, OutputLimit: limit})
	if err != nil {
		var re *agent.RemoteError
		switch {
		case errors.As(err, &re) && re.Code == agent.CodeNotFound:
			return vm.ExecResult{ExitCode: exitCommandNotFound, Stderr: []byte(re.Message + "\n")}, nil
		case errors.As(err, &re):
			return vm.ExecResult{}, fmt.Errorf("%w: %w", err, vm.ErrGuest)
		case errors.Is(err, agent.ErrTimeout):
			return vm.ExecResult{}, fmt.Errorf("%w: %w", err, vm.ErrTimeout)
		case errors.Is(err, agent.ErrClosed), errors.Is(err, agent.ErrProtocol):
			g.drop(c)
			return vm.ExecResult{}, fmt.Errorf("%w: %w", err, vm.ErrGuest)
		}
		return vm.ExecResult{}, err
	}
	return vm.ExecResult{ExitCode: r.ExitCode, Stdout: r.Stdout, Stderr: r.Stderr, TimedOut: r.TimedOut,
		OutputTruncated: r.StdoutTruncated || r.StderrTruncated}, nil
}

// envList renders env as sorted K=V pairs, so requests are reproducible.
func envList(env map[string]string) []string {
	if len(env) == 0 {
		return nil
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out
}
