// Package plant holds the planted bugs: switches that break production code
// on purpose, so that the simulation (dst/) can prove its invariant
// checkers catch each kind of mistake. It is internal, so no program that
// embeds Kelpie Teleport can reach it; production code reads the switches
// only through hooks set here by the simulation.
package plant

// ServiceBugs break the teleport service. The zero value is the correct
// service.
type ServiceBugs struct {
	SkipRestoreRules      bool // restore without checking the restore rules
	SkipChecksums         bool // trust whatever bytes a package holds: re-hash instead of verify
	ResumeSourceAfterMove bool // leave the source running after a move
}

// SetServiceBugs plants bugs in a *service.Service; the service package
// sets it in its init, so this package need not import it.
var SetServiceBugs func(svc any, b ServiceBugs)

// ChunkBugs break the chunk space every store shares (store/chunks). The
// zero value is the correct chunk space.
type ChunkBugs struct {
	// SweepWithoutGrace makes GC remove every pack no committed manifest
	// lists at once: no condemnation, no grace period, so a pack an
	// upload in flight found present can vanish before its commit.
	SweepWithoutGrace bool
}

// SetChunkBugs plants bugs in a *chunks.Space; that package sets it in
// its init.
var SetChunkBugs func(space any, b ChunkBugs)

// RegistryBugs break the move protocol (registry.Node). The zero value is
// the correct protocol.
type RegistryBugs struct {
	// SkipClaimCheck claims any record, whatever its state, package and
	// epoch: a restore that does not check that the agent is in flight.
	SkipClaimCheck bool
}

// SetRegistryBugs plants bugs in a *registry.Node; the registry package
// sets it in its init.
var SetRegistryBugs func(node any, b RegistryBugs)
