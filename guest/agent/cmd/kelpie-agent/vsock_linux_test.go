//go:build linux && !386

package main

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/agent"
)

// TestListenVsock runs where the kernel offers AF_VSOCK (a VM with a vsock
// device, or a host with vhost_vsock loaded). Without a peer it cannot
// connect, so it checks binding, address decoding and that Close ends a
// pending Accept; the boot tests cover serving on a real device-less guest.
func TestListenVsock(t *testing.T) {
	ln, err := listenVsock(vmaddrPortAny)
	if errors.Is(err, syscall.EAFNOSUPPORT) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Skipf("no usable AF_VSOCK here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr, ok := ln.Addr().(vsockAddr)
	if !ok || addr.CID != vmaddrCIDAny || addr.Port == vmaddrPortAny || addr.Network() != "vsock" {
		t.Fatalf("Addr() = %#v", ln.Addr())
	}
	t.Logf("listening on %v; %s", addr, vsockStatus())

	// The kernel holds that port now: binding it again fails.
	if ln2, err := listenVsock(addr.Port); err == nil {
		ln2.Close()
		t.Errorf("second listener on port %d succeeded", addr.Port)
	} else if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("second listener: %v, want EADDRINUSE", err)
	}

	// Accept parks until Close, then reports net.ErrClosed.
	errc := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if c != nil {
			c.Close()
		}
		errc <- err
	}()
	select {
	case err := <-errc:
		t.Fatalf("Accept returned early: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake Accept")
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept on a closed listener: %v", err)
	}
	if err := ln.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	// The agent's vsock loop on a real listener stops with its context and
	// releases the port.
	logs := &logRecorder{t: t}
	srv := agent.NewServer(agent.ServerConfig{Logf: logs.logf})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- serveListener(ctx, srv, "vsock", func() (net.Listener, error) { return listenVsock(addr.Port) }, logs.logf)
	}()
	time.Sleep(100 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("serveListener = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serveListener did not stop")
	}
	if logs.count("serving on "+addr.String()) != 1 {
		t.Errorf("log = %q", logs.lines)
	}
	ln3, err := listenVsock(addr.Port)
	if err != nil {
		t.Fatalf("port not released: %v", err)
	}
	ln3.Close()
}
