package dst

import "fmt"

// shrinkRunsDefault bounds the replays one Shrink may spend.
const shrinkRunsDefault = 2000

// Shrink looks for a shorter operation sequence that still breaks the
// invariant res broke first. It replays candidate subsequences (dropping
// halves, then quarters, ... then single operations, as delta debugging
// does) and keeps any that still fail the same way. Every replay is
// deterministic, so the shrunk sequence is too. maxRuns bounds the replays
// (0: a default).
func Shrink(cfg Config, res *Result, maxRuns int) ([]Op, *Result, error) {
	if len(res.Violations) == 0 {
		return nil, nil, fmt.Errorf("seed %d: nothing to shrink: no invariant was violated", res.Seed)
	}
	if maxRuns <= 0 {
		maxRuns = shrinkRunsDefault
	}
	cfg.Trace = nil
	want := res.Violations[0].Invariant
	ops, best := res.Ops, res
	runs := 0
	fails := func(cand []Op) (*Result, bool) {
		runs++
		r, err := Replay(cfg, cand)
		if err != nil || len(r.Violations) == 0 || r.Violations[0].Invariant != want {
			return nil, false
		}
		return r, true
	}
	for chunk := len(ops) / 2; chunk >= 1 && runs < maxRuns; {
		removed := false
		for i := 0; i < len(ops) && runs < maxRuns; {
			cand := append(append([]Op{}, ops[:i]...), ops[min(i+chunk, len(ops)):]...)
			if r, ok := fails(cand); ok {
				// A replay stops at its first violation: what it ran is
				// the new sequence.
				ops, best, removed = r.Ops, r, true
				continue
			}
			i += chunk
		}
		if !removed {
			chunk /= 2
		}
	}
	return ops, best, nil
}
