package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"strings"

	"github.com/kelpie/teleport/dst"
)

func init() {
	register(command{"sim", "run the deterministic teleport simulation", cmdSim})
}

const simUsage = "kelpie sim [--seeds N] [--start-seed S] [--seed S [--trace]] [--steps K] [--hosts H] [--faults PROFILE] [--bug NAME] [--shrink] [--parallel P] [--json]\n       " + simFleetUsage

// simFailuresShown bounds the failures printed for a sweep.
const simFailuresShown = 20

func cmdSim(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && args[0] == "fleet" {
		return cmdSimFleet(ctx, e, args[1:])
	}
	fs := newFlags(e, "sim")
	seeds := fs.Int("seeds", 1, "how many consecutive seeds to run")
	start := fs.Uint64("start-seed", 1, "the sweep's first seed")
	seed := fs.Uint64("seed", 0, "run this one seed (add --trace to print its trace)")
	steps := fs.Int("steps", dst.StepsDefault, "operations per seed")
	hosts := fs.Int("hosts", dst.HostsDefault, "simulated hosts")
	var points []string
	for _, p := range dst.Points() {
		points = append(points, p.String())
	}
	faults := fs.String("faults", "default", "fault profile: none, default, heavy or all, optionally followed by ,point=probability overrides; points: "+strings.Join(points, ", "))
	bugNames := make([]string, len(dst.Bugs))
	for i, b := range dst.Bugs {
		bugNames[i] = string(b)
	}
	bug := fs.String("bug", "", "plant a known bug to watch the checker fire (test only): "+strings.Join(bugNames, ", "))
	trace := fs.Bool("trace", false, "print the trace of the --seed run")
	shrink := fs.Bool("shrink", false, "shrink the first failing seed to a minimal operation sequence")
	parallel := fs.Int("parallel", 0, "seeds run at once (default: the number of CPUs)")
	asJSON := fs.Bool("json", false, "print the summary as JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: %s", simUsage)
	}
	one, err := checkSeedFlags(fs, *seeds, *steps, *trace)
	if err != nil {
		return err
	}
	switch {
	case *parallel < 0:
		return usagef("--parallel %d: want 0 (the CPUs) or more", *parallel)
	case *hosts < 1 || *hosts > dst.HostsMax:
		return usagef("--hosts %d: want 1..%d", *hosts, dst.HostsMax)
	}
	if _, err := dst.ParseProfile(*faults); err != nil {
		return usagef("--faults: %v", err)
	}
	b, err := dst.ParseBug(*bug)
	if err != nil {
		return usagef("--bug: %v", err)
	}
	cfg := dst.Config{Steps: *steps, Hosts: *hosts, Faults: *faults, Bug: b}

	var sum *dst.Summary
	var runs []*dst.Result
	if one {
		cfg.Seed = *seed
		if *trace {
			cfg.Trace = e.stdout
			if *asJSON {
				cfg.Trace = e.stderr // stdout carries the JSON alone
			}
		}
		res, err := dst.Run(cfg)
		if err != nil {
			return err
		}
		runs = []*dst.Result{res}
		sum = dst.Summarize(runs, simFailuresShown)
	} else {
		sum, err = dst.Sweep(ctx, dst.SweepConfig{StartSeed: *start, Seeds: *seeds, Steps: *steps, Hosts: *hosts,
			Faults: *faults, Bug: b, Parallel: *parallel, FailuresMax: simFailuresShown})
		if err != nil {
			return err
		}
	}

	if *asJSON {
		if err := json.NewEncoder(e.stdout).Encode(sum); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(e.stdout, "sim: %d runs, %d steps, %d teleports, %d restores (%d refused), %d faults injected, %d agents lost to injected faults, %d violations\n",
			sum.Runs, sum.Steps, sum.Teleports, sum.Restores, sum.RestoresRefused, sum.FaultsInjected, sum.AgentsLost, sum.Violations)
		fmt.Fprintf(e.stdout, "trace hash %s\n", sum.TraceHash)
	}
	if sum.Violations == 0 {
		return nil
	}
	for _, f := range sum.Failures {
		fmt.Fprintf(e.stderr, "kelpie sim: seed %d step %d: %s violated: %s\n  op: %s\n  replay: %s\n", f.Seed, f.Step, f.Invariant, f.Detail, f.Op, f.Replay)
	}
	if n := sum.Violations - len(sum.Failures); n > 0 {
		fmt.Fprintf(e.stderr, "kelpie sim: ... and %d more violations\n", n)
	}
	if *shrink {
		if err := shrinkFirst(e, cfg, sum.Failures[0].Seed, runs); err != nil {
			return err
		}
	}
	return exitError{1}
}

// shrinkFirst re-runs a failing seed (runs are deterministic) and prints
// the minimal operation sequence that still fails the same way.
func shrinkFirst(e *env, cfg dst.Config, seed uint64, runs []*dst.Result) error {
	cfg.Seed, cfg.Trace = seed, nil
	var res *dst.Result
	if len(runs) == 1 && runs[0].Seed == seed {
		res = runs[0]
	} else {
		var err error
		if res, err = dst.Run(cfg); err != nil {
			return err
		}
	}
	ops, small, err := dst.Shrink(cfg, res, 0)
	if err != nil {
		return err
	}
	v := small.Violations[0]
	fmt.Fprintf(e.stderr, "kelpie sim: seed %d shrunk from %d to %d operations, still violating %s (%s):\n", seed, len(res.Ops), len(ops), v.Invariant, v.Detail)
	for _, op := range ops {
		fmt.Fprintf(e.stderr, "  step %d: %s\n", op.Step, op)
	}
	return nil
}

// checkSeedFlags checks the flags kelpie sim and sim fleet share and says
// whether they ask for one seed (--seed).
func checkSeedFlags(fs *flag.FlagSet, seeds, steps int, trace bool) (one bool, err error) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	one = set["seed"]
	switch {
	case one && (set["seeds"] || set["start-seed"]):
		return one, usagef("--seed runs one seed; it does not combine with --seeds or --start-seed")
	case trace && !one:
		return one, usagef("--trace needs --seed (a sweep's traces are only hashed)")
	case seeds < 1:
		return one, usagef("--seeds %d: want at least 1", seeds)
	case steps < 1 || steps > dst.StepsMax:
		return one, usagef("--steps %d: want 1..%d", steps, dst.StepsMax)
	}
	return one, nil
}
