package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Backoff after an Accept error worth retrying (out of file descriptors,
// memory, a connection aborted while queued).
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// Serve accepts connections on ln and serves each with ServeConn in its own
// goroutine, so several hosts (or a host reconnecting while an old
// connection lingers) are served at once. Connections share nothing but the
// Server: each has its own frame reader, write lock and request limit, and
// is closed when its ServeConn returns.
//
// Serve returns when ctx ends (ctx.Err()) or Accept fails with an error that
// retrying cannot fix. Either way it first closes ln and the connections it
// accepted and waits for their ServeConn loops; requests still being handled
// then finish in the background with ctx, as after ServeConn.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stopCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		stop()
		ln.Close()
		wg.Wait()
	}()
	context.AfterFunc(stopCtx, func() { ln.Close() })

	backoff := time.Duration(0)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if !temporaryAcceptError(err) {
				return fmt.Errorf("accept on %v: %w", ln.Addr(), err)
			}
			if backoff == 0 {
				s.logf("accept on %v: %v; retrying", ln.Addr(), err)
				backoff = acceptBackoffMin
			} else {
				backoff = min(2*backoff, acceptBackoffMax)
			}
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			}
			continue
		}
		backoff = 0
		s.logf("connection from %v", conn.RemoteAddr())
		wg.Go(func() {
			defer conn.Close()
			unwatch := context.AfterFunc(stopCtx, func() { conn.Close() })
			defer unwatch()
			if err := s.ServeConn(ctx, conn); !errors.Is(err, io.EOF) && stopCtx.Err() == nil {
				s.logf("connection from %v ended: %v", conn.RemoteAddr(), err)
			}
		})
	}
}

// temporaryAcceptError reports whether Accept may succeed later on the same
// listener. A closed listener is final.
func temporaryAcceptError(err error) bool {
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
		return false
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.EINTR, syscall.EAGAIN, syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EPROTO,
			syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM:
			return true
		}
		return false
	}
	var te interface{ Temporary() bool }
	return errors.As(err, &te) && te.Temporary()
}
