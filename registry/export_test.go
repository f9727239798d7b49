package registry

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// StopKeepAlive stops renewing s's lease and returns once etcd has expired
// it: a lease that ran out, not one revoked.
func StopKeepAlive(ctx context.Context, r Registry, s Session) error {
	es := s.(*etcdSession)
	es.cancel()
	e := r.(*Etcd)
	for {
		ttl, err := e.c.TimeToLive(ctx, es.lease)
		if err == nil && ttl.TTL == -1 { // -1: revoked by the expiry, not just due
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// LeaseOf is a session's lease id.
func LeaseOf(s Session) clientv3.LeaseID { return s.(*etcdSession).lease }
