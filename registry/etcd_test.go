package registry_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
)

var prefixes atomic.Int64

// etcdHarness runs the suite on one real embedded member (fsync on), each
// case under its own key prefix.
func etcdHarness(t *testing.T) registrytest.Harness {
	m := registrytest.Member(t)
	return registrytest.Harness{
		Concurrent: true,
		New: func(t *testing.T) registry.Registry {
			r, err := registry.Open(m.URL(), registry.Options{Prefix: fmt.Sprintf("/t%d/", prefixes.Add(1))})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			return r
		},
		Expire: func(t *testing.T, r registry.Registry, s registry.Session) {
			// Stop renewing the lease and wait until etcd itself expires it.
			if err := registry.StopKeepAlive(context.Background(), r, s); err != nil {
				t.Fatal(err)
			}
		},
	}
}

func TestEtcdConformance(t *testing.T) {
	registrytest.Run(t, etcdHarness(t))
}

func TestParseURL(t *testing.T) {
	for _, c := range []struct {
		in   string
		want string
		ok   bool
	}{
		{"etcd://127.0.0.1:2379", "[http://127.0.0.1:2379]", true},
		{"etcd://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "[http://127.0.0.1:1 http://127.0.0.1:2 http://127.0.0.1:3]", true},
		{"http://127.0.0.1:2379", "", false},
		{"etcd://", "", false},
		{"etcd://127.0.0.1", "", false},
		{"etcd://127.0.0.1:0", "", false},
		{"etcd://:2379", "", false},
	} {
		got, err := registry.ParseURL(c.in)
		if (err == nil) != c.ok || (c.ok && fmt.Sprint(got) != c.want) {
			t.Errorf("ParseURL(%q) = %v, %v; want %s ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

// A client started before its registry retries until the member is up.
func TestClientWaitsForMember(t *testing.T) {
	addrs := registrytest.FreeAddrs(t, 2)
	r, err := registry.Open("etcd://"+addrs[0], registry.Options{AttemptTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := r.Register(ctx, registry.Host{ID: "early"}, 10*time.Second)
		done <- err
	}()
	time.Sleep(700 * time.Millisecond)
	m, err := registry.StartMember(context.Background(), registry.MemberConfig{Dir: t.TempDir(), Listen: addrs[0], Peer: addrs[1]})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := <-done; err != nil {
		t.Fatalf("register across the member's start: %v", err)
	}
	// And a client whose registry never comes gives up when told to, with
	// the registry's category.
	r2, _ := registry.Open("etcd://"+registrytest.FreeAddr(t), registry.Options{AttemptTimeout: 200 * time.Millisecond})
	defer r2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := r2.Agents(ctx); err == nil || !isUnavailable(err) {
		t.Fatalf("no registry: %v, want ErrUnavailable", err)
	}
}

func isUnavailable(err error) bool { return errors.Is(err, registry.ErrUnavailable) }
