package dst

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/kelpie/teleport/registry"
)

// Registry is the simulation's model of the agent registry: records with
// revisions and compare-and-swap, hosts with leases that expire on the
// simulated clock, and faults — the whole registry unavailable, or one
// host cut off from it (its calls fail and its lease is not renewed). It
// implements registry.Registry and passes its conformance suite, so the
// production protocol code (registry.Node) runs on it unchanged. Single
// goroutine, like the rest of the simulation.
type Registry struct {
	clock   *Clock
	rev     int64
	ops     int
	agents  map[string]*registry.Agent
	hosts   map[string]*registry.Host
	leases  map[string]*regSession // the current session of each host id
	down    bool                   // the whole registry is unavailable
	cut     map[string]bool        // hosts cut off from the registry
	onWrite func(op string, a *registry.Agent)
}

var _ registry.Registry = (*Registry)(nil)

// NewRegistry makes an empty registry on clock.
func NewRegistry(clock *Clock) *Registry {
	return &Registry{clock: clock, agents: map[string]*registry.Agent{}, hosts: map[string]*registry.Host{},
		leases: map[string]*regSession{}, cut: map[string]bool{}}
}

type regSession struct {
	r       *Registry
	id      string
	ttl     time.Duration
	expires time.Time
	lost    chan struct{}
	closed  bool
}

func (s *regSession) HostID() string        { return s.id }
func (s *regSession) Lost() <-chan struct{} { s.r.expire(); return s.lost }
func (s *regSession) Close(ctx context.Context) error {
	s.r.expire()
	s.end()
	return nil
}

func (s *regSession) end() {
	if !s.closed {
		s.closed = true
		close(s.lost)
	}
}

// expire ends every session whose lease ran out on the clock.
func (r *Registry) expire() {
	now := r.clock.Now()
	for _, id := range sortedHostIDs(r.leases) {
		if s := r.leases[id]; !s.closed && now.After(s.expires) {
			s.end()
		}
	}
}

func sortedHostIDs(m map[string]*regSession) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Renew is the keep-alive: every live session of a host whose daemon
// runs (alive) and that can reach the registry is renewed (the simulation
// calls it each step).
func (r *Registry) Renew(alive func(id string) bool) {
	r.expire()
	if r.down {
		return
	}
	now := r.clock.Now()
	for _, id := range sortedHostIDs(r.leases) {
		if s := r.leases[id]; !s.closed && !r.cut[id] && alive(id) {
			s.expires = now.Add(s.ttl)
		}
	}
}

// SetDown makes the whole registry unavailable (or available again).
func (r *Registry) SetDown(down bool) { r.down = down }

// Cut cuts host id off from the registry (or reconnects it).
func (r *Registry) Cut(id string, cut bool) { r.cut[id] = cut }

// Expire ends s's lease now, as its expiry would.
func (r *Registry) Expire(s registry.Session) {
	if rs, ok := s.(*regSession); ok {
		rs.end()
	}
}

func (r *Registry) reach(s registry.Session) error {
	if r.down {
		return fmt.Errorf("registry: no quorum: %w", registry.ErrUnavailable)
	}
	if s != nil && r.cut[s.HostID()] {
		return fmt.Errorf("registry: host %s is cut off: %w", s.HostID(), registry.ErrUnavailable)
	}
	return nil
}

// holds: s is its host's current session, and its lease has not run out.
func (r *Registry) holds(s registry.Session) error {
	r.expire()
	rs, ok := s.(*regSession)
	if !ok || rs.r != r || rs.closed || r.leases[rs.id] != rs {
		if ok {
			rs.end()
		}
		return fmt.Errorf("registry: host %s: %w", s.HostID(), registry.ErrLeaseLost)
	}
	return nil
}

// Register grants a lease and takes the host over.
func (r *Registry) Register(ctx context.Context, h registry.Host, ttl time.Duration) (registry.Session, error) {
	if err := r.reach(nil); err != nil {
		return nil, err
	}
	if r.cut[h.ID] {
		return nil, fmt.Errorf("registry: host %s is cut off: %w", h.ID, registry.ErrUnavailable)
	}
	if old := r.leases[h.ID]; old != nil {
		old.end()
	}
	s := &regSession{r: r, id: h.ID, ttl: ttl, expires: r.clock.Now().Add(ttl), lost: make(chan struct{})}
	r.leases[h.ID] = s
	h.Since, h.Alive = r.clock.Now().UTC(), false
	r.hosts[h.ID] = &h
	return s, nil
}

// Hosts lists every host, by id.
func (r *Registry) Hosts(ctx context.Context) ([]registry.Host, error) {
	if err := r.reach(nil); err != nil {
		return nil, err
	}
	r.expire()
	ids := make([]string, 0, len(r.hosts))
	for id := range r.hosts {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var out []registry.Host
	for _, id := range ids {
		h := *r.hosts[id]
		s := r.leases[id]
		h.Alive = s != nil && !s.closed
		out = append(out, h)
	}
	return out, nil
}

// Agent returns one record.
func (r *Registry) Agent(ctx context.Context, name string) (*registry.Agent, error) {
	if err := r.reach(nil); err != nil {
		return nil, err
	}
	a, ok := r.agents[name]
	if !ok {
		return nil, fmt.Errorf("agent %s: %w", name, registry.ErrNotFound)
	}
	c := *a
	return &c, nil
}

// Agents lists every record, by name.
func (r *Registry) Agents(ctx context.Context) ([]registry.Agent, error) {
	if err := r.reach(nil); err != nil {
		return nil, err
	}
	names := make([]string, 0, len(r.agents))
	for n := range r.agents {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]registry.Agent, 0, len(names))
	for _, n := range names {
		out = append(out, *r.agents[n])
	}
	return out, nil
}

// Records is the registry's state, by name, for the checkers.
func (r *Registry) Records() []registry.Agent {
	down := r.down
	r.down = false
	out, _ := r.Agents(context.Background())
	r.down = down
	return out
}

func (r *Registry) write(s registry.Session, name string, rev int64, next *registry.Agent, what string) (*registry.Agent, error) {
	if err := r.reach(s); err != nil {
		return nil, err
	}
	if err := r.holds(s); err != nil {
		return nil, err
	}
	cur, ok := r.agents[name]
	switch {
	case rev == 0 && ok:
		return nil, fmt.Errorf("registry: agent %s: %w", name, registry.ErrExists)
	case rev != 0 && !ok:
		return nil, fmt.Errorf("registry: agent %s: %w", name, registry.ErrNotFound)
	case rev != 0 && cur.Revision != rev:
		return nil, fmt.Errorf("registry: %s agent %s: revision %d, not %d: %w", what, name, cur.Revision, rev, registry.ErrConflict)
	}
	if next == nil {
		delete(r.agents, name)
		if r.onWrite != nil {
			r.onWrite("delete", cur)
		}
		return nil, nil
	}
	if err := next.Validate(); err != nil {
		return nil, err
	}
	r.rev++
	r.ops++
	n := *next
	n.Revision, n.Op = r.rev, fmt.Sprintf("op%d", r.ops)
	r.agents[name] = &n
	if r.onWrite != nil {
		r.onWrite(what, &n)
	}
	c := n
	return &c, nil
}

// Create adds a record.
func (r *Registry) Create(ctx context.Context, s registry.Session, a registry.Agent) (*registry.Agent, error) {
	return r.write(s, a.Name, 0, &a, "create")
}

// Update is the CAS.
func (r *Registry) Update(ctx context.Context, s registry.Session, prev *registry.Agent, next registry.Agent) (*registry.Agent, error) {
	if prev.Revision == 0 || next.Name != prev.Name {
		return nil, fmt.Errorf("registry: update of agent %s: %w", prev.Name, registry.ErrConflict)
	}
	return r.write(s, prev.Name, prev.Revision, &next, "update")
}

// Delete removes a record.
func (r *Registry) Delete(ctx context.Context, s registry.Session, prev *registry.Agent) error {
	if prev.Revision == 0 {
		return fmt.Errorf("registry: delete of agent %s: %w", prev.Name, registry.ErrConflict)
	}
	_, err := r.write(s, prev.Name, prev.Revision, nil, "delete")
	return err
}

// Check is the fence.
func (r *Registry) Check(ctx context.Context, s registry.Session, a *registry.Agent) error {
	if err := r.reach(s); err != nil {
		return err
	}
	if err := r.holds(s); err != nil {
		return err
	}
	if cur, ok := r.agents[a.Name]; !ok || cur.Revision != a.Revision {
		return fmt.Errorf("registry: agent %s moved on from revision %d: %w", a.Name, a.Revision, registry.ErrConflict)
	}
	return nil
}

// Close does nothing: the model has no connection.
func (r *Registry) Close() error { return nil }
