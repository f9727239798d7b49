package dst

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// The CI sweep: fixed seeds, every fault on. The correct service and store
// must pass them all.
func TestSweepFixedSeeds(t *testing.T) {
	for _, c := range []struct {
		faults string
		seeds  int
		hosts  int
	}{{"default", 64, 4}, {"heavy", 48, 4}, {"heavy", 16, 2}, {"none", 16, 3}} {
		t.Run(fmt.Sprintf("%s/hosts=%d", c.faults, c.hosts), func(t *testing.T) {
			s, err := Sweep(context.Background(), SweepConfig{StartSeed: 1, Seeds: c.seeds, Steps: 200, Hosts: c.hosts, Faults: c.faults})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range s.Failures {
				t.Errorf("%s", f)
			}
			if s.Teleports == 0 || s.Restores == 0 {
				t.Fatalf("the sweep teleported nothing: %+v", s)
			}
			if c.faults != "none" && (s.FaultsInjected == 0 || s.RestoresRefused == 0) {
				t.Fatalf("no faults or refusals with profile %s: %+v", c.faults, s)
			}
			if c.faults == "none" && s.FaultsInjected != 0 {
				t.Fatalf("profile none injected %d faults", s.FaultsInjected)
			}
		})
	}
}

// Same seeds, same traces, byte for byte, whatever the parallelism.
func TestDeterminism(t *testing.T) {
	for seed := uint64(1); seed <= 12; seed++ {
		var a, b bytes.Buffer
		ra, err := Run(Config{Seed: seed, Faults: "heavy", Trace: &a})
		if err != nil {
			t.Fatal(err)
		}
		rb, err := Run(Config{Seed: seed, Faults: "heavy", Trace: &b})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a.Bytes(), b.Bytes()) || ra.TraceHash != rb.TraceHash {
			t.Fatalf("seed %d: two runs differ (hash %s vs %s)", seed, ra.TraceHash, rb.TraceHash)
		}
		sum := sha256.Sum256(a.Bytes())
		if hex.EncodeToString(sum[:]) != ra.TraceHash {
			t.Fatalf("seed %d: trace hash is not the hash of the trace", seed)
		}
	}
	var hashes []string
	for _, par := range []int{1, 3} {
		s, err := Sweep(context.Background(), SweepConfig{StartSeed: 100, Seeds: 24, Faults: "default", Parallel: par})
		if err != nil {
			t.Fatal(err)
		}
		hashes = append(hashes, s.TraceHash)
	}
	if hashes[0] != hashes[1] {
		t.Fatalf("sweep hash depends on parallelism: %v", hashes)
	}
	other, _ := Run(Config{Seed: 2, Faults: "heavy"})
	first, _ := Run(Config{Seed: 1, Faults: "heavy"})
	if other.TraceHash == first.TraceHash {
		t.Fatal("different seeds gave the same trace")
	}
}

// firstCatch runs seeds 1..maxSeeds and returns the first result whose
// violations include one of want.
func firstCatch(t *testing.T, cfg Config, maxSeeds int, want ...string) *Result {
	t.Helper()
	for seed := uint64(1); seed <= uint64(maxSeeds); seed++ {
		cfg.Seed = seed
		res, err := Run(cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range res.Violations {
			if slices.Contains(want, v.Invariant) {
				t.Logf("caught at seed %d step %d: %s", seed, v.Step, v)
				return res
			}
		}
		if len(res.Violations) > 0 {
			t.Logf("seed %d broke another invariant first: %s", seed, res.Violations[0])
		}
	}
	t.Fatalf("no violation of %v within %d seeds", want, maxSeeds)
	return nil
}

// Each planted bug is caught within a bounded number of seeds: the
// checkers can fail.
func TestPlantedBugsAreCaught(t *testing.T) {
	for _, c := range []struct {
		bug  Bug
		want []string
	}{
		{BugSkipRestoreRules, []string{InvVersionCompatibility, InvArchitectureValidation, InvRefusalReason}},
		{BugResumeSourceAfterMove, []string{InvSingleActivation}},
		{BugSkipChecksums, []string{InvSnapshotConsistency, InvRefusalReason}},
		{BugVisibleBeforeComplete, []string{InvCommitAtomicity, InvNoLoss}},
		{BugGCWithoutGrace, []string{InvChunkSafety}},
	} {
		t.Run(string(c.bug), func(t *testing.T) {
			firstCatch(t, Config{Steps: 200, Faults: "default", Bug: c.bug}, 40, c.want...)
		})
	}
}

// The invariants no planted service bug reaches are shown to fire by
// breaking the simulated machinery instead.
func TestHarnessBugsAreCaught(t *testing.T) {
	for _, c := range []struct {
		name    string
		harness harnessBugs
		bug     Bug
		want    string
	}{
		{"leaked VMs", harnessBugs{leakVMs: true}, BugNone, InvNoPartialRestore},
		{"lenient hypervisor without rules", harnessBugs{lenientBackend: true}, BugSkipRestoreRules, InvArchitectureValidation},
		{"lying resume", harnessBugs{lyingResume: true}, BugNone, InvOutAtomicity},
	} {
		t.Run(c.name, func(t *testing.T) {
			firstCatch(t, Config{Steps: 200, Faults: "heavy", Bug: c.bug, harness: c.harness}, 60, c.want)
		})
	}
}

func TestReplayAndShrink(t *testing.T) {
	cfg := Config{Steps: 200, Faults: "default", Bug: BugSkipChecksums}
	res := firstCatch(t, cfg, 40, InvRefusalReason, InvSnapshotConsistency)
	cfg.Seed = res.Seed
	again, err := Replay(cfg, res.Ops)
	if err != nil {
		t.Fatal(err)
	}
	if again.TraceHash != res.TraceHash || len(again.Violations) != len(res.Violations) {
		t.Fatalf("replaying the recorded operations differs from the run (%s vs %s)", again.TraceHash, res.TraceHash)
	}
	ops, small, err := Shrink(cfg, res, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(small.Violations) == 0 || small.Violations[0].Invariant != res.Violations[0].Invariant {
		t.Fatalf("shrunk run lost the violation: %+v", small.Violations)
	}
	if len(ops) >= len(res.Ops) && len(res.Ops) > 2 {
		t.Fatalf("shrink kept all %d operations", len(ops))
	}
	t.Logf("shrunk %d operations to %d: %v", len(res.Ops), len(ops), ops)
	if _, _, err := Shrink(cfg, &Result{}, 0); err == nil {
		t.Fatal("Shrink of a passing run succeeded")
	}
}

// The model's restore rules (verdict) and the production rules
// (teleport.Check) agree on every pair of host shapes and every kind.
func TestOracleAgreesWithRules(t *testing.T) {
	var shapes []HostConfig
	i := 0
	for _, arch := range []vm.Architecture{vm.ArchX86_64, vm.ArchArm64} {
		for _, img := range []string{"1.2.0", "1.2.3", "1.3.0", "2.2.0"} {
			for _, kind := range []string{KindFC, KindVZ} {
				for _, mem := range []int{simMemoryBytes, 2 * simMemoryBytes} {
					shapes = append(shapes, HostConfig{ID: fmt.Sprintf("h%d", i), Arch: arch, BaseImage: img, Kind: kind, MemoryBytes: mem})
					i++
				}
			}
		}
	}
	checked := 0
	for _, src := range shapes {
		srcHost := sim.NewFactory(src.simOptions()).Host()
		for _, dst := range append(shapes, src) {
			dstHost := sim.NewFactory(dst.simOptions()).Host()
			for _, kind := range []teleport.SnapshotKind{teleport.KindSuspend, teleport.KindTeleport, teleport.KindCheckpoint} {
				pkg := &teleport.Package{ID: "p", AgentID: "a", SourceArch: src.Arch, Kind: kind, BaseImageVersion: src.BaseImage,
					SourceHostID: src.ID, Backend: srcHost.Backend}
				if kind.FullVM() {
					pkg.Snapshot = &vm.SnapshotMetadata{Architecture: src.Arch, Backend: srcHost.Backend, HostID: src.ID,
						Compat: srcHost.Compat, HostBound: src.hostBound(), IsFullSnapshot: true, Layout: src.simOptions().Layout}
				}
				_, err := teleport.Check(pkg, dstHost)
				want := verdict(packageFacts{kind: kind, src: src}, dst, false)
				if (want == nil) != (err == nil) || (want != nil && !errors.Is(err, want)) {
					t.Fatalf("%s from %s to %s: rules say %v, the model says %s", kind, src, dst, err, categoryName(want))
				}
				checked++
			}
		}
	}
	t.Logf("%d combinations agree", checked)
}

func TestParseProfile(t *testing.T) {
	for _, c := range []struct {
		spec string
		ok   bool
		p    Point
		want float64
	}{
		{"none", true, VMCrash, 0},
		{"default", true, StoreAckLost, profileDefault.P[StoreAckLost]},
		{"all", true, HostCrash, profileHeavy.P[HostCrash]},
		{"heavy,vm.crash=0.5", true, VMCrash, 0.5},
		{"store.ack_lost=1", true, StoreAckLost, 1},
		{"store.ack_lost=1", true, VMCrash, 0},
		{"default,vm.crash=2", false, 0, 0},
		{"default,nope=0.1", false, 0, 0},
		{"bogus", false, 0, 0},
		{"default,vm.crash", false, 0, 0},
	} {
		pr, err := ParseProfile(c.spec)
		if (err == nil) != c.ok {
			t.Errorf("ParseProfile(%q): %v", c.spec, err)
			continue
		}
		if c.ok && pr.P[c.p] != c.want {
			t.Errorf("ParseProfile(%q)[%s] = %v, want %v", c.spec, c.p, pr.P[c.p], c.want)
		}
	}
	for _, p := range Points() {
		if q, err := ParsePoint(p.String()); err != nil || q != p {
			t.Errorf("point %d does not round-trip: %v", p, err)
		}
	}
}

func TestStreams(t *testing.T) {
	a, b := Stream(1, "faults"), Stream(1, "faults")
	c, d := Stream(1, "scenario"), Stream(2, "faults")
	x := a.Uint64()
	if x != b.Uint64() {
		t.Fatal("the same stream differs")
	}
	if x == c.Uint64() || x == d.Uint64() {
		t.Fatal("streams of other names or seeds coincide")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []Config{{Steps: -1}, {Hosts: 100}, {Faults: "sideways"}, {Bug: "bogus"}} {
		if _, err := Run(c); err == nil {
			t.Errorf("Run(%+v) accepted a bad config", c)
		}
	}
	if _, err := Sweep(context.Background(), SweepConfig{Seeds: 0}); err == nil {
		t.Error("Sweep of zero seeds succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Sweep(ctx, SweepConfig{Seeds: 1000}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled sweep: %v", err)
	}
}
