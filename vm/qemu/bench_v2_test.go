package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/store/s3"
	"github.com/kelpie/teleport/vm"
)

// BenchmarkCompactPackages measures KLP1 version 2 against version 1 on
// real QEMU guests (256 MiB), every figure a ratio inside one run, each
// iteration alternating the formats:
//
//	first-v2/v1        stored bytes of a freshly booted guest's first
//	                   package, v2 over the same guest's v1 package
//	sibling-new/v1     new bytes of a guest booted from the same image into
//	                   a store holding the first's package, over its own v1
//	idle-new-KiB       new bytes of the next teleport of that guest, no change
//	written-new-MiB    ... after it wrote 8 MiB of random data
//	pause-v2/v1        how long a copy (--keep-source) stops the source
//	e2e-fs-v2/v1       teleport end to end (pause on A to ready on B),
//	                   through a filesystem store already holding a
//	                   sibling's package (the usual case in a fleet)
//	e2e-fs-empty-v2/v1 the same into an empty store
//	e2e-s3-v2/v1       the same through S3 (SeaweedFS; when
//	                   KELPIE_S3_ENDPOINT is set)
//
//	go test -run '^$' -bench CompactPackages -benchtime 3x -timeout 60m ./vm/qemu/
func BenchmarkCompactPackages(b *testing.B) {
	ctx := testCtx(b, 50*time.Minute)
	fa, fb := newTestFactory(b, "bench-a"), newTestFactory(b, "bench-b")
	dir := b.TempDir()
	openFS := func(name string) teleport.Store {
		st, err := fs.Open(filepath.Join(dir, name))
		if err != nil {
			b.Fatal(err)
		}
		return st
	}
	var s3st teleport.Store
	if ep := os.Getenv("KELPIE_S3_ENDPOINT"); ep != "" {
		bucket := os.Getenv("KELPIE_S3_BUCKET")
		if bucket == "" {
			bucket = "kelpie-test"
		}
		st, err := s3.New(ctx, s3.Options{Bucket: bucket, Prefix: fmt.Sprintf("bench-%d", time.Now().UnixNano()), Endpoint: ep, PathStyle: true})
		if err != nil {
			b.Fatal(err)
		}
		s3st = st
	}
	stats := benchStats{}
	var steps = map[string]benchStats{}
	observe := func(prefix string) service.Option {
		return service.WithStepObserver(func(step string, d time.Duration) {
			if steps[prefix] == nil {
				steps[prefix] = benchStats{}
			}
			steps[prefix].add(step, d)
		})
	}
	boot := func(name string) *Instance {
		v := bootVM(b, ctx, fa, testConfig(name, 256))
		mustShell(b, ctx, v, counterScript)
		time.Sleep(2 * time.Second) // let the guest settle as an idle agent would
		return v
	}
	out := func(st teleport.Store, v *Instance, format int, keep bool, label string) *teleport.Package {
		pkg, err := newService(st, fa, observe(label)).Out(ctx, v, service.OutRequest{AgentID: "bench", Kind: teleport.KindTeleport, KeepSource: keep, Format: format})
		if err != nil {
			b.Fatalf("%s: %v", label, err)
		}
		return pkg
	}
	// e2e moves v into st and restores it on host B; it returns the
	// restored VM and how long from the pause to the guest's answer.
	e2e := func(st teleport.Store, v *Instance, format int, label string) (vm.Instance, time.Duration, *teleport.Package) {
		t := time.Now()
		pkg := out(st, v, format, false, label+"-out")
		moved, _, err := newService(st, fb, observe(label+"-in")).In(ctx, pkg.ID, vm.Config{Name: fmt.Sprintf("moved-%s-%d", label, time.Now().UnixNano()%1e6)}, service.InOptions{})
		if err != nil {
			b.Fatalf("%s in: %v", label, err)
		}
		return moved, time.Since(t), pkg
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v1, v2 := openFS(fmt.Sprintf("v1-%d", i)), openFS(fmt.Sprintf("v2-%d", i))
		scratch := openFS(fmt.Sprintf("scratch-%d", i))

		// The first guest: its v1 and v2 packages, and copies that measure
		// how long the source stays stopped, alternating.
		first := boot(fmt.Sprintf("first-%d", i))
		p1 := out(v1, first, blob.Version1, true, "copy-v1")
		stats.add("pause-v1", first.LastSnapshotStats().Downtime)
		p2 := out(v2, first, blob.Version2, true, "copy-v2")
		stats.add("pause-v2", first.LastSnapshotStats().Downtime)
		stats.add("first-v1-MiB", time.Duration(p1.SizeBytes)*time.Millisecond/(1<<20))
		stats.add("first-v2-MiB", time.Duration(p2.StoredBytes)*time.Millisecond/(1<<20))
		for r := 0; r < 2; r++ {
			out(scratch, first, blob.Version1, true, "copy-v1")
			stats.add("pause-v1", first.LastSnapshotStats().Downtime)
			out(scratch, first, blob.Version2, true, "copy-v2")
			stats.add("pause-v2", first.LastSnapshotStats().Downtime)
		}
		first.Destroy(ctx)

		// A sibling from the same image into the store holding the first's
		// package, against its own v1 package; then its next teleports.
		sib := boot(fmt.Sprintf("sibling-%d", i))
		ps1 := out(scratch, sib, blob.Version1, true, "copy-v1")
		moved, d2, ps2 := e2e(v2, sib, blob.Version2, "e2e-fs-v2")
		stats.add("sibling-new-ratio", time.Duration(float64(ps2.NewBytes)/float64(ps1.SizeBytes)*float64(time.Millisecond)*1000))
		stats.add("e2e-fs-v2", d2)
		idle := out(v2, moved.(*Instance), blob.Version2, true, "copy-v2")
		stats.add("idle-new-KiB", time.Duration(idle.NewBytes)*time.Millisecond/(1<<10))
		mustShell(b, ctx, moved, "head -c 8388608 /dev/urandom > /tmp/random.bin")
		written := out(v2, moved.(*Instance), blob.Version2, true, "copy-v2")
		stats.add("written-new-MiB", time.Duration(written.NewBytes)*time.Millisecond/(1<<20))
		moved.Destroy(ctx)

		// Version 1 end to end through a store holding a sibling's package
		// (it cannot share it) and both into empty stores.
		g := boot(fmt.Sprintf("g1-%d", i))
		m, d1, _ := e2e(v1, g, blob.Version1, "e2e-fs-v1")
		stats.add("e2e-fs-v1", d1)
		m.Destroy(ctx)
		for _, f := range []int{blob.Version1, blob.Version2} {
			g := boot(fmt.Sprintf("empty-%d-v%d", i, f))
			m, d, _ := e2e(openFS(fmt.Sprintf("empty-%d-v%d", i, f)), g, f, fmt.Sprintf("e2e-fs-empty-v%d", f))
			stats.add(fmt.Sprintf("e2e-fs-empty-v%d", f), d)
			m.Destroy(ctx)
		}
		if s3st != nil {
			for _, f := range []int{blob.Version1, blob.Version2} {
				g := boot(fmt.Sprintf("s3-%d-v%d", i, f))
				m, d, _ := e2e(s3st, g, f, fmt.Sprintf("e2e-s3-v%d", f))
				stats.add(fmt.Sprintf("e2e-s3-v%d", f), d)
				m.Destroy(ctx)
			}
		}
	}
	b.StopTimer()
	ratio := func(a, c string) float64 { return stats.mean(a) / stats.mean(c) }
	b.ReportMetric(ratio("first-v2-MiB", "first-v1-MiB"), "first-v2/v1")
	b.ReportMetric(stats.mean("first-v1-MiB"), "first-v1-MiB")
	b.ReportMetric(stats.mean("first-v2-MiB"), "first-v2-MiB")
	b.ReportMetric(stats.mean("sibling-new-ratio")/1000, "sibling-new/v1")
	b.ReportMetric(stats.mean("idle-new-KiB"), "idle-new-KiB")
	b.ReportMetric(stats.mean("written-new-MiB"), "written-new-MiB")
	b.ReportMetric(ratio("pause-v2", "pause-v1"), "pause-v2/v1")
	b.ReportMetric(stats.mean("pause-v1"), "pause-v1-ms")
	b.ReportMetric(ratio("e2e-fs-v2", "e2e-fs-v1"), "e2e-fs-v2/v1")
	b.ReportMetric(stats.mean("e2e-fs-v1"), "e2e-fs-v1-ms")
	b.ReportMetric(ratio("e2e-fs-empty-v2", "e2e-fs-empty-v1"), "e2e-fs-empty-v2/v1")
	if s3st != nil {
		b.ReportMetric(ratio("e2e-s3-v2", "e2e-s3-v1"), "e2e-s3-v2/v1")
		b.ReportMetric(stats.mean("e2e-s3-v1"), "e2e-s3-v1-ms")
	}
	b.ReportMetric(0, "ns/op")
	var lines []string
	for _, label := range []string{"e2e-fs-v1-out", "e2e-fs-v2-out", "e2e-fs-v1-in", "e2e-fs-v2-in", "e2e-s3-v1-out", "e2e-s3-v2-out", "e2e-s3-v1-in", "e2e-s3-v2-in"} {
		st := steps[label]
		if st == nil {
			continue
		}
		var parts []string
		for _, k := range []string{"pause", "snapshot", "upload", "stop-source", "validate", "restore", "resume", "ready"} {
			if len(st[k]) > 0 {
				parts = append(parts, fmt.Sprintf("%s %.0f", k, st.mean(k)))
			}
		}
		lines = append(lines, label+": "+strings.Join(parts, ", "))
	}
	for _, k := range []string{"e2e-fs-v1", "e2e-fs-v2", "e2e-fs-empty-v1", "e2e-fs-empty-v2", "e2e-s3-v1", "e2e-s3-v2", "pause-v1", "pause-v2", "first-v1-MiB", "first-v2-MiB"} {
		if len(stats[k]) > 0 {
			lines = append(lines, fmt.Sprintf("%s mean %.1f of %v", k, stats.mean(k), stats[k]))
		}
	}
	b.Logf("steps (ms, means) and samples:\n%s", strings.Join(lines, "\n"))
}
