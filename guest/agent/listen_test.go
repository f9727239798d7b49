package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// pipeListener is an in-memory net.Listener: Dial hands the server end of
// a net.Pipe to Accept. Errors sent on errs are returned by Accept, before
// any connection already waiting.
type pipeListener struct {
	conns  chan net.Conn
	errs   chan error
	done   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	closed int // Close calls
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), errs: make(chan error, 8), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case err := <-l.errs:
		return nil, err
	default:
	}
	select {
	case err := <-l.errs:
		return nil, err
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.mu.Lock()
	l.closed++
	l.mu.Unlock()
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

func (l *pipeListener) Dial(t *testing.T) net.Conn {
	t.Helper()
	host, guest := net.Pipe()
	select {
	case l.conns <- guest:
		return host
	case <-time.After(5 * time.Second):
		t.Fatal("listener is not accepting")
	case <-l.done:
		t.Fatal("listener closed")
	}
	return nil
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// startServe runs srv.Serve on ln; the returned function cancels it and
// returns its result.
func startServe(t *testing.T, srv *Server, ln net.Listener) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, ln) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-errc:
			case <-time.After(10 * time.Second):
				t.Error("Serve did not return after cancel")
			}
		})
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// Several connections on one listener are independent sessions served at
// once: a slow request on one does not hold up the others, and one
// connection going away leaves the others working.
func TestServeConcurrentConnections(t *testing.T) {
	ln := newPipeListener()
	srv := NewServer(ServerConfig{DefaultWorkdir: t.TempDir(), Logf: t.Logf})
	stop := startServe(t, srv, ln)
	ctx := testCtx(t)

	const n = 6
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = NewClient(ln.Dial(t))
		t.Cleanup(func() { clients[i].Close() })
	}
	slow := make(chan error, 1)
	go func() {
		_, err := clients[0].Exec(ctx, ExecRequest{Cmd: "sleep", Args: []string{"2"}})
		slow <- err
	}()
	time.Sleep(100 * time.Millisecond)

	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range clients {
		for j := 0; j < 5; j++ {
			wg.Go(func() {
				want := fmt.Sprintf("conn%d-req%d", i, j)
				r, err := c.Exec(ctx, ExecRequest{Cmd: "printf", Args: []string{"%s", want}})
				if err != nil || string(r.Stdout) != want {
					t.Errorf("conn %d req %d: %+v %v", i, j, r, err)
				}
			})
		}
	}
	wg.Wait()
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("requests on %d connections took %v: blocked behind the slow one?", n, d)
	}

	// Drop one connection: the rest keep working, and new ones are served.
	clients[n-1].Close()
	if _, err := clients[1].Ping(ctx); err != nil {
		t.Errorf("ping after another connection closed: %v", err)
	}
	late := NewClient(ln.Dial(t))
	defer late.Close()
	if _, err := late.WaitReady(ctx); err != nil {
		t.Errorf("new connection: %v", err)
	}
	if err := <-slow; err != nil {
		t.Errorf("slow exec: %v", err)
	}

	// Ending Serve closes the listener and every connection it accepted.
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("Serve = %v, want context.Canceled", err)
	}
	select {
	case <-clients[1].Done():
	case <-time.After(5 * time.Second):
		t.Error("connection still open after Serve returned")
	}
	if _, err := clients[2].Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("ping after Serve returned: %v", err)
	}
	ln.mu.Lock()
	closed := ln.closed
	ln.mu.Unlock()
	if closed == 0 {
		t.Error("listener not closed")
	}
}

// Accept errors that may clear up are retried; others end Serve, which
// then still closes the connections it accepted.
func TestServeAcceptErrors(t *testing.T) {
	ln := newPipeListener()
	ln.errs <- fmt.Errorf("accept4: %w", syscall.EMFILE)
	ln.errs <- syscall.ECONNABORTED
	srv := NewServer(ServerConfig{Logf: t.Logf})
	ctx := testCtx(t)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, ln) }()

	c := NewClient(ln.Dial(t)) // accepted after the two retried errors
	defer c.Close()
	if _, err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	fatal := errors.New("listener broke")
	ln.errs <- fatal
	select {
	case err := <-errc:
		if !errors.Is(err, fatal) {
			t.Errorf("Serve = %v, want %v", err, fatal)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after a permanent Accept error")
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Error("connection still open after Serve returned")
	}
}

func TestTemporaryAcceptError(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{syscall.EMFILE, true},
		{&net.OpError{Op: "accept", Err: fmt.Errorf("x: %w", syscall.ECONNABORTED)}, true},
		{syscall.EBADF, false},
		{net.ErrClosed, false},
		{fmt.Errorf("accept: %w", net.ErrClosed), false},
		{errors.New("other"), false},
	} {
		if got := temporaryAcceptError(tt.err); got != tt.want {
			t.Errorf("temporaryAcceptError(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
