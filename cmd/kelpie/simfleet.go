package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/kelpie/teleport/dst"
)

const simFleetUsage = "kelpie sim fleet [--seeds N] [--start-seed S] [--seed S [--trace]] [--steps K] [--hosts H] [--bug skip-claim-check] [--json]"

// fleetSummary is what `kelpie sim fleet` prints: the production move
// protocol (registry.Node) and service over simulated hosts, a simulated
// registry and store, with daemons killed at every step of moves.
type fleetSummary struct {
	Runs        int             `json:"runs"`
	Steps       int             `json:"steps"`
	Moves       int             `json:"moves"`
	DaemonKills int             `json:"daemon_kills"`
	Claims      int             `json:"claims"`
	StaleClaims int             `json:"stale_claims"`
	Violations  int             `json:"violations"`
	Failures    []dst.Violation `json:"failures,omitempty"`
	TraceHash   string          `json:"trace_hash"` // of the last run
}

func cmdSimFleet(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "sim fleet")
	seeds := fs.Int("seeds", 1, "how many consecutive seeds to run")
	start := fs.Uint64("start-seed", 1, "the sweep's first seed")
	seed := fs.Uint64("seed", 0, "run this one seed (add --trace to print its trace)")
	steps := fs.Int("steps", 200, "operations per seed")
	hosts := fs.Int("hosts", 3, "simulated hosts, each with its daemon (2..16)")
	bug := fs.String("bug", "", "plant a known protocol bug to watch the checker fire (test only): "+string(dst.FleetBugSkipClaimCheck))
	trace := fs.Bool("trace", false, "print the trace of the --seed run")
	asJSON := fs.Bool("json", false, "print the summary as JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: %s", simFleetUsage)
	}
	one, err := checkSeedFlags(fs, *seeds, *steps, *trace)
	if err != nil {
		return err
	}
	switch {
	case *hosts < 2 || *hosts > 16:
		return usagef("--hosts %d: want 2..16", *hosts)
	case *bug != "" && dst.FleetBug(*bug) != dst.FleetBugSkipClaimCheck:
		return usagef("--bug %q: the fleet simulation knows %s", *bug, dst.FleetBugSkipClaimCheck)
	}
	first, n := *start, uint64(*seeds)
	if one {
		first, n = *seed, 1
	}
	var sum fleetSummary
	for s := first; s < first+n; s++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		cfg := dst.FleetConfig{Seed: s, Steps: *steps, Hosts: *hosts, Bug: dst.FleetBug(*bug)}
		if one && *trace {
			cfg.Trace = e.stdout
			if *asJSON {
				cfg.Trace = e.stderr
			}
		}
		res, err := dst.RunFleet(cfg)
		if err != nil {
			return err
		}
		sum.Runs++
		sum.Steps += res.Steps
		sum.Moves += res.Moves
		sum.DaemonKills += res.Crashes
		sum.Claims += res.Claims
		sum.StaleClaims += res.StaleClaims
		sum.Violations += len(res.Violations)
		if len(sum.Failures) < simFailuresShown {
			sum.Failures = append(sum.Failures, res.Violations...)
		}
		sum.TraceHash = res.TraceHash
	}
	if *asJSON {
		if err := json.NewEncoder(e.stdout).Encode(sum); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(e.stdout, "sim fleet: %d runs, %d steps, %d moves, %d daemon kills, %d claims (%d of agents not in flight), %d violations\n",
			sum.Runs, sum.Steps, sum.Moves, sum.DaemonKills, sum.Claims, sum.StaleClaims, sum.Violations)
		fmt.Fprintf(e.stdout, "trace hash %s\n", sum.TraceHash)
	}
	if sum.Violations == 0 {
		return nil
	}
	for _, f := range sum.Failures {
		fmt.Fprintf(e.stderr, "kelpie sim fleet: seed %d step %d: %s violated: %s\n  op: %s\n  replay: %s\n", f.Seed, f.Step, f.Invariant, f.Detail, f.Op, f.Replay)
	}
	return fmt.Errorf("%d violations", sum.Violations)
}
