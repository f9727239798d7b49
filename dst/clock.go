package dst

import (
	"sync"
	"time"
)

// simEpoch is where simulated time starts; any fixed instant would do.
var simEpoch = time.UnixMilli(1700000000000).UTC()

// Clock is simulated time: it moves only when the simulator calls Advance
// (an operation's latency, a timeout), never on its own. It satisfies the
// Clock interfaces of vm/sim and service.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a clock at the simulation epoch.
func NewClock() *Clock { return &Clock{now: simEpoch} }

// Now returns the current simulated time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves time forward by d (negative d is ignored: time never runs
// backwards).
func (c *Clock) Advance(d time.Duration) {
	if d <= 0 {
		return
	}
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// Elapsed is the simulated time since the epoch.
func (c *Clock) Elapsed() time.Duration { return c.Now().Sub(simEpoch) }
