package dst

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/mem"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// BenchmarkSim runs one 200-step seed per iteration and reports simulated
// steps, seeds and teleports per second of real time.
func BenchmarkSim(b *testing.B) {
	for _, faults := range []string{"none", "default", "all"} {
		b.Run("faults="+faults, func(b *testing.B) {
			steps, teleports := 0, 0
			start := time.Now()
			for i := 0; i < b.N; i++ {
				res, err := Run(Config{Seed: uint64(i + 1), Steps: 200, Faults: faults})
				if err != nil {
					b.Fatal(err)
				}
				if len(res.Violations) > 0 {
					b.Fatal(res.Violations[0])
				}
				steps += res.Steps
				teleports += res.Teleports
			}
			sec := time.Since(start).Seconds()
			b.ReportMetric(float64(steps)/sec, "steps/s")
			b.ReportMetric(float64(b.N)/sec, "seeds/s")
			b.ReportMetric(float64(teleports)/sec, "teleports/s")
		})
	}
}

// BenchmarkBaselineTeleport is the baseline: the bare service moving one
// simulated VM back and forth between two hosts through store/mem, with no
// simulator, faults or checks. BenchmarkSim's teleports/s over this one's
// is the price of simulating and checking a teleport.
func BenchmarkBaselineTeleport(b *testing.B) {
	ctx := context.Background()
	store := mem.New()
	clock := NewClock()
	var hosts [2]*service.Service
	var facs [2]*sim.Factory
	for i := range hosts {
		facs[i] = sim.NewFactory(sim.Options{HostID: fmt.Sprintf("h%d", i), MemoryBytes: simMemoryBytes, Clock: clock})
		n := 0
		hosts[i] = service.New(store, facs[i], service.WithClock(clock), service.WithIDs(func() string { n++; return fmt.Sprintf("h%d-p%d", i, n) }))
	}
	inst, err := facs[0].Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
	if err != nil {
		b.Fatal(err)
	}
	if err := inst.Start(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := inst.Exec(ctx, "set", []string{"k", "v"}, vm.ExecOptions{}); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	for i := 0; i < b.N; i++ {
		src, dst := hosts[i%2], hosts[(i+1)%2]
		pkg, err := src.Out(ctx, inst, service.OutRequest{AgentID: "a", Kind: teleport.KindTeleport})
		if err != nil {
			b.Fatal(err)
		}
		next, _, err := dst.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
		if err != nil {
			b.Fatal(err)
		}
		inst.Destroy(ctx)
		if err := store.Delete(ctx, pkg.ID); err != nil {
			b.Fatal(err)
		}
		inst = next
		clock.Advance(time.Millisecond)
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "teleports/s")
}
