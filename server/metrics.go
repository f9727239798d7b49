package server

import (
	"context"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/registry"
)

// Metrics are the daemon's Prometheus metrics, on a registry of their own
// (no global state): teleport step durations, bytes, failures by reason,
// protocol steps, moves, HTTP requests, and agents by state.
type Metrics struct {
	reg      *prometheus.Registry
	steps    *prometheus.HistogramVec
	protocol *prometheus.CounterVec
	bytesT   *prometheus.CounterVec
	failures *prometheus.CounterVec
	moves    prometheus.Histogram
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	ops      *prometheus.CounterVec
}

// AgentLister lists the agents for the agents-by-state gauge, at scrape
// time.
type AgentLister func(ctx context.Context) (hostID string, agents []registry.Agent, err error)

// NewMetrics makes the metrics; agents, when set, feeds kelpie_agents.
func NewMetrics(agents AgentLister) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.steps = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kelpie_teleport_step_seconds",
		Help:    "Duration of each step of a teleport (op: out, in, suspend, resume; step: pause, snapshot, upload, validate, restore, resume, ready, ...).",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 16)}, []string{"op", "step"})
	m.protocol = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kelpie_protocol_steps_total",
		Help: "Move protocol steps reached on this host (moving, committed, in-flight, destroyed, claimed, restored, running, rolled-back)."}, []string{"step"})
	m.bytesT = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kelpie_teleport_bytes_total",
		Help: "Bytes of packages this host sent (out) and restored (in)."}, []string{"direction"})
	m.failures = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kelpie_teleport_failures_total",
		Help: "Failed teleports, moves and claims by reason (the API error code)."}, []string{"op", "reason"})
	m.moves = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kelpie_move_seconds",
		Help: "Duration of a move through the daemons, from the API call to running on the target.", Buckets: prometheus.ExponentialBuckets(0.05, 2, 12)})
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kelpie_http_requests_total",
		Help: "API requests by route and status code."}, []string{"route", "code"})
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kelpie_http_request_seconds",
		Help: "API request latency by route.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"route"})
	m.ops = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kelpie_agent_operations_total",
		Help: "Agent operations that succeeded, by operation."}, []string{"op"})
	m.reg.MustRegister(m.steps, m.protocol, m.bytesT, m.failures, m.moves, m.requests, m.latency, m.ops,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if agents != nil {
		m.reg.MustRegister(&agentsCollector{list: agents, desc: prometheus.NewDesc("kelpie_agents",
			"Agents this host owns, by registry state.", []string{"state"}, nil)})
	}
	return m
}

// Handler serves the metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Step records one teleport step.
func (m *Metrics) Step(op, step string, d time.Duration) {
	m.steps.WithLabelValues(op, step).Observe(d.Seconds())
}

// ProtocolStep records one move protocol step.
func (m *Metrics) ProtocolStep(step string) { m.protocol.WithLabelValues(step).Inc() }

func (m *Metrics) bytes(direction string, n int64) {
	m.bytesT.WithLabelValues(direction).Add(float64(n))
}

// Package records a package sent or restored (fleet.Options.OnPackage).
func (m *Metrics) Package(direction string, p *teleport.Package) { m.bytes(direction, p.SizeBytes) }

// AgentsOf lists reg's agents for the agents-by-state gauge of host id.
func AgentsOf(reg registry.Registry, id string) AgentLister {
	return func(ctx context.Context) (string, []registry.Agent, error) {
		a, err := reg.Agents(ctx)
		return id, a, err
	}
}

// ProtocolObserver is the daemon's protocol step observer: metrics, the
// streamed progress of the request whose step it is, logs, and then
// extra (the crash point), in that order.
func ProtocolObserver(m *Metrics, log *slog.Logger, extra func(step string)) func(ctx context.Context, agent, step string) {
	return func(ctx context.Context, agent, step string) {
		m.ProtocolStep(step)
		protocolStep(ctx, step)
		if log != nil {
			log.Info("protocol step", "agent", agent, "step", step)
		}
		if extra != nil {
			extra(step)
		}
	}
}

func (m *Metrics) teleport(op string, err error) {
	if err != nil {
		m.failures.WithLabelValues(op, reason(err)).Inc()
	}
}

func (m *Metrics) move(d time.Duration, err error) {
	if err != nil {
		m.failures.WithLabelValues("move", reason(err)).Inc()
		return
	}
	m.moves.Observe(d.Seconds())
}

func (m *Metrics) agentOp(op string) { m.ops.WithLabelValues(op).Inc() }

func (m *Metrics) request(route string, code int, d time.Duration) {
	if code == 0 {
		code = http.StatusOK
	}
	m.requests.WithLabelValues(route, strconv.Itoa(code)).Inc()
	m.latency.WithLabelValues(route).Observe(d.Seconds())
}

// agentsCollector counts this host's agents by state at scrape time.
type agentsCollector struct {
	list AgentLister
	desc *prometheus.Desc
}

func (c *agentsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *agentsCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	self, agents, err := c.list(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	counts := map[registry.State]int{}
	for _, a := range agents {
		if a.Owner == self {
			counts[a.State]++
		}
	}
	for _, s := range registry.States {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[s]), string(s))
	}
}
