package registry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// MemberConfig describes one etcd member run inside this process.
type MemberConfig struct {
	// Dir holds the member's data (its WAL and database).
	Dir string
	// Listen is the client address, HOST:PORT (loopback by default).
	Listen string
	// Name is the member's name in the cluster (default "default").
	Name string
	// Peer is the peer address, HOST:PORT; for a single member, default
	// the client port + 1 on the same host.
	Peer string
	// InitialCluster, for a cluster of several members, lists them all:
	// NAME=http://HOST:PEERPORT,...; empty for a single member.
	InitialCluster string
	// ClusterState is "new" (default) or "existing".
	ClusterState string
	// NoFsync turns fsync off (unsafe: for throwaway tests only).
	NoFsync bool
	// LogLevel of etcd's own log on stderr: debug, info, warn, error,
	// panic or fatal (default fatal: etcd logs its orderly shutdown as
	// errors).
	LogLevel string
	// StartTimeout bounds the wait for the member to be ready to serve
	// (default 60 s; a member of a new cluster waits for a quorum).
	StartTimeout time.Duration
}

// Member is an etcd member running in this process.
type Member struct {
	e    *embed.Etcd
	url  string
	once sync.Once
}

// StartMember starts an embedded etcd member and returns once it serves
// clients (for a cluster: once the cluster has a leader).
func StartMember(ctx context.Context, c MemberConfig) (*Member, error) {
	if c.Dir == "" || c.Listen == "" {
		return nil, errors.New("registry member: need a data directory and a listen address")
	}
	if c.Name == "" {
		c.Name = "default"
	}
	if c.ClusterState == "" {
		c.ClusterState = embed.ClusterStateFlagNew
	}
	if c.ClusterState != embed.ClusterStateFlagNew && c.ClusterState != embed.ClusterStateFlagExisting {
		return nil, fmt.Errorf("registry member: cluster state %q: want new or existing", c.ClusterState)
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 60 * time.Second
	}
	client, err := hostPortURL(c.Listen)
	if err != nil {
		return nil, fmt.Errorf("registry member: --listen: %w", err)
	}
	if c.Peer == "" {
		if c.InitialCluster != "" {
			return nil, errors.New("registry member: a member of a cluster needs its peer address")
		}
		c.Peer = net.JoinHostPort(client.Hostname(), fmt.Sprint(portOf(client)+1))
	}
	peer, err := hostPortURL(c.Peer)
	if err != nil {
		return nil, fmt.Errorf("registry member: peer: %w", err)
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("registry member: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir = c.Name, c.Dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = c.InitialCluster
	if cfg.InitialCluster == "" {
		cfg.InitialCluster = c.Name + "=" + peer.String()
	}
	cfg.ClusterState = c.ClusterState
	cfg.InitialClusterToken = "kelpie"
	cfg.UnsafeNoFsync = c.NoFsync
	cfg.LogLevel = c.LogLevel
	if cfg.LogLevel == "" {
		cfg.LogLevel = "fatal"
	}
	cfg.LogOutputs = []string{"stderr"}
	cfg.EnableGRPCGateway = false
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("registry member %s on %s: %w", c.Name, c.Listen, err)
	}
	timer := time.NewTimer(c.StartTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("registry member %s: %w", c.Name, err)
	case <-timer.C:
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("registry member %s: not ready after %v (are the other members of %s up?)", c.Name, c.StartTimeout, c.InitialCluster)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	return &Member{e: e, url: "etcd://" + client.Host}, nil
}

// URL is the member's registry URL (etcd://HOST:PORT).
func (m *Member) URL() string { return m.url }

// Err reports a member that stopped by itself.
func (m *Member) Err() <-chan error { return m.e.Err() }

// Close stops the member.
func (m *Member) Close() { m.once.Do(m.e.Close) }

func hostPortURL(hp string) (*url.URL, error) {
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		return nil, err
	}
	if host == "" {
		return nil, fmt.Errorf("%q: name the address to listen on (e.g. 127.0.0.1:%s)", hp, port)
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return url.Parse("http://" + host + ":" + port)
}

func portOf(u *url.URL) int {
	var p int
	fmt.Sscan(u.Port(), &p)
	return p
}
