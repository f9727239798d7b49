package dst

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime"
	"sync"
)

// SweepConfig is a sweep over consecutive seeds.
type SweepConfig struct {
	StartSeed uint64
	Seeds     int
	Steps     int
	Hosts     int
	Faults    string
	Bug       Bug
	// Parallel is how many seeds run at once (default GOMAXPROCS). Each
	// run is single-goroutine; results are merged in seed order, so the
	// summary does not depend on it.
	Parallel int
	// FailuresMax bounds the failures kept in the summary (default 20).
	FailuresMax int
}

// Summary is a sweep's outcome, as `kelpie sim --json` prints it.
type Summary struct {
	Runs            int            `json:"runs"`
	Steps           int            `json:"steps"`
	Teleports       int            `json:"teleports"`
	RestoresRefused int            `json:"restores_refused"`
	FaultsInjected  int            `json:"faults_injected"`
	Violations      int            `json:"violations"`
	TraceHash       string         `json:"trace_hash"`
	Restores        int            `json:"restores"`
	AgentsLost      int            `json:"agents_lost_to_faults"`
	FailedSeeds     int            `json:"failed_seeds"`
	Faults          map[string]int `json:"faults_by_point,omitempty"`
	Failures        []Violation    `json:"failures,omitempty"`
}

// Sweep runs cfg.Seeds seeds from cfg.StartSeed. Its trace hash is the
// SHA-256 of the runs' trace hashes in seed order. It stops early, with
// ctx's error, when ctx is done.
func Sweep(ctx context.Context, cfg SweepConfig) (*Summary, error) {
	if cfg.Seeds < 1 {
		return nil, fmt.Errorf("seeds %d: want at least 1", cfg.Seeds)
	}
	if cfg.Parallel <= 0 {
		cfg.Parallel = runtime.GOMAXPROCS(0)
	}
	if cfg.FailuresMax <= 0 {
		cfg.FailuresMax = 20
	}
	base := Config{Steps: cfg.Steps, Hosts: cfg.Hosts, Faults: cfg.Faults, Bug: cfg.Bug}
	if err := base.normalize(); err != nil {
		return nil, err
	}
	results := make([]*Result, cfg.Seeds)
	errs := make([]error, cfg.Seeds)
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < min(cfg.Parallel, cfg.Seeds); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c := base
				c.Seed = cfg.StartSeed + uint64(i)
				results[i], errs[i] = Run(c)
				if results[i] != nil {
					results[i].Ops = nil // only replays need them; a big sweep should not hold them
				}
			}
		}()
	}
feed:
	for i := 0; i < cfg.Seeds; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sweep interrupted: %w", err)
	}
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return Summarize(results, cfg.FailuresMax), nil
}

// Summarize merges run results, in the order given, into a summary. Its
// trace hash is the SHA-256 of the runs' trace hashes in that order, so a
// sweep of one seed and a replay of that seed agree.
func Summarize(results []*Result, failuresMax int) *Summary {
	s := &Summary{Faults: map[string]int{}}
	h := sha256.New()
	var counts [numPoints]int
	for _, res := range results {
		s.Runs++
		s.Steps += res.Steps
		s.Teleports += res.Teleports
		s.Restores += res.Restores
		s.RestoresRefused += res.RestoresRefused
		s.FaultsInjected += res.FaultsInjected
		s.AgentsLost += res.AgentsLost
		s.Violations += len(res.Violations)
		if len(res.Violations) > 0 {
			s.FailedSeeds++
		}
		for _, v := range res.Violations {
			if len(s.Failures) < failuresMax {
				s.Failures = append(s.Failures, v)
			}
		}
		for p, n := range res.FaultCounts {
			counts[p] += n
		}
		h.Write([]byte(res.TraceHash))
	}
	for p, n := range counts {
		if n > 0 {
			s.Faults[Point(p).String()] = n
		}
	}
	s.TraceHash = hex.EncodeToString(h.Sum(nil))
	return s
}
