package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// Client is a typed client for the handful of Firecracker API endpoints
// Kelpie uses, over the API's unix socket. Every call takes ctx; errors
// Firecracker reports come back as *APIError with its fault_message.
//
// Field names and types follow Firecracker's swagger definition
// (src/firecracker/swagger/firecracker.yaml); api_test.go checks every
// request against a table encoded from it.
type Client struct {
	socket string
	hc     *http.Client
	tr     *http.Transport
}

// apiResponseMaxBytes bounds a response body we read (API answers are
// small JSON objects).
const apiResponseMaxBytes = 1 << 20

// NewClient returns a client for the API socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 1,
	}
	return &Client{socket: path, hc: &http.Client{Transport: tr}, tr: tr}
}

// Close drops idle connections to the API socket.
func (c *Client) Close() { c.tr.CloseIdleConnections() }

// APIError is an error response from Firecracker: an HTTP status and the
// body's fault_message.
type APIError struct {
	Method       string
	Path         string
	StatusCode   int
	FaultMessage string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), e.FaultMessage)
}

// Request and response bodies (the swagger definitions of the same names).

// InstanceInfo is GET / (InstanceInfo).
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"` // "Not started", "Running", "Paused"
	VMMVersion string `json:"vmm_version"`
}

// Firecracker instance states as InstanceInfo reports them.
const (
	InstanceNotStarted = "Not started"
	InstanceRunning    = "Running"
	InstancePaused     = "Paused"
)

// MachineConfig is PUT /machine-config (MachineConfiguration).
type MachineConfig struct {
	VCPUCount       int    `json:"vcpu_count"`
	MemSizeMiB      int    `json:"mem_size_mib"`
	SMT             bool   `json:"smt"`
	TrackDirtyPages bool   `json:"track_dirty_pages"`
	CPUTemplate     string `json:"cpu_template,omitempty"`
}

// BootSource is PUT /boot-source (BootSource).
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// Drive is PUT /drives/{drive_id} (Drive, virtio-block).
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

// Vsock is PUT /vsock (Vsock).
type Vsock struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// SnapshotCreateParams is PUT /snapshot/create (SnapshotCreateParams).
type SnapshotCreateParams struct {
	SnapshotType string `json:"snapshot_type,omitempty"` // "Full" or "Diff"
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// MemoryBackend is SnapshotLoadParams.mem_backend (MemoryBackend).
type MemoryBackend struct {
	BackendType string `json:"backend_type"` // "File" or "Uffd"
	BackendPath string `json:"backend_path"`
}

// SnapshotLoadParams is PUT /snapshot/load (SnapshotLoadParams). Kelpie
// always sends mem_backend, never the deprecated mem_file_path.
type SnapshotLoadParams struct {
	SnapshotPath string         `json:"snapshot_path"`
	MemBackend   *MemoryBackend `json:"mem_backend"`
	ResumeVM     bool           `json:"resume_vm"`
}

// instanceAction is PUT /actions (InstanceActionInfo).
type instanceAction struct {
	ActionType string `json:"action_type"`
}

// vmState is PATCH /vm (Vm).
type vmState struct {
	State string `json:"state"`
}

// Values the API takes.
const (
	SnapshotFull        = "Full"
	MemoryBackendFile   = "File"
	actionInstanceStart = "InstanceStart"
	vmStatePaused       = "Paused"
	vmStateResumed      = "Resumed"
)

// DescribeInstance is GET /.
func (c *Client) DescribeInstance(ctx context.Context) (InstanceInfo, error) {
	var r InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &r)
	return r, err
}

// Version is GET /version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var r struct {
		Version string `json:"firecracker_version"`
	}
	if err := c.do(ctx, http.MethodGet, "/version", nil, &r); err != nil {
		return "", err
	}
	return r.Version, nil
}

// PutMachineConfig is PUT /machine-config (pre-boot only).
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.do(ctx, http.MethodPut, "/machine-config", m, nil)
}

// PutBootSource is PUT /boot-source (pre-boot only).
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.do(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutDrive is PUT /drives/{drive_id} (pre-boot only).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	return c.do(ctx, http.MethodPut, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PutVsock is PUT /vsock (pre-boot only).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.do(ctx, http.MethodPut, "/vsock", v, nil)
}

// StartInstance is PUT /actions {"action_type": "InstanceStart"}.
func (c *Client) StartInstance(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/actions", instanceAction{ActionType: actionInstanceStart}, nil)
}

// PauseVM is PATCH /vm {"state": "Paused"}.
func (c *Client) PauseVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", vmState{State: vmStatePaused}, nil)
}

// ResumeVM is PATCH /vm {"state": "Resumed"}.
func (c *Client) ResumeVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", vmState{State: vmStateResumed}, nil)
}

// CreateSnapshot is PUT /snapshot/create; the VM must be paused.
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotCreateParams) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", p, nil)
}

// LoadSnapshot is PUT /snapshot/load; only a fresh process accepts it, and
// a failed load ends the process.
func (c *Client) LoadSnapshot(ctx context.Context, p SnapshotLoadParams) error {
	return c.do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("firecracker %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, apiResponseMaxBytes))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: read response: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		return &APIError{Method: method, Path: path, StatusCode: resp.StatusCode, FaultMessage: faultMessage(b)}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("firecracker %s %s: response is not the documented JSON (%v): %q", method, path, err, truncate(b))
	}
	return nil
}

// faultMessage extracts {"fault_message": "..."}, or the raw body when
// Firecracker (or something else on the socket) sent anything else.
func faultMessage(b []byte) string {
	var e struct {
		FaultMessage *string `json:"fault_message"`
	}
	if json.Unmarshal(b, &e) == nil && e.FaultMessage != nil {
		return *e.FaultMessage
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return "(no fault message)"
	}
	return truncate(b)
}

func truncate(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

// isAPIError reports whether err is a Firecracker error response.
func isAPIError(err error) bool {
	var ae *APIError
	return errors.As(err, &ae)
}
