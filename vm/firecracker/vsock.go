package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// vsockHandshakeMaxBytes bounds Firecracker's "OK <port>\n" acknowledgement.
const vsockHandshakeMaxBytes = 64

// errVsockRefused: Firecracker closed the connection instead of
// acknowledging it, which it does when no guest process listens on the port
// (yet).
var errVsockRefused = errors.New("no guest listener on the vsock port")

// dialVsock opens a host-initiated vsock connection through Firecracker's
// unix socket at path: it sends "CONNECT <port>\n" and expects
// "OK <host port>\n" before handing the stream over. The handshake is read
// a byte at a time so that no byte of the guest's stream is consumed.
func dialVsock(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("vsock %s: %w", path, err)
	}
	// A handshake that never completes must still end with ctx.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	line, err := handshake(conn, port)
	if !stop() {
		conn.Close()
		return nil, fmt.Errorf("vsock %s port %d: %w", path, port, ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("vsock %s port %d: %w", path, port, err)
	}
	if !strings.HasPrefix(line, "OK ") {
		conn.Close()
		return nil, fmt.Errorf("vsock %s port %d: unexpected handshake answer %q", path, port, line)
	}
	return conn, nil
}

func handshake(conn net.Conn, port uint32) (string, error) {
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return "", err
	}
	var b [1]byte
	var line []byte
	for len(line) < vsockHandshakeMaxBytes {
		if _, err := conn.Read(b[:]); err != nil {
			if len(line) == 0 {
				return "", fmt.Errorf("%w (%v)", errVsockRefused, err)
			}
			return "", fmt.Errorf("handshake cut short after %q: %w", line, err)
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", fmt.Errorf("handshake answer longer than %d bytes", vsockHandshakeMaxBytes)
}
