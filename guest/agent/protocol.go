// Package agent implements the Kelpie guest agent protocol, shared by the
// host-side Client and the in-guest Server (cmd/kelpie-agent).
//
// Transport: any byte stream; in production a virtio-serial port named
// PortName, exposed on the host as a QEMU socket chardev, or connections to
// AF_VSOCK port VsockPort (Server.Serve), each its own protocol session.
// Messages are JSON objects carried in checksummed frames (see frame.go);
// []byte fields are base64 in JSON.
//
// Every Request carries an ID; the matching Response echoes it. A client
// ignores responses whose ID it is not waiting for, which makes responses to
// requests from before a reconnect (or a snapshot/restore) harmless.
package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"
)

// Version is the agent software version reported by ping.
const Version = "1.0.0"

// ProtocolVersion is bumped on incompatible wire changes.
const ProtocolVersion = 1

// PortName is the virtio-serial port name the guest agent looks for
// (-device virtserialport,name=org.kelpie.agent).
const PortName = "org.kelpie.agent"

// VsockPort is the AF_VSOCK port the guest agent also listens on, for hosts
// whose channel to the guest is a virtio socket (Firecracker, Apple VZ).
// It must equal vm/hostvm.AgentVsockPort.
const VsockPort uint32 = 1024

// Operation names.
const (
	OpPing      = "ping"
	OpExec      = "exec"
	OpReadFile  = "read_file"
	OpWriteFile = "write_file"
	OpSync      = "sync"
	OpSetTime   = "set_time"
	OpReseedRNG = "reseed_rng"
	// OpTime reads the guest's clocks (TimeResult), to the nanosecond.
	OpTime = "time"
	// OpSetHostname sets the guest's hostname (SetHostnameRequest).
	OpSetHostname = "set_hostname"
)

// Limits.
const (
	// MaxOutputLimit caps ExecRequest.OutputLimit (per stream).
	MaxOutputLimit = 2 << 20
	// DefaultOutputLimit is used when ExecRequest.OutputLimit is 0.
	DefaultOutputLimit = 1 << 20
	// MaxChunk is the largest data size of one read_file/write_file call.
	// Client.ReadFile/WriteFile split larger files into several calls.
	MaxChunk = 4 << 20
)

// Request is one call. Args holds the operation's request struct.
type Request struct {
	ID   uint64          `json:"id"`
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response answers the Request with the same ID: either Result (the
// operation's result struct) or Error.
type Response struct {
	ID     uint64          `json:"id"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *RemoteError    `json:"error,omitempty"`
}

// PingRequest has no fields.
type PingRequest struct{}

// PingResult describes the running agent.
type PingResult struct {
	Version      string        `json:"version"`       // agent version
	Protocol     int           `json:"protocol"`      // ProtocolVersion
	ImageVersion string        `json:"image_version"` // /etc/kelpie-image-version, "" if absent
	BootID       string        `json:"boot_id"`       // /proc/sys/kernel/random/boot_id
	Uptime       time.Duration `json:"uptime_ns"`     // guest uptime (CLOCK_BOOTTIME-ish, /proc/uptime)
	AgentUptime  time.Duration `json:"agent_uptime_ns"`
	Time         time.Time     `json:"time"` // guest wall clock
}

// ExecRequest runs a program. If Shell is set, it is run by "/bin/sh -c"
// and Cmd/Args are ignored; otherwise Cmd is looked up in PATH.
type ExecRequest struct {
	Cmd     string   `json:"cmd,omitempty"`
	Args    []string `json:"args,omitempty"`
	Shell   string   `json:"shell,omitempty"`
	Env     []string `json:"env,omitempty"`     // "K=V", added to / overriding the default env
	Workdir string   `json:"workdir,omitempty"` // default /workspace if it exists, else /
	Stdin   []byte   `json:"stdin,omitempty"`
	// Timeout kills the process group after this long (0 = none; the
	// Client fills it in from the context deadline).
	Timeout time.Duration `json:"timeout_ns,omitempty"`
	// OutputLimit caps captured bytes per stream (0 = DefaultOutputLimit,
	// max MaxOutputLimit). Output beyond it is drained and dropped.
	OutputLimit int `json:"output_limit,omitempty"`
	// Background starts the process detached (new session, stdio on
	// /dev/null, Stdin ignored) and returns at once with its Pid.
	Background bool `json:"background,omitempty"`
}

// ExecResult is the outcome of an exec. A command that ran and failed is
// not an error: see ExitCode. ExitCode is -1 if killed by a signal.
type ExecResult struct {
	ExitCode        int           `json:"exit_code"`
	Signal          string        `json:"signal,omitempty"`
	Stdout          []byte        `json:"stdout,omitempty"`
	Stderr          []byte        `json:"stderr,omitempty"`
	StdoutTruncated bool          `json:"stdout_truncated,omitempty"`
	StderrTruncated bool          `json:"stderr_truncated,omitempty"`
	TimedOut        bool          `json:"timed_out,omitempty"`
	Duration        time.Duration `json:"duration_ns"`
	Pid             int           `json:"pid,omitempty"`
}

// ReadFileRequest reads up to Limit bytes (0 or > MaxChunk = MaxChunk)
// starting at Offset.
type ReadFileRequest struct {
	Path   string `json:"path"`
	Offset int64  `json:"offset,omitempty"`
	Limit  int    `json:"limit,omitempty"`
}

// ReadFileResult holds the data read. EOF is set when the end of the file
// was reached; Size is the file size at open time.
type ReadFileResult struct {
	Data []byte      `json:"data,omitempty"`
	Size int64       `json:"size"`
	Mode fs.FileMode `json:"mode"`
	EOF  bool        `json:"eof,omitempty"`
}

// WriteFileRequest writes Data (at most MaxChunk bytes) to Path, creating
// or truncating it unless Append is set. Mode is the permission for new
// files and is applied to existing ones (0 = 0644 / unchanged). MkdirAll
// creates missing parent directories (0755).
type WriteFileRequest struct {
	Path     string      `json:"path"`
	Data     []byte      `json:"data,omitempty"`
	Mode     fs.FileMode `json:"mode,omitempty"`
	Append   bool        `json:"append,omitempty"`
	MkdirAll bool        `json:"mkdir_all,omitempty"`
}

// WriteFileResult reports the file size after the write.
type WriteFileResult struct {
	Size int64 `json:"size"`
}

// SyncRequest asks the guest to flush filesystem buffers (sync(2)).
type SyncRequest struct{}

// SetTimeRequest sets the guest wall clock (e.g. after a restore, when the
// guest clock lags by the time the VM was frozen).
type SetTimeRequest struct {
	UnixNano int64 `json:"unix_nano"`
}

// ReseedRNGRequest mixes Data into the guest kernel's entropy pool,
// credits it, and forces a CRNG reseed (RNDADDENTROPY + RNDRESEEDCRNG).
// Needed after restoring one snapshot more than once: otherwise the clones
// share their random number generator state. At most 4096 bytes.
type ReseedRNGRequest struct {
	Data []byte `json:"data"`
}

// TimeRequest has no fields.
type TimeRequest struct{}

// TimeResult is the guest's clocks, read one right after the other
// (clock_gettime). The guest's busybox date has no sub-second output;
// this is how a host or a test reads guest time to the nanosecond.
type TimeResult struct {
	RealtimeNs  int64 `json:"realtime_ns"`  // CLOCK_REALTIME, ns since the Unix epoch
	MonotonicNs int64 `json:"monotonic_ns"` // CLOCK_MONOTONIC: never goes back, stops while the VM is paused
	BoottimeNs  int64 `json:"boottime_ns"`  // CLOCK_BOOTTIME
}

// Realtime is RealtimeNs as a time.
func (r TimeResult) Realtime() time.Time { return time.Unix(0, r.RealtimeNs) }

// SetHostnameRequest sets the guest's hostname (sethostname(2)) and
// rewrites /etc/hostname and the 127.0.1.1 line of /etc/hosts to match.
type SetHostnameRequest struct {
	Hostname string `json:"hostname"`
}

// HostnameMaxBytes is the longest hostname Linux accepts.
const HostnameMaxBytes = 64

// Empty is the result of operations that return nothing.
type Empty struct{}

// Error codes carried in RemoteError.Code.
const (
	CodeInvalid     = "invalid"      // bad request arguments
	CodeNotFound    = "not_found"    // file or command does not exist
	CodePermission  = "permission"   // permission denied
	CodeUnsupported = "unsupported"  // unknown operation
	CodeInternal    = "internal"     // anything else
	CodeTooLarge    = "too_large"    // result would exceed limits
	CodeIsDirectory = "is_directory" // path is a directory
)

// Errors returned by the Client. Use errors.Is.
var (
	// ErrTimeout: the context deadline expired before a response arrived.
	// The error also matches context.DeadlineExceeded.
	ErrTimeout = errors.New("agent: timeout")
	// ErrProtocol: the peer sent a malformed or unexpected message.
	ErrProtocol = errors.New("agent: protocol error")
	// ErrClosed: the client was closed or its connection failed.
	ErrClosed = errors.New("agent: connection closed")
	// ErrRemote matches every *RemoteError.
	ErrRemote = errors.New("agent: remote error")
)

// RemoteError is an error reported by the guest agent.
type RemoteError struct {
	Op      string `json:"op,omitempty"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *RemoteError) Error() string {
	if e.Op != "" {
		return fmt.Sprintf("agent %s: %s (%s)", e.Op, e.Message, e.Code)
	}
	return fmt.Sprintf("agent: %s (%s)", e.Message, e.Code)
}

// Is makes errors.Is(err, ErrRemote) true, and maps codes to fs errors:
// errors.Is(err, fs.ErrNotExist) for CodeNotFound and fs.ErrPermission for
// CodePermission.
func (e *RemoteError) Is(target error) bool {
	switch target {
	case ErrRemote:
		return true
	case fs.ErrNotExist:
		return e.Code == CodeNotFound
	case fs.ErrPermission:
		return e.Code == CodePermission
	}
	return false
}
