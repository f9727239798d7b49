package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/server"
)

func init() {
	register(command{"serve", "run this host's daemon: the API over its VMs, under the agent registry", cmdServe})
	register(command{"registry", "run an etcd member of the agent registry (registry serve)", cmdRegistry})
}

// stringList is a flag that may be given several times.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

const serveUsage = `kelpie serve --home DIR --listen 127.0.0.1:PORT [--registry etcd://HOST:PORT[,...]] [--store STORE]...
           [--token-file F] [--tls-cert F --tls-key F] [--registry-listen 127.0.0.1:PORT] [--host-id ID]`

func cmdServe(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "serve")
	homeF := fs.String("home", "", "the host's home (default $KELPIE_HOME)")
	listen := fs.String("listen", "127.0.0.1:7070", "API address (loopback unless --token-file is given)")
	regFlag := fs.String("registry", "", "agent registry etcd://HOST:PORT[,...] (default $KELPIE_REGISTRY; none: an embedded member in HOME/registry)")
	regListen := fs.String("registry-listen", server.RegistryListenDefault, "the embedded registry member's client address (its peer port is the next one)")
	var stores stringList
	fs.Var(&stores, "store", "a package store the API may use, the first for moves (repeatable; default HOME/packages)")
	tokenFile := fs.String("token-file", "", "file holding the bearer token every request must carry")
	tlsCert := fs.String("tls-cert", "", "serve https with this certificate (PEM)")
	tlsKey := fs.String("tls-key", "", "the certificate's key (PEM)")
	hostID := fs.String("host-id", "", "override the home's host id (default $KELPIE_HOST_ID or HOME/host-id)")
	logJSON := fs.Bool("log-json", false, "log JSON lines instead of text")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: %s", serveUsage)
	}
	if e.server != "" {
		return usagef("kelpie serve is the daemon; it takes no --server")
	}
	h := *homeF
	if h == "" {
		h = home(e)
	}
	regURL, err := registryURL(e, *regFlag)
	if err != nil {
		return err
	}
	if *hostID == "" {
		*hostID = e.getenv("KELPIE_HOST_ID")
	}
	for _, s := range stores {
		if strings.Contains(s, "://") && !strings.HasPrefix(s, "s3://") {
			return usagef("--store %q: want a directory or s3://bucket/prefix", s)
		}
	}
	var handler slog.Handler = slog.NewTextHandler(e.stderr, nil)
	if *logJSON {
		handler = slog.NewJSONHandler(e.stderr, nil)
	}
	if err := server.CheckListen(*listen, *tokenFile != ""); err != nil {
		return usagef("%v", err)
	}
	return server.RunDaemon(ctx, server.DaemonConfig{
		Home: h, HostID: *hostID, Listen: *listen, Registry: regURL, RegistryListen: *regListen, Stores: stores,
		TokenFile: *tokenFile, TLSCert: *tlsCert, TLSKey: *tlsKey,
		Backends: host.DefaultBackends(host.BackendConfigFromEnv(e.getenv)), Log: slog.New(handler),
		CrashAt: crashAt(e),
	})
}

const registryUsage = `kelpie registry serve --data DIR --listen 127.0.0.1:PORT [--name NAME --peer 127.0.0.1:PORT
           --initial-cluster NAME=http://HOST:PORT,... [--cluster-state new|existing]] [--no-fsync]`

func cmdRegistry(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] != "serve" {
		return usagef("usage: %s", registryUsage)
	}
	fs := newFlags(e, "registry serve")
	data := fs.String("data", "", "the member's data directory")
	listen := fs.String("listen", "", "client address, 127.0.0.1:PORT")
	name := fs.String("name", "", "member name (default \"default\")")
	peer := fs.String("peer", "", "peer address (default: the client port + 1)")
	initial := fs.String("initial-cluster", "", "every member of a new cluster: NAME=http://HOST:PORT,...")
	state := fs.String("cluster-state", "new", "new or existing")
	noFsync := fs.Bool("no-fsync", false, "turn fsync off (unsafe: throwaway tests only)")
	logLevel := fs.String("log-level", "fatal", "etcd's own log level: debug, info, warn, error, panic, fatal (default fatal: etcd logs its orderly shutdown as errors)")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 || *data == "" || *listen == "" {
		return usagef("usage: %s", registryUsage)
	}
	m, err := registry.StartMember(ctx, registry.MemberConfig{Dir: *data, Listen: *listen, Name: *name, Peer: *peer,
		InitialCluster: *initial, ClusterState: *state, NoFsync: *noFsync, LogLevel: *logLevel})
	if err != nil {
		return err
	}
	defer m.Close()
	fmt.Fprintf(e.stderr, "kelpie: registry member %s serving %s (data %s)\n", orDash(*name), m.URL(), *data)
	fmt.Fprintln(e.stdout, m.URL())
	select {
	case <-ctx.Done():
		return nil
	case err := <-m.Err():
		return fmt.Errorf("registry member stopped: %w", err)
	}
}
