package sim_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
	"github.com/kelpie/teleport/vm/vmtest"
)

func harness(layout vm.Layout) vmtest.Harness {
	return vmtest.Harness{
		NewFactory: func(t *testing.T) vm.Factory { return sim.NewFactory(sim.Options{Layout: layout}) },
		Config:     func(t *testing.T) vm.Config { return vm.Config{VCPUs: 1, MemoryMiB: 256} },
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
	}
}

func TestConformanceSplit(t *testing.T)  { vmtest.Run(t, harness(vm.LayoutSplit)) }
func TestConformanceSingle(t *testing.T) { vmtest.Run(t, harness(vm.LayoutSingle)) }

func TestLayouts(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		layout     vm.Layout
		wantMemory bool
	}{{vm.LayoutSplit, true}, {vm.LayoutSingle, false}} {
		f := sim.NewFactory(sim.Options{Layout: c.layout})
		inst, _ := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
		inst.Start(ctx)
		snap, err := inst.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if (snap.Memory != nil) != c.wantMemory || snap.Metadata.Layout != c.layout {
			t.Errorf("%s: memory section present=%v layout=%s", c.layout, snap.Memory != nil, snap.Metadata.Layout)
		}
	}
}

func TestExecIsDeterministic(t *testing.T) {
	run := func() string {
		ctx := context.Background()
		inst, _ := sim.NewFactory(sim.Options{}).Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
		inst.Start(ctx)
		for i := 0; i < 50; i++ {
			inst.Exec(ctx, "incr", []string{fmt.Sprintf("k%d", i%7)}, vm.ExecOptions{})
		}
		snap, _ := inst.Snapshot(ctx)
		return snap.Metadata.DeviceStateSHA256 + snap.Metadata.MemorySHA256 + fmt.Sprint(snap.Metadata.CreatedAtMs)
	}
	if a, b := run(), run(); a != b {
		t.Fatalf("two identical runs differ: %s vs %s", a, b)
	}
}

func TestOutOfMemoryCrashes(t *testing.T) {
	ctx := context.Background()
	inst, _ := sim.NewFactory(sim.Options{MemoryBytes: 64}).Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
	inst.Start(ctx)
	_, err := inst.Exec(ctx, "set", []string{"k", strings.Repeat("x", 100)}, vm.ExecOptions{})
	if err == nil || inst.State() != vm.StateCrashed {
		t.Fatalf("err %v state %s, want a crash", err, inst.State())
	}
}
