package dst

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Point is a named fault point. Each has a probability per opportunity;
// the opportunity is given beside each point.
type Point int

// The fault points.
const (
	VMBoot                Point = iota // per boot: the guest never comes up
	VMCrash                            // per VM operation: the hypervisor dies during it
	VMPause                            // per pause
	VMResume                           // per resume
	VMStop                             // per stop
	VMExec                             // per exec: the guest agent fails the request
	VMExecTimeout                      // per exec: the guest does not answer in time
	VMSnapshot                         // per snapshot: the hypervisor fails to write it
	VMSnapshotTooLarge                 // per snapshot: it exceeds the store's object limit
	VMSnapshotCorrupt                  // per snapshot: a bit flips in a payload after its checksum was taken
	VMRestore                          // per restore
	VMDestroy                          // per destroy: the hypervisor will not go away
	StoreUpload                        // per create, write or commit: refused before it took effect
	StoreDownload                      // per open or read
	StoreStat                          // per stat or list
	StoreDelete                        // per delete
	StoreTimeout                       // per store call: no answer in time (and no effect)
	StoreAckLost                       // per commit: it took effect but the answer was lost
	StorePartialWrite                  // per commit: the transfer is cut part way through
	StoreCorruptAtRest                 // per step: a bit flips in a committed blob
	TargetArchMismatch                 // per teleport: deliberately aim a full snapshot at another architecture
	TargetVersionMismatch              // per teleport: deliberately aim at another base image MAJOR.MINOR
	HostCrash                          // per host call during an operation: the host process dies (before or after the call)
	EnvHostCrash                       // per step: an idle host dies
	EnvVMCrash                         // per step: a running agent's VM dies
	StoreGCRace                        // per store call: GC runs right after it, inside the operation
	StoreStall                         // per store call: it takes longer than half the chunk grace period
	numPoints
)

var pointNames = [numPoints]string{
	"vm.boot", "vm.crash", "vm.pause", "vm.resume", "vm.stop", "vm.exec", "vm.exec_timeout",
	"vm.snapshot", "vm.snapshot_too_large", "vm.snapshot_corrupt", "vm.restore", "vm.destroy",
	"store.upload", "store.download", "store.stat", "store.delete", "store.timeout", "store.ack_lost",
	"store.partial_write", "store.corrupt_at_rest",
	"target.arch_mismatch", "target.version_mismatch",
	"host.crash", "env.host_crash", "env.vm_crash", "store.gc_race", "store.stall",
}

func (p Point) String() string {
	if p >= 0 && p < numPoints {
		return pointNames[p]
	}
	return "point(" + strconv.Itoa(int(p)) + ")"
}

// Points lists every fault point in a fixed order.
func Points() []Point {
	out := make([]Point, numPoints)
	for i := range out {
		out[i] = Point(i)
	}
	return out
}

// ParsePoint is the inverse of Point.String.
func ParsePoint(s string) (Point, error) {
	for i, n := range pointNames {
		if n == s {
			return Point(i), nil
		}
	}
	return 0, fmt.Errorf("unknown fault point %q (see Points)", s)
}

// Profile is a probability per fault point.
type Profile struct {
	P [numPoints]float64
}

// Prob returns the probability of p.
func (pr *Profile) Prob(p Point) float64 { return pr.P[p] }

// The base profiles. Probabilities are per opportunity (see Point), so a
// teleport, which makes a dozen host calls, sees host.crash about a dozen
// times.
var (
	profileNone    = Profile{}
	profileDefault = Profile{P: [numPoints]float64{
		VMBoot: 0.02, VMCrash: 0.002, VMPause: 0.02, VMResume: 0.02, VMStop: 0.02, VMExec: 0.02, VMExecTimeout: 0.01,
		VMSnapshot: 0.02, VMSnapshotTooLarge: 0.01, VMSnapshotCorrupt: 0.01, VMRestore: 0.02, VMDestroy: 0.01,
		StoreUpload: 0.01, StoreDownload: 0.01, StoreStat: 0.03, StoreDelete: 0.03, StoreTimeout: 0.005, StoreAckLost: 0.03,
		StorePartialWrite: 0.02, StoreCorruptAtRest: 0.01,
		TargetArchMismatch: 0.05, TargetVersionMismatch: 0.05,
		HostCrash: 0.002, EnvHostCrash: 0.01, EnvVMCrash: 0.01,
		StoreGCRace: 0.05, StoreStall: 0.005,
	}}
	profileHeavy = Profile{P: [numPoints]float64{
		VMBoot: 0.05, VMCrash: 0.01, VMPause: 0.05, VMResume: 0.05, VMStop: 0.05, VMExec: 0.05, VMExecTimeout: 0.03,
		VMSnapshot: 0.05, VMSnapshotTooLarge: 0.03, VMSnapshotCorrupt: 0.03, VMRestore: 0.05, VMDestroy: 0.03,
		StoreUpload: 0.03, StoreDownload: 0.03, StoreStat: 0.1, StoreDelete: 0.1, StoreTimeout: 0.02, StoreAckLost: 0.1,
		StorePartialWrite: 0.05, StoreCorruptAtRest: 0.03,
		TargetArchMismatch: 0.1, TargetVersionMismatch: 0.1,
		HostCrash: 0.005, EnvHostCrash: 0.02, EnvVMCrash: 0.02,
		StoreGCRace: 0.1, StoreStall: 0.02,
	}}
)

// ProfileNames are the named base profiles ("all" is "heavy": every point
// on, often).
var ProfileNames = []string{"none", "default", "heavy", "all"}

// ParseProfile parses a profile: a base name optionally followed by
// point=probability overrides, e.g. "default,store.ack_lost=0.5" or
// "none,vm.crash=0.1".
func ParseProfile(spec string) (Profile, error) {
	parts := strings.Split(spec, ",")
	var pr Profile
	switch strings.TrimSpace(parts[0]) {
	case "none", "off":
		pr = profileNone
	case "default", "":
		pr = profileDefault
	case "heavy", "all":
		pr = profileHeavy
	default:
		if !strings.Contains(parts[0], "=") {
			return pr, fmt.Errorf("fault profile %q: want one of %s, then optional point=probability overrides", spec, strings.Join(ProfileNames, ", "))
		}
		pr = profileNone
		parts = append([]string{""}, parts...)
	}
	for _, kv := range parts[1:] {
		name, val, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return pr, fmt.Errorf("fault profile %q: %q is not point=probability", spec, kv)
		}
		p, err := ParsePoint(name)
		if err != nil {
			return pr, fmt.Errorf("fault profile %q: %w", spec, err)
		}
		f, err := strconv.ParseFloat(val, 64)
		if err != nil || f < 0 || f > 1 {
			return pr, fmt.Errorf("fault profile %q: probability of %s must be in 0..1, got %q", spec, name, val)
		}
		pr.P[p] = f
	}
	return pr, nil
}

// ErrInjected marks every failure the injector causes, so a trace reader
// can tell injected failures from real ones.
var ErrInjected = errors.New("injected fault")
