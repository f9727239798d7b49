//go:build !linux || 386

package main

import (
	"errors"
	"fmt"
	"net"
)

// listenVsock: AF_VSOCK serving is implemented for the Linux guest only.
func listenVsock(port uint32) (net.Listener, error) {
	return nil, fmt.Errorf("vsock port %d: %w", port, errors.ErrUnsupported)
}

func vsockStatus() string { return "vsock: not supported on this platform" }
