package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/vm"
)

// Client is the Go client of the daemon's API (what `kelpie --server`
// uses, and what one daemon drives another with).
type Client struct {
	base  string
	token string
	hc    *http.Client
}

// ClientOptions configure a Client.
type ClientOptions struct {
	Token string
	// CAFile is a PEM file of the CA that signed an https daemon's
	// certificate (default: the system's roots).
	CAFile string
	// HTTP replaces the HTTP client.
	HTTP *http.Client
}

var _ registry.Claimer = (*Client)(nil)

// NewClient returns a client of the daemon at base (http://HOST:PORT or
// https://...).
func NewClient(base string, o ClientOptions) *Client {
	c := &Client{base: strings.TrimSuffix(base, "/"), token: o.Token, hc: o.HTTP}
	if c.hc == nil {
		c.hc = &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second}}
	}
	return c
}

// NewClientTLS is NewClient for an https daemon whose certificate o.CAFile
// signs.
func NewClientTLS(base string, o ClientOptions) (*Client, error) {
	if o.CAFile == "" || o.HTTP != nil {
		return NewClient(base, o), nil
	}
	pem, err := os.ReadFile(o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA file %s holds no PEM certificate", o.CAFile)
	}
	o.HTTP = &http.Client{Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return NewClient(base, o), nil
}

// URL is the daemon's base URL.
func (c *Client) URL() string { return c.base }

// APIError is an error answer of the daemon; it matches the category its
// code names (registry.ErrRunsElsewhere for "runs_elsewhere", ...).
type APIError struct {
	Status int
	Code   string
	Msg    string
}

func (e *APIError) Error() string { return e.Msg }

var codeErrors = map[string]error{
	"runs_elsewhere":       registry.ErrRunsElsewhere,
	"conflict":             registry.ErrConflict,
	"lease_lost":           registry.ErrLeaseLost,
	"registry_unavailable": registry.ErrUnavailable,
	"outcome_unknown":      registry.ErrOutcomeUnknown,
	"wrong_state":          registry.ErrWrongState,
	"exists":               registry.ErrExists,
	"not_found":            registry.ErrNotFound,
	"bad_request":          vm.ErrInvalidConfig,
	"unsupported":          vm.ErrUnsupported,
}

// Is matches the error's category.
func (e *APIError) Is(target error) bool {
	if want, ok := codeErrors[e.Code]; ok && target == want {
		return true
	}
	switch e.Code {
	case "not_found":
		return target == vm.ErrNotFound || target == teleport.ErrNotFound
	case "exists":
		return target == vm.ErrAlreadyExists
	}
	return false
}

// ErrDaemon: the daemon could not be reached.
var ErrDaemon = errors.New("kelpie daemon unreachable")

func (c *Client) request(ctx context.Context, method, path string, q url.Values, body any, stream bool) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, fmt.Errorf("daemon %s: %w", c.base, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if stream {
		req.Header.Set("Accept", ndjsonMediaType)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("daemon %s: %v: %w", c.base, err, ErrDaemon)
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e Error
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		return &APIError{Status: resp.StatusCode, Code: e.Code, Msg: e.Error}
	}
	return &APIError{Status: resp.StatusCode, Code: "http", Msg: fmt.Sprintf("daemon answered %s: %s", resp.Status, oneLine(string(b)))}
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body, out any) error {
	resp, err := c.request(ctx, method, path, q, body, false)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("daemon %s: unreadable answer to %s %s: %w", c.base, method, path, err)
	}
	return nil
}

// doStream is do for an operation that streams its steps to onStep.
func (c *Client) doStream(ctx context.Context, path string, body, out any, onStep func(Event)) error {
	if onStep == nil {
		return c.do(ctx, http.MethodPost, path, nil, body, out)
	}
	resp, err := c.request(ctx, http.MethodPost, path, nil, body, true)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("daemon %s: unreadable progress line: %w", c.base, err)
		}
		switch ev.Event {
		case "step":
			onStep(ev)
		case "error":
			if ev.Error == nil {
				return fmt.Errorf("daemon %s: an error event without an error", c.base)
			}
			return &APIError{Status: ev.Status, Code: ev.Error.Code, Msg: ev.Error.Error}
		case "result":
			if out == nil {
				return nil
			}
			return json.Unmarshal(ev.Result, out)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("daemon %s: the answer broke off: %v: %w", c.base, err, ErrDaemon)
	}
	return fmt.Errorf("daemon %s: the answer ended without a result: %w", c.base, ErrDaemon)
}

func esc(s string) string { return url.PathEscape(s) }

// Health is GET /healthz.
func (c *Client) Health(ctx context.Context) (map[string]string, error) {
	var out map[string]string
	return out, c.do(ctx, http.MethodGet, "/healthz", nil, nil, &out)
}

// Ready is GET /readyz: nil once the daemon is ready.
func (c *Client) Ready(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/readyz", nil, nil, nil)
}

// Hosts lists the fleet's hosts.
func (c *Client) Hosts(ctx context.Context) ([]registry.Host, error) {
	var out []registry.Host
	return out, c.do(ctx, http.MethodGet, "/v1/hosts", nil, nil, &out)
}

// Agents lists every agent of the registry.
func (c *Client) Agents(ctx context.Context) ([]registry.Agent, error) {
	var out []registry.Agent
	return out, c.do(ctx, http.MethodGet, "/v1/agents", nil, nil, &out)
}

// Agent shows one agent's record.
func (c *Client) Agent(ctx context.Context, name string) (*registry.Agent, error) {
	var out registry.Agent
	if err := c.do(ctx, http.MethodGet, "/v1/agents/"+esc(name), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// CreateAgent creates and boots an agent on the daemon's host.
func (c *Client) CreateAgent(ctx context.Context, req CreateRequest) (*registry.Agent, error) {
	var out registry.Agent
	if err := c.do(ctx, http.MethodPost, "/v1/agents", nil, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RemoveAgent destroys an agent's VM and removes its record.
func (c *Client) RemoveAgent(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/agents/"+esc(name), nil, nil, nil)
}

// Exec runs a command in an agent's guest.
func (c *Client) Exec(ctx context.Context, name string, req ExecRequest) (*ExecResult, error) {
	var out ExecResult
	if err := c.do(ctx, http.MethodPost, "/v1/agents/"+esc(name)+"/exec", nil, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Act runs pause, resume or stop on an agent.
func (c *Client) Act(ctx context.Context, name, action string) (*registry.Agent, error) {
	var out registry.Agent
	if err := c.do(ctx, http.MethodPost, "/v1/agents/"+esc(name)+"/"+action, nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Move moves an agent to host to; onStep, when set, gets its progress.
func (c *Client) Move(ctx context.Context, name string, req MoveRequest, onStep func(Event)) (*registry.Agent, error) {
	var out registry.Agent
	if err := c.doStream(ctx, "/v1/agents/"+esc(name)+"/move", req, &out, onStep); err != nil {
		return nil, err
	}
	return &out, nil
}

// Claim restores an in-flight agent on the daemon's host.
func (c *Client) Claim(ctx context.Context, name, pkg string) (*registry.Agent, error) {
	var out registry.Agent
	if err := c.do(ctx, http.MethodPost, "/v1/agents/"+esc(name)+"/claim", nil, ClaimRequest{Package: pkg}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// TeleportOut sends a VM of the daemon's host to a store.
func (c *Client) TeleportOut(ctx context.Context, req OutRequest, onStep func(Event)) (*OutResult, error) {
	var out OutResult
	if err := c.doStream(ctx, "/v1/teleport/out", req, &out, onStep); err != nil {
		return nil, err
	}
	return &out, nil
}

// TeleportIn restores a package on the daemon's host.
func (c *Client) TeleportIn(ctx context.Context, req InRequest, onStep func(Event)) (*InResult, error) {
	var out InResult
	if err := c.doStream(ctx, "/v1/teleport/in", req, &out, onStep); err != nil {
		return nil, err
	}
	return &out, nil
}

// VMs lists the daemon's host's VMs.
func (c *Client) VMs(ctx context.Context) ([]host.VMInfo, error) {
	var out []host.VMInfo
	return out, c.do(ctx, http.MethodGet, "/v1/vms", nil, nil, &out)
}

func storeQuery(store string) url.Values {
	if store == "" {
		return nil
	}
	return url.Values{"store": {store}}
}

// Packages lists a store's packages.
func (c *Client) Packages(ctx context.Context, store string) ([]*teleport.Package, error) {
	var out []*teleport.Package
	return out, c.do(ctx, http.MethodGet, "/v1/packages", storeQuery(store), nil, &out)
}

// Package shows one package.
func (c *Client) Package(ctx context.Context, store, id string) (*teleport.Package, error) {
	var out teleport.Package
	if err := c.do(ctx, http.MethodGet, "/v1/packages/"+esc(id), storeQuery(store), nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// VerifyPackage re-reads a package and checks every section.
func (c *Client) VerifyPackage(ctx context.Context, store, id string) (*host.Verification, error) {
	var out host.Verification
	if err := c.do(ctx, http.MethodPost, "/v1/packages/"+esc(id)+"/verify", storeQuery(store), nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RemovePackage deletes a package.
func (c *Client) RemovePackage(ctx context.Context, store, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/packages/"+esc(id), storeQuery(store), nil, nil)
}
