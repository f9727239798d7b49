package image

import "syscall"

// qemuProcAttr makes the kernel kill QEMU when the test process dies, so an
// interrupted test run leaves no VM behind.
func qemuProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
