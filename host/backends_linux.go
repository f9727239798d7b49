//go:build linux

package host

import (
	"context"
	"path/filepath"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/firecracker"
)

// firecrackerBackend is Firecracker, on Linux. Its VMs live under
// $KELPIE_HOME/firecracker and only as long as the process that started
// them (see docs/backends.md).
func firecrackerBackend(c FirecrackerConfig) (Backend, bool) {
	return Backend{Name: firecracker.BackendName, Open: func(ctx context.Context, env BackendEnv) (vm.Factory, error) {
		return firecracker.NewFactory(ctx, firecracker.Options{Binary: c.Binary, Dir: filepath.Join(env.Home, "firecracker"),
			HostID: env.HostID, BaseImageVersion: image.Version(), CPUTemplate: c.CPUTemplate})
	}}, true
}
