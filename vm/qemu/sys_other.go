//go:build !linux

package qemu

import (
	"os"
	"runtime"
)

// kernelRelease names the OS: the KVM probe verdict is per kernel, and off
// Linux there is no KVM to probe.
func kernelRelease() string { return runtime.GOOS }

// fallocate is best effort; without it the file is allocated on write.
func fallocate(f *os.File, off, n int64) error { return nil }
