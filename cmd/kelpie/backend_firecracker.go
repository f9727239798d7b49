//go:build linux

package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/firecracker"
)

// The Firecracker backend: KELPIE_FIRECRACKER_BIN names the binary (default
// "firecracker" in PATH), KELPIE_FIRECRACKER_CPU_TEMPLATE a static CPU
// template (default None). Its VMs live under $KELPIE_HOME/firecracker and
// only as long as the kelpie process that started them (see
// docs/backends.md).
func init() {
	backends["firecracker"] = func(ctx context.Context, e *env, hostID string) (vm.Factory, error) {
		f, err := firecracker.NewFactory(ctx, firecracker.Options{
			Binary:           e.getenv("KELPIE_FIRECRACKER_BIN"),
			Dir:              filepath.Join(home(e), "firecracker"),
			HostID:           hostID,
			BaseImageVersion: baseImageVersion,
			CPUTemplate:      e.getenv("KELPIE_FIRECRACKER_CPU_TEMPLATE"),
		})
		if err != nil {
			return nil, fmt.Errorf("firecracker backend: %w", err)
		}
		return f, nil
	}
}
