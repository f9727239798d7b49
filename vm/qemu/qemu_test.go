package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
	"github.com/kelpie/teleport/vm/vmtest"
)

// The real-VM tests boot the Kelpie guest image under QEMU TCG. Boots cost
// 3-10 s on a 2-core host, so TestTeleport shares one source VM between
// its subtests; each subtest leaves that VM running with its counter.

func TestConformance(t *testing.T) {
	needQEMU(t)
	vmtest.Run(t, vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return newTestFactory(t, "conformance") },
		Config:     func(t *testing.T) vm.Config { return testConfig("", 256) },
		// The value lives in the guest's tmpfs: guest RAM.
		Write: func(ctx context.Context, inst vm.Instance, key, value string) error {
			_, err := shell(ctx, inst, fmt.Sprintf("printf %%s %q > /tmp/kv-%s", value, key))
			return err
		},
		Read: func(ctx context.Context, inst vm.Instance, key string) (string, error) {
			return shell(ctx, inst, "cat /tmp/kv-"+key)
		},
		Timeout: 3 * time.Minute,
	})
}

type wallClock struct{}

func (wallClock) Now() time.Time { return time.Now() }

func newService(st teleport.Store, f vm.Factory, opts ...service.Option) *service.Service {
	return service.New(st, f, opts...)
}

// counter is a guest process that counts in its own memory and publishes
// the count to tmpfs every 100 ms.
const counterScript = `setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!`

type guestCounter struct {
	pid string
}

func startCounter(t *testing.T, ctx context.Context, inst vm.Instance) guestCounter {
	t.Helper()
	pid := mustShell(t, ctx, inst, counterScript)
	c := guestCounter{pid: pid}
	for c.read(t, ctx, inst) < 3 {
		time.Sleep(100 * time.Millisecond) // let the guest count a little
	}
	return c
}

func (c guestCounter) read(t *testing.T, ctx context.Context, inst vm.Instance) int {
	t.Helper()
	out, err := shell(ctx, inst, readCounterScript)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(out)
	if err != nil {
		t.Fatalf("counter %q: %v", out, err)
	}
	return n
}

// checkContinues asserts the counter process of the source runs in inst
// with its count carried over (not restarted) and still advancing.
func (c guestCounter) checkContinues(t *testing.T, ctx context.Context, inst vm.Instance, before int) {
	t.Helper()
	if out := mustShell(t, ctx, inst, "kill -0 "+c.pid+" && echo alive"); out != "alive" {
		t.Fatalf("counter process %s is not running after restore", c.pid)
	}
	after := c.read(t, ctx, inst)
	if after < before {
		t.Fatalf("counter went back from %d to %d: guest memory was not carried over", before, after)
	}
	deadline := time.Now().Add(30 * time.Second)
	for c.read(t, ctx, inst) <= after {
		if time.Now().After(deadline) {
			t.Fatalf("counter stuck at %d after restore", after)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func bootID(t *testing.T, ctx context.Context, inst vm.Instance) string {
	return mustShell(t, ctx, inst, "cat /proc/sys/kernel/random/boot_id")
}

func TestTeleport(t *testing.T) {
	ctx := testCtx(t, 4*time.Minute)
	fa := newTestFactory(t, "host-a")
	fb := newTestFactory(t, "host-b")
	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	sa, sb := newService(st, fa), newService(st, fb)

	src := bootVM(t, ctx, fa, testConfig("src", 256))
	srcBoot := bootID(t, ctx, src)
	counter := startCounter(t, ctx, src)
	mustShell(t, ctx, src, "echo kept-in-tmpfs > /tmp/note")
	// restoreCheck restores snap on host b and checks the guest counter
	// carried on from before; it returns the running VM (destroyed at the
	// end of the subtest).
	restoreCheck := func(t *testing.T, snap *vm.Snapshot, name string, before int) vm.Instance {
		t.Helper()
		dst, err := fb.CreateFromSnapshot(ctx, vm.Config{Name: name}, snap)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dst.Destroy(context.Background()) })
		if err := dst.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		counter.checkContinues(t, ctx, dst, before)
		return dst
	}

	// Both formats through a store: version 1 (the sparse KLPQMEM1 memory
	// section) and version 2 (the raw RAM image, chunked and compressed,
	// its chunks in the store's chunk space).
	for _, format := range []int{blob.Version1, blob.Version2} {
		t.Run(fmt.Sprintf("SplitThroughStore/v%d", format), func(t *testing.T) {
			before := counter.read(t, ctx, src)
			pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport, KeepSource: true, Format: format})
			if err != nil {
				t.Fatalf("Out: %v", err)
			}
			if src.State() != vm.StateRunning {
				t.Fatalf("source is %s after a copy", src.State())
			}
			md := pkg.Snapshot
			if md.Layout != vm.LayoutSplit || md.Backend != BackendName || md.Compat["accel"] != "tcg" || md.Compat["qemu_version"] == "" ||
				md.Compat["machine"] != machineType || md.Compat["cpu"] == "" || md.Compat["devices"] == "" || md.MemoryMiB != 256 ||
				md.BaseImageVersion == "" || md.DeviceStateSHA256 == "" || pkg.Format != format {
				t.Fatalf("metadata incomplete: %+v", md)
			}
			switch format {
			case blob.Version1:
				// The memory section is sparse: a 256 MiB guest sends far less.
				if md.MemorySHA256 == "" || md.MemorySize <= 0 || md.MemorySize >= 200<<20 {
					t.Errorf("memory section is %d bytes (sha %q) for a 256 MiB guest", md.MemorySize, md.MemorySHA256)
				}
			case blob.Version2:
				// The raw image, verified chunk by chunk; zero pages cost
				// nothing and the rest is compressed.
				if md.MemoryFormat != vm.MemoryFormatImage || md.MemorySize != 256<<20 || md.MemorySHA256 != "" {
					t.Errorf("memory: format %q, %d bytes, sha %q; want the 256 MiB image", md.MemoryFormat, md.MemorySize, md.MemorySHA256)
				}
				if pkg.Chunks == 0 || pkg.StoredBytes <= 0 || pkg.StoredBytes >= 40<<20 || pkg.LogicalBytes < 256<<20 {
					t.Errorf("a booted 256 MiB guest stored in %d bytes, %d chunks (logical %d)", pkg.StoredBytes, pkg.Chunks, pkg.LogicalBytes)
				}
			}
			blobSum := fileSHA(t, st.BlobPath(pkg.ID))
			dst, got, err := sb.In(ctx, pkg.ID, vm.Config{Name: fmt.Sprintf("dst-split-v%d", format)}, service.InOptions{})
			if err != nil {
				t.Fatalf("In: %v", err)
			}
			defer dst.Destroy(context.Background())
			if got.SourceHostID != "host-a" || dst.State() != vm.StateRunning {
				t.Fatalf("package from %s, dst %s", got.SourceHostID, dst.State())
			}
			counter.checkContinues(t, ctx, dst, before)
			if b := bootID(t, ctx, dst); b != srcBoot {
				t.Errorf("boot id %s, source %s: the guest rebooted", b, srcBoot)
			}
			if out := mustShell(t, ctx, dst, "cat /tmp/note"); out != "kept-in-tmpfs" {
				t.Errorf("tmpfs file = %q", out)
			}
			if after := fileSHA(t, st.BlobPath(pkg.ID)); after != blobSum {
				t.Errorf("restoring modified the package blob")
			}
			// RAM file in the instance dir is sparse.
			var sst syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dst.(*Instance).Dir(), memFile), &sst); err != nil {
				t.Fatal(err)
			}
			if alloc := sst.Blocks * 512; alloc >= sst.Size {
				t.Errorf("restored RAM file is not sparse: %d of %d bytes allocated", alloc, sst.Size)
			}
		})
	}

	t.Run("SingleLayout", func(t *testing.T) {
		before := counter.read(t, ctx, src)
		snap, err := src.SnapshotLayout(ctx, vm.LayoutSingle)
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		if snap.Memory != nil || snap.Metadata.Layout != vm.LayoutSingle || snap.DeviceState.Size() < 10<<20 {
			t.Fatalf("single layout: memory %v, layout %s, state %d bytes", snap.Memory, snap.Metadata.Layout, snap.DeviceState.Size())
		}
		if src.State() != vm.StateRunning {
			t.Fatalf("source is %s", src.State())
		}
		dst := restoreCheck(t, snap, "dst-single", before)
		if out := mustShell(t, ctx, dst, "cat /tmp/note"); out != "kept-in-tmpfs" {
			t.Errorf("tmpfs file = %q", out)
		}
	})

	t.Run("SnapshotOfRunningGuest", func(t *testing.T) {
		before := counter.read(t, ctx, src)
		snap, err := src.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		st := src.LastSnapshotStats()
		t.Logf("split snapshot of a running guest: %+v", st)
		// Live RAM copies are for KVM only (see liveCapture).
		if st.LiveRAM != (src.Accel() == AccelKVM) || st.Downtime <= 0 || src.State() != vm.StateRunning {
			t.Fatalf("live RAM capture %v under %s (%q); source %s", st.LiveRAM, src.Accel(), st.LiveFallback, src.State())
		}
		dst := restoreCheck(t, snap, "dst-live", before)
		if out := mustShell(t, ctx, dst, "cat /tmp/note"); out != "kept-in-tmpfs" {
			t.Errorf("tmpfs file = %q", out)
		}
	})

	t.Run("RAMStreamMatchesRAMFile", func(t *testing.T) {
		// With the guest paused, QEMU's stream and the RAM file must hold
		// the very same bytes: this checks the stream reader page by page.
		if err := src.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		defer src.Resume(ctx)
		src.mu.Lock()
		defer src.mu.Unlock()
		q, err := src.qmpConn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		events, unsubscribe := q.subscribe()
		defer unsubscribe()
		raw, err := os.Create(filepath.Join(t.TempDir(), "raw"))
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.Truncate(256 << 20)
		if _, _, err := captureRAMLive(ctx, q, events, raw, 256<<20, io.Discard); err != nil {
			t.Fatal(err)
		}
		if fileSHA(t, raw.Name()) != fileSHA(t, src.ramPath()) {
			t.Fatal("RAM rebuilt from the migration stream differs from the RAM file")
		}
	})

	t.Run("PausedGuestSavedTwice", func(t *testing.T) {
		// QEMU saves a VM only once until it runs again; a paused guest
		// is snapshotted from the stream it saved then.
		for _, tc := range []struct {
			name   string
			stream bool // first snapshot through the stream splitter
			first  vm.Layout
			then   []vm.Layout
			refuse vm.Layout
		}{
			{"split then split", false, vm.LayoutSplit, []vm.Layout{vm.LayoutSplit}, vm.LayoutSingle},
			{"single then split and single", false, vm.LayoutSingle, []vm.Layout{vm.LayoutSplit, vm.LayoutSingle}, ""},
			{"stream split then split", true, vm.LayoutSplit, []vm.Layout{vm.LayoutSplit}, vm.LayoutSingle},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := counter.read(t, ctx, src)
				if err := src.Pause(ctx); err != nil {
					t.Fatal(err)
				}
				defer src.Resume(ctx)
				src.forceStream = tc.stream
				first, err := src.SnapshotLayout(ctx, tc.first)
				src.forceStream = false
				if err != nil {
					t.Fatal(err)
				}
				defer first.Close()
				if tc.stream && !src.LastSnapshotStats().LiveRAM {
					t.Fatalf("stream path not taken: %+v", src.LastSnapshotStats())
				}
				for _, l := range tc.then {
					again, err := src.SnapshotLayout(ctx, l)
					if err != nil {
						t.Fatalf("second snapshot (%s) of a paused guest: %v", l, err)
					}
					defer again.Close()
					restoreCheck(t, again, "", before).Destroy(context.Background())
				}
				restoreCheck(t, first, "", before).Destroy(context.Background())
				if tc.refuse != "" {
					if _, err := src.SnapshotLayout(ctx, tc.refuse); !errors.Is(err, vm.ErrInvalidState) {
						t.Fatalf("%s snapshot after a stream without RAM: %v, want ErrInvalidState", tc.refuse, err)
					}
				}
				if src.State() != vm.StatePaused {
					t.Fatalf("source %s", src.State())
				}
			})
		}
	})

	t.Run("RefusedBeforeQEMUStarts", func(t *testing.T) {
		snap, err := src.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		memPath := snap.Memory.(*vm.FilePayload).Path
		memSum := fileSHA(t, memPath)

		// One flipped byte in the middle of the RAM data.
		bad := filepath.Join(t.TempDir(), "memory")
		copyFile(t, memPath, bad)
		flipByte(t, bad, snap.Memory.Size()/2)
		badMem, _ := vm.NewFilePayload(bad)
		corrupt := vm.NewSnapshot(snap.Metadata, snap.DeviceState, badMem, nil)

		wrongAccel := vm.NewSnapshot(snap.Metadata, snap.DeviceState, snap.Memory, nil)
		wrongAccel.Metadata.Compat = cloneMap(snap.Metadata.Compat)
		wrongAccel.Metadata.Compat["accel"] = "kvm"

		simSnap := simSnapshot(t, ctx)

		for _, tc := range []struct {
			name string
			snap *vm.Snapshot
			cfg  vm.Config
			want error
			why  string
		}{
			{"corrupt memory", corrupt, vm.Config{}, vm.ErrCorrupt, "memory section checksum mismatch"},
			{"other accelerator", wrongAccel, vm.Config{}, vm.ErrIncompatible, `accel: the snapshot has "kvm", this host has "tcg"`},
			{"other memory size", snap, vm.Config{MemoryMiB: 512, VCPUs: 1}, vm.ErrIncompatible, "its machine has 1 vCPUs and 256 MiB"},
			{"sim backend", simSnap, vm.Config{}, vm.ErrIncompatible, "written by sim"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				cfg := tc.cfg
				cfg.Name = "refused"
				_, err := fb.CreateFromSnapshot(ctx, cfg, tc.snap)
				if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.why) {
					t.Fatalf("got %v, want %v mentioning %q", err, tc.want, tc.why)
				}
				// Nothing was started and nothing is left behind.
				if _, err := os.Stat(fb.instDir("refused")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("instance directory left behind: %v", err)
				}
			})
		}
		if fileSHA(t, memPath) != memSum {
			t.Error("a refused restore modified the snapshot's memory payload")
		}
	})

	t.Run("StoreRefusals", func(t *testing.T) {
		// A version 1 package whose memory section was damaged in the store.
		pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport, KeepSource: true, Format: blob.Version1})
		if err != nil {
			t.Fatal(err)
		}
		flipMemorySection(t, st.BlobPath(pkg.ID))
		if _, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "from-damaged"}, service.InOptions{}); !errors.Is(err, teleport.ErrChecksumMismatch) {
			t.Fatalf("damaged package: %v, want ErrChecksumMismatch", err)
		}
		// A version 2 package whose chunk was damaged, then one whose
		// chunks are gone: refused before QEMU starts, naming the chunk and
		// the package.
		pkg, err = sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport, KeepSource: true, Format: blob.Version2})
		if err != nil {
			t.Fatal(err)
		}
		// Damage every pack the package lists (a byte in every 4 KiB), so
		// whichever chunk the restore reads first is bad; put them back
		// afterwards.
		saved := t.TempDir()
		for _, name := range pkg.ChunkPacks {
			p := filepath.Join(st.Root(), "chunks", "packs", name+".pack")
			copyFile(t, p, filepath.Join(saved, name))
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			for off := int64(100); off < fi.Size(); off += 4096 {
				flipByte(t, p, off)
			}
		}
		_, _, err = sb.In(ctx, pkg.ID, vm.Config{Name: "from-damaged-chunk"}, service.InOptions{})
		if !errors.Is(err, teleport.ErrChecksumMismatch) || !strings.Contains(err.Error(), "package "+pkg.ID+": chunk ") {
			t.Fatalf("damaged chunk: %v, want ErrChecksumMismatch naming the package and the chunk", err)
		}
		for _, name := range pkg.ChunkPacks {
			os.Remove(filepath.Join(st.Root(), "chunks", "packs", name+".pack"))
		}
		_, _, err = sb.In(ctx, pkg.ID, vm.Config{Name: "from-missing-chunk"}, service.InOptions{})
		if !errors.Is(err, teleport.ErrChecksumMismatch) || !strings.Contains(err.Error(), "chunk ") || !strings.Contains(err.Error(), pkg.ID) {
			t.Fatalf("missing chunk: %v, want ErrChecksumMismatch naming the package and the chunk", err)
		}
		for _, name := range pkg.ChunkPacks {
			copyFile(t, filepath.Join(saved, name), filepath.Join(st.Root(), "chunks", "packs", name+".pack"))
		}
		// A suspend package restores only on its own host. The counter is
		// read before the snapshot: the source counts on after it.
		before := counter.read(t, ctx, src)
		pkg, err = sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindSuspend, KeepSource: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "suspended-elsewhere"}, service.InOptions{}); !errors.Is(err, teleport.ErrHostMismatch) {
			t.Fatalf("suspend on another host: %v, want ErrHostMismatch", err)
		}
		back, _, err := sa.In(ctx, pkg.ID, vm.Config{Name: "resumed-here"}, service.InOptions{})
		if err != nil {
			t.Fatalf("suspend on its own host: %v", err)
		}
		defer back.Destroy(context.Background())
		counter.checkContinues(t, ctx, back, before)
		// A sim package into qemu: the backend rule refuses it.
		simPkg := simPackage(t, ctx, st)
		if _, _, err := sb.In(ctx, simPkg, vm.Config{Name: "from-sim"}, service.InOptions{}); !errors.Is(err, teleport.ErrBackendMismatch) {
			t.Fatalf("sim package: %v, want ErrBackendMismatch", err)
		}
		if ents, _ := os.ReadDir(fb.vmsDir()); len(ents) != 0 {
			t.Errorf("refused restores left %d instances on host-b", len(ents))
		}
	})

	t.Run("FailedOutLeavesSourceRunning", func(t *testing.T) {
		broken := newService(commitFails{st}, fa)
		before := counter.read(t, ctx, src)
		if _, err := broken.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport}); err == nil {
			t.Fatal("Out with a failing store succeeded")
		}
		if src.State() != vm.StateRunning {
			t.Fatalf("source is %s after a failed move, want running", src.State())
		}
		counter.checkContinues(t, ctx, src, before)
	})

	t.Run("OpenByName", func(t *testing.T) {
		// Another kelpie invocation: a new factory on the same home.
		src.Detach()
		f2, err := NewFactory(ctx, Options{Home: fa.Home(), HostID: "host-a", Accel: AccelTCG})
		if err != nil {
			t.Fatal(err)
		}
		other, err := f2.open(ctx, "src")
		if err != nil {
			t.Fatal(err)
		}
		if other.State() != vm.StateRunning || other.PID() == 0 {
			t.Fatalf("opened VM is %s, pid %d", other.State(), other.PID())
		}
		if out := mustShell(t, ctx, other, "cat /tmp/note"); out != "kept-in-tmpfs" {
			t.Fatalf("exec through the second handle: %q", out)
		}
		list, err := f2.List(ctx)
		if err != nil || len(list) != 1 || list[0].Name != "src" || list[0].State != vm.StateRunning {
			t.Fatalf("List = %+v, %v", list, err)
		}
		other.Detach()
		if _, err := f2.Attach(ctx, "nope"); !errors.Is(err, vm.ErrNotFound) {
			t.Fatalf("Open(nope) = %v", err)
		}
	})

	t.Run("Checkpoint", func(t *testing.T) {
		mustShell(t, ctx, src, "mkdir -p /workspace/proj && echo 'results: 42' > /workspace/proj/out.txt")
		archive := filepath.Join(t.TempDir(), "ws.tgz")
		af, err := os.Create(archive)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := src.ArchiveWorkspace(ctx, af); err != nil {
			t.Fatal(err)
		}
		af.Close()
		ws, _ := vm.NewFilePayload(archive)
		pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", AgentState: []byte(`{"turn":7}`),
			Kind: teleport.KindCheckpoint, KeepSource: true, Workspace: ws})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := pkg.Section(teleport.SectionWorkspace); pkg.Snapshot != nil || !ok {
			t.Fatalf("checkpoint package: %+v", pkg)
		}
		dst, got, err := sb.In(ctx, pkg.ID, vm.Config{Name: "from-checkpoint", VCPUs: 1, MemoryMiB: 256}, service.InOptions{
			Workspace: &fileRestorer{path: filepath.Join(t.TempDir(), "ws-in.tgz")}})
		if err != nil {
			t.Fatal(err)
		}
		defer dst.Destroy(context.Background())
		if string(got.AgentState) != `{"turn":7}` {
			t.Errorf("agent state %q", got.AgentState)
		}
		if out := mustShell(t, ctx, dst, "cat /workspace/proj/out.txt"); out != "results: 42" {
			t.Errorf("workspace file = %q", out)
		}
		if bootID(t, ctx, dst) == srcBoot {
			t.Error("a checkpoint restored the VM instead of booting a fresh one")
		}
		if out := mustShell(t, ctx, dst, "kill -0 "+counter.pid+" 2>/dev/null && echo alive || echo gone"); out != "gone" {
			t.Error("the source's counter process exists in a checkpoint's fresh VM")
		}
	})

	t.Run("MoveThenKillMidSnapshot", func(t *testing.T) {
		before := counter.read(t, ctx, src)
		pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport})
		if err != nil {
			t.Fatal(err)
		}
		if src.State() != vm.StateStopped || src.PID() != 0 {
			t.Fatalf("source after a move: %s, pid %d", src.State(), src.PID())
		}
		dst, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "moved"}, service.InOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer dst.Destroy(context.Background())
		counter.checkContinues(t, ctx, dst, before)

		// Now QEMU dies in the middle of the next teleport's snapshot.
		d := dst.(*Instance)
		d.hookAfterStateSaved = func() { d.run.Proc.kill(context.Background()) }
		pkgs, _ := st.List(ctx)
		_, err = sb.Out(ctx, dst, service.OutRequest{AgentID: "agent-1", Kind: teleport.KindTeleport})
		if !errors.Is(err, vm.ErrCrashed) {
			t.Fatalf("Out with QEMU killed mid-snapshot: %v, want ErrCrashed", err)
		}
		if after, _ := st.List(ctx); len(after) != len(pkgs) {
			t.Fatalf("a package became visible: %d -> %d", len(pkgs), len(after))
		}
		if dst.State() != vm.StateCrashed {
			t.Fatalf("state after QEMU died: %s", dst.State())
		}
		if _, err := dst.Exec(ctx, "true", nil, vm.ExecOptions{}); !errors.Is(err, vm.ErrCrashed) {
			t.Fatalf("exec on a crashed VM: %v", err)
		}
		// A later invocation sees the crash too, and Stop clears it.
		f2, _ := NewFactory(ctx, Options{Home: fb.Home(), HostID: "host-b", Accel: AccelTCG})
		again, err := f2.open(ctx, "moved")
		if err != nil || again.State() != vm.StateCrashed {
			t.Fatalf("reopened: %v, %v", again, err)
		}
		if err := again.Stop(ctx); err != nil || again.State() != vm.StateStopped {
			t.Fatalf("stop crashed VM: %v, %s", err, again.State())
		}
	})
}

// fileRestorer stages a checkpoint's workspace in a file, then unpacks it
// into the guest.
type fileRestorer struct{ path string }

func (f *fileRestorer) Stage(r io.Reader) error { return vm.FileSink(f.path)(r) }

func (f *fileRestorer) Restore(ctx context.Context, inst vm.Instance) error {
	in, err := os.Open(f.path)
	if err != nil {
		return err
	}
	defer in.Close()
	return inst.(*Instance).RestoreWorkspace(ctx, in)
}

// commitFails is a store whose commits fail (the network went away).
type commitFails struct{ teleport.Store }

func (s commitFails) Create(ctx context.Context, id string) (teleport.Writer, error) {
	w, err := s.Store.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	return failingWriter{w}, nil
}

type failingWriter struct{ teleport.Writer }

func (w failingWriter) Commit(ctx context.Context, m *teleport.Package) error {
	w.Writer.Abort(ctx)
	return fmt.Errorf("commit: connection reset: %w", teleport.ErrStore)
}

func simSnapshot(t *testing.T, ctx context.Context) *vm.Snapshot {
	f := sim.NewFactory(sim.Options{HostID: "sim-host", Arch: vm.HostArchitecture(), BaseImageVersion: image.Version()})
	inst, err := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	inst.Start(ctx)
	snap, err := inst.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

func simPackage(t *testing.T, ctx context.Context, st teleport.Store) string {
	f := sim.NewFactory(sim.Options{HostID: "sim-host", Arch: vm.HostArchitecture(), BaseImageVersion: image.Version()})
	inst, _ := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 256})
	inst.Start(ctx)
	pkg, err := newService(st, f).Out(ctx, inst, service.OutRequest{AgentID: "sim-agent", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	return pkg.ID
}

func cloneMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	p, err := vm.NewFilePayload(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := vm.HashPayload(p)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// flipMemorySection damages one byte in the middle of a blob's memory
// section.
func flipMemorySection(t *testing.T, blobPath string) {
	t.Helper()
	f, err := os.Open(blobPath)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	b, err := blob.Open(f, fi.Size())
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if b.Header.MemoryLen == 0 {
		t.Fatal("blob has no memory section")
	}
	flipByte(t, blobPath, b.MemoryOffset()+int64(b.Header.MemoryLen)/2)
}

// readCounterScript reads the counter, retrying the instant when the
// counter's shell has truncated the file and not yet written it.
const readCounterScript = `c=; while [ -z "$c" ]; do c=$(cat /tmp/counter 2>/dev/null || echo 0); done; echo $c`
