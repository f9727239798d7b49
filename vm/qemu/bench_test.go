package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

// Benchmarks of the real backend under TCG. Each reports its own baseline,
// measured in the same run, and the ratio:
//
//	go test -run '^$' -bench . -benchtime 3x -timeout 30m ./vm/qemu/
//
// BenchmarkTeleportQEMU/mem=N, per iteration:
//
//	boot-ms      cold boot: QEMU start to the guest agent's first answer
//	downtime-ms  split snapshot of a running guest: how long it was stopped
//	restore-ms   CreateFromSnapshot (verify, stage RAM, start QEMU, load)
//	             + Resume + first agent answer; restore/boot is the ratio
//	teleport-ms  Out (pause, snapshot, pack, commit to an fs store, stop)
//	             on host A, then In (validate, verify, restore, resume) on
//	             host B until the agent answers
//	raw-ms       QEMU's own save + restore of the same VM (measured on the
//	             moved VM): stop, migrate (RAM in the stream) to a local
//	             file, new QEMU with the same command line (guest RAM in a
//	             shared tmpfs file), migrate-incoming, cont, first agent
//	             answer; teleport/raw is the ratio. raw-anon-ms: the same
//	             restore into anonymous RAM (QEMU's default, a different VM
//	             configuration), teleport/raw-anon.
//	pkg-MiB      the package's size
//
// The log line "teleport steps" splits teleport-ms into the service's
// steps (run with -v to see it).
//
// BenchmarkRestoreScaling interleaves 256 MiB and 1 GiB restores and
// reports restore-1G/256M.

type benchStats map[string][]float64

func (s benchStats) add(k string, d time.Duration) {
	s[k] = append(s[k], float64(d.Microseconds())/1000)
}

func (s benchStats) mean(k string) float64 {
	v := s[k]
	if len(v) == 0 {
		return 0
	}
	t := 0.0
	for _, x := range v {
		t += x
	}
	return t / float64(len(v))
}

func BenchmarkTeleportQEMU(b *testing.B) {
	for _, mem := range []int{256, 1024} {
		b.Run(fmt.Sprintf("mem=%dMiB", mem), func(b *testing.B) { benchTeleport(b, mem) })
	}
}

func benchTeleport(b *testing.B, memMiB int) {
	ctx := testCtx(b, 30*time.Minute)
	fa, fb := newTestFactory(b, "bench-a"), newTestFactory(b, "bench-b")
	st, err := fs.Open(filepath.Join(b.TempDir(), "store"))
	if err != nil {
		b.Fatal(err)
	}
	stats := benchStats{}
	sa := newService(st, fa, service.WithStepObserver(func(step string, d time.Duration) { stats.add("out-"+step, d) }))
	sb := newService(st, fb, service.WithStepObserver(func(step string, d time.Duration) { stats.add("in-"+step, d) }))
	var pkgBytes int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("src-%d", i)
		t := time.Now()
		src := bootVM(b, ctx, fa, testConfig(name, memMiB))
		stats.add("boot", time.Since(t))
		mustShell(b, ctx, src, counterScript)

		snap, err := src.Snapshot(ctx)
		if err != nil {
			b.Fatal(err)
		}
		stats.add("downtime", src.LastSnapshotStats().Downtime)
		t = time.Now()
		dst, err := fb.CreateFromSnapshot(ctx, vm.Config{Name: "restored-" + name}, snap)
		if err != nil {
			b.Fatal(err)
		}
		if err := dst.Resume(ctx); err != nil {
			b.Fatal(err)
		}
		if err := dst.(*Instance).WaitReady(ctx); err != nil {
			b.Fatal(err)
		}
		stats.add("restore", time.Since(t))
		dst.Destroy(ctx)
		snap.Close()

		t = time.Now()
		pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "bench", Kind: teleport.KindTeleport})
		if err != nil {
			b.Fatal(err)
		}
		moved, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "moved-" + name}, service.InOptions{})
		if err != nil {
			b.Fatal(err)
		}
		tr := time.Now()
		if err := moved.(*Instance).WaitReady(ctx); err != nil {
			b.Fatal(err)
		}
		stats.add("in-ready", time.Since(tr))
		stats.add("teleport", time.Since(t))
		pkgBytes = pkg.SizeBytes

		// The baseline runs on the moved VM afterwards: a full RAM save
		// touches every page, which would slow the source's teardown in
		// the teleport measured above.
		for _, anon := range []bool{false, true} {
			d, err := rawSaveRestore(ctx, b, moved.(*Instance), fa, anon)
			if err != nil {
				b.Fatal(err)
			}
			stats.add(map[bool]string{false: "raw", true: "raw-anon"}[anon], d)
		}
		moved.Destroy(ctx)
		src.Destroy(ctx)
		st.Delete(ctx, pkg.ID)
	}
	b.StopTimer()
	for _, k := range []string{"boot", "downtime", "restore", "teleport", "raw", "raw-anon"} {
		b.ReportMetric(stats.mean(k), k+"-ms")
	}
	b.ReportMetric(stats.mean("restore")/stats.mean("boot"), "restore/boot")
	b.ReportMetric(stats.mean("teleport")/stats.mean("raw"), "teleport/raw")
	b.ReportMetric(stats.mean("teleport")/stats.mean("raw-anon"), "teleport/raw-anon")
	b.ReportMetric(float64(pkgBytes)/(1<<20), "pkg-MiB")
	b.ReportMetric(0, "ns/op") // wall time per op mixes everything; the metrics above are the result
	var steps []string
	for _, k := range []string{"out-pause", "out-snapshot", "out-upload", "out-stop-source", "in-validate", "in-fetch-verify", "in-restore", "in-resume", "in-ready"} {
		steps = append(steps, fmt.Sprintf("%s %.1f", k, stats.mean(k)))
	}
	b.Logf("teleport steps (ms, mean of %d): %s", b.N, strings.Join(steps, ", "))
}

// rawSaveRestore is the baseline: QEMU saving the paused VM with RAM in the
// stream to a local file and a new QEMU process restoring it, until the
// guest agent answers. anon restores into anonymous RAM instead of the
// VM's file-backed RAM. The source is resumed afterwards.
func rawSaveRestore(ctx context.Context, b *testing.B, src *Instance, fb *Factory, anon bool) (time.Duration, error) {
	src.mu.Lock()
	defer src.mu.Unlock()
	q, err := src.qmpConn(ctx)
	if err != nil {
		return 0, err
	}
	events, unsubscribe := q.subscribe()
	defer unsubscribe()
	if err := setupMigration(ctx, q, false, true); err != nil {
		return 0, err
	}
	statePath := filepath.Join(b.TempDir(), "raw.state")
	start := time.Now()
	if err := q.Call(ctx, "stop", nil, nil); err != nil {
		return 0, err
	}
	if _, err := migrateToFile(ctx, q, statePath, events); err != nil {
		return 0, err
	}
	saved := time.Since(start)
	defer q.Call(ctx, "cont", nil, nil)

	dst, err := fb.create(ctx, vm.Config{Name: "raw", VCPUs: src.rec.Config.VCPUs, MemoryMiB: src.rec.Config.MemoryMiB})
	if err != nil {
		return 0, err
	}
	defer dst.Destroy(context.Background())
	args := dst.qemuArgs(true)
	if anon {
		for i, a := range args {
			if strings.HasPrefix(a, "memory-backend-file,") {
				args[i] = fmt.Sprintf("memory-backend-ram,id=mem,size=%dM", src.rec.Config.MemoryMiB)
			}
		}
	}
	start = time.Now()
	p, err := spawn(dst.rec.Binary, args, dst.dir, dst.path(qemuLog))
	if err != nil {
		return 0, err
	}
	dst.setState(vm.StateStarting, p)
	q2, err := dialQMP(ctx, dst.path(qmpSock))
	if err != nil {
		return 0, err
	}
	dst.qmp = q2
	ev2, unsub2 := q2.subscribe()
	defer unsub2()
	if err := setupMigration(ctx, q2, false, false); err != nil {
		return 0, err
	}
	f, err := os.Open(statePath)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if err := q2.CallWithFile(ctx, "getfd", map[string]any{"fdname": migrateFDName}, f); err != nil {
		return 0, err
	}
	if err := q2.Call(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + migrateFDName}, nil); err != nil {
		return 0, err
	}
	if _, err := q2.waitMigration(ctx, ev2); err != nil {
		return 0, err
	}
	if err := q2.Call(ctx, "cont", nil, nil); err != nil {
		return 0, err
	}
	dst.setState(vm.StateRunning, p)
	if _, err := dst.agentConn(ctx); err != nil {
		return 0, err
	}
	return saved + time.Since(start), nil
}

func BenchmarkRestoreScaling(b *testing.B) {
	ctx := testCtx(b, 30*time.Minute)
	fa, fb := newTestFactory(b, "scale-a"), newTestFactory(b, "scale-b")
	sizes := []int{256, 1024}
	snaps := map[int]*vm.Snapshot{}
	for _, mem := range sizes {
		src := bootVM(b, ctx, fa, testConfig(fmt.Sprintf("src-%d", mem), mem))
		mustShell(b, ctx, src, counterScript)
		snap, err := src.Snapshot(ctx)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { snap.Close() })
		snaps[mem] = snap
		src.Destroy(ctx)
	}
	stats := benchStats{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, mem := range sizes {
			t := time.Now()
			dst, err := fb.CreateFromSnapshot(ctx, vm.Config{Name: fmt.Sprintf("r-%d-%d", mem, i)}, snaps[mem])
			if err != nil {
				b.Fatal(err)
			}
			if err := dst.Resume(ctx); err != nil {
				b.Fatal(err)
			}
			if err := dst.(*Instance).WaitReady(ctx); err != nil {
				b.Fatal(err)
			}
			stats.add(fmt.Sprint(mem), time.Since(t))
			dst.Destroy(ctx)
		}
	}
	b.StopTimer()
	b.ReportMetric(stats.mean("256"), "restore256M-ms")
	b.ReportMetric(stats.mean("1024"), "restore1G-ms")
	b.ReportMetric(stats.mean("1024")/stats.mean("256"), "restore-1G/256M")
	b.ReportMetric(float64(snaps[256].Metadata.SizeBytes)/(1<<20), "snap256M-MiB")
	b.ReportMetric(float64(snaps[1024].Metadata.SizeBytes)/(1<<20), "snap1G-MiB")
	b.ReportMetric(0, "ns/op")
}
