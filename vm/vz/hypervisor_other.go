//go:build !(darwin && arm64 && cgo)

package vz

import (
	"fmt"

	"github.com/kelpie/teleport/vm"
)

// newHypervisor: Virtualization.framework save/restore exists only on
// Apple silicon Macs, and this package reaches it through cgo.
func newHypervisor(dir string) (hypervisor, error) {
	return nil, fmt.Errorf("the vz backend needs macOS on Apple silicon and a cgo build: %w", vm.ErrUnsupported)
}
