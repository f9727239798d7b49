package hostvm

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/vm"
)

// agentServer runs the real guest agent server (guest/agent) on a unix
// socket on this host, standing in for the agent inside a guest.
type agentServer struct {
	path string
	ln   net.Listener

	mu    sync.Mutex
	conns []net.Conn
}

func startAgent(t *testing.T) *agentServer {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &agentServer{path: path, ln: ln}
	srv := agent.NewServer(agent.ServerConfig{})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			go func() {
				srv.ServeConn(context.Background(), c)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.dropAll()
	})
	return s
}

func (s *agentServer) dropAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// dialer counts dials and can fail the first few, as a vsock dial fails
// while the guest agent is not listening yet.
type dialer struct {
	path string
	mu   sync.Mutex
	n    int
	fail int
	err  error
}

func (d *dialer) dial(ctx context.Context) (io.ReadWriteCloser, error) {
	d.mu.Lock()
	d.n++
	n := d.n
	d.mu.Unlock()
	if n <= d.fail {
		return nil, d.err
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", d.path)
}

func (d *dialer) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n
}

func TestAgentGuestExec(t *testing.T) {
	s := startAgent(t)
	g := NewAgentGuest((&dialer{path: s.path}).dial)
	defer g.Disconnect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range []struct {
		name       string
		cmd        string
		args       []string
		opts       vm.ExecOptions
		wantCode   int
		wantOut    string
		wantErrSub string
	}{
		{"echo", "echo", []string{"hello", "world"}, vm.ExecOptions{}, 0, "hello world\n", ""},
		{"exit status", "sh", []string{"-c", "exit 3"}, vm.ExecOptions{}, 3, "", ""},
		{"missing command is 127", "no-such-command-kelpie", nil, vm.ExecOptions{}, 127, "", "no-such-command-kelpie"},
		{"env", "sh", []string{"-c", "echo $KA-$KB"}, vm.ExecOptions{Env: map[string]string{"KB": "2", "KA": "1"}}, 0, "1-2\n", ""},
		{"workdir", "pwd", nil, vm.ExecOptions{Workdir: "/"}, 0, "/\n", ""},
		{"stdin", "cat", nil, vm.ExecOptions{Stdin: []byte("in")}, 0, "in", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			res, err := g.Exec(ctx, c.cmd, c.args, c.opts)
			if err != nil {
				t.Fatal(err)
			}
			if res.ExitCode != c.wantCode || (c.wantOut != "" && string(res.Stdout) != c.wantOut) ||
				!strings.Contains(string(res.Stderr), c.wantErrSub) {
				t.Fatalf("got exit %d out %q err %q", res.ExitCode, res.Stdout, res.Stderr)
			}
		})
	}
	res, err := g.Exec(ctx, "sh", []string{"-c", "echo 0123456789"}, vm.ExecOptions{OutputLimitBytes: 4})
	if err != nil || !res.OutputTruncated || string(res.Stdout) != "0123" {
		t.Fatalf("output limit: %q truncated=%v %v", res.Stdout, res.OutputTruncated, err)
	}
}

func TestAgentGuestTimeoutKillsCommand(t *testing.T) {
	s := startAgent(t)
	g := NewAgentGuest((&dialer{path: s.path}).dial)
	defer g.Disconnect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	res, err := g.Exec(ctx, "sleep", []string{"10"}, vm.ExecOptions{Timeout: 200 * time.Millisecond})
	if err != nil || !res.TimedOut || time.Since(start) > 5*time.Second {
		t.Fatalf("sleep with timeout: %+v %v after %s", res, err, time.Since(start))
	}
}

func TestAgentGuestReconnects(t *testing.T) {
	s := startAgent(t)
	d := &dialer{path: s.path}
	g := NewAgentGuest(d.dial)
	defer g.Disconnect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := g.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The hypervisor closes the stream (a Firecracker snapshot resets
	// every vsock connection).
	s.dropAll()
	<-c.Done()
	if res, err := g.Exec(ctx, "echo", []string{"again"}, vm.ExecOptions{}); err != nil || string(res.Stdout) != "again\n" {
		t.Fatalf("exec after the stream closed: %q %v", res.Stdout, err)
	}
	if d.count() != 2 {
		t.Fatalf("%d dials, want 2", d.count())
	}
	// Disconnect forces a new stream too.
	g.Disconnect()
	if _, err := g.Exec(ctx, "true", nil, vm.ExecOptions{}); err != nil || d.count() != 3 {
		t.Fatalf("exec after Disconnect: %v, %d dials", err, d.count())
	}
}

func TestAgentGuestWaitsForListener(t *testing.T) {
	s := startAgent(t)
	d := &dialer{path: s.path, fail: 3, err: syscall.ECONNREFUSED}
	g := NewAgentGuest(d.dial)
	defer g.Disconnect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := g.Connect(ctx); err != nil || d.count() != 4 {
		t.Fatalf("connect: %v after %d dials", err, d.count())
	}
}

func TestAgentGuestGivesUp(t *testing.T) {
	t.Run("crashed", func(t *testing.T) {
		d := &dialer{fail: 1 << 30, err: vm.ErrCrashed}
		g := NewAgentGuest(d.dial)
		if _, err := g.Connect(context.Background()); !errors.Is(err, vm.ErrCrashed) || d.count() != 1 {
			t.Fatalf("connect: %v after %d dials", err, d.count())
		}
	})
	t.Run("deadline", func(t *testing.T) {
		d := &dialer{fail: 1 << 30, err: syscall.ECONNREFUSED}
		g := NewAgentGuest(d.dial)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := g.Exec(ctx, "true", nil, vm.ExecOptions{})
		if !errors.Is(err, vm.ErrTimeout) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("exec: %v", err)
		}
	})
}

// Close (the hypervisor is going away) stops a connection attempt that
// would otherwise retry until its context ends.
func TestAgentGuestCloseInterruptsConnect(t *testing.T) {
	d := &dialer{fail: 1 << 30, err: syscall.ECONNREFUSED}
	g := NewAgentGuest(d.dial)
	done := make(chan error, 1)
	go func() {
		_, err := g.Exec(context.Background(), "true", nil, vm.ExecOptions{})
		done <- err
	}()
	for d.count() < 2 {
		time.Sleep(time.Millisecond)
	}
	g.Close()
	select {
	case err := <-done:
		if !errors.Is(err, vm.ErrInvalidState) {
			t.Fatalf("exec after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not stop the connection attempt")
	}
	if _, err := g.Connect(context.Background()); !errors.Is(err, vm.ErrInvalidState) {
		t.Fatalf("connect after Close: %v", err)
	}
}

func TestEnvListSorted(t *testing.T) {
	got := envList(map[string]string{"b": "2", "a": "1", "c": "3"})
	if strings.Join(got, ",") != "a=1,b=2,c=3" {
		t.Fatalf("%v", got)
	}
	if envList(nil) != nil {
		t.Fatal("empty env is not nil")
	}
}
