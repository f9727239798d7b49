package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configure the etcd registry.
type Options struct {
	// Endpoints are the etcd members' client URLs (http://host:port).
	Endpoints []string
	// Prefix keys every record (default "/kelpie/"): clusters shared by
	// tests or tenants keep apart.
	Prefix string
	// AttemptTimeout bounds one request to the cluster; a request that
	// fails for a reason that passes (no leader yet, a member down, a
	// timeout) is retried until the caller's context ends (default 2 s).
	AttemptTimeout time.Duration
	// Now tells time for Host.Since (default the system clock).
	Now func() time.Time
	// OnOp, when set, is told every agent operation with its call and
	// return times: what the linearizability check records.
	OnOp func(OpRecord)
}

// OpRecord is one recorded registry operation on an agent record.
type OpRecord struct {
	Kind       string // "get", "create", "update", "delete"
	Name       string
	Prev, Next *Agent // the input (update's prev and next, create's next)
	Out        *Agent // what a get or a successful write returned
	Err        error
	Call, Ret  time.Time
}

const (
	prefixDefault         = "/kelpie/"
	attemptTimeoutDefault = 2 * time.Second
	dialTimeoutDefault    = 5 * time.Second
	retryBackoffMin       = 50 * time.Millisecond
	retryBackoffMax       = 500 * time.Millisecond
)

// Etcd is the registry on an etcd cluster.
type Etcd struct {
	c *clientv3.Client
	o Options
}

var _ Registry = (*Etcd)(nil)

// ParseURL turns a registry URL, etcd://HOST:PORT[,HOST:PORT...], into the
// members' client endpoints.
func ParseURL(u string) ([]string, error) {
	rest, ok := strings.CutPrefix(u, "etcd://")
	if !ok || rest == "" {
		return nil, fmt.Errorf("registry %q: want etcd://HOST:PORT[,HOST:PORT...]", u)
	}
	var out []string
	for _, hp := range strings.Split(strings.TrimSuffix(rest, "/"), ",") {
		host, port, found := strings.Cut(hp, ":")
		if !found || host == "" {
			return nil, fmt.Errorf("registry %q: member %q has no port", u, hp)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("registry %q: member %q: bad port", u, hp)
		}
		out = append(out, "http://"+hp)
	}
	return out, nil
}

// Open connects to the etcd cluster at url (see ParseURL). It does not wait
// for the cluster: requests retry while it starts or has no leader.
func Open(url string, o Options) (*Etcd, error) {
	eps, err := ParseURL(url)
	if err != nil {
		return nil, err
	}
	o.Endpoints = eps
	return OpenEndpoints(o)
}

// OpenEndpoints connects to the members o.Endpoints.
func OpenEndpoints(o Options) (*Etcd, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("registry: no etcd endpoints")
	}
	if o.Prefix == "" {
		o.Prefix = prefixDefault
	}
	if o.AttemptTimeout == 0 {
		o.AttemptTimeout = attemptTimeoutDefault
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	c, err := clientv3.New(clientv3.Config{Endpoints: o.Endpoints, DialTimeout: dialTimeoutDefault, Logger: zap.NewNop(),
		DialKeepAliveTime: 5 * time.Second, DialKeepAliveTimeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", strings.Join(o.Endpoints, ","), err)
	}
	return &Etcd{c: c, o: o}, nil
}

// Close closes the client.
func (e *Etcd) Close() error { return e.c.Close() }

func (e *Etcd) agentKey(name string) string { return e.o.Prefix + "agents/" + name }
func (e *Etcd) hostKey(id string) string    { return e.o.Prefix + "hosts/" + id }
func (e *Etcd) aliveKey(id string) string   { return e.o.Prefix + "alive/" + id }

// transient: an error that passes (a member down, no leader yet, a
// request timed out) rather than an answer.
func transient(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	code := status.Code(err)
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		code = ee.Code()
	}
	switch code {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted, codes.ResourceExhausted:
		return true
	}
	return false
}

// do runs f, retrying transient failures until ctx ends. attempt counts
// from 0: a write's retry must check whether its first attempt took effect.
func (e *Etcd) do(ctx context.Context, what string, f func(ctx context.Context, attempt int) error) error {
	backoff := retryBackoffMin
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, e.o.AttemptTimeout)
		err := f(actx, attempt)
		cancel()
		if err == nil || !transient(err) {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("registry: %s: %v: %w", what, err, ErrUnavailable)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("registry: %s: %v: %w", what, err, ErrUnavailable)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, retryBackoffMax)
	}
}

func (e *Etcd) record(kind, name string, prev, next, out *Agent, err error, call time.Time) {
	if e.o.OnOp != nil {
		e.o.OnOp(OpRecord{Kind: kind, Name: name, Prev: prev, Next: next, Out: out, Err: err, Call: call, Ret: time.Now()})
	}
}

func decodeAgent(kv []byte, rev int64) (*Agent, error) {
	var a Agent
	if err := json.Unmarshal(kv, &a); err != nil {
		return nil, fmt.Errorf("registry: unreadable agent record: %w", err)
	}
	a.Revision = rev
	return &a, nil
}

// Agent returns one record (a linearizable read).
func (e *Etcd) Agent(ctx context.Context, name string) (a *Agent, err error) {
	call := time.Now()
	defer func() { e.record("get", name, nil, nil, a, err, call) }()
	err = e.do(ctx, "get agent "+name, func(ctx context.Context, _ int) error {
		resp, err := e.c.Get(ctx, e.agentKey(name))
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return fmt.Errorf("agent %s: %w", name, ErrNotFound)
		}
		a, err = decodeAgent(resp.Kvs[0].Value, resp.Kvs[0].ModRevision)
		return err
	})
	return a, err
}

// Agents lists every record, sorted by name.
func (e *Etcd) Agents(ctx context.Context) ([]Agent, error) {
	var out []Agent
	err := e.do(ctx, "list agents", func(ctx context.Context, _ int) error {
		resp, err := e.c.Get(ctx, e.o.Prefix+"agents/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return err
		}
		out = out[:0]
		for _, kv := range resp.Kvs {
			a, err := decodeAgent(kv.Value, kv.ModRevision)
			if err != nil {
				return err
			}
			out = append(out, *a)
		}
		return nil
	})
	return out, err
}

// Hosts lists every registered host, sorted by id, with its liveness, in
// one consistent read.
func (e *Etcd) Hosts(ctx context.Context) ([]Host, error) {
	var out []Host
	err := e.do(ctx, "list hosts", func(ctx context.Context, _ int) error {
		resp, err := e.c.Txn(ctx).Then(
			clientv3.OpGet(e.o.Prefix+"hosts/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)),
			clientv3.OpGet(e.o.Prefix+"alive/", clientv3.WithPrefix(), clientv3.WithKeysOnly())).Commit()
		if err != nil {
			return err
		}
		alive := map[string]bool{}
		for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
			alive[strings.TrimPrefix(string(kv.Key), e.o.Prefix+"alive/")] = true
		}
		out = out[:0]
		for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
			var h Host
			if err := json.Unmarshal(kv.Value, &h); err != nil {
				return fmt.Errorf("registry: unreadable host record %s: %w", kv.Key, err)
			}
			h.Alive = alive[h.ID]
			out = append(out, h)
		}
		return nil
	})
	return out, err
}

// etcdSession is a host's lease, kept alive by the client.
type etcdSession struct {
	e      *Etcd
	id     string
	lease  clientv3.LeaseID
	lost   chan struct{}
	cancel context.CancelFunc
	once   sync.Once
}

func (s *etcdSession) HostID() string        { return s.id }
func (s *etcdSession) Lost() <-chan struct{} { return s.lost }

func (s *etcdSession) markLost() { s.once.Do(func() { close(s.lost) }) }

// Close revokes the lease: the host's alive key goes with it.
func (s *etcdSession) Close(ctx context.Context) error {
	s.cancel()
	defer s.markLost()
	return s.e.do(ctx, "revoke lease of "+s.id, func(ctx context.Context, _ int) error {
		_, err := s.e.c.Revoke(ctx, s.lease)
		if rpctypes.Error(err) == rpctypes.ErrLeaseNotFound {
			return nil
		}
		return err
	})
}

// leaseSeconds is ttl in etcd's unit, at least the 2 s etcd grants.
func leaseSeconds(ttl time.Duration) int64 {
	return max(2, int64((ttl+time.Second-1)/time.Second))
}

// Register grants a lease, records the host and its alive key under it
// (replacing an earlier registration's: that one's writes are refused from
// now on), and keeps the lease alive.
func (e *Etcd) Register(ctx context.Context, h Host, ttl time.Duration) (Session, error) {
	if h.ID == "" {
		return nil, errors.New("registry: register: empty host id")
	}
	var lease clientv3.LeaseID
	err := e.do(ctx, "grant lease for "+h.ID, func(ctx context.Context, _ int) error {
		g, err := e.c.Grant(ctx, leaseSeconds(ttl))
		if err == nil {
			lease = g.ID
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	h.Alive, h.Since = false, e.o.Now().UTC()
	b, _ := json.Marshal(h)
	err = e.do(ctx, "register host "+h.ID, func(ctx context.Context, _ int) error {
		_, err := e.c.Txn(ctx).Then(clientv3.OpPut(e.hostKey(h.ID), string(b)),
			clientv3.OpPut(e.aliveKey(h.ID), strconv.FormatInt(int64(lease), 16), clientv3.WithLease(lease))).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	kctx, cancel := context.WithCancel(context.Background())
	ch, err := e.c.KeepAlive(kctx, lease)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("registry: keep lease of %s alive: %w", h.ID, err)
	}
	s := &etcdSession{e: e, id: h.ID, lease: lease, lost: make(chan struct{}), cancel: cancel}
	go func() {
		for range ch {
		}
		// The channel closes when the lease expired, was revoked, or the
		// client could not renew it within its TTL.
		s.markLost()
	}()
	return s, nil
}

func (e *Etcd) session(s Session) (*etcdSession, error) {
	es, ok := s.(*etcdSession)
	if !ok || es.e != e {
		return nil, fmt.Errorf("registry: a session of another registry: %w", ErrLeaseLost)
	}
	return es, nil
}

func newOpID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// write is the one CAS: put (or delete, when next is nil) the record if its
// revision is rev (0: absent) and the session's lease holds.
func (e *Etcd) write(ctx context.Context, s Session, name string, rev int64, next *Agent, what string) (*Agent, error) {
	es, err := e.session(s)
	if err != nil {
		return nil, err
	}
	key, alive := e.agentKey(name), e.aliveKey(es.id)
	var val string
	if next != nil {
		// Always a fresh id: a next copied from the record it replaces
		// carries that record's id, and a retry would take the old record
		// for its own write.
		next.Op = newOpID()
		next.Revision = 0
		if err := next.Validate(); err != nil {
			return nil, err
		}
		b, _ := json.Marshal(next)
		val = string(b)
	}
	var out *Agent
	err = e.do(ctx, what+" agent "+name, func(ctx context.Context, attempt int) error {
		cond := clientv3.Compare(clientv3.ModRevision(key), "=", rev)
		if rev == 0 {
			cond = clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
		}
		op := clientv3.OpDelete(key)
		if next != nil {
			op = clientv3.OpPut(key, val)
		}
		resp, err := e.c.Txn(ctx).If(cond, clientv3.Compare(clientv3.LeaseValue(alive), "=", es.lease)).
			Then(op).Else(clientv3.OpGet(key), clientv3.OpGet(alive)).Commit()
		if err != nil {
			return err
		}
		if resp.Succeeded {
			if next != nil {
				out = new(Agent)
				*out = *next
				out.Revision = resp.Header.Revision
			}
			return nil
		}
		cur := resp.Responses[0].GetResponseRange().Kvs
		lease := resp.Responses[1].GetResponseRange().Kvs
		if attempt > 0 {
			// An earlier attempt may have taken effect with its answer
			// lost, and the record may have moved on since.
			a, known := e.earlierAttempt(ctx, key, rev, cur, next)
			if a != nil {
				out = a
				return nil
			}
			if !known {
				return fmt.Errorf("registry: %s agent %s: an earlier attempt's answer was lost and the record changed since, so whether it took effect is unknown (read the agent again): %w", what, name, ErrUnavailable)
			}
		}
		if len(lease) == 0 || clientv3.LeaseID(lease[0].Lease) != es.lease {
			es.markLost()
			return fmt.Errorf("registry: %s agent %s: host %s: %w", what, name, es.id, ErrLeaseLost)
		}
		switch {
		case rev == 0:
			return fmt.Errorf("registry: agent %s: %w", name, ErrExists)
		case len(cur) == 0:
			return fmt.Errorf("registry: agent %s: %w", name, ErrNotFound)
		}
		return fmt.Errorf("registry: %s agent %s: revision %d, not %d: %w", what, name, cur[0].ModRevision, rev, ErrConflict)
	})
	return out, err
}

// earlierAttempt tells whether an earlier attempt of the write of next
// (nil: a delete) expecting revision rev (0: absent) took effect, given
// the record cur the failed compare read. It returns the record that
// attempt wrote when it did (a delete returns nothing it can prove), and
// known=false when the key's history cannot say.
func (e *Etcd) earlierAttempt(ctx context.Context, key string, rev int64, cur []*mvccpb.KeyValue, next *Agent) (wrote *Agent, known bool) {
	ours := func(kv *mvccpb.KeyValue) *Agent {
		if next == nil {
			return nil
		}
		if a, err := decodeAgent(kv.Value, kv.ModRevision); err == nil && a.Op == next.Op {
			return a
		}
		return nil
	}
	if len(cur) == 1 {
		if a := ours(cur[0]); a != nil {
			return a, true
		}
		if rev != 0 && cur[0].ModRevision == rev {
			// Unchanged since the revision the write expected: no
			// attempt took effect (the compare failed on the lease).
			return nil, true
		}
	}
	if rev == 0 {
		// A create: the current incarnation of the key may be ours,
		// updated since; an earlier one cannot be told apart.
		if len(cur) == 1 {
			resp, err := e.c.Get(ctx, key, clientv3.WithRev(cur[0].CreateRevision))
			if err == nil && len(resp.Kvs) == 1 {
				if a := ours(resp.Kvs[0]); a != nil {
					return a, true
				}
			}
		}
		return nil, false
	}
	// An update or delete: the CAS makes it the first change of the key
	// after revision rev, if it happened at all.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for resp := range e.c.Watch(wctx, key, clientv3.WithRev(rev+1)) {
		if resp.Err() != nil {
			return nil, false
		}
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision <= rev {
				continue
			}
			if ev.Type == mvccpb.DELETE {
				// Someone's delete: a delete's own is indistinguishable.
				return nil, next != nil
			}
			return ours(ev.Kv), true
		}
	}
	return nil, false
}

// Create adds a new record.
func (e *Etcd) Create(ctx context.Context, s Session, a Agent) (out *Agent, err error) {
	call := time.Now()
	defer func() { e.record("create", a.Name, nil, &a, out, err, call) }()
	return e.write(ctx, s, a.Name, 0, &a, "create")
}

// Update is the CAS of prev into next.
func (e *Etcd) Update(ctx context.Context, s Session, prev *Agent, next Agent) (out *Agent, err error) {
	call := time.Now()
	defer func() { e.record("update", prev.Name, prev, &next, out, err, call) }()
	if next.Name != prev.Name {
		return nil, fmt.Errorf("registry: update renames agent %s to %s: %w", prev.Name, next.Name, ErrWrongState)
	}
	if prev.Revision == 0 {
		return nil, fmt.Errorf("registry: update of agent %s without a revision: %w", prev.Name, ErrConflict)
	}
	return e.write(ctx, s, prev.Name, prev.Revision, &next, "update")
}

// Delete removes record prev.
func (e *Etcd) Delete(ctx context.Context, s Session, prev *Agent) (err error) {
	call := time.Now()
	defer func() { e.record("delete", prev.Name, prev, nil, nil, err, call) }()
	if prev.Revision == 0 {
		return fmt.Errorf("registry: delete of agent %s without a revision: %w", prev.Name, ErrConflict)
	}
	_, err = e.write(ctx, s, prev.Name, prev.Revision, nil, "delete")
	return err
}

// Check is the fence: one linearizable transaction that compares the
// record's revision and the session's lease and writes nothing.
func (e *Etcd) Check(ctx context.Context, s Session, a *Agent) error {
	es, err := e.session(s)
	if err != nil {
		return err
	}
	key, alive := e.agentKey(a.Name), e.aliveKey(es.id)
	return e.do(ctx, "check agent "+a.Name, func(ctx context.Context, _ int) error {
		resp, err := e.c.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", a.Revision),
			clientv3.Compare(clientv3.LeaseValue(alive), "=", es.lease)).Else(clientv3.OpGet(alive)).Commit()
		if err != nil {
			return err
		}
		if resp.Succeeded {
			return nil
		}
		if l := resp.Responses[0].GetResponseRange().Kvs; len(l) == 0 || clientv3.LeaseID(l[0].Lease) != es.lease {
			es.markLost()
			return fmt.Errorf("registry: agent %s: host %s: %w", a.Name, es.id, ErrLeaseLost)
		}
		return fmt.Errorf("registry: agent %s moved on from revision %d (epoch %d): %w", a.Name, a.Revision, a.Epoch, ErrConflict)
	})
}
