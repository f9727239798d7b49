package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/vm/hostvm"
)

func TestVsockPortMatchesHost(t *testing.T) {
	if agent.VsockPort != hostvm.AgentVsockPort {
		t.Fatalf("agent.VsockPort = %d, hostvm.AgentVsockPort = %d", agent.VsockPort, hostvm.AgentVsockPort)
	}
}

// logRecorder collects log lines.
type logRecorder struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (r *logRecorder) logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	r.t.Log(line)
	r.mu.Lock()
	r.lines = append(r.lines, line)
	r.mu.Unlock()
}

func (r *logRecorder) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, l := range r.lines {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// No vsock device: listening fails, which is logged once, and
// serveListener returns at once so the agent goes on with virtio-serial.
func TestServeListenerUnavailable(t *testing.T) {
	logs := &logRecorder{t: t}
	srv := agent.NewServer(agent.ServerConfig{Logf: logs.logf})
	calls := 0
	noDevice := fmt.Errorf("socket: %w", syscall.EAFNOSUPPORT)
	done := make(chan error, 1)
	go func() {
		done <- serveListener(testCtx(t), srv, "vsock", func() (net.Listener, error) {
			calls++
			return nil, noDevice
		}, logs.logf)
	}()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EAFNOSUPPORT) {
			t.Errorf("serveListener = %v, want the listen error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serveListener kept going without a listener")
	}
	if calls != 1 {
		t.Errorf("listen called %d times, want 1", calls)
	}
	if n := len(logs.lines); n != 1 || logs.count("not serving on vsock") != 1 {
		t.Errorf("log = %q, want one line saying vsock is off", logs.lines)
	}
}

// unixListen returns listen functions for fresh unix sockets in a temporary
// directory (a socket stands in for AF_VSOCK here).
func unixListen(t *testing.T) (listen func() (net.Listener, error), dial func() (net.Conn, error)) {
	dir := t.TempDir()
	var mu sync.Mutex
	path := ""
	n := 0
	listen = func() (net.Listener, error) {
		mu.Lock()
		defer mu.Unlock()
		n++
		path = filepath.Join(dir, fmt.Sprintf("s%d", n))
		return net.Listen("unix", path)
	}
	dial = func() (net.Conn, error) {
		mu.Lock()
		p := path
		mu.Unlock()
		return net.Dial("unix", p)
	}
	return listen, dial
}

// Connections accepted by serveListener run the same protocol as the
// serial port, several at once.
func TestServeListenerConcurrentConnections(t *testing.T) {
	logs := &logRecorder{t: t}
	srv := agent.NewServer(agent.ServerConfig{DefaultWorkdir: t.TempDir(), Logf: logs.logf})
	listen, dial := unixListen(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- serveListener(ctx, srv, "test socket", listen, logs.logf) }()

	const n = 8
	var wg sync.WaitGroup
	clients := make(chan *agent.Client, n)
	for i := 0; i < n; i++ {
		wg.Go(func() {
			var conn net.Conn
			var err error
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if conn, err = dial(); err == nil || time.Now().After(deadline) {
					break
				}
			}
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			c := agent.NewClient(conn)
			clients <- c
			if _, err := c.WaitReady(ctx); err != nil {
				t.Errorf("client %d: %v", i, err)
				return
			}
			for j := 0; j < 3; j++ {
				want := fmt.Sprintf("%d/%d", i, j)
				r, err := c.Exec(ctx, agent.ExecRequest{Shell: `sleep 0.1; printf %s "$V"`, Env: []string{"V=" + want}})
				if err != nil || string(r.Stdout) != want {
					t.Errorf("client %d: %+v %v", i, r, err)
				}
			}
		})
	}
	wg.Wait()
	close(clients)

	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("serveListener = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serveListener did not return after cancel")
	}
	for c := range clients {
		select {
		case <-c.Done(): // the agent closed it
		case <-time.After(5 * time.Second):
			t.Error("connection still open after serveListener returned")
		}
		c.Close()
	}
	if logs.count("serving on") != 1 {
		t.Errorf("log = %q", logs.lines)
	}
}

// brokenListener fails every Accept with a permanent error.
type brokenListener struct{ net.Listener }

func (l brokenListener) Accept() (net.Conn, error) { return nil, syscall.EINVAL }

// A listener that fails for good is replaced by a new one.
func TestServeListenerRelisten(t *testing.T) {
	logs := &logRecorder{t: t}
	srv := agent.NewServer(agent.ServerConfig{Logf: logs.logf})
	listenUnix, dial := unixListen(t)
	var mu sync.Mutex
	calls := 0
	listen := func() (net.Listener, error) {
		mu.Lock()
		calls++
		k := calls
		mu.Unlock()
		switch k {
		case 1:
			ln, err := listenUnix()
			return brokenListener{ln}, err
		case 2:
			return nil, syscall.EADDRINUSE // transient: retried
		}
		return listenUnix()
	}
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- serveListener(ctx, srv, "test socket", listen, logs.logf) }()

	var c *agent.Client
	for deadline := time.Now().Add(10 * time.Second); c == nil; time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		k := calls
		mu.Unlock()
		if k >= 3 {
			if conn, err := dial(); err == nil {
				c = agent.NewClient(conn)
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no working listener after %d listen calls", k)
		}
	}
	defer c.Close()
	if _, err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("serveListener = %v", err)
	}
	if logs.count("listening again") != 1 || logs.count("listen: address already in use; retrying") != 1 {
		t.Errorf("log = %q", logs.lines)
	}
}
