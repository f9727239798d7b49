package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/hostvm"
	"github.com/kelpie/teleport/vm/vmtest"
)

var testFacts = hostFacts{Arch: vm.ArchX86_64, Version: "1.7.0", CPUVendor: "AuthenticAMD",
	CPUModel: "AMD EPYC (family 25 model 1)", KernelClass: "6.1"}

type rig struct {
	f   *hostvm.Factory
	l   *fakeLauncher
	dir string
}

func newRig(t testing.TB, facts hostFacts, hostID string) rig {
	t.Helper()
	l := &fakeLauncher{t: t, version: facts.Version}
	dir := shortTempDir(t)
	f, err := newFactory(Options{Dir: dir, HostID: hostID, BaseImageVersion: "1.0.0"}, facts, l)
	if err != nil {
		t.Fatal(err)
	}
	return rig{f: f, l: l, dir: dir}
}

func guestConfig(t testing.TB) vm.Config {
	dir := t.TempDir()
	return vm.Config{VCPUs: 1, MemoryMiB: 16, Kernel: touch(t, filepath.Join(dir, "vmlinux")),
		Initrd: touch(t, filepath.Join(dir, "initramfs.cpio.gz"))}
}

func set(ctx context.Context, inst vm.Instance, k, v string) error {
	res, err := inst.Exec(ctx, "set", []string{k, v}, vm.ExecOptions{})
	if err == nil && res.ExitCode != 0 {
		err = fmt.Errorf("set: exit %d: %s", res.ExitCode, res.Stderr)
	}
	return err
}

func get(ctx context.Context, inst vm.Instance, k string) (string, error) {
	res, err := inst.Exec(ctx, "get", []string{k}, vm.ExecOptions{})
	return strings.TrimSpace(string(res.Stdout)), err
}

// The conformance suite, run through the Firecracker driver (its API calls,
// vsock agent channel, process handling) against the fake Firecracker that
// checks each request against the API definition.
func TestConformanceAgainstFakeFirecracker(t *testing.T) {
	vmtest.Run(t, vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return newRig(t, testFacts, "host-a").f },
		Config:     func(t *testing.T) vm.Config { return guestConfig(t) },
		Write:      set,
		Read:       get,
		Timeout:    20 * time.Second,
	})
}

func bootedVM(t *testing.T, r rig, cfg vm.Config) vm.Instance {
	t.Helper()
	ctx := context.Background()
	inst, err := r.f.Create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Destroy(context.Background()) })
	if err := inst.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return inst
}

func TestBootRequests(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	cfg := guestConfig(t)
	cfg.RootDisk = touch(t, filepath.Join(t.TempDir(), "rootfs.ext4"))
	cfg.KernelArgs = "console=ttyS0 quiet"
	inst := bootedVM(t, r, cfg)
	got := r.l.last().log()
	// The first requests poll for the API; the configuration follows in
	// the order Firecracker documents, with device paths relative to the
	// process's directory.
	var conf []string
	for _, s := range got {
		if s != "GET /" {
			conf = append(conf, s)
		}
	}
	want := []string{
		`PUT /machine-config {"vcpu_count":1,"mem_size_mib":16,"smt":false,"track_dirty_pages":false}`,
		`PUT /boot-source {"kernel_image_path":"` + cfg.Kernel + `","initrd_path":"` + cfg.Initrd + `","boot_args":"console=ttyS0 quiet"}`,
		`PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"rootfs","is_root_device":true,"is_read_only":true}`,
		`PUT /vsock {"guest_cid":3,"uds_path":"v.sock"}`,
		`PUT /actions {"action_type":"InstanceStart"}`,
	}
	if strings.Join(conf, "\n") != strings.Join(want, "\n") {
		t.Fatalf("boot requests:\n%s\nwant:\n%s", strings.Join(conf, "\n"), strings.Join(want, "\n"))
	}
	link, err := os.Readlink(filepath.Join(inst.(*hostvm.Instance).Dir(), rootfsLink))
	if err != nil || link != cfg.RootDisk {
		t.Fatalf("rootfs link %q %v", link, err)
	}
}

func TestSnapshotAndRestoreRequests(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	src := bootedVM(t, r, guestConfig(t))
	srcFC := r.l.last()
	before := len(srcFC.log())
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	st, mem := snap.DeviceState.(*vm.FilePayload).Path, snap.Memory.(*vm.FilePayload).Path
	want := []string{
		`PATCH /vm {"state":"Paused"}`,
		`PUT /snapshot/create {"snapshot_type":"Full","snapshot_path":"` + st + `","mem_file_path":"` + mem + `"}`,
		`PATCH /vm {"state":"Resumed"}`,
	}
	if got := srcFC.log()[before:]; strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("snapshot requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	md := snap.Metadata
	if md.Layout != vm.LayoutSplit || md.MemorySize != 16<<20 || md.Compat[CompatFirecrackerVersion] != "1.7.0" ||
		md.Compat[CompatCPUModel] != testFacts.CPUModel || md.Compat[CompatHostKernel] != "6.1" ||
		md.Compat[CompatCPUTemplate] != "None" || md.BackendVersion != "1.7.0" || md.HostBound {
		t.Fatalf("metadata %+v", md)
	}

	dst, err := r.f.CreateFromSnapshot(ctx, guestConfig(t), snap)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(ctx)
	dstFC := r.l.last()
	if dstFC == srcFC {
		t.Fatal("restore reused a process")
	}
	var load []string
	for _, s := range dstFC.log() {
		if s != "GET /" {
			load = append(load, s)
		}
	}
	staged := filepath.Join(dst.(*hostvm.Instance).Dir(), "hostvm-restore")
	wantLoad := `PUT /snapshot/load {"snapshot_path":"` + filepath.Join(staged, "state") +
		`","mem_backend":{"backend_type":"File","backend_path":"` + filepath.Join(staged, "memory") + `"},"resume_vm":false}`
	if len(load) != 1 || load[0] != wantLoad {
		t.Fatalf("a fresh process must get only the load:\n%s\nwant:\n%s", strings.Join(load, "\n"), wantLoad)
	}
}

// Firecracker refuses what hostvm cannot see (here: the binary was
// replaced by another version after the factory probed it). The failed load
// ends the process; the caller gets ErrIncompatible and nothing is left.
func TestFailedLoadEndsProcess(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	src := bootedVM(t, r, guestConfig(t))
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	r.l.version = "1.8.0"
	for _, drop := range []bool{false, true} {
		r.l.setup = func(fc *fakeFC) { fc.dropLoadAnswer = drop }
		_, err = r.f.CreateFromSnapshot(ctx, guestConfig(t), snap)
		if !errors.Is(err, vm.ErrIncompatible) || !strings.Contains(err.Error(), "version mismatch") {
			t.Fatalf("answer dropped=%v: got %v", drop, err)
		}
		if r.l.running() != 1 {
			t.Fatalf("%d processes running, want only the source", r.l.running())
		}
		ents, _ := os.ReadDir(filepath.Join(r.dir, "vms"))
		if len(ents) != 1 {
			t.Fatalf("%d VM directories, want 1", len(ents))
		}
	}
}

// A snapshot from a host whose facts differ is refused before any process
// is started, and the reason names the fact.
func TestIncompatibleHostRefusedBeforeLaunch(t *testing.T) {
	ctx := context.Background()
	a := newRig(t, testFacts, "host-a")
	src := bootedVM(t, a, guestConfig(t))
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	for _, c := range []struct {
		name string
		mut  func(h *hostFacts)
		want string
	}{
		{"firecracker version", func(h *hostFacts) { h.Version = "1.8.0" }, `firecracker_version: the snapshot has "1.7.0", this host has "1.8.0"`},
		{"cpu model", func(h *hostFacts) { h.CPUModel = "AMD EPYC (family 25 model 17)" }, "cpu_model"},
		{"cpu vendor", func(h *hostFacts) { h.CPUVendor = "GenuineIntel" }, "cpu_vendor"},
		{"host kernel", func(h *hostFacts) { h.KernelClass = "5.10" }, `host_kernel: the snapshot has "6.1", this host has "5.10"`},
		{"architecture", func(h *hostFacts) { h.Arch = vm.ArchArm64 }, "this host is arm64"},
	} {
		t.Run(c.name, func(t *testing.T) {
			facts := testFacts
			c.mut(&facts)
			b := newRig(t, facts, "host-b")
			_, err := b.f.CreateFromSnapshot(ctx, guestConfig(t), snap)
			if !errors.Is(err, vm.ErrIncompatible) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrIncompatible mentioning %q", err, c.want)
			}
			if b.l.count() != 0 {
				t.Fatal("a process was started for a refused snapshot")
			}
		})
	}
	// Same facts on another host: Firecracker snapshots are not host-bound.
	b := newRig(t, testFacts, "host-b")
	dst, err := b.f.CreateFromSnapshot(ctx, guestConfig(t), snap)
	if err != nil {
		t.Fatalf("restore on an identical host: %v", err)
	}
	defer dst.Destroy(ctx)
}

// A CPU template is a restore fact.
func TestCPUTemplate(t *testing.T) {
	l := &fakeLauncher{t: t, version: "1.7.0"}
	f, err := newFactory(Options{Dir: shortTempDir(t), HostID: "h", BaseImageVersion: "1.0.0", CPUTemplate: "T2"}, testFacts, l)
	if err != nil {
		t.Fatal(err)
	}
	if f.Host().Compat[CompatCPUTemplate] != "T2" {
		t.Fatalf("compat %v", f.Host().Compat)
	}
	inst := bootedVM(t, rig{f: f, l: l}, guestConfig(t))
	_ = inst
	found := false
	for _, s := range l.last().log() {
		found = found || strings.Contains(s, `"cpu_template":"T2"`)
	}
	if !found {
		t.Fatal("machine-config did not carry the template")
	}
	if _, err := newFactory(Options{Dir: t.TempDir(), HostID: "h", CPUTemplate: "M1"}, testFacts, l); !errors.Is(err, vm.ErrInvalidConfig) {
		t.Fatalf("unknown template: %v", err)
	}
}

// The root disk is attached by a relative link, so the restored process
// finds it in its own directory even after the source VM is gone.
func TestRootDiskFollowsRestore(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	cfg := guestConfig(t)
	cfg.RootDisk = touch(t, filepath.Join(t.TempDir(), "rootfs.ext4"))
	src := bootedVM(t, r, cfg)
	if err := set(ctx, src, "k", "v"); err != nil {
		t.Fatal(err)
	}
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	if err := src.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	dst, err := r.f.CreateFromSnapshot(ctx, cfg, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(ctx)
	if err := dst.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := get(ctx, dst, "k"); err != nil || v != "v" {
		t.Fatalf("get %q %v", v, err)
	}
	// Without the disk the load fails and says which device.
	cfg.RootDisk = ""
	if _, err := r.f.CreateFromSnapshot(ctx, cfg, snap); !errors.Is(err, vm.ErrIncompatible) || !strings.Contains(err.Error(), "block device rootfs") {
		t.Fatalf("restore without the disk: %v", err)
	}
}

func TestProcessDeathIsACrash(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	inst := bootedVM(t, r, guestConfig(t))
	r.l.last().exit("SIGSEGV")
	if inst.State() != vm.StateCrashed {
		t.Fatalf("state %s", inst.State())
	}
	if _, err := inst.Exec(ctx, "echo", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrCrashed) {
		t.Fatalf("exec: %v", err)
	}
	if err := inst.Stop(ctx); err != nil || inst.State() != vm.StateStopped {
		t.Fatalf("stop: %v %s", err, inst.State())
	}
}

func TestBootFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("kernel missing", func(t *testing.T) {
		r := newRig(t, testFacts, "host-a")
		cfg := guestConfig(t)
		cfg.Kernel = filepath.Join(t.TempDir(), "no-such-vmlinux")
		inst, err := r.f.Create(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer inst.Destroy(ctx)
		err = inst.Start(ctx)
		if err == nil || !strings.Contains(err.Error(), "start the instance") || !strings.Contains(err.Error(), "no-such-vmlinux") {
			t.Fatalf("start: %v", err)
		}
		if inst.State() != vm.StateCreated || r.l.running() != 0 {
			t.Fatalf("state %s with %d processes left", inst.State(), r.l.running())
		}
	})
	t.Run("launch fails", func(t *testing.T) {
		r := newRig(t, testFacts, "host-a")
		r.l.fail = errors.New("exec: permission denied")
		inst, err := r.f.Create(ctx, guestConfig(t))
		if err != nil {
			t.Fatal(err)
		}
		defer inst.Destroy(ctx)
		if err := inst.Start(ctx); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("start: %v", err)
		}
	})
	t.Run("agent never answers", func(t *testing.T) {
		r := newRig(t, testFacts, "host-a")
		r.l.setup = func(fc *fakeFC) { fc.bootDelay = time.Hour }
		inst, err := r.f.Create(ctx, guestConfig(t))
		if err != nil {
			t.Fatal(err)
		}
		defer inst.Destroy(ctx)
		cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if err := inst.Start(cctx); !errors.Is(err, vm.ErrTimeout) {
			t.Fatalf("start: %v", err)
		}
		if r.l.running() != 0 {
			t.Fatal("process left running after a failed boot")
		}
	})
}

// The guest agent starts listening a while after InstanceStart; Start
// waits for it.
func TestBootWaitsForAgent(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	r.l.setup = func(fc *fakeFC) { fc.bootDelay = 150 * time.Millisecond }
	inst := bootedVM(t, r, guestConfig(t))
	res, err := inst.Exec(context.Background(), "echo", []string{"up"}, vm.ExecOptions{})
	if err != nil || string(res.Stdout) != "up\n" {
		t.Fatalf("exec %q %v", res.Stdout, err)
	}
}

func TestSnapshotFailureResumesSource(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	inst := bootedVM(t, r, guestConfig(t))
	if err := set(ctx, inst, "k", "v"); err != nil {
		t.Fatal(err)
	}
	r.l.last().injectFault("PUT", "/snapshot/create", "Cannot create snapshot: No space left on device (os error 28)")
	if _, err := inst.Snapshot(ctx); err == nil || !strings.Contains(err.Error(), "No space left") {
		t.Fatalf("snapshot: %v", err)
	}
	if inst.State() != vm.StateRunning {
		t.Fatalf("state %s", inst.State())
	}
	if v, err := get(ctx, inst, "k"); err != nil || v != "v" {
		t.Fatalf("guest after failed snapshot: %q %v", v, err)
	}
	ents, _ := os.ReadDir(filepath.Join(r.dir, "snapshots"))
	if len(ents) != 0 {
		t.Fatalf("%d snapshot directories left", len(ents))
	}
}

func TestConfigRefusals(t *testing.T) {
	r := newRig(t, testFacts, "host-a")
	ctx := context.Background()
	for name, mut := range map[string]func(c *vm.Config){
		"user network": func(c *vm.Config) { c.Network = vm.NetworkRestricted },
		"33 vcpus":     func(c *vm.Config) { c.VCPUs = 33 },
		"no kernel":    func(c *vm.Config) { c.Kernel = "" },
	} {
		cfg := guestConfig(t)
		mut(&cfg)
		if _, err := r.f.Create(ctx, cfg); !errors.Is(err, vm.ErrUnsupported) && !errors.Is(err, vm.ErrInvalidConfig) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestSocketPathTooLong(t *testing.T) {
	l := &fakeLauncher{t: t, version: "1.7.0"}
	dir := filepath.Join(shortTempDir(t), strings.Repeat("d", 90))
	f, err := newFactory(Options{Dir: dir, HostID: "h", BaseImageVersion: "1.0.0"}, testFacts, l)
	if err != nil {
		t.Fatal(err)
	}
	inst, err := f.Create(context.Background(), guestConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(context.Background())
	if err := inst.Start(context.Background()); !errors.Is(err, vm.ErrInvalidConfig) || !strings.Contains(err.Error(), "KELPIE_HOME") {
		t.Fatalf("start: %v", err)
	}
}

func TestInstanceID(t *testing.T) {
	for in, want := range map[string]string{
		"box":                   "box",
		"my_vm.1":               "my-vm-1",
		strings.Repeat("a", 70): strings.Repeat("a", 64),
	} {
		if got := instanceID(in); got != want {
			t.Errorf("instanceID(%q) = %q, want %q", in, got, want)
		}
	}
}
