package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/fleet"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
)

// openHost opens this home's host for one command. Commands that move
// packages pass progressJSON; a terminal gets a progress bar either way.
// stepPrefix != "" prints each step of a long operation with its time.
func openHost(ctx context.Context, e *env, progressJSON, steps bool) (*localHost, error) {
	if e.server != "" {
		return nil, usagef("this command does not go through a daemon; run it without --server (or unset KELPIE_SERVER) on the daemon's machine")
	}
	lock, err := host.UseHome(home(e))
	if err != nil {
		return nil, err
	}
	o := host.Options{
		Home:           home(e),
		HostID:         e.getenv("KELPIE_HOST_ID"),
		Backends:       host.DefaultBackends(host.BackendConfigFromEnv(e.getenv)),
		DefaultBackend: e.getenv("KELPIE_BACKEND"),
		OneShot:        true,
		Log:            slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		OpenStore: func(ctx context.Context, url string) (teleport.Store, error) {
			st, err := host.StoreOpener(e.getenv)(ctx, url)
			if err != nil {
				return nil, err
			}
			return withProgress(e, st, progressJSON), nil
		},
	}
	if steps {
		o.OnStep = func(op, step string, d time.Duration) {
			fmt.Fprintf(e.stderr, "kelpie: %s: %-14s %8.1f ms\n", op, step, ms(d))
		}
	}
	h, err := host.Open(ctx, o)
	if err != nil {
		lock.Release()
		return nil, err
	}
	return &localHost{Host: h, lock: lock}, nil
}

// localHost is this home's host for one command, holding the home's
// shared lock (no daemon serves it meanwhile), and its fleet membership
// when the command was given a registry.
type localHost struct {
	*host.Host
	lock  *host.HomeLock
	fleet *fleet.Fleet
	reg   registry.Registry
}

// Close leaves the registry, lets the VMs go (they keep running) and
// releases the home.
func (h *localHost) Close() error {
	if h.fleet != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		h.fleet.Leave(ctx)
		cancel()
	}
	if h.reg != nil {
		h.reg.Close()
	}
	err := h.Host.Close()
	h.lock.Release()
	return err
}

const registryFlagHelp = "agent registry, etcd://HOST:PORT[,HOST:PORT...] (default $KELPIE_REGISTRY): enforce single activation"

// registryURL is --registry, or KELPIE_REGISTRY.
func registryURL(e *env, flagValue string) (string, error) {
	u := flagValue
	if u == "" {
		u = e.getenv("KELPIE_REGISTRY")
	}
	if u != "" {
		if _, err := registry.ParseURL(u); err != nil {
			return "", usagef("--registry: %v", err)
		}
	}
	return u, nil
}

// join makes the command's host a member of the fleet at registry URL u
// (for the length of the command) and reconciles the named agents, so
// that what a killed command left behind is settled first. Without a
// registry it says that single activation is not enforced.
func (h *localHost) join(ctx context.Context, e *env, u string, agents ...string) (*fleet.Fleet, error) {
	if u == "" {
		e.unenforced = true // said once the command succeeded
		return fleet.Join(ctx, h.Host, nil, fleet.Options{})
	}
	reg, err := registry.Open(u, registry.Options{})
	if err != nil {
		return nil, err
	}
	f, err := fleet.Join(ctx, h.Host, reg, fleet.Options{})
	if err != nil {
		reg.Close()
		return nil, fmt.Errorf("registry %s: %w", u, err)
	}
	h.fleet, h.reg = f, reg
	repairs, err := f.Reconcile(ctx, agents...)
	if err != nil {
		return nil, err
	}
	for _, r := range repairs {
		fmt.Fprintf(e.stderr, "kelpie: reconciled agent %s: %s (%s -> %s)\n", r.Agent, r.Action, r.From, orDash(string(r.To)))
		if r.Err != "" {
			fmt.Fprintf(e.stderr, "kelpie: reconciling agent %s failed: %s\n", r.Agent, r.Err)
		}
	}
	return f, nil
}

const storeFlagHelp = "package store: a directory or s3://bucket/prefix (default $KELPIE_HOME/packages)"

// storeFlags are the flags of every command that takes --store: the store
// itself and the S3 settings that may go with it.
type storeFlags struct {
	spec *string
	s3   *s3Flags
}

func addStoreFlags(fs *flag.FlagSet) *storeFlags {
	return &storeFlags{spec: fs.String("store", "", storeFlagHelp), s3: addS3Flags(fs)}
}

// url is the store's URL with the S3 flags folded in ("" for the host's
// own store).
func (f *storeFlags) url() (string, error) {
	spec, err := f.s3.storeSpec(*f.spec)
	if err != nil {
		return "", err
	}
	if strings.Contains(spec, "://") && !strings.HasPrefix(spec, "s3://") {
		return "", usagef("--store %q: want a directory or s3://bucket/prefix", spec)
	}
	return spec, nil
}

// The S3 package store: --store s3://BUCKET/PREFIX works wherever a
// directory does. Where the server is comes from, in order: the URL's query
// (?endpoint=URL&region=R&path_style=BOOL&part_size_mib=N&concurrency=N),
// the environment (KELPIE_S3_ENDPOINT, KELPIE_S3_REGION,
// KELPIE_S3_PATH_STYLE), then the AWS chain (AWS_REGION, AWS_PROFILE, shared
// config). Credentials come only from the AWS chain (environment, shared
// config and credentials files, SSO, ...), never from the URL. A flag
// overrides the URL's query and the environment.
type s3Flags struct {
	endpoint, region, pathStyle *string
}

func addS3Flags(fs *flag.FlagSet) *s3Flags {
	return &s3Flags{
		endpoint:  fs.String("s3-endpoint", "", "S3 API URL for an s3:// store that is not AWS (env KELPIE_S3_ENDPOINT)"),
		region:    fs.String("s3-region", "", "region of an s3:// store (env KELPIE_S3_REGION, then AWS_REGION)"),
		pathStyle: fs.String("s3-path-style", "", "true: address buckets as ENDPOINT/BUCKET (default when an endpoint is set)"),
	}
}

// storeSpec folds the flags into an s3:// store URL.
func (f *s3Flags) storeSpec(spec string) (string, error) {
	set := map[string]string{"endpoint": *f.endpoint, "region": *f.region, "path_style": *f.pathStyle}
	if *f.endpoint == "" && *f.region == "" && *f.pathStyle == "" {
		return spec, nil
	}
	if !strings.HasPrefix(spec, "s3://") {
		return "", usagef("--s3-* flags need --store s3://BUCKET/PREFIX")
	}
	if v := *f.pathStyle; v != "" {
		if _, err := strconv.ParseBool(v); err != nil {
			return "", usagef("--s3-path-style %q: want true or false", v)
		}
	}
	u, err := url.Parse(spec)
	if err != nil {
		return "", usagef("--store %q: %v", spec, err)
	}
	q := u.Query()
	for _, k := range []string{"endpoint", "region", "path_style"} {
		if set[k] != "" {
			q.Set(k, set[k])
		}
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}
