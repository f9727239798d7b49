package host

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/store/fs"
	s3store "github.com/kelpie/teleport/store/s3"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/qemu"
	"github.com/kelpie/teleport/vm/sim"
)

// A Backend is one kind of VM a host can run: a name and how to open its
// factory on a host.
type Backend struct {
	Name string
	Open func(ctx context.Context, env BackendEnv) (vm.Factory, error)
}

// BackendEnv is what a backend's factory is opened with.
type BackendEnv struct {
	Home   string // the host's home
	HostID string
	// Accel is the accelerator asked for ("" for the backend's default);
	// backends without a choice ignore it.
	Accel string
}

// BackendConfig are the settings of the default backends; zero values are
// the backends' defaults.
type BackendConfig struct {
	// QEMU
	Accel       string    // auto, kvm or tcg (default auto)
	QEMULayout  vm.Layout // split (default) or single
	ImageDir    string    // the guest image (default: `kelpie image build`'s)
	QEMUBinary  string
	AccelCache  string // file holding the machine's KVM verdict
	Firecracker FirecrackerConfig
}

// FirecrackerConfig are the Firecracker backend's settings.
type FirecrackerConfig struct {
	Binary      string // default "firecracker" in PATH
	CPUTemplate string // a static CPU template (default None)
}

// BackendConfigFromEnv reads the backends' settings from the environment:
// KELPIE_ACCEL, KELPIE_QEMU_LAYOUT, KELPIE_IMAGE_DIR, KELPIE_QEMU_BIN,
// KELPIE_ACCEL_CACHE, KELPIE_FIRECRACKER_BIN, KELPIE_FIRECRACKER_CPU_TEMPLATE.
func BackendConfigFromEnv(getenv func(string) string) BackendConfig {
	return BackendConfig{
		Accel: getenv("KELPIE_ACCEL"), QEMULayout: vm.Layout(getenv("KELPIE_QEMU_LAYOUT")),
		ImageDir: getenv("KELPIE_IMAGE_DIR"), QEMUBinary: getenv("KELPIE_QEMU_BIN"), AccelCache: getenv("KELPIE_ACCEL_CACHE"),
		Firecracker: FirecrackerConfig{Binary: getenv("KELPIE_FIRECRACKER_BIN"), CPUTemplate: getenv("KELPIE_FIRECRACKER_CPU_TEMPLATE")},
	}
}

// DefaultBackends are the backends of a Kelpie host, in order of
// preference: QEMU (KVM on real hosts, TCG elsewhere), Firecracker (Linux
// with a usable KVM), and the simulated VM.
func DefaultBackends(c BackendConfig) []Backend {
	out := []Backend{QEMUBackend(c)}
	if fc, ok := firecrackerBackend(c.Firecracker); ok {
		out = append(out, fc)
	}
	return append(out, SimBackend())
}

// QEMUBackend is the QEMU backend with settings c.
func QEMUBackend(c BackendConfig) Backend {
	return Backend{Name: qemu.BackendName, Open: func(ctx context.Context, env BackendEnv) (vm.Factory, error) {
		want := env.Accel
		if want == "" {
			want = c.Accel
		}
		accel, err := qemu.ParseAccel(want)
		if err != nil {
			return nil, err
		}
		return qemu.NewFactory(ctx, qemu.Options{Home: env.Home, HostID: env.HostID, Accel: accel, Layout: c.QEMULayout,
			ImageDir: c.ImageDir, Binary: c.QEMUBinary, AccelCache: c.AccelCache})
	}}
}

// SimBackend is the deterministic simulated VM (vm/sim). Its VMs live only
// in the process that made them.
func SimBackend() Backend {
	return Backend{Name: sim.BackendName, Open: func(ctx context.Context, env BackendEnv) (vm.Factory, error) {
		return sim.NewFactory(sim.Options{HostID: env.HostID, Arch: vm.HostArchitecture(), BaseImageVersion: image.Version()}), nil
	}}
}

// OpenStore opens a package store by URL: a directory (the filesystem
// store) or s3://BUCKET/PREFIX (see store/s3.ParseURL for the server and
// credentials; settings come from the URL's query and the environment).
func OpenStore(ctx context.Context, url string) (teleport.Store, error) {
	return StoreOpener(os.Getenv)(ctx, url)
}

// StoreOpener is OpenStore reading the environment through getenv.
func StoreOpener(getenv func(string) string) func(ctx context.Context, url string) (teleport.Store, error) {
	return func(ctx context.Context, url string) (teleport.Store, error) {
		return openStore(ctx, url, getenv)
	}
}

func openStore(ctx context.Context, url string, getenv func(string) string) (teleport.Store, error) {
	switch {
	case strings.HasPrefix(url, "s3://"):
		o, err := s3store.ParseURL(url, getenv)
		if err != nil {
			return nil, err
		}
		return s3store.New(ctx, o)
	case strings.Contains(url, "://"):
		return nil, fmt.Errorf("store %q: want a directory or s3://bucket/prefix: %w", url, teleport.ErrInvalidStore)
	}
	dir, err := filepath.Abs(url)
	if err != nil {
		return nil, fmt.Errorf("store %s: %v: %w", url, err, teleport.ErrStore)
	}
	return fs.Open(dir)
}
