// Package registrytest is the conformance suite of registry.Registry: every
// implementation (the etcd one, the simulation's model) runs Run. It also
// has what tests of the registry need: free loopback addresses and an
// embedded member or cluster in a test's temporary directory.
//
// The suite must never assume more than the interface promises: records
// and revisions are opaque, and lease expiry is the harness's to cause.
package registrytest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport/registry"
)

// Harness makes a fresh, empty registry for each case, and can make a
// session's lease end as if it expired.
type Harness struct {
	New func(t *testing.T) registry.Registry
	// Expire ends s's lease the way its expiry would (not by s.Close).
	Expire func(t *testing.T, r registry.Registry, s registry.Session)
	// Concurrent: the registry may be used from several goroutines (the
	// simulation's model is single-threaded).
	Concurrent bool
}

// TTL is the sessions' lease; short, so that ExpiredLeaseFenced waits little.
const ttl = 3 * time.Second

// Run runs the suite.
func Run(t *testing.T, h Harness) {
	ctx := context.Background()
	open := func(t *testing.T) (registry.Registry, registry.Session) {
		r := h.New(t)
		s, err := r.Register(ctx, registry.Host{ID: "host-a", Address: "http://127.0.0.1:1"}, ttl)
		if err != nil {
			t.Fatalf("register: %v", err)
		}
		return r, s
	}
	rec := func(name string) registry.Agent {
		return registry.Agent{Name: name, Owner: "host-a", State: registry.StateRunning, Epoch: 1, Since: time.Unix(100, 0).UTC()}
	}

	t.Run("CreateGetList", func(t *testing.T) {
		r, s := open(t)
		for _, n := range []string{"b", "a", "c"} {
			a, err := r.Create(ctx, s, rec(n))
			if err != nil || a.Revision == 0 || a.Name != n {
				t.Fatalf("create %s: %+v %v", n, a, err)
			}
		}
		if _, err := r.Create(ctx, s, rec("a")); !errors.Is(err, registry.ErrExists) {
			t.Fatalf("second create of a: %v, want ErrExists", err)
		}
		got, err := r.Agent(ctx, "a")
		if err != nil || got.Owner != "host-a" || got.State != registry.StateRunning || got.Epoch != 1 || got.Revision == 0 {
			t.Fatalf("get a: %+v %v", got, err)
		}
		if _, err := r.Agent(ctx, "zz"); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("get zz: %v, want ErrNotFound", err)
		}
		all, err := r.Agents(ctx)
		if err != nil || len(all) != 3 || all[0].Name != "a" || all[1].Name != "b" || all[2].Name != "c" {
			t.Fatalf("list: %+v %v", all, err)
		}
	})

	t.Run("CompareAndSwap", func(t *testing.T) {
		r, s := open(t)
		a, err := r.Create(ctx, s, rec("x"))
		if err != nil {
			t.Fatal(err)
		}
		next := *a
		next.State, next.Epoch = registry.StatePaused, 2
		b, err := r.Update(ctx, s, a, next)
		if err != nil || b.Revision == a.Revision || b.State != registry.StatePaused || b.Epoch != 2 {
			t.Fatalf("update: %+v %v", b, err)
		}
		if _, err := r.Update(ctx, s, a, next); !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("update from a stale revision: %v, want ErrConflict", err)
		}
		if err := r.Delete(ctx, s, a); !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("delete from a stale revision: %v, want ErrConflict", err)
		}
		if err := r.Check(ctx, s, a); !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("check of a stale revision: %v, want ErrConflict", err)
		}
		if err := r.Check(ctx, s, b); err != nil {
			t.Fatalf("check of the current revision: %v", err)
		}
		got, _ := r.Agent(ctx, "x")
		if got.Revision != b.Revision || got.State != registry.StatePaused {
			t.Fatalf("get after update: %+v, want revision %d", got, b.Revision)
		}
		if err := r.Delete(ctx, s, b); err != nil {
			t.Fatalf("delete: %v", err)
		}
		if _, err := r.Agent(ctx, "x"); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("get after delete: %v", err)
		}
		if _, err := r.Update(ctx, s, b, next); err == nil {
			t.Fatal("update of a deleted record succeeded")
		}
	})

	t.Run("InvalidRecordsRefused", func(t *testing.T) {
		r, s := open(t)
		bad := rec("y")
		bad.State = registry.StateInFlight // in flight, yet with an owner
		if _, err := r.Create(ctx, s, bad); err == nil {
			t.Fatal("an in-flight record with an owner was accepted")
		}
		bad = rec("y")
		bad.State = "flying"
		if _, err := r.Create(ctx, s, bad); err == nil {
			t.Fatal("an unknown state was accepted")
		}
	})

	t.Run("HostsAndLeases", func(t *testing.T) {
		r, s := open(t)
		s2, err := r.Register(ctx, registry.Host{ID: "host-b", Address: "http://127.0.0.1:2"}, ttl)
		if err != nil {
			t.Fatal(err)
		}
		hosts, err := r.Hosts(ctx)
		if err != nil || len(hosts) != 2 || hosts[0].ID != "host-a" || !hosts[0].Alive || hosts[1].Address != "http://127.0.0.1:2" || !hosts[1].Alive {
			t.Fatalf("hosts: %+v %v", hosts, err)
		}
		a, err := r.Create(ctx, s2, rec("z"))
		if err != nil {
			t.Fatal(err)
		}
		if err := s2.Close(ctx); err != nil {
			t.Fatalf("close session: %v", err)
		}
		select {
		case <-s2.Lost():
		case <-time.After(5 * time.Second):
			t.Fatal("a closed session's Lost channel stayed open")
		}
		hosts, _ = r.Hosts(ctx)
		if len(hosts) != 2 || hosts[1].Alive {
			t.Fatalf("after close, host-b should be listed and not alive: %+v", hosts)
		}
		next := *a
		next.State = registry.StatePaused
		if _, err := r.Update(ctx, s2, a, next); !errors.Is(err, registry.ErrLeaseLost) {
			t.Fatalf("write under a closed session: %v, want ErrLeaseLost", err)
		}
		if err := r.Check(ctx, s2, a); !errors.Is(err, registry.ErrLeaseLost) {
			t.Fatalf("fence under a closed session: %v, want ErrLeaseLost", err)
		}
		if _, err := r.Update(ctx, s, a, next); err != nil {
			t.Fatalf("another live host's write: %v", err)
		}
	})

	t.Run("ExpiredLeaseFenced", func(t *testing.T) {
		r, s := open(t)
		a, err := r.Create(ctx, s, rec("w"))
		if err != nil {
			t.Fatal(err)
		}
		h.Expire(t, r, s)
		select {
		case <-s.Lost():
		case <-time.After(15 * time.Second):
			t.Fatal("an expired session's Lost channel stayed open")
		}
		next := *a
		next.State = registry.StatePaused
		if _, err := r.Update(ctx, s, a, next); !errors.Is(err, registry.ErrLeaseLost) {
			t.Fatalf("write after expiry: %v, want ErrLeaseLost", err)
		}
		if _, err := r.Create(ctx, s, rec("w2")); !errors.Is(err, registry.ErrLeaseLost) {
			t.Fatalf("create after expiry: %v, want ErrLeaseLost", err)
		}
		hosts, _ := r.Hosts(ctx)
		if len(hosts) != 1 || hosts[0].Alive {
			t.Fatalf("after expiry the host must not be alive: %+v", hosts)
		}
		// Registering again takes the host back.
		s3, err := r.Register(ctx, registry.Host{ID: "host-a"}, ttl)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.Update(ctx, s3, a, next); err != nil {
			t.Fatalf("write after re-registering: %v", err)
		}
	})

	t.Run("TakeOver", func(t *testing.T) {
		r, old := open(t)
		a, err := r.Create(ctx, old, rec("v"))
		if err != nil {
			t.Fatal(err)
		}
		// The same host id registers again (a daemon restarted while its
		// old lease still ran): the old session is fenced off.
		cur, err := r.Register(ctx, registry.Host{ID: "host-a"}, ttl)
		if err != nil {
			t.Fatal(err)
		}
		next := *a
		next.State = registry.StatePaused
		if _, err := r.Update(ctx, old, a, next); !errors.Is(err, registry.ErrLeaseLost) {
			t.Fatalf("the replaced session's write: %v, want ErrLeaseLost", err)
		}
		if _, err := r.Update(ctx, cur, a, next); err != nil {
			t.Fatalf("the new session's write: %v", err)
		}
		hosts, _ := r.Hosts(ctx)
		if len(hosts) != 1 || !hosts[0].Alive {
			t.Fatalf("hosts after take-over: %+v", hosts)
		}
	})

	if !h.Concurrent {
		return
	}
	t.Run("ConcurrentCAS", func(t *testing.T) {
		r, s := open(t)
		if _, err := r.Create(ctx, s, rec("n")); err != nil {
			t.Fatal(err)
		}
		const writers, each = 8, 10
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins, errs := 0, []error{}
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; {
					a, err := r.Agent(ctx, "n")
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
					next := *a
					next.Epoch++
					if _, err := r.Update(ctx, s, a, next); err == nil {
						mu.Lock()
						wins++
						mu.Unlock()
						i++
					} else if !errors.Is(err, registry.ErrConflict) {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		if len(errs) > 0 {
			t.Fatal(errs[0])
		}
		a, _ := r.Agent(ctx, "n")
		if wins != writers*each || a.Epoch != uint64(1+wins) {
			t.Fatalf("%d CAS wins, epoch %d: every win must count exactly once (want %d)", wins, a.Epoch, 1+writers*each)
		}
	})
}

// FreeAddr returns a loopback address no one listens on now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreeAddrs returns n distinct free loopback addresses.
func FreeAddrs(t testing.TB, n int) []string {
	t.Helper()
	var ls []net.Listener
	var out []string
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	for _, l := range ls {
		l.Close()
	}
	return out
}

// FreeMemberAddrs is FreeAddrs for a test that starts a member with its
// default peer address (client port + 1): the first address's next port
// is free too, and none of the others is it.
func FreeMemberAddrs(t testing.TB, n int) []string {
	t.Helper()
	for try := 0; try < 100; try++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		next, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1))
		if err != nil {
			l.Close()
			continue
		}
		// Draw the others while both are held, so none of them is either.
		rest := FreeAddrs(t, n-1)
		l.Close()
		next.Close()
		return append([]string{l.Addr().String()}, rest...)
	}
	t.Fatal("no free pair of loopback ports")
	return nil
}

// Member starts an embedded single member in a temporary directory, with
// fsync on, and stops it when the test ends.
func Member(t testing.TB) *registry.Member {
	t.Helper()
	addrs := FreeAddrs(t, 2)
	m, err := registry.StartMember(context.Background(), registry.MemberConfig{Dir: t.TempDir(), Listen: addrs[0], Peer: addrs[1]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// InitialCluster is the initial-cluster value for members m0..mN-1 at the
// given peer addresses.
func InitialCluster(peers []string) string {
	s := ""
	for i, p := range peers {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprintf("m%d=http://%s", i, p)
	}
	return s
}

// Cluster starts n embedded members forming one cluster on free loopback
// ports (each with its own data directory, fsync on) and returns them
// and the cluster's registry URL; they stop when the test ends.
func Cluster(t testing.TB, n int) ([]*registry.Member, string) {
	t.Helper()
	addrs := FreeAddrs(t, 2*n)
	clients, peers := addrs[:n], addrs[n:]
	initial := InitialCluster(peers)
	ms := make([]*registry.Member, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ms[i], errs[i] = registry.StartMember(context.Background(), registry.MemberConfig{Dir: t.TempDir(), Listen: clients[i],
				Name: fmt.Sprintf("m%d", i), Peer: peers[i], InitialCluster: initial})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("member m%d: %v", i, err)
		}
		t.Cleanup(ms[i].Close)
	}
	url := "etcd://"
	for i, c := range clients {
		if i > 0 {
			url += ","
		}
		url += c
	}
	return ms, url
}
