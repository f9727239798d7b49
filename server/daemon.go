package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kelpie/teleport/fleet"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
)

// DaemonConfig is `kelpie serve`.
type DaemonConfig struct {
	// Home is the host's home; HostID overrides its host id.
	Home, HostID string
	// Listen is the API address, HOST:PORT (loopback unless a token is
	// set).
	Listen string
	// Registry is the registry URL (etcd://...); "" starts an embedded
	// member in Home/registry listening on RegistryListen.
	Registry       string
	RegistryListen string // default 127.0.0.1:2379 (peer: the next port)
	// Stores are the package stores the API may use, the default (used for
	// moves) first; default the host's own.
	Stores []string
	// TokenFile holds the bearer token every request must carry.
	TokenFile string
	// TLSCert and TLSKey serve https.
	TLSCert, TLSKey string
	Backends        []host.Backend
	Log             *slog.Logger
	// LeaseTTL is the host's registry lease (default fleet.LeaseTTLDefault).
	LeaseTTL time.Duration
	// ShutdownTimeout bounds the wait for running requests on SIGTERM
	// (default 60 s).
	ShutdownTimeout time.Duration
	// CrashAt, for crash tests only, names a protocol step (moving,
	// committed, in-flight, destroyed, claimed, restored, running) or a
	// teleport step (out:snapshot, in:restore, ...) at which the daemon
	// kills itself with SIGKILL.
	CrashAt string
	// OnReady is told the API's URL once the daemon serves.
	OnReady func(url string)
}

// RegistryListenDefault is the embedded member's client address.
const RegistryListenDefault = "127.0.0.1:2379"

// ErrInsecureListen: a non-loopback listen address without a token.
var ErrInsecureListen = errors.New("refusing to listen beyond loopback without a token")

// CheckListen refuses an address beyond loopback when there is no token.
func CheckListen(addr string, token bool) error {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--listen %q: want HOST:PORT: %v", addr, err)
	}
	if token || h == "localhost" {
		return nil
	}
	if ip := net.ParseIP(h); ip != nil && ip.IsLoopback() {
		return nil
	}
	if h == "" {
		h = "every interface"
	}
	return fmt.Errorf("--listen %s is reachable beyond this machine (%s) and there is no --token-file: anyone could drive this host's VMs; give a token or listen on 127.0.0.1: %w",
		addr, h, ErrInsecureListen)
}

// ReadToken reads a token file: one line, not empty.
func ReadToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" || strings.ContainsAny(t, "\r\n") {
		return "", fmt.Errorf("--token-file %s: want one non-empty line", path)
	}
	return t, nil
}

// RunDaemon serves the host until ctx ends (SIGTERM), then shuts down
// gracefully: running requests finish, the lease is revoked, VMs keep
// running (a restarted daemon re-attaches to them).
func RunDaemon(ctx context.Context, c DaemonConfig) error {
	log := c.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	token := ""
	if c.TokenFile != "" {
		t, err := ReadToken(c.TokenFile)
		if err != nil {
			return err
		}
		token = t
	}
	if err := CheckListen(c.Listen, token != ""); err != nil {
		return err
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 60 * time.Second
	}
	metrics := (*Metrics)(nil)
	var fl *fleet.Fleet
	crash := crashPoint(c.CrashAt, log)
	h, err := host.Open(ctx, host.Options{Home: c.Home, HostID: c.HostID, Backends: c.Backends, Log: log,
		OnStep: func(op, step string, d time.Duration) {
			if metrics != nil {
				metrics.Step(op, step, d)
			}
			crash(op + ":" + step)
		}})
	if err != nil {
		return err
	}
	defer h.Close()

	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", c.Listen, err)
	}
	defer ln.Close()
	scheme := "http"
	if c.TLSCert != "" {
		scheme = "https"
	}
	url := scheme + "://" + ln.Addr().String()
	lock, err := host.ServeHome(h.Home(), host.ServeInfo{PID: os.Getpid(), URL: url, HostID: h.ID()})
	if err != nil {
		return err
	}
	defer lock.Release()

	regURL := c.Registry
	if regURL == "" {
		listen := c.RegistryListen
		if listen == "" {
			listen = RegistryListenDefault
		}
		m, err := registry.StartMember(ctx, registry.MemberConfig{Dir: filepath.Join(h.Home(), "registry"), Listen: listen})
		if err != nil {
			return fmt.Errorf("start the embedded registry (give --registry etcd://... to use another, or --registry-listen): %w", err)
		}
		defer m.Close()
		regURL = m.URL()
		log.Info("embedded registry member", "url", regURL, "data", filepath.Join(h.Home(), "registry"))
	}
	reg, err := registry.Open(regURL, registry.Options{})
	if err != nil {
		return err
	}
	defer reg.Close()
	metrics = NewMetrics(AgentsOf(reg, h.ID()))
	fl, err = fleet.Join(ctx, h, reg, fleet.Options{Address: url, LeaseTTL: c.LeaseTTL,
		OnStep: ProtocolObserver(metrics, log, crash), OnPackage: metrics.Package})
	if err != nil {
		return fmt.Errorf("register host %s in %s: %w", h.ID(), regURL, err)
	}
	stores := c.Stores
	if len(stores) == 0 {
		stores = []string{""}
	}
	srv := New(Config{Fleet: fl, Stores: stores, Token: token, Log: log, Metrics: metrics})
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	serveErr := make(chan error, 1)
	go func() {
		if c.TLSCert != "" {
			serveErr <- hs.ServeTLS(ln, c.TLSCert, c.TLSKey)
			return
		}
		serveErr <- hs.Serve(ln)
	}()
	log.Info("serving", "url", url, "host_id", h.ID(), "registry", regURL, "auth", token != "", "tls", c.TLSCert != "")

	// Re-attach to this host's VMs (their QEMU processes outlived the last
	// daemon), then reconcile every record this host owns.
	reconcile := func() {
		if vms, err := h.VMs(ctx); err == nil {
			for _, v := range vms {
				h.VM(ctx, v.Name)
			}
			log.Info("re-attached", "vms", len(vms))
		}
		repairs, err := fl.Reconcile(ctx)
		if err != nil {
			log.Warn("reconcile", "error", err.Error())
		}
		for _, r := range repairs {
			log.Info("reconciled", "agent", r.Agent, "from", r.From, "to", r.To, "action", r.Action, "error", r.Err)
		}
	}
	reconcile()
	srv.SetReady(true)
	if c.OnReady != nil {
		c.OnReady(url)
	}

	for {
		select {
		case err := <-serveErr:
			return fmt.Errorf("serve: %w", err)
		case <-fl.Lost():
			if ctx.Err() != nil {
				continue
			}
			srv.SetReady(false)
			log.Warn("registry lease lost; registering again")
			for ctx.Err() == nil {
				if err := fl.Rejoin(ctx); err == nil {
					break
				} else {
					log.Warn("register again", "error", err.Error())
					select {
					case <-ctx.Done():
					case <-time.After(time.Second):
					}
				}
			}
			if ctx.Err() == nil {
				reconcile()
				srv.SetReady(true)
			}
		case <-ctx.Done():
			log.Info("shutting down: waiting for running requests; VMs keep running", "timeout", c.ShutdownTimeout)
			srv.SetReady(false)
			sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
			err := hs.Shutdown(sctx)
			cancel()
			lctx, lcancel := context.WithTimeout(context.Background(), 5*time.Second)
			if lerr := fl.Leave(lctx); lerr != nil {
				log.Warn("revoke lease", "error", lerr.Error())
			}
			lcancel()
			log.Info("stopped")
			return err
		}
	}
}

// crashPoint returns the hook that kills the daemon at step at (crash
// tests); a no-op when at is "".
func crashPoint(at string, log *slog.Logger) func(step string) {
	if at == "" {
		return func(string) {}
	}
	return func(step string) {
		if step == at {
			log.Warn("crash point reached: SIGKILL", "step", step)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
}
