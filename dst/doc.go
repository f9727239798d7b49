// Package dst is the deterministic simulation test of Kelpie Teleport. It
// runs the production teleport service (service/) unchanged on
// simulated hosts (vm/sim factories), a simulated package store (Store) and
// a simulated clock (Clock); a scenario generator picks operations from a
// seed, a fault injector breaks VMs, storage and hosts at named fault points
// (Points), and invariants (Invariants) are checked after every step against
// a model of where every agent is. A failing run reports its seed, step,
// invariant and the command that replays it; Shrink cuts its operations down
// to a minimal failing sequence.
//
//	kelpie sim --seeds 1000 --steps 200 --faults all --json   # a sweep
//	kelpie sim --seed 42 --trace                              # replay one seed
//	kelpie sim --seed 1 --bug resume-source-after-move        # watch a checker fire
//	go test ./dst                                             # CI seeds, determinism, planted bugs
//	scripts/sim-sweep.sh                                      # the nightly sweep
//
// Determinism is the whole point, so code here must never read the wall
// clock, use global randomness, depend on goroutine scheduling, or let map
// iteration order reach the trace: the same seed gives the same trace, byte
// for byte. Each run is single-goroutine; a sweep runs whole seeds in
// parallel and merges their results in seed order.
package dst
