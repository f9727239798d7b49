package dst

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/kelpie/teleport/internal/plant"
)

// Bug names a planted bug: a test-only switch that breaks the service or the
// store on purpose so a user can watch the checker fire.
type Bug string

// The planted bugs.
const (
	BugNone                  Bug = ""
	BugSkipRestoreRules      Bug = "skip-restore-rules"       // plant.ServiceBugs.SkipRestoreRules
	BugResumeSourceAfterMove Bug = "resume-source-after-move" // plant.ServiceBugs.ResumeSourceAfterMove
	BugSkipChecksums         Bug = "skip-checksums"           // plant.ServiceBugs.SkipChecksums
	BugVisibleBeforeComplete Bug = "visible-before-complete"  // StoreBugs.PublishBeforeComplete
	BugGCWithoutGrace        Bug = "gc-without-grace"         // plant.ChunkBugs.SweepWithoutGrace
)

// Bugs lists the planted bugs.
var Bugs = []Bug{BugSkipRestoreRules, BugResumeSourceAfterMove, BugSkipChecksums, BugVisibleBeforeComplete, BugGCWithoutGrace}

// ParseBug checks a bug name ("" or "none" for no bug).
func ParseBug(s string) (Bug, error) {
	if s == "" || s == "none" {
		return BugNone, nil
	}
	for _, b := range Bugs {
		if string(b) == s {
			return b, nil
		}
	}
	names := make([]string, len(Bugs))
	for i, b := range Bugs {
		names[i] = string(b)
	}
	return "", fmt.Errorf("unknown planted bug %q (want one of %s)", s, strings.Join(names, ", "))
}

// Limits and defaults of a run.
const (
	StepsDefault = 200
	HostsDefault = 4
	HostsMax     = 64
	StepsMax     = 1_000_000
	// simMemoryBytes is the simulated guest RAM: small, so a snapshot is a
	// few KiB and a sweep runs thousands of teleports a second.
	simMemoryBytes = 4 << 10
	// objectLimitBytes is the store's object quota in the simulation, well
	// above any real simulated snapshot.
	objectLimitBytes = 64 << 10
)

// Config is one simulation run.
type Config struct {
	Seed  uint64
	Steps int // default StepsDefault
	Hosts int // default HostsDefault
	// Faults is a fault profile spec (see ParseProfile); "" is "default".
	Faults string
	Bug    Bug
	// Trace, when set, receives the trace as it is written. The trace is
	// hashed either way.
	Trace io.Writer

	profile Profile
	harness harnessBugs
}

// harnessBugs break the simulated machinery itself (not the service), for
// tests proving that the invariants no planted service bug reaches can
// fire too. Unexported: only this package's tests set them.
type harnessBugs struct {
	leakVMs        bool // Destroy leaves the VM as it is: NoPartialRestore
	lenientBackend bool // the hypervisor restores any architecture: ArchitectureValidation
	lyingResume    bool // Resume reports success and does nothing: OutAtomicity
}

func (c *Config) normalize() error {
	if c.Steps == 0 {
		c.Steps = StepsDefault
	}
	if c.Hosts == 0 {
		c.Hosts = HostsDefault
	}
	if c.Faults == "" {
		c.Faults = "default"
	}
	if c.Steps < 0 || c.Steps > StepsMax {
		return fmt.Errorf("steps %d out of range 1..%d", c.Steps, StepsMax)
	}
	if c.Hosts < 1 || c.Hosts > HostsMax {
		return fmt.Errorf("hosts %d out of range 1..%d", c.Hosts, HostsMax)
	}
	if _, err := ParseBug(string(c.Bug)); err != nil {
		return err
	}
	p, err := ParseProfile(c.Faults)
	if err != nil {
		return err
	}
	c.profile = p
	return nil
}

func (c *Config) serviceBugs() plant.ServiceBugs {
	return plant.ServiceBugs{
		SkipRestoreRules:      c.Bug == BugSkipRestoreRules,
		SkipChecksums:         c.Bug == BugSkipChecksums,
		ResumeSourceAfterMove: c.Bug == BugResumeSourceAfterMove,
	}
}

func (c *Config) chunkBugs() plant.ChunkBugs {
	return plant.ChunkBugs{SweepWithoutGrace: c.Bug == BugGCWithoutGrace}
}

func (c *Config) storeBugs() StoreBugs {
	return StoreBugs{PublishBeforeComplete: c.Bug == BugVisibleBeforeComplete}
}

// ReplayCommand is the exact command that replays this run with its trace.
func (c Config) ReplayCommand() string {
	faults := c.Faults
	if strings.Trim(faults, "abcdefghijklmnopqrstuvwxyz0123456789._=,") != "" {
		faults = strconv.Quote(faults)
	}
	cmd := fmt.Sprintf("kelpie sim --seed %d --steps %d --hosts %d --faults %s", c.Seed, c.Steps, c.Hosts, faults)
	if c.Bug != BugNone {
		cmd += " --bug " + string(c.Bug)
	}
	return cmd + " --trace"
}
