package hostvm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Options configure a Factory.
type Options struct {
	Spec   Spec
	Driver Driver
	// Dir holds the factory's VM directories (Dir/vms/ID) and the snapshot
	// files it hands out (Dir/snapshots/SNAPSHOT-ID). Created if missing.
	Dir string
	// Clock stamps snapshots; nil means the system clock.
	Clock Clock
}

// Factory creates instances of one backend on this host.
type Factory struct {
	spec   Spec
	driver Driver
	dir    string
	clock  Clock

	mu   sync.Mutex
	seq  uint64 // makes snapshot ids unique within a millisecond
	next int    // next generated VM number
}

var _ vm.Factory = (*Factory)(nil)

// NewFactory checks o and creates the factory's directories.
func NewFactory(o Options) (*Factory, error) {
	if err := o.Spec.Validate(); err != nil {
		return nil, err
	}
	if o.Driver == nil {
		return nil, fmt.Errorf("hostvm: %s factory has no driver: %w", o.Spec.Backend, vm.ErrInvalidConfig)
	}
	if o.Dir == "" {
		return nil, fmt.Errorf("hostvm: %s factory has no directory: %w", o.Spec.Backend, vm.ErrInvalidConfig)
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("hostvm: %s directory %s: %w", o.Spec.Backend, o.Dir, err)
	}
	for _, d := range []string{filepath.Join(dir, vmsDirName), filepath.Join(dir, snapsDirName)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("hostvm: %s: %w", o.Spec.Backend, err)
		}
	}
	if o.Clock == nil {
		o.Clock = systemClock{}
	}
	o.Spec.Compat = maps.Clone(o.Spec.Compat)
	return &Factory{spec: o.Spec, driver: o.Driver, dir: dir, clock: o.Clock}, nil
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// Host describes this backend on this host.
func (f *Factory) Host() vm.HostInfo {
	return vm.HostInfo{Arch: f.spec.Arch, Backend: f.spec.Backend, BackendVersion: f.spec.BackendVersion,
		HostID: f.spec.HostID, BaseImageVersion: f.spec.BaseImageVersion, Compat: maps.Clone(f.spec.Compat),
		HostBound: f.spec.HostBound, Layouts: []vm.Layout{f.spec.Layout}}
}

// Spec returns the factory's spec.
func (f *Factory) Spec() Spec {
	s := f.spec
	s.Compat = maps.Clone(s.Compat)
	return s
}

// Dir is the factory's directory.
func (f *Factory) Dir() string { return f.dir }

// Create makes an instance in state Created and its directory. A named
// instance fails with ErrAlreadyExists while a directory of that name
// exists (another live VM, or one a crashed process left behind).
func (f *Factory) Create(ctx context.Context, cfg vm.Config) (vm.Instance, error) {
	v, err := f.create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return v, nil
}

func (f *Factory) checkConfig(cfg vm.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if f.spec.RequireBoot {
		if err := cfg.RequireBoot(); err != nil {
			return err
		}
	}
	if cc, ok := f.driver.(ConfigChecker); ok {
		if err := cc.CheckConfig(cfg); err != nil {
			return err
		}
	}
	return nil
}

func (f *Factory) create(ctx context.Context, cfg vm.Config) (*Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.checkConfig(cfg); err != nil {
		return nil, err
	}
	if cfg.BaseImageVersion == "" {
		cfg.BaseImageVersion = f.spec.BaseImageVersion
	}
	id, dir, err := f.makeDir(cfg.Name)
	if err != nil {
		return nil, err
	}
	return &Instance{f: f, id: id, dir: dir, cfg: cfg, state: vm.StateCreated, ops: make(chan struct{}, 1)}, nil
}

// makeDir claims a VM directory: the name's, or the first free generated
// one. Mkdir is the claim, so two processes sharing Dir never share a VM.
func (f *Factory) makeDir(name string) (id, dir string, err error) {
	root := filepath.Join(f.dir, vmsDirName)
	if name != "" {
		dir = filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return "", "", fmt.Errorf("vm %s: %w", name, vm.ErrAlreadyExists)
			}
			return "", "", fmt.Errorf("vm %s: %w", name, err)
		}
		return name, dir, nil
	}
	for {
		f.mu.Lock()
		f.next++
		id = fmt.Sprintf("%s-%d", f.spec.Backend, f.next)
		f.mu.Unlock()
		dir = filepath.Join(root, id)
		err := os.Mkdir(dir, 0o700)
		if err == nil {
			return id, dir, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", "", fmt.Errorf("vm %s: %w", id, err)
		}
	}
}

// CreateFromSnapshot makes an instance and restores snap into it; the
// instance is Paused. A zero VCPUs or MemoryMiB in cfg is taken from the
// snapshot. On failure nothing is left behind.
func (f *Factory) CreateFromSnapshot(ctx context.Context, cfg vm.Config, snap *vm.Snapshot) (vm.Instance, error) {
	if snap == nil {
		return nil, fmt.Errorf("hostvm: no snapshot to restore: %w", vm.ErrInvalidConfig)
	}
	cfg = vm.ConfigFor(cfg, snap.Metadata)
	// Refuse an incompatible snapshot before making anything.
	if err := f.checkConfig(cfg); err != nil {
		return nil, err
	}
	if err := f.checkSnapshot(snap, cfg); err != nil {
		return nil, err
	}
	v, err := f.create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := v.restore(ctx, snap); err != nil {
		return nil, vm.RemoveFailed(ctx, v, err)
	}
	return v, nil
}

// newSnapshotDir makes a fresh directory for one snapshot's files.
func (f *Factory) newSnapshotDir(vmID string) (id, dir string, now time.Time, err error) {
	now = f.clock.Now()
	f.mu.Lock()
	f.seq++
	seq := f.seq
	f.mu.Unlock()
	for {
		id = fmt.Sprintf("%s-%d-%d", vmID, now.UnixMilli(), seq)
		dir = filepath.Join(f.dir, snapsDirName, id)
		err = os.Mkdir(dir, 0o700)
		if err == nil {
			return id, dir, now, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", "", now, fmt.Errorf("snapshot %s: %w", id, err)
		}
		// Another process sharing Dir made the same id: take the next.
		f.mu.Lock()
		f.seq++
		seq = f.seq
		f.mu.Unlock()
	}
}
