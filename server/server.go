// Package server is `kelpie serve`: the host daemon's JSON HTTP API over
// the host library (host/) under the registry's ownership rules (fleet/,
// registry/), with bearer-token auth, Prometheus metrics, structured logs
// and an OpenAPI 3 spec (openapi.yaml, served at /openapi.yaml) that the
// tests hold the server to; and the Go client (Client) the CLI uses with
// --server.
//
// It is a thin face: it validates its input, calls fleet or host, and
// encodes the answer. Every request body and parameter is checked before
// anything acts; bad input gets a 4xx with a one-line JSON error. It must
// never answer with a stack trace, never kill a guest on shutdown, and
// never act on an agent the registry says is elsewhere.
package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/fleet"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/vm"
)

//go:embed openapi.yaml
var openAPISpec []byte

// OpenAPI is the API's OpenAPI 3 document.
func OpenAPI() []byte { return openAPISpec }

// Limits of a request.
const (
	bodyMaxBytes    = 1 << 20
	execArgsMax     = 256
	execTimeoutMax  = time.Hour
	memoryMiBMax    = 1 << 20
	vcpusMax        = 256
	hostIDMaxBytes  = 128
	ndjsonMediaType = "application/x-ndjson"
)

// Server serves one host's API.
type Server struct {
	fleet *fleet.Fleet
	// stores are the package stores requests may name: the default first.
	stores  []string
	tokenID [32]byte // SHA-256 of the token; zero when there is none
	token   bool
	log     *slog.Logger
	metrics *Metrics
	peers   func(address string) registry.Claimer
	ready   atomic.Bool
	mux     *http.ServeMux
	served  []string
}

// Config configures a Server.
type Config struct {
	Fleet *fleet.Fleet
	// Stores are the stores requests may name, the default first ("" is
	// the host's own); default just the host's own.
	Stores []string
	// Token, when not empty, is required as "Authorization: Bearer TOKEN"
	// on every request but /healthz and /readyz.
	Token   string
	Log     *slog.Logger
	Metrics *Metrics
	// Peers reaches another host's daemon for a move (default: a Client
	// with the same token).
	Peers func(address string) registry.Claimer
}

// New makes the server; it is not ready (readyz) until SetReady.
func New(c Config) *Server {
	s := &Server{fleet: c.Fleet, stores: c.Stores, log: c.Log, metrics: c.Metrics, peers: c.Peers}
	if len(s.stores) == 0 {
		s.stores = []string{""}
	}
	if c.Token != "" {
		s.token, s.tokenID = true, sha256.Sum256([]byte(c.Token))
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.metrics == nil {
		s.metrics = NewMetrics(nil)
	}
	if s.peers == nil {
		token := c.Token
		s.peers = func(address string) registry.Claimer { return NewClient(address, ClientOptions{Token: token}) }
	}
	s.routes()
	return s
}

// Routes lists the API's routes as METHOD PATTERN (what the OpenAPI
// spec must describe).
func (s *Server) Routes() []string { return slices.Clone(s.served) }

// SetReady marks the server ready (after the daemon reconciled).
func (s *Server) SetReady(ok bool) { s.ready.Store(ok) }

type handler func(w http.ResponseWriter, r *http.Request) error

func (s *Server) routes() {
	s.mux = http.NewServeMux()
	add := func(pattern string, h handler) {
		s.served = append(s.served, pattern)
		s.mux.Handle(pattern, s.instrument(pattern, h))
	}
	add("GET /healthz", s.healthz)
	add("GET /readyz", s.readyz)
	add("GET /openapi.yaml", func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "application/yaml")
		_, err := w.Write(openAPISpec)
		return err
	})
	s.served = append(s.served, "GET /metrics")
	s.mux.Handle("GET /metrics", s.auth(s.metrics.Handler()))
	add("GET /v1/hosts", s.listHosts)
	add("GET /v1/agents", s.listAgents)
	add("POST /v1/agents", s.createAgent)
	add("GET /v1/agents/{name}", s.showAgent)
	add("DELETE /v1/agents/{name}", s.removeAgent)
	add("POST /v1/agents/{name}/exec", s.execAgent)
	add("POST /v1/agents/{name}/pause", s.pauseAgent)
	add("POST /v1/agents/{name}/resume", s.resumeAgent)
	add("POST /v1/agents/{name}/stop", s.stopAgent)
	add("POST /v1/agents/{name}/move", s.moveAgent)
	add("POST /v1/agents/{name}/claim", s.claimAgent)
	add("POST /v1/teleport/out", s.teleportOut)
	add("POST /v1/teleport/in", s.teleportIn)
	add("GET /v1/vms", s.listVMs)
	add("GET /v1/packages", s.listPackages)
	add("GET /v1/packages/{id}", s.showPackage)
	add("POST /v1/packages/{id}/verify", s.verifyPackage)
	add("DELETE /v1/packages/{id}", s.removePackage)
}

// ServeHTTP serves the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mux.ServeHTTP(&jsonErrorWriter{ResponseWriter: w, r: r}, r)
}

// jsonErrorWriter turns ServeMux's own plain-text answers (404 for an
// unknown path, 405 for a method the path does not take) into JSON errors
// like every other.
type jsonErrorWriter struct {
	http.ResponseWriter
	r       *http.Request
	swallow bool
}

func (j *jsonErrorWriter) WriteHeader(code int) {
	if code >= 400 && !strings.HasPrefix(j.Header().Get("Content-Type"), "application/json") {
		j.swallow = true
		e := Error{Error: fmt.Sprintf("no such endpoint: %s %s (the API is in /openapi.yaml)", j.r.Method, j.r.URL.Path), Code: "not_found"}
		if code == http.StatusMethodNotAllowed {
			e = Error{Error: fmt.Sprintf("%s is not allowed on %s (allowed: %s)", j.r.Method, j.r.URL.Path, j.Header().Get("Allow")),
				Code: "method_not_allowed"}
		}
		j.Header().Del("X-Content-Type-Options")
		j.Header().Set("Content-Type", "application/json")
		j.ResponseWriter.WriteHeader(code)
		b, _ := json.Marshal(e)
		j.ResponseWriter.Write(append(b, '\n'))
		return
	}
	j.ResponseWriter.WriteHeader(code)
}

func (j *jsonErrorWriter) Write(b []byte) (int, error) {
	if j.swallow {
		return len(b), nil
	}
	return j.ResponseWriter.Write(b)
}

func (j *jsonErrorWriter) Flush() {
	if f, ok := j.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// authorized compares the bearer token in constant time: both sides are
// hashed first, so neither the token's bytes nor its length leak through
// timing.
func (s *Server) authorized(r *http.Request) bool {
	if !s.token {
		return true
	}
	given, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	sum := sha256.Sum256([]byte(given))
	return subtle.ConstantTimeCompare(sum[:], s.tokenID[:]) == 1
}

func (s *Server) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kelpie"`)
			writeError(w, &badRequest{status: http.StatusUnauthorized, msg: "missing or wrong bearer token (Authorization: Bearer TOKEN; the CLI reads KELPIE_TOKEN or KELPIE_TOKEN_FILE)"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// statusWriter remembers the status for the logs and metrics.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// instrument wraps a handler with auth (but for the probes), panic
// recovery, error encoding, logs and metrics.
func (s *Server) instrument(route string, h handler) http.Handler {
	open := route == "GET /healthz" || route == "GET /readyz"
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w := &statusWriter{ResponseWriter: rw}
		defer func() {
			if p := recover(); p != nil {
				s.log.Error("panic in handler", "route", route, "panic", fmt.Sprint(p))
				if w.status == 0 {
					writeError(w, fmt.Errorf("internal error (please report it): %v", p))
				}
			}
			d := time.Since(start)
			s.metrics.request(route, w.status, d)
			if route != "GET /healthz" && route != "GET /readyz" && route != "GET /v1/agents/{name}" {
				s.log.Info("request", "method", r.Method, "path", r.URL.Path, "status", w.status, "ms", float64(d.Microseconds())/1000)
			}
		}()
		if !open && !s.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kelpie"`)
			writeError(w, &badRequest{status: http.StatusUnauthorized, msg: "missing or wrong bearer token (Authorization: Bearer TOKEN; the CLI reads KELPIE_TOKEN or KELPIE_TOKEN_FILE)"})
			return
		}
		if err := h(w, r); err != nil {
			if w.status != 0 {
				// The answer had begun (a stream): the error is in it.
				return
			}
			status, _ := classify(err)
			if status >= 500 {
				s.log.Warn("request failed", "route", route, "error", err.Error())
			}
			writeError(w, err)
		}
	})
}

// Input checks.

// decode reads a JSON body strictly: one object, known fields only,
// bounded. An empty body is the zero value when empty is allowed.
func decode(w http.ResponseWriter, r *http.Request, v any, emptyOK bool) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return &badRequest{status: http.StatusUnsupportedMediaType, msg: fmt.Sprintf("content type %q: send application/json", ct)}
	}
	body := http.MaxBytesReader(w, r.Body, bodyMaxBytes)
	b, err := io.ReadAll(body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &badRequest{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("request body over %d bytes", bodyMaxBytes)}
		}
		return badf("read the request body: %v", err)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		if emptyOK {
			return nil
		}
		return badf("empty request body: send a JSON object")
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badf("malformed JSON body: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if dec.More() {
		return badf("malformed JSON body: data after the object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return badf("malformed JSON body: data after the object")
	}
	return nil
}

// query checks that r has only the known query parameters, once each.
func query(r *http.Request, known ...string) (map[string]string, error) {
	out := map[string]string{}
	for k, vs := range r.URL.Query() {
		if !slices.Contains(known, k) {
			if len(known) == 0 {
				return nil, badf("unknown query parameter %q (this endpoint takes none)", k)
			}
			return nil, badf("unknown query parameter %q (known: %s)", k, strings.Join(known, ", "))
		}
		if len(vs) != 1 {
			return nil, badf("query parameter %q given %d times", k, len(vs))
		}
		out[k] = vs[0]
	}
	return out, nil
}

func pathName(r *http.Request) (string, error) {
	name := r.PathValue("name")
	if err := vm.ValidateName(name); err != nil {
		return "", badf("agent name: %s", strings.TrimSuffix(err.Error(), ": "+vm.ErrInvalidConfig.Error()))
	}
	return name, nil
}

func pathPackage(r *http.Request) (string, error) {
	id := r.PathValue("id")
	if err := teleport.ValidateID(id); err != nil {
		return "", badf("%s", strings.TrimSuffix(err.Error(), ": "+teleport.ErrInvalidID.Error()))
	}
	return id, nil
}

func validHostID(id string) error {
	if id == "" || len(id) > hostIDMaxBytes {
		return badf("host id must be 1..%d bytes", hostIDMaxBytes)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return badf("host id %q: use letters, digits, '-', '_' and '.'", id)
		}
	}
	return nil
}

// store resolves a request's store: one the daemon offers, "" for its
// default.
func (s *Server) store(name string) (string, error) {
	if name == "" {
		return s.stores[0], nil
	}
	if slices.Contains(s.stores, name) {
		return name, nil
	}
	return "", badf("store %q is not one this daemon serves (%s)", name, strings.Join(s.storeNames(), ", "))
}

func (s *Server) storeNames() []string {
	var out []string
	for _, st := range s.stores {
		if st == "" {
			st = s.fleet.Host.DefaultStore()
		}
		out = append(out, st)
	}
	return out
}

func (s *Server) node() (*registry.Node, error) {
	n := s.fleet.Node()
	if n == nil {
		return nil, fmt.Errorf("this daemon runs without a registry: %w", vm.ErrUnsupported)
	}
	return n, nil
}

// Probes.

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok", "host_id": s.fleet.Host.ID()})
	return nil
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) error {
	if !s.ready.Load() {
		writeJSON(w, http.StatusServiceUnavailable, Error{Error: "starting: reconciling this host's agents with the registry", Code: "not_ready"})
		return nil
	}
	if n := s.fleet.Node(); n != nil {
		select {
		case <-n.Session.Lost():
			writeJSON(w, http.StatusServiceUnavailable, Error{Error: "this host's registry lease is lost; registering again", Code: "lease_lost"})
			return nil
		default:
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready", "host_id": s.fleet.Host.ID()})
	return nil
}

// Hosts and agents.

// list answers a query-less GET with a JSON array ([] rather than null).
func list[T any](w http.ResponseWriter, r *http.Request, get func(ctx context.Context) ([]T, error)) error {
	if _, err := query(r); err != nil {
		return err
	}
	items, err := get(r.Context())
	if err != nil {
		return err
	}
	if items == nil {
		items = []T{}
	}
	writeJSON(w, http.StatusOK, items)
	return nil
}

func (s *Server) listHosts(w http.ResponseWriter, r *http.Request) error {
	n, err := s.node()
	if err != nil {
		return err
	}
	return list(w, r, n.Reg.Hosts)
}

func (s *Server) listAgents(w http.ResponseWriter, r *http.Request) error {
	n, err := s.node()
	if err != nil {
		return err
	}
	return list(w, r, n.Reg.Agents)
}

func (s *Server) showAgent(w http.ResponseWriter, r *http.Request) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	n, err := s.node()
	if err != nil {
		return err
	}
	a, err := n.Reg.Agent(r.Context(), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}

// CreateRequest is the body of POST /v1/agents.
type CreateRequest struct {
	Name      string `json:"name"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`
	Backend   string `json:"backend,omitempty"`
	// Network is none, restricted or full ("": restricted); Publish
	// ("127.0.0.1:HOSTPORT:GUESTPORT") and Forwards
	// ("GUESTPORT:127.0.0.1:HOSTPORT") its ports, as on the CLI.
	Network  string   `json:"network,omitempty"`
	Publish  []string `json:"publish,omitempty"`
	Forwards []string `json:"forwards,omitempty"`
	// DiskBytes sizes a workspace disk at /workspace (0: none).
	DiskBytes int64 `json:"disk_bytes,omitempty"`
}

// spec checks the request's VM shape and network and makes it a VM spec.
func (req CreateRequest) spec() (host.VMSpec, error) {
	spec := host.VMSpec{Name: req.Name, MemoryMiB: req.MemoryMiB, VCPUs: req.VCPUs, Backend: req.Backend, DiskBytes: req.DiskBytes}
	if req.Network != "" {
		m, err := vm.ParseNetworkMode(req.Network)
		if err != nil {
			return spec, badf("network %q: want none, restricted or full", req.Network)
		}
		spec.Network = m
	}
	for _, p := range req.Publish {
		pp, err := vm.ParsePublish(p)
		if err != nil {
			return spec, badf("publish: %s", strings.TrimSuffix(err.Error(), ": "+vm.ErrInvalidConfig.Error()))
		}
		spec.Publish = append(spec.Publish, pp)
	}
	for _, f := range req.Forwards {
		ff, err := vm.ParseForward(f)
		if err != nil {
			return spec, badf("forwards: %s", strings.TrimSuffix(err.Error(), ": "+vm.ErrInvalidConfig.Error()))
		}
		spec.Forwards = append(spec.Forwards, ff)
	}
	if req.DiskBytes != 0 {
		if err := (vm.Disk{SizeBytes: req.DiskBytes}).Validate(); err != nil {
			return spec, badf("disk_bytes: %s", strings.TrimSuffix(err.Error(), ": "+vm.ErrInvalidConfig.Error()))
		}
	}
	return spec, nil
}

func (s *Server) createAgent(w http.ResponseWriter, r *http.Request) error {
	var req CreateRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if err := vm.ValidateName(req.Name); err != nil {
		return badf("name: %s", strings.TrimSuffix(err.Error(), ": "+vm.ErrInvalidConfig.Error()))
	}
	if req.MemoryMiB < 0 || req.MemoryMiB > memoryMiBMax {
		return badf("memory_mib %d out of range 1..%d (0 for the default %d)", req.MemoryMiB, memoryMiBMax, host.VMMemoryMiBDefault)
	}
	if req.VCPUs < 0 || req.VCPUs > vcpusMax {
		return badf("vcpus %d out of range 1..%d (0 for the default %d)", req.VCPUs, vcpusMax, host.VMCPUsDefault)
	}
	spec, err := req.spec()
	if err != nil {
		return err
	}
	if _, err := s.node(); err != nil {
		return err
	}
	a, _, err := s.fleet.Create(r.Context(), spec)
	if err != nil {
		return err
	}
	s.metrics.agentOp("create")
	writeJSON(w, http.StatusCreated, a)
	return nil
}

func (s *Server) removeAgent(w http.ResponseWriter, r *http.Request) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if _, err := s.node(); err != nil {
		return err
	}
	if _, err := s.fleet.Remove(r.Context(), name); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"name": name, "removed": true})
	return nil
}

// ExecRequest is the body of POST /v1/agents/{name}/exec.
type ExecRequest struct {
	Cmd       string   `json:"cmd"`
	Args      []string `json:"args,omitempty"`
	TimeoutMs int64    `json:"timeout_ms,omitempty"`
	Workdir   string   `json:"workdir,omitempty"`
}

// ExecResult is the answer of exec. Stdout and stderr are base64 in JSON.
type ExecResult struct {
	ExitCode  int    `json:"exit_code"`
	Stdout    []byte `json:"stdout"`
	Stderr    []byte `json:"stderr"`
	TimedOut  bool   `json:"timed_out"`
	Truncated bool   `json:"truncated"`
}

func (s *Server) execAgent(w http.ResponseWriter, r *http.Request) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	var req ExecRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if req.Cmd == "" {
		return badf("cmd: give the command to run")
	}
	if len(req.Args) > execArgsMax {
		return badf("args: at most %d", execArgsMax)
	}
	if req.TimeoutMs < 0 || time.Duration(req.TimeoutMs)*time.Millisecond > execTimeoutMax {
		return badf("timeout_ms %d out of range 0..%d", req.TimeoutMs, execTimeoutMax.Milliseconds())
	}
	if err := s.mustOwn(r.Context(), name); err != nil {
		return err
	}
	res, err := s.fleet.Host.Exec(r.Context(), name, req.Cmd, req.Args, vm.ExecOptions{Timeout: time.Duration(req.TimeoutMs) * time.Millisecond, Workdir: req.Workdir})
	if err != nil {
		return err
	}
	out := ExecResult{ExitCode: res.ExitCode, Stdout: res.Stdout, Stderr: res.Stderr, TimedOut: res.TimedOut, Truncated: res.OutputTruncated}
	if out.Stdout == nil {
		out.Stdout = []byte{}
	}
	if out.Stderr == nil {
		out.Stderr = []byte{}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// mustOwn refuses to act on an agent the registry says is elsewhere, and
// says where it is and which daemon serves it.
func (s *Server) mustOwn(ctx context.Context, name string) error {
	n := s.fleet.Node()
	if n == nil {
		return nil
	}
	a, err := n.Reg.Agent(ctx, name)
	if err != nil {
		return err
	}
	if a.Owner == s.fleet.Host.ID() {
		return nil
	}
	where := ""
	if a.Owner != "" {
		if hosts, err := n.Reg.Hosts(ctx); err == nil {
			for _, h := range hosts {
				if h.ID == a.Owner && h.Address != "" {
					where = "; its daemon is " + h.Address
				}
			}
		}
	}
	return fmt.Errorf("agent %s %s%s: %w", name, a.Where(), where, registry.ErrRunsElsewhere)
}

func (s *Server) simple(w http.ResponseWriter, r *http.Request, op func(ctx context.Context, name string) error) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	if err := decode(w, r, &struct{}{}, true); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	n, err := s.node()
	if err != nil {
		return err
	}
	if err := op(r.Context(), name); err != nil {
		return err
	}
	a, err := n.Reg.Agent(r.Context(), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}

func (s *Server) pauseAgent(w http.ResponseWriter, r *http.Request) error {
	return s.simple(w, r, s.fleet.Pause)
}

func (s *Server) resumeAgent(w http.ResponseWriter, r *http.Request) error {
	return s.simple(w, r, func(ctx context.Context, name string) error {
		_, err := s.fleet.Resume(ctx, name)
		return err
	})
}

func (s *Server) stopAgent(w http.ResponseWriter, r *http.Request) error {
	return s.simple(w, r, s.fleet.Stop)
}

// MoveRequest is the body of POST /v1/agents/{name}/move.
type MoveRequest struct {
	To    string `json:"to"`
	Store string `json:"store,omitempty"`
}

// streaming says whether the client asked for progress as NDJSON.
func streaming(r *http.Request) bool {
	return strings.Contains(r.Header.Get("Accept"), ndjsonMediaType)
}

// Event is one line of a streamed answer: a step of the operation, then
// its result or its error.
type Event struct {
	Event  string          `json:"event"` // "step", "result" or "error"
	Op     string          `json:"op,omitempty"`
	Step   string          `json:"step,omitempty"`
	Ms     float64         `json:"ms,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	Status int             `json:"status,omitempty"`
}

// progress runs op, streaming its steps as NDJSON when asked, and answers
// with its result.
func (s *Server) progress(w http.ResponseWriter, r *http.Request, status int, op func(ctx context.Context) (any, error)) error {
	if !streaming(r) {
		v, err := op(r.Context())
		if err != nil {
			return err
		}
		writeJSON(w, status, v)
		return nil
	}
	w.Header().Set("Content-Type", ndjsonMediaType)
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	events := make(chan Event, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range events {
			enc.Encode(ev)
			if flusher != nil {
				flusher.Flush()
			}
		}
	}()
	ctx := host.WithSteps(r.Context(), func(op, step string, d time.Duration) {
		events <- Event{Event: "step", Op: op, Step: step, Ms: float64(d.Microseconds()) / 1000}
	})
	ctx = withProtocolSteps(ctx, func(step string) { events <- Event{Event: "step", Op: "protocol", Step: step} })
	v, err := op(ctx)
	if err != nil {
		st, code := classify(err)
		events <- Event{Event: "error", Error: &Error{Error: oneLine(err.Error()), Code: code}, Status: st}
	} else {
		b, _ := json.Marshal(v)
		events <- Event{Event: "result", Result: b, Status: status}
	}
	close(events)
	<-done
	return nil
}

func (s *Server) moveAgent(w http.ResponseWriter, r *http.Request) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	var req MoveRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if err := validHostID(req.To); err != nil {
		return badf("to: %v", err)
	}
	store, err := s.store(req.Store)
	if err != nil {
		return err
	}
	n, err := s.node()
	if err != nil {
		return err
	}
	if req.To == s.fleet.Host.ID() {
		return badf("to: agent %s would move to the host it is on (%s)", name, req.To)
	}
	target, err := s.peerFor(r.Context(), n, req.To)
	if err != nil {
		return err
	}
	return s.progress(w, r, http.StatusOK, func(ctx context.Context) (any, error) {
		start := time.Now()
		a, err := s.fleet.Move(ctx, name, store, req.To, target)
		s.metrics.move(time.Since(start), err)
		if err != nil {
			return nil, err
		}
		return a, nil
	})
}

// peerFor finds host id's daemon through the registry.
func (s *Server) peerFor(ctx context.Context, n *registry.Node, id string) (registry.Claimer, error) {
	hosts, err := n.Reg.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		if h.ID != id {
			continue
		}
		if !h.Alive {
			return nil, fmt.Errorf("host %s is not alive (its lease ran out at or after %s): %w", id, h.Since.Format(time.RFC3339), registry.ErrUnavailable)
		}
		if h.Address == "" {
			return nil, fmt.Errorf("host %s has no daemon to drive (it was registered by the CLI): %w", id, vm.ErrUnsupported)
		}
		return s.peers(h.Address), nil
	}
	return nil, fmt.Errorf("no host %s in the registry (kelpie host ls lists them): %w", id, registry.ErrNotFound)
}

// ClaimRequest is the body of POST /v1/agents/{name}/claim.
type ClaimRequest struct {
	Package string `json:"package,omitempty"`
}

func (s *Server) claimAgent(w http.ResponseWriter, r *http.Request) error {
	name, err := pathName(r)
	if err != nil {
		return err
	}
	var req ClaimRequest
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if req.Package != "" {
		if err := teleport.ValidateID(req.Package); err != nil {
			return badf("package: %v", err)
		}
	}
	if _, err := s.node(); err != nil {
		return err
	}
	return s.progress(w, r, http.StatusOK, func(ctx context.Context) (any, error) {
		a, err := s.fleet.Claim(ctx, name, req.Package)
		s.metrics.teleport("claim", err)
		return a, err
	})
}

// OutRequest is the body of POST /v1/teleport/out.
type OutRequest struct {
	Name       string `json:"name"`
	Store      string `json:"store,omitempty"`
	KeepSource bool   `json:"keep_source,omitempty"`
	// AgentID names a copy's new agent (keep_source; default a fresh name).
	AgentID string `json:"agent_id,omitempty"`
	// Format is the package's KLP1 version, "v1" or "v2" ("": v2 into a
	// store with a chunk space).
	Format string `json:"format,omitempty"`
}

// OutResult is the answer of teleport out.
type OutResult struct {
	Package *teleport.Package `json:"package"`
	Agent   *registry.Agent   `json:"agent,omitempty"`
	Warning string            `json:"warning,omitempty"`
}

func (s *Server) teleportOut(w http.ResponseWriter, r *http.Request) error {
	var req OutRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if err := vm.ValidateName(req.Name); err != nil {
		return badf("name: %v", err)
	}
	if req.AgentID != "" {
		if err := vm.ValidateName(req.AgentID); err != nil {
			return badf("agent_id: %v", err)
		}
	}
	format := 0
	if req.Format != "" {
		f, err := blob.ParseFormat(req.Format)
		if err != nil {
			return badf("format: %v", err)
		}
		format = f
	}
	store, err := s.store(req.Store)
	if err != nil {
		return err
	}
	return s.progress(w, r, http.StatusOK, func(ctx context.Context) (any, error) {
		res, a, err := s.fleet.TeleportOut(ctx, req.Name, host.OutRequest{Store: store, KeepSource: req.KeepSource, AgentID: req.AgentID, Format: format})
		s.metrics.teleport("out", err)
		if err != nil {
			return nil, err
		}
		if a == nil {
			// Without a registry the fleet does not see the package go.
			s.metrics.bytes("out", res.Package.SizeBytes)
		}
		return OutResult{Package: res.Package, Agent: a, Warning: res.Warning}, nil
	})
}

// InRequest is the body of POST /v1/teleport/in.
type InRequest struct {
	Package string `json:"package"`
	Store   string `json:"store,omitempty"`
	Name    string `json:"name,omitempty"`
}

// InResult is the answer of teleport in.
type InResult struct {
	VM      host.VMInfo       `json:"vm"`
	Package *teleport.Package `json:"package"`
	Agent   *registry.Agent   `json:"agent,omitempty"`
}

func (s *Server) teleportIn(w http.ResponseWriter, r *http.Request) error {
	var req InRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := query(r); err != nil {
		return err
	}
	if err := teleport.ValidateID(req.Package); err != nil {
		return badf("package: %v", err)
	}
	if req.Name != "" {
		if err := vm.ValidateName(req.Name); err != nil {
			return badf("name: %v", err)
		}
	}
	store, err := s.store(req.Store)
	if err != nil {
		return err
	}
	return s.progress(w, r, http.StatusOK, func(ctx context.Context) (any, error) {
		res, a, err := s.fleet.TeleportIn(ctx, req.Package, host.InRequest{Store: store, Name: req.Name})
		s.metrics.teleport("in", err)
		if err != nil {
			return nil, err
		}
		if a == nil {
			s.metrics.bytes("in", res.Package.SizeBytes)
		}
		return InResult{VM: res.VM, Package: res.Package, Agent: a}, nil
	})
}

func (s *Server) listVMs(w http.ResponseWriter, r *http.Request) error {
	return list(w, r, s.fleet.Host.VMs)
}

// Packages.

func (s *Server) storeParam(r *http.Request) (string, error) {
	q, err := query(r, "store")
	if err != nil {
		return "", err
	}
	return s.store(q["store"])
}

func (s *Server) listPackages(w http.ResponseWriter, r *http.Request) error {
	store, err := s.storeParam(r)
	if err != nil {
		return err
	}
	pkgs, err := s.fleet.Host.Packages(r.Context(), store)
	if err != nil {
		return err
	}
	if pkgs == nil {
		pkgs = []*teleport.Package{}
	}
	writeJSON(w, http.StatusOK, pkgs)
	return nil
}

func (s *Server) showPackage(w http.ResponseWriter, r *http.Request) error {
	id, err := pathPackage(r)
	if err != nil {
		return err
	}
	store, err := s.storeParam(r)
	if err != nil {
		return err
	}
	p, err := s.fleet.Host.Package(r.Context(), store, id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

func (s *Server) verifyPackage(w http.ResponseWriter, r *http.Request) error {
	id, err := pathPackage(r)
	if err != nil {
		return err
	}
	if err := decode(w, r, &struct{}{}, true); err != nil {
		return err
	}
	store, err := s.storeParam(r)
	if err != nil {
		return err
	}
	v, err := s.fleet.Host.VerifyPackage(r.Context(), store, id)
	if v != nil && errors.Is(err, teleport.ErrChecksumMismatch) {
		writeJSON(w, http.StatusOK, v)
		return nil
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) removePackage(w http.ResponseWriter, r *http.Request) error {
	id, err := pathPackage(r)
	if err != nil {
		return err
	}
	store, err := s.storeParam(r)
	if err != nil {
		return err
	}
	if err := s.fleet.Host.RemovePackage(r.Context(), store, id); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": id, "removed": true})
	return nil
}

// Protocol steps per request, for streaming.

type protoStepsKey struct{}

func withProtocolSteps(ctx context.Context, f func(step string)) context.Context {
	return context.WithValue(ctx, protoStepsKey{}, f)
}

// protocolStep tells the request whose context ctx is about a protocol
// step, when it streams.
func protocolStep(ctx context.Context, step string) {
	if f, ok := ctx.Value(protoStepsKey{}).(func(string)); ok {
		f(step)
	}
}
