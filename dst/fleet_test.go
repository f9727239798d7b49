package dst

import (
	"flag"
	"strings"
	"testing"
)

var fleetSeed = flag.Uint64("fleet.seed", 0, "run this fleet seed alone, with its trace")

// TestFleet sweeps seeds of the fleet simulation: the production move
// protocol with daemons killed at every step of moves, leases expiring,
// the registry down and hosts cut off, and stale claims; SingleActivation
// and NoLoss hold against the registry after every step.
func TestFleet(t *testing.T) {
	seeds := uint64(150)
	if testing.Short() {
		seeds = 40
	}
	if *fleetSeed != 0 {
		var tr strings.Builder
		res, err := RunFleet(FleetConfig{Seed: *fleetSeed, Trace: &tr})
		if err != nil {
			t.Fatal(err)
		}
		t.Log(tr.String())
		for _, v := range res.Violations {
			t.Error(v)
		}
		return
	}
	var total FleetResult
	for s := uint64(1); s <= seeds; s++ {
		res, err := RunFleet(FleetConfig{Seed: s})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range res.Violations {
			t.Fatalf("%s", v)
		}
		total.Moves += res.Moves
		total.Crashes += res.Crashes
		total.Claims += res.Claims
		total.StaleClaims += res.StaleClaims
	}
	t.Logf("%d seeds: %d moves, %d daemon kills, %d claims (%d of agents not in flight)", seeds, total.Moves, total.Crashes, total.Claims, total.StaleClaims)
	if total.Crashes == 0 || total.StaleClaims == 0 || total.Moves == 0 {
		t.Fatal("the sweep exercised nothing")
	}
}

func TestFleetDeterministic(t *testing.T) {
	a, _ := RunFleet(FleetConfig{Seed: 7})
	b, _ := RunFleet(FleetConfig{Seed: 7})
	if a.TraceHash != b.TraceHash {
		t.Fatalf("seed 7 gave two traces: %s vs %s", a.TraceHash, b.TraceHash)
	}
}

// The planted bug (a claim that skips the in-flight and epoch check) makes
// a second host restore an agent that already runs: SingleActivation,
// checked against the registry, must catch it within the sweep.
func TestFleetPlantedSkipClaimCheck(t *testing.T) {
	for s := uint64(1); s <= 150; s++ {
		res, err := RunFleet(FleetConfig{Seed: s, Bug: FleetBugSkipClaimCheck})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range res.Violations {
			if v.Invariant == InvSingleActivation {
				t.Logf("caught at seed %d: %s", s, v.Detail)
				return
			}
		}
	}
	t.Fatal("skip-claim-check planted, and no seed of 150 broke SingleActivation")
}
