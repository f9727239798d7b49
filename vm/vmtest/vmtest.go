// Package vmtest is the conformance suite every vm backend passes: the
// lifecycle table, exec, and snapshot/restore keeping guest state.
package vmtest

import (
	"context"
	"errors"
	"maps"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// Harness adapts a backend to the suite. Write and Read store and load a
// value in guest memory (the sim's key-value machine, a file in a real
// guest's tmpfs), so the suite can check that restore keeps guest state.
type Harness struct {
	NewFactory func(t *testing.T) vm.Factory
	Config     func(t *testing.T) vm.Config
	Write      func(ctx context.Context, inst vm.Instance, key, value string) error
	Read       func(ctx context.Context, inst vm.Instance, key string) (string, error)
	// Timeout bounds each subtest (real VMs boot slowly under TCG).
	Timeout time.Duration
}

// Run runs the suite.
func Run(t *testing.T, h Harness) {
	if h.Timeout == 0 {
		h.Timeout = time.Minute
	}
	ctxFor := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
		t.Cleanup(cancel)
		return ctx
	}
	newVM := func(t *testing.T, ctx context.Context, f vm.Factory) vm.Instance {
		inst, err := f.Create(ctx, h.Config(t))
		if err != nil {
			t.Fatalf("Create: %v", err)
		}
		t.Cleanup(func() { inst.Destroy(context.Background()) })
		if inst.State() != vm.StateCreated {
			t.Fatalf("new VM is %s, want created", inst.State())
		}
		return inst
	}
	wantState := func(t *testing.T, err error) {
		t.Helper()
		if !errors.Is(err, vm.ErrInvalidState) {
			t.Fatalf("got %v, want ErrInvalidState", err)
		}
	}

	t.Run("Lifecycle", func(t *testing.T) {
		ctx := ctxFor(t)
		inst := newVM(t, ctx, h.NewFactory(t))
		wantState(t, inst.Pause(ctx))
		wantState(t, inst.Resume(ctx))
		_, err := inst.Snapshot(ctx)
		wantState(t, err)
		_, err = inst.Exec(ctx, "echo", []string{"x"}, vm.ExecOptions{})
		wantState(t, err)
		if err := inst.Start(ctx); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if inst.State() != vm.StateRunning {
			t.Fatalf("after Start: %s", inst.State())
		}
		wantState(t, inst.Start(ctx))
		wantState(t, inst.Resume(ctx))
		if err := inst.Pause(ctx); err != nil {
			t.Fatalf("Pause: %v", err)
		}
		if inst.State() != vm.StatePaused {
			t.Fatalf("after Pause: %s", inst.State())
		}
		wantState(t, inst.Pause(ctx))
		_, err = inst.Exec(ctx, "echo", []string{"x"}, vm.ExecOptions{})
		wantState(t, err)
		if err := inst.Resume(ctx); err != nil {
			t.Fatalf("Resume: %v", err)
		}
		if err := inst.Stop(ctx); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if inst.State() != vm.StateStopped {
			t.Fatalf("after Stop: %s", inst.State())
		}
		if err := inst.Stop(ctx); err != nil {
			t.Fatalf("second Stop: %v", err)
		}
		wantState(t, inst.Pause(ctx))
	})

	t.Run("Exec", func(t *testing.T) {
		ctx := ctxFor(t)
		inst := newVM(t, ctx, h.NewFactory(t))
		if err := inst.Start(ctx); err != nil {
			t.Fatal(err)
		}
		res, err := inst.Exec(ctx, "echo", []string{"hello", "world"}, vm.ExecOptions{})
		if err != nil || res.ExitCode != 0 || string(res.Stdout) != "hello world\n" {
			t.Fatalf("echo: %+v %v", res, err)
		}
		res, err = inst.Exec(ctx, "no-such-command-kelpie", nil, vm.ExecOptions{})
		if err != nil || res.ExitCode != 127 {
			t.Fatalf("unknown command: exit %d, err %v; want exit 127", res.ExitCode, err)
		}
		if err := h.Write(ctx, inst, "k", "v1"); err != nil {
			t.Fatal(err)
		}
		if got, err := h.Read(ctx, inst, "k"); err != nil || got != "v1" {
			t.Fatalf("Read = %q, %v", got, err)
		}
	})

	t.Run("SnapshotRestore", func(t *testing.T) {
		ctx := ctxFor(t)
		f := h.NewFactory(t)
		src := newVM(t, ctx, f)
		if err := src.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.Write(ctx, src, "counter", "41"); err != nil {
			t.Fatal(err)
		}
		snap, err := src.Snapshot(ctx)
		if err != nil {
			t.Fatalf("Snapshot: %v", err)
		}
		defer snap.Close()
		if src.State() != vm.StateRunning {
			t.Fatalf("source is %s after snapshot of a running VM", src.State())
		}
		md := snap.Metadata
		if md.Backend == "" || md.Architecture == "" || md.SnapshotID == "" || md.VMID != src.ID() || !md.IsFullSnapshot {
			t.Fatalf("metadata incomplete: %+v", md)
		}
		if err := vm.VerifyPayloads(snap); err != nil {
			t.Fatalf("fresh snapshot fails its own checksums: %v", err)
		}
		// The source moves on; the snapshot must not.
		if err := h.Write(ctx, src, "counter", "99"); err != nil {
			t.Fatal(err)
		}
		dst, err := f.CreateFromSnapshot(ctx, h.Config(t), snap)
		if err != nil {
			t.Fatalf("CreateFromSnapshot: %v", err)
		}
		t.Cleanup(func() { dst.Destroy(context.Background()) })
		if dst.State() != vm.StatePaused {
			t.Fatalf("restored VM is %s, want paused", dst.State())
		}
		if err := dst.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if got, err := h.Read(ctx, dst, "counter"); err != nil || got != "41" {
			t.Fatalf("restored counter = %q (%v), want 41", got, err)
		}
		if got, _ := h.Read(ctx, src, "counter"); got != "99" {
			t.Fatalf("source counter = %q, want 99", got)
		}
		// The same snapshot restores a second time: restore only reads it.
		again, err := f.CreateFromSnapshot(ctx, h.Config(t), snap)
		if err != nil {
			t.Fatalf("second CreateFromSnapshot: %v", err)
		}
		t.Cleanup(func() { again.Destroy(context.Background()) })
		if err := again.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if got, err := h.Read(ctx, again, "counter"); err != nil || got != "41" {
			t.Fatalf("re-restored counter = %q (%v), want 41", got, err)
		}
	})

	t.Run("SnapshotFromPausedStaysPaused", func(t *testing.T) {
		ctx := ctxFor(t)
		inst := newVM(t, ctx, h.NewFactory(t))
		if err := inst.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := inst.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		snap, err := inst.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		snap.Close()
		if inst.State() != vm.StatePaused {
			t.Fatalf("after snapshot: %s, want paused", inst.State())
		}
	})

	t.Run("CorruptSnapshotRefused", func(t *testing.T) {
		ctx := ctxFor(t)
		f := h.NewFactory(t)
		inst := newVM(t, ctx, f)
		if err := inst.Start(ctx); err != nil {
			t.Fatal(err)
		}
		snap, err := inst.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		bad := *snap
		// A checksum that differs from the real one in its first digit
		// (setting it to "00…" would leave one in 256 unchanged).
		sum := []byte(bad.Metadata.DeviceStateSHA256)
		if sum[0] == '0' {
			sum[0] = '1'
		} else {
			sum[0] = '0'
		}
		bad.Metadata.DeviceStateSHA256 = string(sum)
		if _, err := f.CreateFromSnapshot(ctx, h.Config(t), &bad); !errors.Is(err, vm.ErrCorrupt) {
			t.Fatalf("corrupt snapshot: %v, want ErrCorrupt", err)
		}
		other := *snap
		other.Metadata.Backend = "not-" + snap.Metadata.Backend
		if _, err := f.CreateFromSnapshot(ctx, h.Config(t), &other); !errors.Is(err, vm.ErrIncompatible) {
			t.Fatalf("foreign backend snapshot: %v, want ErrIncompatible", err)
		}
	})

	// The restore rules (teleport.Check, what `kelpie package show
	// --can-restore-here` prints) and the backend decide alike: for each
	// variant of a real snapshot's metadata, a package the rules allow is
	// one the backend does not refuse as incompatible, and the other way
	// round.
	t.Run("RestoreRulesAgreeWithBackend", func(t *testing.T) {
		ctx := ctxFor(t)
		f := h.NewFactory(t)
		inst := newVM(t, ctx, f)
		if err := inst.Start(ctx); err != nil {
			t.Fatal(err)
		}
		snap, err := inst.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer snap.Close()
		host := f.Host()
		firstFact := ""
		for k := range snap.Metadata.Compat {
			if firstFact == "" || k < firstFact {
				firstFact = k
			}
		}
		otherArch := vm.ArchArm64
		if host.Arch == vm.ArchArm64 {
			otherArch = vm.ArchX86_64
		}
		otherLayout := vm.LayoutSingle
		if snap.Metadata.Layout == vm.LayoutSingle {
			otherLayout = vm.LayoutSplit
		}
		for _, c := range []struct {
			name string
			mut  func(md *vm.SnapshotMetadata)
			// reshaped: the payloads no longer fit the metadata, so a
			// restore the rules allow must still fail, as corrupt.
			reshaped bool
		}{
			{"as taken", func(md *vm.SnapshotMetadata) {}, false},
			{"other architecture", func(md *vm.SnapshotMetadata) { md.Architecture = otherArch }, false},
			{"other backend", func(md *vm.SnapshotMetadata) { md.Backend = "other-" + md.Backend }, false},
			{"no backend", func(md *vm.SnapshotMetadata) { md.Backend = "" }, false},
			{"host-bound to this host", func(md *vm.SnapshotMetadata) { md.HostBound, md.HostID = true, host.HostID }, false},
			{"host-bound to another host", func(md *vm.SnapshotMetadata) { md.HostBound, md.HostID = true, "elsewhere" }, false},
			{"written on another host", func(md *vm.SnapshotMetadata) { md.HostID = "elsewhere" }, false},
			{"a fact differs", func(md *vm.SnapshotMetadata) { md.Compat[firstFact] += "-other" }, false},
			{"a fact missing", func(md *vm.SnapshotMetadata) { delete(md.Compat, firstFact) }, false},
			{"an extra fact", func(md *vm.SnapshotMetadata) { md.Compat["kelpie_test_extra"] = "x" }, false},
			{"no VM state", func(md *vm.SnapshotMetadata) { md.Layout, md.IsFullSnapshot = vm.LayoutNone, false }, false},
			{"the other layout", func(md *vm.SnapshotMetadata) { md.Layout = otherLayout }, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				md := snap.Metadata
				md.Compat = maps.Clone(md.Compat)
				c.mut(&md)
				pkg := &teleport.Package{ID: "p", AgentID: "a", SourceArch: md.Architecture, Kind: teleport.KindTeleport,
					BaseImageVersion: host.BaseImageVersion, SourceHostID: md.HostID, Backend: md.Backend, Snapshot: &md}
				_, rerr := teleport.Check(pkg, host)
				restored, err := f.CreateFromSnapshot(ctx, h.Config(t), vm.NewSnapshot(md, snap.DeviceState, snap.Memory, nil))
				if restored != nil {
					restored.Destroy(ctx)
				}
				switch {
				case rerr != nil && !errors.Is(err, vm.ErrIncompatible):
					t.Fatalf("the rules refuse (%v); the backend does not say incompatible: %v", rerr, err)
				case rerr == nil && c.reshaped && !errors.Is(err, vm.ErrCorrupt):
					t.Fatalf("the rules allow it and the payloads do not fit: the backend must refuse them as corrupt, not %v", err)
				case rerr == nil && !c.reshaped && err != nil:
					t.Fatalf("the rules allow it; the backend fails: %v", err)
				}
			})
		}
	})

	t.Run("InvalidConfig", func(t *testing.T) {
		ctx := ctxFor(t)
		f := h.NewFactory(t)
		for name, mut := range map[string]func(*vm.Config){
			"zero vcpus":      func(c *vm.Config) { c.VCPUs = 0 },
			"absurd memory":   func(c *vm.Config) { c.MemoryMiB = 1 << 30 },
			"tiny memory":     func(c *vm.Config) { c.MemoryMiB = 1 },
			"blank kernel":    func(c *vm.Config) { c.Kernel = "  " },
			"path as name":    func(c *vm.Config) { c.Name = "../evil" },
			"unknown netmode": func(c *vm.Config) { c.Network = "bridge" },
		} {
			cfg := h.Config(t)
			mut(&cfg)
			if inst, err := f.Create(ctx, cfg); !errors.Is(err, vm.ErrInvalidConfig) {
				if inst != nil {
					inst.Destroy(ctx)
				}
				t.Errorf("%s: %v, want ErrInvalidConfig", name, err)
			}
		}
	})
}
