//go:build linux && !386

// (linux/386 reaches the socket calls through socketcall(2) only; the guest
// image is x86_64, and arm64 for Apple VZ.)

package main

// An AF_VSOCK listener from raw system calls. The syscall package knows no
// AF_VSOCK address (its Accept4 even closes a connection whose peer address
// it cannot decode), and the agent stays standard-library only:
// scripts/build-image.sh hashes the agent's sources, not go.mod, into the
// image's cache key.

import (
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// From <linux/socket.h> and <linux/vm_sockets.h>.
const (
	afVsock       = 40         // AF_VSOCK
	vmaddrCIDAny  = 0xFFFFFFFF // VMADDR_CID_ANY: bind to every CID of this VM
	vmaddrPortAny = 0xFFFFFFFF // VMADDR_PORT_ANY: the kernel picks a free port

	// IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9), on /dev/vsock.
	ioctlVMSocketsGetLocalCID = 0x7b9
)

// sockaddrVM is struct sockaddr_vm from <linux/vm_sockets.h>, in native byte
// order:
//
//	sa_family_t    svm_family;    // AF_VSOCK
//	unsigned short svm_reserved1;
//	unsigned int   svm_port;
//	unsigned int   svm_cid;
//	__u8           svm_flags;     // VMADDR_FLAG_TO_HOST, unused here
//	unsigned char  svm_zero[3];   // pads to sizeof(struct sockaddr) = 16
type sockaddrVM struct {
	Family    uint16
	Reserved1 uint16
	Port      uint32
	CID       uint32
	Flags     uint8
	Zero      [3]uint8
}

// The kernel rejects any other size; these fail to compile unless it is 16.
var (
	_ [unsafe.Sizeof(sockaddrVM{}) - 16]struct{}
	_ [16 - unsafe.Sizeof(sockaddrVM{})]struct{}
)

// vsockAddr is a vsock address as a net.Addr.
type vsockAddr struct{ CID, Port uint32 }

func (a vsockAddr) Network() string { return "vsock" }

func (a vsockAddr) String() string {
	if a.CID == vmaddrCIDAny {
		return fmt.Sprintf("vsock:any:%d", a.Port)
	}
	return fmt.Sprintf("vsock:%d:%d", a.CID, a.Port)
}

// listenVsock listens on AF_VSOCK port (port vmaddrPortAny: any free one)
// of every CID of this VM. It fails when the kernel has no AF_VSOCK or no
// vsock transport is loaded (the VM has no vsock device).
func listenVsock(port uint32) (net.Listener, error) {
	fd, err := syscall.Socket(afVsock, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	sa := sockaddrVM{Family: afVsock, Port: port, CID: vmaddrCIDAny}
	if _, _, e := syscall.Syscall(syscall.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa)); e != 0 {
		syscall.Close(fd)
		return nil, os.NewSyscallError("bind", e)
	}
	if err := syscall.Listen(fd, syscall.SOMAXCONN); err != nil {
		syscall.Close(fd)
		return nil, os.NewSyscallError("listen", err)
	}
	addr, err := getsockname(fd)
	if err != nil {
		syscall.Close(fd)
		return nil, os.NewSyscallError("getsockname", err)
	}
	// A non-blocking descriptor makes os.File use the runtime poller: Accept
	// parks its goroutine, and Close wakes it.
	f := os.NewFile(uintptr(fd), "vsock-listener")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &vsockListener{f: f, rc: rc, addr: addr}, nil
}

// vsockStatus describes this VM's vsock device for the console log. The
// virtio transport registers when its module loads, device or not, so
// listening succeeds even without a device; the local CID tells them apart
// (VMADDR_CID_ANY: no device).
func vsockStatus() string {
	f, err := os.Open("/dev/vsock")
	if err != nil {
		return fmt.Sprintf("vsock: %v", err)
	}
	defer f.Close()
	var cid uint32
	_, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), ioctlVMSocketsGetLocalCID, uintptr(unsafe.Pointer(&cid)))
	switch {
	case e != 0:
		return fmt.Sprintf("vsock: local CID: %v", e)
	case cid == vmaddrCIDAny:
		return "vsock: no vsock device: the vsock listener will stay idle"
	}
	return fmt.Sprintf("vsock: this VM's CID is %d", cid)
}

func getsockname(fd int) (vsockAddr, error) {
	var sa sockaddrVM
	n := uint32(unsafe.Sizeof(sa)) // socklen_t
	if _, _, e := syscall.Syscall(syscall.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n))); e != 0 {
		return vsockAddr{}, e
	}
	if sa.Family != afVsock {
		return vsockAddr{}, syscall.EAFNOSUPPORT
	}
	return vsockAddr{CID: sa.CID, Port: sa.Port}, nil
}

type vsockListener struct {
	f         *os.File
	rc        syscall.RawConn
	addr      vsockAddr
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// Accept waits for a connection; after Close it fails with net.ErrClosed.
func (l *vsockListener) Accept() (net.Conn, error) {
	var (
		nfd   int
		sa    sockaddrVM
		opErr error
	)
	err := l.rc.Read(func(fd uintptr) bool {
		for {
			n := uint32(unsafe.Sizeof(sa))
			r, _, e := syscall.Syscall6(syscall.SYS_ACCEPT4, fd, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)),
				syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0, 0)
			switch e {
			case 0:
				nfd, opErr = int(r), nil
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // nothing queued: wait until readable
			default:
				opErr = e
				return true
			}
		}
	})
	if l.closed.Load() {
		if err == nil && opErr == nil {
			syscall.Close(nfd)
		}
		return nil, &net.OpError{Op: "accept", Net: "vsock", Addr: l.addr, Err: net.ErrClosed}
	}
	if err == nil {
		err = opErr
	}
	if err != nil {
		return nil, &net.OpError{Op: "accept", Net: "vsock", Addr: l.addr, Err: os.NewSyscallError("accept4", err)}
	}
	remote := vsockAddr{CID: sa.CID, Port: sa.Port}
	local, lerr := getsockname(nfd)
	if lerr != nil {
		local = l.addr
	}
	return &vsockConn{File: os.NewFile(uintptr(nfd), remote.String()), local: local, remote: remote}, nil
}

// Close closes the socket; every call returns once the port is released.
func (l *vsockListener) Close() error {
	l.closeOnce.Do(func() {
		l.closed.Store(true)
		l.closeErr = l.f.Close()
	})
	return l.closeErr
}

func (l *vsockListener) Addr() net.Addr { return l.addr }

// vsockConn is an accepted connection. Its non-blocking descriptor goes
// through the runtime poller: Read and Write park the goroutine, Close wakes
// them, deadlines work, and each Write writes everything it is given.
type vsockConn struct {
	*os.File
	local, remote vsockAddr
}

func (c *vsockConn) LocalAddr() net.Addr  { return c.local }
func (c *vsockConn) RemoteAddr() net.Addr { return c.remote }
