package host_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
)

// BenchmarkForkQEMU: a fork of 3 copies (one snapshot of the running
// source, three restores side by side, each until its guest answers with
// its new identity) against one teleport in of a package of the same VM
// (from an fs store, until the guest answers), in the same run, on real
// QEMU VMs (256 MiB, restricted network, 1 GiB workspace disk with 10 MiB
// written). fork3/in1 is the ratio of the means, median-fork3/in1 of the
// medians.
//
//	go test -run '^$' -bench ForkQEMU -benchtime 5x -timeout 30m ./host/
func BenchmarkForkQEMU(b *testing.B) {
	if os.Getenv("KELPIE_QEMU_TESTS") == "0" {
		b.Skip("KELPIE_QEMU_TESTS=0")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		b.Skip("no QEMU")
	}
	if _, err := image.CurrentDir(); err != nil {
		b.Skip("no guest image")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := b.TempDir()
	h, err := host.Open(ctx, host.Options{Home: filepath.Join(dir, "home"), Backends: []host.Backend{host.QEMUBackend(host.BackendConfig{Accel: "tcg"})}})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	store := filepath.Join(dir, "store")
	var in1, fork3 []float64
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	mean := func(v []float64) float64 {
		t := 0.0
		for _, x := range v {
			t += x
		}
		return t / float64(len(v))
	}
	for i := 0; i < b.N; i++ {
		src := fmt.Sprintf("src%d", i)
		if _, err := h.CreateVM(ctx, host.VMSpec{Name: src, DiskBytes: 1 << 30}); err != nil {
			b.Fatal(err)
		}
		if _, err := h.Exec(ctx, src, "sh", []string{"-c", "head -c 10485760 /dev/urandom > /workspace/data && sync"}, vm.ExecOptions{}); err != nil {
			b.Fatal(err)
		}
		out, err := h.TeleportOut(ctx, src, host.OutRequest{Store: store, KeepSource: true})
		if err != nil {
			b.Fatal(err)
		}
		runIn := func() {
			t := time.Now()
			if _, err := h.TeleportIn(ctx, out.Package.ID, host.InRequest{Store: store, Name: fmt.Sprintf("in%d", i)}); err != nil {
				b.Fatal(err)
			}
			in1 = append(in1, ms(time.Since(t)))
		}
		runFork := func() {
			t := time.Now()
			if _, err := h.ForkVM(ctx, src, host.ForkRequest{Count: 3, Prefix: fmt.Sprintf("f%d-", i)}); err != nil {
				b.Fatal(err)
			}
			fork3 = append(fork3, ms(time.Since(t)))
		}
		if i%2 == 0 {
			runIn()
			runFork()
		} else {
			runFork()
			runIn()
		}
		vms, _ := h.VMs(ctx)
		for _, v := range vms {
			h.RemoveVM(ctx, v.Name)
		}
		h.RemovePackage(ctx, store, out.Package.ID)
	}
	b.ReportMetric(mean(in1), "in1-ms")
	b.ReportMetric(mean(fork3), "fork3-ms")
	b.ReportMetric(mean(fork3)/mean(in1), "fork3/in1")
	med := func(v []float64) float64 {
		s := slices.Clone(v)
		slices.Sort(s)
		if len(s)%2 == 1 {
			return s[len(s)/2]
		}
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	b.ReportMetric(med(fork3)/med(in1), "median-fork3/in1")
	b.ReportMetric(0, "ns/op")
	b.Logf("teleport in (ms) %v; fork of 3 (ms) %v", in1, fork3)
}
