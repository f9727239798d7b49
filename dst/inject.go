package dst

import (
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/kelpie/teleport/vm/sim"
)

// Simulated latencies and timeouts. They only move the simulated clock.
const (
	stepThinkTime      = 500 * time.Millisecond
	vmOpLatency        = 2 * time.Millisecond
	vmBootLatency      = 300 * time.Millisecond
	vmSnapshotLatency  = 40 * time.Millisecond
	vmRestoreLatency   = 60 * time.Millisecond
	execTimeout        = 10 * time.Second
	storeLatencyBase   = 5 * time.Millisecond
	storeLatencyJitter = 5 * time.Millisecond
	storeNsPerByte     = 10 // 100 MB/s
	storeTimeout       = 30 * time.Second
)

// event is one injected fault.
type event struct {
	point  Point
	target string // VM, package or host id
	detail string
}

// injector makes every fault decision of a run from the current step's
// stream and records what it injected.
type injector struct {
	prof   *Profile
	rng    *rand.Rand
	clock  *Clock
	events []event // this step's
	counts [numPoints]int
	total  int
	tr     *tracer
	// gc runs the store's GC in the middle of an operation (StoreGCRace).
	gc   func()
	inGC bool
}

// roll draws once for p; a point that is off draws nothing. (The profile is
// part of a run's identity: the same seed under another profile is another
// run.)
func (in *injector) roll(p Point) bool {
	q := in.prof.P[p]
	if q <= 0 {
		return false
	}
	return in.rng.Float64() < q
}

func (in *injector) fire(p Point, target, detail string) {
	in.events = append(in.events, event{p, target, detail})
	in.counts[p]++
	in.total++
	in.tr.linef("    ! %s %s %s", p, target, detail)
}

// mark and since delimit the faults injected during one call.
func (in *injector) mark() int { return len(in.events) }

func (in *injector) since(m int) []event { return in.events[m:] }

func hasEvent(evs []event, p Point, target string) bool {
	for _, e := range evs {
		if e.point == p && (target == "" || e.target == target) {
			return true
		}
	}
	return false
}

// hasStoreFault reports whether a store call op on id failed by injection
// (refused or timed out).
func hasStoreFault(evs []event, id string, op StoreOp) bool {
	for _, e := range evs {
		if (e.point == StoreTimeout || e.point == storePoint(op)) && e.target == id && e.detail == op.String() {
			return true
		}
	}
	return false
}

func storePoint(op StoreOp) Point {
	switch op {
	case StoreOpOpen, StoreOpRead:
		return StoreDownload
	case StoreOpStat, StoreOpList, StoreOpChunkList:
		return StoreStat
	case StoreOpDelete:
		return StoreDelete
	case StoreOpChunkGet:
		return StoreDownload
	}
	return StoreUpload
}

// StoreFault implements StoreFaults: latency first (sometimes a stall
// past the chunk rule's deadline), GC racing the call, then at most one
// fault.
func (in *injector) StoreFault(op StoreOp, id string, n int64) StoreOutcome {
	in.clock.Advance(storeLatencyBase + time.Duration(n)*storeNsPerByte + time.Duration(in.rng.Int64N(int64(storeLatencyJitter))))
	if in.roll(StoreStall) {
		in.clock.Advance(chunkGraceDefault)
		in.fire(StoreStall, id, op.String())
	}
	if !in.inGC && in.gc != nil && in.roll(StoreGCRace) {
		in.fire(StoreGCRace, id, op.String())
		in.inGC = true
		in.gc()
		in.inGC = false
	}
	if in.roll(StoreTimeout) {
		in.clock.Advance(storeTimeout)
		in.fire(StoreTimeout, id, op.String())
		return Timeout
	}
	if op == StoreOpChunkPut && in.roll(StoreAckLost) {
		in.fire(StoreAckLost, id, op.String())
		return AckLost
	}
	if op == StoreOpCommit {
		switch {
		case in.roll(StoreUpload):
			in.fire(StoreUpload, id, op.String())
			return Fail
		case in.roll(StorePartialWrite):
			in.fire(StorePartialWrite, id, op.String())
			return Interrupt
		case in.roll(StoreAckLost):
			in.fire(StoreAckLost, id, op.String())
			return AckLost
		}
		return Proceed
	}
	if p := storePoint(op); in.roll(p) {
		in.fire(p, id, op.String())
		return Fail
	}
	return Proceed
}

func vmLatency(point string) time.Duration {
	switch point {
	case "boot":
		return vmBootLatency
	case "snapshot":
		return vmSnapshotLatency
	case "restore":
		return vmRestoreLatency
	}
	return vmOpLatency
}

func vmPoint(point string) (Point, bool) {
	switch point {
	case "boot":
		return VMBoot, true
	case "pause":
		return VMPause, true
	case "resume":
		return VMResume, true
	case "stop":
		return VMStop, true
	case "exec":
		return VMExec, true
	case "snapshot":
		return VMSnapshot, true
	case "restore":
		return VMRestore, true
	case sim.OpDestroy:
		return VMDestroy, true
	}
	return 0, false
}

func injectedf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrInjected)...)
}
