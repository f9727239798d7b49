package qemu

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

// Benchmarks of the sandbox devices, each against the same VM without
// them, measured in the same run, interleaved (the machine is noisy):
//
//	go test -run '^$' -bench 'Sandbox' -benchtime 5x -timeout 30m ./vm/qemu/
//
// BenchmarkSandboxDiskTeleport: pause on home A -> ready on home B (Out
// through an fs store, then In until the guest answers) of a 256 MiB VM
// with a 1 GiB workspace disk into which the guest wrote 10 MiB, and of
// the same VM without a disk (the 10 MiB written into its RAM-backed
// /workspace instead). disk/plain is the ratio of the means,
// median-disk/plain of the medians.
//
// BenchmarkSandboxColdBoot: create + boot until the guest answers, of a
// VM with a restricted network (a published port and a forward) and a
// 1 GiB workspace disk, and of the same VM without them. devices/plain.

// median of samples (a noisy machine's outliers move the mean).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

const (
	benchDiskBytes    = 1 << 30
	benchWrittenBytes = 10 << 20
)

// interleave runs b.N pairs of run(i, false) (the baseline, "plain") and
// run(i, true) (with, named with), alternating their order so neither
// always runs second, and reports both and their ratios.
func interleave(b *testing.B, run func(i int, with bool), stats benchStats, with string) {
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		run(i, i%2 == 1)
		run(i, i%2 == 0)
	}
	b.StopTimer()
	b.ReportMetric(stats.mean("plain"), "plain-ms")
	b.ReportMetric(stats.mean(with), with+"-ms")
	b.ReportMetric(stats.mean(with)/stats.mean("plain"), with+"/plain")
	b.ReportMetric(median(stats[with])/median(stats["plain"]), "median-"+with+"/plain")
}

func BenchmarkSandboxDiskTeleport(b *testing.B) {
	ctx := testCtx(b, 30*time.Minute)
	fa, fb := newTestFactory(b, "bench-a"), newTestFactory(b, "bench-b")
	st, err := fs.Open(filepath.Join(b.TempDir(), "store"))
	if err != nil {
		b.Fatal(err)
	}
	stats := benchStats{}
	var kind string
	sa := newService(st, fa, service.WithStepObserver(func(step string, d time.Duration) { stats.add(kind+"-out-"+step, d) }))
	sb := newService(st, fb, service.WithStepObserver(func(step string, d time.Duration) { stats.add(kind+"-in-"+step, d) }))
	stored := map[string]int64{}
	run := func(i int, withDisk bool) {
		kind = map[bool]string{false: "plain", true: "disk"}[withDisk]
		cfg := testConfig(fmt.Sprintf("%s-%d", kind, i), 256)
		if withDisk {
			cfg.Disk = vm.Disk{SizeBytes: benchDiskBytes}
		}
		src := bootVM(b, ctx, fa, cfg)
		mustShell(b, ctx, src, counterScript)
		mustShell(b, ctx, src, fmt.Sprintf("head -c %d /dev/urandom > /workspace/data && sync", benchWrittenBytes))
		t := time.Now()
		pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "bench", Kind: teleport.KindTeleport})
		if err != nil {
			b.Fatal(err)
		}
		moved, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "moved-" + cfg.Name}, service.InOptions{})
		if err != nil {
			b.Fatal(err)
		}
		stats.add(kind, time.Since(t))
		// Version 2 (the default) carries the disk in the blob, chunked;
		// version 1 in a section of its own.
		stored[kind] = pkg.StoredBytes
		if sec, ok := pkg.Section(teleport.SectionDisk); ok {
			stored[kind] = pkg.SizeBytes
			b.Logf("disk section %d bytes", sec.Size)
		}
		moved.Destroy(ctx)
		src.Destroy(ctx)
		st.Delete(ctx, pkg.ID)
	}
	interleave(b, run, stats, "disk")
	b.ReportMetric(float64(stored["plain"])/(1<<20), "plain-stored-MiB")
	b.ReportMetric(float64(stored["disk"])/(1<<20), "disk-stored-MiB")
	b.ReportMetric(0, "ns/op")
	b.Logf("pause->ready (ms): plain %v, disk %v", stats["plain"], stats["disk"])
	for _, k := range []string{"plain", "disk"} {
		var steps []string
		for _, st := range []string{"out-pause", "out-snapshot", "out-upload", "out-stop-source", "in-validate", "in-restore", "in-resume", "in-ready"} {
			steps = append(steps, fmt.Sprintf("%s %.1f", st, median(stats[k+"-"+st])))
		}
		b.Logf("%s steps (ms, medians): %s", k, strings.Join(steps, ", "))
	}
}

func BenchmarkSandboxColdBoot(b *testing.B) {
	ctx := testCtx(b, 30*time.Minute)
	f := newTestFactory(b, "bench")
	srv := startHostServer(b, "x")
	stats := benchStats{}
	run := func(i int, devices bool) {
		kind := map[bool]string{false: "plain", true: "devices"}[devices]
		cfg := testConfig(fmt.Sprintf("%s-%d", kind, i), 256)
		if devices {
			cfg.Network = vm.NetworkRestricted
			cfg.Publish = []vm.Publish{{HostIP: "127.0.0.1", GuestPort: 8080}}
			cfg.Forwards = []vm.Forward{{GuestPort: 5000, HostIP: "127.0.0.1", HostPort: srv.port}}
			cfg.Disk = vm.Disk{SizeBytes: benchDiskBytes}
		}
		t := time.Now()
		inst, err := f.Create(ctx, cfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := inst.Start(ctx); err != nil {
			b.Fatal(err)
		}
		stats.add(kind, time.Since(t))
		inst.Destroy(ctx)
	}
	interleave(b, run, stats, "devices")
	b.ReportMetric(0, "ns/op")
	b.Logf("cold boot (ms): plain %v, devices %v", stats["plain"], stats["devices"])
}
