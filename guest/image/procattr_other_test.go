//go:build !linux

package image

import "syscall"

// qemuProcAttr: only Linux has a parent-death signal; elsewhere QEMU is
// killed by the tests' cleanup alone.
func qemuProcAttr() *syscall.SysProcAttr { return nil }
