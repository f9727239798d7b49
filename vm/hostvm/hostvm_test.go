package hostvm

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/vmtest"
)

// stepClock is a deterministic clock for snapshot ids and timestamps.
type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Millisecond)
	return c.t
}

// splitSpec imitates Firecracker, singleSpec imitates Apple VZ.
func splitSpec() Spec {
	return Spec{Backend: "fake-fc", BackendVersion: "1.7.0", Arch: vm.ArchX86_64, HostID: "host-a",
		BaseImageVersion: "1.0.0", Layout: vm.LayoutSplit, RequireBoot: true,
		Compat: map[string]string{"fc_version": "1.7.0", "cpu_model": "family 25 model 1", "host_kernel": "6.1"}}
}

func singleSpec() Spec {
	return Spec{Backend: "fake-vz", BackendVersion: "14.5", Arch: vm.ArchArm64, HostID: "mac-a",
		BaseImageVersion: "1.0.0", Layout: vm.LayoutSingle, HostBound: true,
		Compat: map[string]string{"macos_version": "14.5"}}
}

type fixture struct {
	f   *Factory
	d   *fakeDriver
	dir string
}

func newFixture(t testing.TB, spec Spec) fixture {
	t.Helper()
	d := newFakeDriver(spec.Layout)
	dir := t.TempDir()
	f, err := NewFactory(Options{Spec: spec, Driver: d, Dir: dir, Clock: &stepClock{t: time.UnixMilli(1700000000000)}})
	if err != nil {
		t.Fatal(err)
	}
	return fixture{f: f, d: d, dir: dir}
}

func bootConfig(t testing.TB) vm.Config {
	dir := t.TempDir()
	k, i := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")
	for _, p := range []string{k, i} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return vm.Config{VCPUs: 1, MemoryMiB: 64, Kernel: k, Initrd: i}
}

func harness(spec Spec) vmtest.Harness {
	return vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return newFixture(t, spec).f },
		Config:     func(t *testing.T) vm.Config { return bootConfig(t) },
		Write: func(ctx context.Context, inst vm.Instance, k, v string) error {
			res, err := inst.Exec(ctx, "set", []string{k, v}, vm.ExecOptions{})
			if err == nil && res.ExitCode != 0 {
				err = fmt.Errorf("set: exit %d", res.ExitCode)
			}
			return err
		},
		Read: func(ctx context.Context, inst vm.Instance, k string) (string, error) {
			res, err := inst.Exec(ctx, "get", []string{k}, vm.ExecOptions{})
			return strings.TrimSpace(string(res.Stdout)), err
		},
		Timeout: 10 * time.Second,
	}
}

// The conformance suite against the shared core, once per layout.
func TestConformanceSplit(t *testing.T)           { vmtest.Run(t, harness(splitSpec())) }
func TestConformanceSingleHostBound(t *testing.T) { vmtest.Run(t, harness(singleSpec())) }

func running(t *testing.T, fx fixture) *Instance {
	t.Helper()
	ctx := context.Background()
	inst, err := fx.f.Create(ctx, bootConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Destroy(context.Background()) })
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := inst.Exec(ctx, "set", []string{"k", "v"}, vm.ExecOptions{}); err != nil {
		t.Fatal(err)
	}
	return inst.(*Instance)
}

func TestSnapshotMetadataAndFiles(t *testing.T) {
	for _, spec := range []Spec{splitSpec(), singleSpec()} {
		t.Run(string(spec.Layout), func(t *testing.T) {
			fx := newFixture(t, spec)
			inst := running(t, fx)
			snap, err := inst.Snapshot(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			md := snap.Metadata
			if md.Backend != spec.Backend || md.BackendVersion != spec.BackendVersion || md.HostID != spec.HostID ||
				md.Layout != spec.Layout || md.HostBound != spec.HostBound || md.Architecture != spec.Arch ||
				md.VCPUCount != 1 || md.MemoryMiB != 64 || md.BaseImageVersion != "1.0.0" || md.CreatedAtMs <= 1700000000000 {
				t.Fatalf("metadata: %+v", md)
			}
			if fmt.Sprint(md.Compat) != fmt.Sprint(spec.Compat) {
				t.Fatalf("compat %v, want %v", md.Compat, spec.Compat)
			}
			if (snap.Memory != nil) != (spec.Layout == vm.LayoutSplit) {
				t.Fatalf("memory section present=%v for layout %s", snap.Memory != nil, spec.Layout)
			}
			if md.SizeBytes != uint64(md.DeviceStateSize+md.MemorySize) {
				t.Fatalf("size %d != %d + %d", md.SizeBytes, md.DeviceStateSize, md.MemorySize)
			}
			state, _ := os.ReadFile(snap.DeviceState.(*vm.FilePayload).Path)
			if md.Checksum != crc32.Checksum(state, crc32.MakeTable(crc32.Castagnoli)) {
				t.Fatalf("checksum %08x is not the CRC-32C of the state file", md.Checksum)
			}
			if err := vm.VerifyPayloads(snap); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Dir(snap.DeviceState.(*vm.FilePayload).Path)
			if err := snap.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("snapshot files survive Close: %v", err)
			}
		})
	}
}

// A snapshot is checked against the host before any file is written or the
// driver is asked to load anything.
func TestRestoreRefusals(t *testing.T) {
	for _, base := range []Spec{splitSpec(), singleSpec()} {
		fx := newFixture(t, base)
		inst := running(t, fx)
		snap, err := inst.Snapshot(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		type tc struct {
			name   string
			mut    func(s *vm.Snapshot, c *vm.Config)
			want   error
			reason string
		}
		cases := []tc{
			{"other backend", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.Backend = "qemu" }, vm.ErrIncompatible, "written by qemu"},
			{"other arch", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.Architecture = "riscv64" }, vm.ErrIncompatible, "riscv64"},
			{"not full", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.IsFullSnapshot = false }, vm.ErrIncompatible, "holds no VM state"},
			{"other layout", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.Layout = vm.LayoutNone }, vm.ErrIncompatible, "layout"},
			{"fact differs", func(s *vm.Snapshot, c *vm.Config) {
				for k := range s.Metadata.Compat {
					s.Metadata.Compat[k] = "other"
				}
			}, vm.ErrIncompatible, `the snapshot has "other"`},
			{"fact missing", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.Compat = nil }, vm.ErrIncompatible, "does not record"},
			{"fact unknown here", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.Compat["gpu"] = "x" }, vm.ErrIncompatible, "this host does not know it"},
			{"vcpus differ", func(s *vm.Snapshot, c *vm.Config) { c.VCPUs = 2 }, vm.ErrIncompatible, "1 vCPUs and 64 MiB"},
			{"memory differs", func(s *vm.Snapshot, c *vm.Config) { c.MemoryMiB = 128 }, vm.ErrIncompatible, "128 MiB"},
			{"state sha", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.DeviceStateSHA256 = strings.Repeat("0", 64) }, vm.ErrCorrupt, "checksum mismatch"},
			{"state size", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.DeviceStateSize++ }, vm.ErrCorrupt, "metadata says"},
			{"state missing", func(s *vm.Snapshot, c *vm.Config) { s.DeviceState = nil }, vm.ErrCorrupt, "device-state section is empty"},
			{"payload longer than declared", func(s *vm.Snapshot, c *vm.Config) {
				s.DeviceState = lyingPayload{s.DeviceState}
				s.Metadata.DeviceStateSize--
			}, vm.ErrCorrupt, "has more than"},
			{"no checksum", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.DeviceStateSHA256 = "" }, vm.ErrCorrupt, "no recorded checksum"},
		}
		if base.Layout == vm.LayoutSplit {
			cases = append(cases,
				tc{"memory sha", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.MemorySHA256 = strings.Repeat("f", 64) }, vm.ErrCorrupt, "memory section checksum mismatch"},
				tc{"memory missing", func(s *vm.Snapshot, c *vm.Config) { s.Memory = nil }, vm.ErrCorrupt, "needs a memory section"},
			)
		} else {
			cases = append(cases,
				tc{"other host", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.HostID = "mac-b" }, vm.ErrIncompatible, "only on the host that wrote them"},
				// A VZ save file is host-bound even if its metadata forgot it.
				tc{"other host, flag lost", func(s *vm.Snapshot, c *vm.Config) { s.Metadata.HostID, s.Metadata.HostBound = "mac-b", false }, vm.ErrIncompatible, "only on the host"},
				tc{"memory section in a single file", func(s *vm.Snapshot, c *vm.Config) { s.Memory = vm.BytesPayload("x") }, vm.ErrCorrupt, "memory section has 1 bytes, metadata says 0"},
			)
		}
		for _, c := range cases {
			t.Run(string(base.Layout)+"/"+c.name, func(t *testing.T) {
				bad := *snap
				bad.Metadata.Compat = map[string]string{}
				for k, v := range snap.Metadata.Compat {
					bad.Metadata.Compat[k] = v
				}
				cfg := bootConfig(t)
				c.mut(&bad, &cfg)
				restores := fx.d.restores
				inst, err := fx.f.CreateFromSnapshot(context.Background(), cfg, &bad)
				if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.reason) {
					if inst != nil {
						inst.Destroy(context.Background())
					}
					t.Fatalf("got %v, want %v mentioning %q", err, c.want, c.reason)
				}
				if fx.d.restores != restores {
					t.Fatalf("the driver was asked to load a refused snapshot")
				}
				assertOnlyVMs(t, fx, 1) // the source only
			})
		}
	}
}

// lyingPayload claims one byte fewer than it yields.
type lyingPayload struct{ vm.Payload }

func (p lyingPayload) Size() int64 { return p.Payload.Size() - 1 }

func assertOnlyVMs(t *testing.T, fx fixture, n int) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(fx.dir, vmsDirName))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != n {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("VM directories %v, want %d", names, n)
	}
}

func assertNoSnapshots(t *testing.T, fx fixture) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(fx.dir, snapsDirName))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Fatalf("%d snapshot directories left behind", len(ents))
	}
}

func TestSnapshotFailureLeavesSourceAsItWas(t *testing.T) {
	for _, c := range []struct {
		name   string
		inject func(d *fakeDriver)
		paused bool
	}{
		{"save fails on a running VM", func(d *fakeDriver) { d.failSave = errors.New("disk full") }, false},
		{"save fails on a paused VM", func(d *fakeDriver) { d.failSave = errors.New("disk full") }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			fx := newFixture(t, splitSpec())
			inst := running(t, fx)
			ctx := context.Background()
			if c.paused {
				if err := inst.Pause(ctx); err != nil {
					t.Fatal(err)
				}
			}
			before := inst.State()
			c.inject(fx.d)
			if _, err := inst.Snapshot(ctx); err == nil || !strings.Contains(err.Error(), "disk full") {
				t.Fatalf("snapshot: %v, want the save error", err)
			}
			if got := inst.State(); got != before {
				t.Fatalf("state %s after a failed snapshot, want %s", got, before)
			}
			assertNoSnapshots(t, fx)
			if !c.paused {
				if res, err := inst.Exec(ctx, "get", []string{"k"}, vm.ExecOptions{}); err != nil || string(res.Stdout) != "v\n" {
					t.Fatalf("guest after rollback: %q %v", res.Stdout, err)
				}
			}
		})
	}
}

func TestSnapshotResumeFailureReported(t *testing.T) {
	fx := newFixture(t, splitSpec())
	inst := running(t, fx)
	fx.d.failResume = errors.New("resume refused")
	if _, err := inst.Snapshot(context.Background()); err == nil || !strings.Contains(err.Error(), "resume refused") {
		t.Fatalf("snapshot: %v", err)
	}
	// The VM is honestly reported as paused and no files are kept.
	if inst.State() != vm.StatePaused {
		t.Fatalf("state %s", inst.State())
	}
	assertNoSnapshots(t, fx)
}

func TestCrashDetected(t *testing.T) {
	fx := newFixture(t, splitSpec())
	inst := running(t, fx)
	ctx := context.Background()
	fx.d.machines[0].crash()
	if inst.State() != vm.StateCrashed {
		t.Fatalf("state %s after the hypervisor died", inst.State())
	}
	if _, err := inst.Exec(ctx, "echo", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("exec: %v", err)
	}
	for name, op := range map[string]func() error{
		"pause":  func() error { return inst.Pause(ctx) },
		"resume": func() error { return inst.Resume(ctx) },
		"start":  func() error { return inst.Start(ctx) },
	} {
		if err := op(); !errors.Is(err, vm.ErrCrashed) {
			t.Errorf("%s on a crashed VM: %v", name, err)
		}
	}
	if _, err := inst.Snapshot(ctx); !errors.Is(err, vm.ErrCrashed) {
		t.Errorf("snapshot on a crashed VM: %v", err)
	}
	if err := inst.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if fx.d.machines[0].shutdown != 1 {
		t.Fatalf("crashed machine reaped %d times", fx.d.machines[0].shutdown)
	}
	if err := inst.Start(ctx); err != nil || inst.State() != vm.StateRunning {
		t.Fatalf("restart after crash: %v %s", err, inst.State())
	}
}

func TestCrashDuringOperation(t *testing.T) {
	fx := newFixture(t, splitSpec())
	inst := running(t, fx)
	fx.d.machines[0].crash()
	// The state was not refreshed yet when Pause began; the failure
	// still comes back as a crash.
	err := inst.Pause(context.Background())
	if !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("pause: %v", err)
	}
}

func TestBootFailureLeavesVMWhereItWas(t *testing.T) {
	fx := newFixture(t, splitSpec())
	ctx := context.Background()
	inst, err := fx.f.Create(ctx, bootConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	fx.d.failBoot = errors.New("no kvm")
	if err := inst.Start(ctx); err == nil || !strings.Contains(err.Error(), "no kvm") {
		t.Fatalf("start: %v", err)
	}
	if inst.State() != vm.StateCreated {
		t.Fatalf("state %s after failed boot", inst.State())
	}
	if err := inst.Start(ctx); err != nil {
		t.Fatalf("second start: %v", err)
	}
}

func TestRestoreDriverFailureLeavesNothing(t *testing.T) {
	fx := newFixture(t, splitSpec())
	src := running(t, fx)
	ctx := context.Background()
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	fx.d.failRestore = fmt.Errorf("load refused: %w", vm.ErrIncompatible)
	if inst, err := fx.f.CreateFromSnapshot(ctx, bootConfig(t), snap); !errors.Is(err, vm.ErrIncompatible) || inst != nil {
		t.Fatalf("CreateFromSnapshot: %v %v", inst, err)
	}
	assertOnlyVMs(t, fx, 1)
	// The snapshot itself was only read.
	if err := vm.VerifyPayloads(snap); err != nil {
		t.Fatal(err)
	}
}

func TestStopRemovesRestoreFiles(t *testing.T) {
	fx := newFixture(t, splitSpec())
	src := running(t, fx)
	ctx := context.Background()
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	dst, err := fx.f.CreateFromSnapshot(ctx, vm.Config{Kernel: "k", Initrd: "i"}, snap)
	if err != nil {
		t.Fatal(err)
	}
	// Zero VCPUs/MemoryMiB came from the snapshot.
	if c := dst.Config(); c.VCPUs != 1 || c.MemoryMiB != 64 {
		t.Fatalf("config %+v", c)
	}
	staged := filepath.Join(dst.(*Instance).Dir(), restoreDirName)
	if _, err := os.Stat(filepath.Join(staged, memoryFileName)); err != nil {
		t.Fatalf("memory file not staged: %v", err)
	}
	if err := dst.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(staged); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("staged files survive Stop: %v", err)
	}
}

func TestDestroy(t *testing.T) {
	fx := newFixture(t, singleSpec())
	inst := running(t, fx)
	ctx := context.Background()
	if err := inst.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(inst.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("VM directory survives Destroy: %v", err)
	}
	if fx.d.machines[0].shutdown != 1 {
		t.Fatal("machine not shut down")
	}
	if err := inst.Start(ctx); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("start after destroy: %v", err)
	}
	if _, err := inst.Exec(ctx, "echo", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("exec after destroy: %v", err)
	}
	if err := inst.Destroy(ctx); err != nil {
		t.Fatalf("second destroy: %v", err)
	}
}

func TestNames(t *testing.T) {
	fx := newFixture(t, splitSpec())
	ctx := context.Background()
	cfg := bootConfig(t)
	cfg.Name = "box"
	a, err := fx.f.Create(ctx, cfg)
	if err != nil || a.ID() != "box" {
		t.Fatalf("create: %v %v", a, err)
	}
	if _, err := fx.f.Create(ctx, cfg); !errors.Is(err, vm.ErrAlreadyExists) {
		t.Fatalf("duplicate name: %v", err)
	}
	// Generated ids skip directories another process made.
	if err := os.Mkdir(filepath.Join(fx.dir, vmsDirName, "fake-fc-1"), 0o700); err != nil {
		t.Fatal(err)
	}
	b, err := fx.f.Create(ctx, bootConfig(t))
	if err != nil || b.ID() != "fake-fc-2" {
		t.Fatalf("generated id %v, %v", b.ID(), err)
	}
	if err := a.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := fx.f.Create(ctx, cfg); err != nil {
		t.Fatalf("name reusable after destroy: %v", err)
	}
}

func TestCreateRefusesUnbootableConfig(t *testing.T) {
	fx := newFixture(t, splitSpec())
	for name, cfg := range map[string]vm.Config{
		"no kernel": {VCPUs: 1, MemoryMiB: 64, Initrd: "i"},
		"no initrd": {VCPUs: 1, MemoryMiB: 64, Kernel: "k"},
	} {
		if _, err := fx.f.Create(context.Background(), cfg); !errors.Is(err, vm.ErrInvalidConfig) {
			t.Errorf("%s: %v", name, err)
		}
	}
	assertOnlyVMs(t, fx, 0)
}

func TestExecDefaultsFromConfig(t *testing.T) {
	fx := newFixture(t, splitSpec())
	ctx := context.Background()
	cfg := bootConfig(t)
	cfg.Workdir, cfg.Env = "/workspace", map[string]string{"A": "1", "B": "2"}
	inst, err := fx.f.Create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	res, _ := inst.Exec(ctx, "env", nil, vm.ExecOptions{Env: map[string]string{"B": "3"}})
	if string(res.Stdout) != "A=1\nB=3\n" {
		t.Fatalf("env %q", res.Stdout)
	}
	res, _ = inst.Exec(ctx, "pwd", nil, vm.ExecOptions{})
	if string(res.Stdout) != "/workspace\n" {
		t.Fatalf("pwd %q", res.Stdout)
	}
	res, _ = inst.Exec(ctx, "pwd", nil, vm.ExecOptions{Workdir: "/tmp"})
	if string(res.Stdout) != "/tmp\n" {
		t.Fatalf("pwd %q", res.Stdout)
	}
	if inst.Config().Env["B"] != "2" {
		t.Fatal("exec options leaked into the config")
	}
}

// A lifecycle call waiting behind a stuck one gives up when its ctx ends;
// Exec does not wait at all.
func TestOperationsRespectContext(t *testing.T) {
	fx := newFixture(t, splitSpec())
	inst := running(t, fx)
	block := make(chan struct{})
	fx.d.mu.Lock()
	fx.d.blockPause = block
	fx.d.mu.Unlock()
	pauseDone := make(chan error, 1)
	go func() { pauseDone <- inst.Pause(context.Background()) }()
	// Wait until Pause holds the lock.
	for len(inst.ops) == 0 {
		time.Sleep(time.Millisecond)
	}
	if res, err := inst.Exec(context.Background(), "echo", []string{"hi"}, vm.ExecOptions{}); err != nil || string(res.Stdout) != "hi\n" {
		t.Fatalf("exec during a pause: %q %v", res.Stdout, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := inst.Resume(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("resume behind a stuck pause: %v", err)
	}
	close(block)
	if err := <-pauseDone; err != nil {
		t.Fatal(err)
	}
	if inst.State() != vm.StatePaused {
		t.Fatalf("state %s", inst.State())
	}
}

func TestNewFactoryValidates(t *testing.T) {
	good := Options{Spec: splitSpec(), Driver: newFakeDriver(vm.LayoutSplit), Dir: t.TempDir()}
	for name, mut := range map[string]func(o *Options){
		"no backend": func(o *Options) { o.Spec.Backend = "" },
		"bad arch":   func(o *Options) { o.Spec.Arch = "sparc" },
		"no host":    func(o *Options) { o.Spec.HostID = "" },
		"no layout":  func(o *Options) { o.Spec.Layout = vm.LayoutNone },
		"no driver":  func(o *Options) { o.Driver = nil },
		"no dir":     func(o *Options) { o.Dir = "" },
	} {
		o := good
		mut(&o)
		if _, err := NewFactory(o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := NewFactory(good); err != nil {
		t.Fatal(err)
	}
}

func TestHostIsACopy(t *testing.T) {
	fx := newFixture(t, splitSpec())
	h := fx.f.Host()
	h.Compat["fc_version"] = "tampered"
	if fx.f.Host().Compat["fc_version"] != "1.7.0" {
		t.Fatal("Host exposes the factory's compat map")
	}
}
