package vm

import (
	"errors"
	"fmt"
)

// Error categories. Backends wrap them with the identifier involved:
//
//	fmt.Errorf("vm %s: pause: %w", id, vm.ErrInvalidState)
var (
	// ErrInvalidState: the operation is not allowed in the VM's current state.
	ErrInvalidState = errors.New("operation not allowed in this VM state")
	// ErrInvalidConfig: a configuration value is missing or out of range.
	ErrInvalidConfig = errors.New("invalid VM configuration")
	// ErrNotFound: no VM of that name or id on this host.
	ErrNotFound = errors.New("VM not found")
	// ErrAlreadyExists: a VM of that name already exists on this host.
	ErrAlreadyExists = errors.New("VM already exists")
	// ErrUnsupported: this backend or platform cannot do that.
	ErrUnsupported = errors.New("unsupported on this platform or backend")
	// ErrCrashed: the hypervisor died underneath the VM.
	ErrCrashed = errors.New("VM crashed")
	// ErrTimeout: the guest or hypervisor did not answer in time.
	ErrTimeout = errors.New("timed out")
	// ErrIncompatible: a snapshot cannot be restored by this backend/host.
	ErrIncompatible = errors.New("snapshot incompatible with this host")
	// ErrCorrupt: a snapshot payload does not match its recorded checksum or
	// cannot be parsed.
	ErrCorrupt = errors.New("snapshot corrupt")
	// ErrGuest: the guest agent failed to run a request.
	ErrGuest = errors.New("guest agent error")
	// ErrUnavailable: something the VM needs on this host is not there or
	// is taken (a published host port in use, nothing listening where a
	// forward points, a helper program missing). Refused before anything
	// starts.
	ErrUnavailable = errors.New("not available on this host")
	// ErrLeftBehind: an operation failed and could not remove the VM it
	// made (a half-restored VM): it is still on the host.
	ErrLeftBehind = errors.New("a failed operation left its VM behind")
)

// StateError reports an illegal transition. It matches ErrInvalidState.
type StateError struct {
	VMID  string
	Op    string
	State State
}

func (e *StateError) Error() string {
	return fmt.Sprintf("vm %s: cannot %s a %s VM", e.VMID, e.Op, e.State)
}

// Is makes errors.Is(err, ErrInvalidState) true.
func (e *StateError) Is(target error) bool { return target == ErrInvalidState }

// CheckTransition returns a *StateError unless op is legal from s. It is the
// one lifecycle table every backend shares.
func CheckTransition(vmID, op string, s State) error {
	ok := false
	switch op {
	case OpStart:
		ok = s == StateCreated || s == StateStopped
	case OpStop:
		ok = true
	case OpPause:
		ok = s == StateRunning
	case OpResume:
		ok = s == StatePaused
	case OpExec:
		ok = s == StateRunning
	case OpSnapshot:
		ok = s == StateRunning || s == StatePaused
	case OpRestore:
		ok = s == StateCreated || s == StateStopped
	}
	if ok {
		return nil
	}
	return &StateError{VMID: vmID, Op: op, State: s}
}

// Operation names used by CheckTransition and in errors.
const (
	OpStart    = "start"
	OpStop     = "stop"
	OpPause    = "pause"
	OpResume   = "resume"
	OpExec     = "exec"
	OpSnapshot = "snapshot"
	OpRestore  = "restore"
)
