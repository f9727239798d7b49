// Command kelpie-forward carries one guest connection of a QEMU VM to a
// TCP port on the host's loopback: QEMU's user network runs it for each
// connection the guest makes to a forwarded port (guestfwd=...-cmd:), with
// the guest's side of the connection on stdin and stdout.
//
// Usage: kelpie-forward 127.0.0.1:PORT
//
// It copies both ways and passes each direction's end on as a half-close,
// so request/response protocols see the same EOFs as on a direct
// connection. It dials loopback addresses only, and exits when both
// directions are done (or at once, with status 1, when the dial fails: the
// guest then sees its connection closed).
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kelpie-forward 127.0.0.1:PORT")
		os.Exit(2)
	}
	addr, err := net.ResolveTCPAddr("tcp", os.Args[1])
	if err != nil || !addr.IP.IsLoopback() {
		fmt.Fprintf(os.Stderr, "kelpie-forward: %q is not a loopback address and port\n", os.Args[1])
		os.Exit(2)
	}
	conn, err := net.DialTCP("tcp", nil, addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kelpie-forward: %v\n", err)
		os.Exit(1)
	}
	done := make(chan struct{})
	go func() {
		// guest -> host; the guest's EOF becomes the host's.
		io.Copy(conn, os.Stdin)
		conn.CloseWrite()
		close(done)
	}()
	// host -> guest; the host's EOF becomes the guest's.
	io.Copy(os.Stdout, conn)
	syscall.Shutdown(int(os.Stdout.Fd()), syscall.SHUT_WR)
	<-done
}
