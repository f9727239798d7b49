//go:build !linux

package firecracker

import (
	"context"
	"fmt"

	"github.com/kelpie/teleport/vm"
)

// probe: Firecracker runs only on Linux hosts with KVM.
func probe(ctx context.Context, binary string) (hostFacts, launcher, error) {
	return hostFacts{}, nil, fmt.Errorf("the firecracker backend runs only on Linux: %w", vm.ErrUnsupported)
}
