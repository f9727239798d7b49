// Package host is one Kelpie host as a Go library: its home directory and
// host id, its VM backends by name, package stores by URL, its VMs by name
// (create, attach, list, exec, pause, resume, stop, remove), suspend and
// resume, teleport out and in, and package verify, explain and remove.
//
// The kelpie CLI and the host daemon are thin faces of this package: they
// parse their input, call it and print. A Go program can embed a host the
// same way. Everything it does to a VM goes through the vm contract and its
// role interfaces (vm.Attach, vm.WaitReady, ...), never a backend's
// concrete type, so a backend that gains a role works here at once.
//
// A Host is safe for concurrent use. It must never hold a snapshot in
// memory, and never leave a VM it made without either a record of it or an
// error that names it.
package host

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
)

// Options configure a Host. Only Home is required.
type Options struct {
	// Home is the host's directory ($KELPIE_HOME): its host id, its VMs,
	// its default package store. Two homes on one machine are two hosts.
	Home string
	// HostID overrides the id kept in Home/host-id (made on first use).
	HostID string
	// Backends are the VM backends this host offers, by name; default
	// DefaultBackends(BackendConfig{}).
	Backends []Backend
	// DefaultBackend is used when a request names none; default the first
	// of Backends that opens here.
	DefaultBackend string
	// OpenStore opens a package store by URL ("" is never passed: Host
	// uses Home/packages); default OpenStore.
	OpenStore func(ctx context.Context, url string) (teleport.Store, error)
	// OneShot says the caller exits after each call (the CLI): a new VM
	// must outlive it, so backends whose VMs cannot (no vm.Attacher) are
	// refused for new VMs with a one-line reason.
	OneShot bool
	// Clock dates packages and times steps; default the system clock.
	Clock service.Clock
	// Log receives warnings; default discarded.
	Log *slog.Logger
	// OnStep, when set, is told each step of a long operation (op is
	// "out", "in", "suspend", "resume") and how long it took.
	OnStep func(op, step string, d time.Duration)
}

// Error categories of the host, beside the vm and teleport ones.
var (
	// ErrNotDurable: the backend's VMs cannot outlive the process that
	// made them, and the caller exits after each call.
	ErrNotDurable = fmt.Errorf("backend VMs do not outlive this process: %w", vm.ErrUnsupported)
	// ErrUnknownBackend: no backend of that name on this host.
	ErrUnknownBackend = errors.New("unknown backend")
	// ErrInvalidRequest: the request itself is malformed (options that
	// do not go together); nothing was done.
	ErrInvalidRequest = errors.New("invalid request")
)

// Host is one Kelpie host. Make it with Open; Close it when done.
type Host struct {
	o  Options
	id string

	mu        sync.Mutex
	factories map[factoryKey]vm.Factory
	stores    map[string]teleport.Store
	live      map[string]*liveVM // VMs this process holds handles on, by name
	locks     map[string]*vmLock
}

type factoryKey struct{ backend, accel string }

// liveVM is a VM this process made or attached to.
type liveVM struct {
	inst    vm.Instance
	f       vm.Factory
	backend string
}

// Open opens the host whose home is o.Home, creating the home and its host
// id on first use.
func Open(ctx context.Context, o Options) (*Host, error) {
	if strings.TrimSpace(o.Home) == "" {
		return nil, fmt.Errorf("host: no home directory (set KELPIE_HOME): %w", vm.ErrInvalidConfig)
	}
	home, err := filepath.Abs(o.Home)
	if err != nil {
		return nil, fmt.Errorf("host: home %s: %w", o.Home, err)
	}
	o.Home = home
	if err := os.MkdirAll(o.Home, 0o755); err != nil {
		return nil, fmt.Errorf("host: create home %s: %w", o.Home, err)
	}
	if o.Backends == nil {
		o.Backends = DefaultBackends(BackendConfig{})
	}
	if o.OpenStore == nil {
		o.OpenStore = OpenStore
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	id := o.HostID
	if id == "" {
		if id, err = loadHostID(o.Home); err != nil {
			return nil, err
		}
	}
	return &Host{o: o, id: id, factories: map[factoryKey]vm.Factory{}, stores: map[string]teleport.Store{},
		live: map[string]*liveVM{}, locks: map[string]*vmLock{}}, nil
}

// ID is the host id: what suspend packages and host-bound snapshots are
// tied to.
func (h *Host) ID() string { return h.id }

// Home is the host's home directory.
func (h *Host) Home() string { return h.o.Home }

// Close releases the handles this process holds on VMs; the VMs of
// backends that outlive the process keep running, the others are
// destroyed with it.
func (h *Host) Close() error {
	h.mu.Lock()
	live := h.live
	h.live = map[string]*liveVM{}
	h.mu.Unlock()
	var errs []error
	for _, name := range sortedKeys(live) {
		lv := live[name]
		if _, ok := lv.f.(vm.Attacher); ok {
			errs = append(errs, vm.Detach(lv.inst))
			continue
		}
		dctx, cancel := vm.SettleContext(context.Background())
		err := lv.inst.Destroy(dctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("vm %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// BackendNames lists the host's backends in their order.
func (h *Host) BackendNames() []string {
	var out []string
	for _, b := range h.o.Backends {
		out = append(out, b.Name)
	}
	return out
}

func (h *Host) backend(name string) (Backend, error) {
	if name == "" {
		name = h.o.DefaultBackend
	}
	for _, b := range h.o.Backends {
		if b.Name == name {
			return b, nil
		}
	}
	return Backend{}, fmt.Errorf("backend %q (this host has %s): %w", name, strings.Join(h.BackendNames(), ", "), ErrUnknownBackend)
}

// defaultBackend is the backend a request that names none gets.
func (h *Host) defaultBackend(ctx context.Context) (string, error) {
	if h.o.DefaultBackend != "" {
		return h.o.DefaultBackend, nil
	}
	var why []string
	for _, b := range h.o.Backends {
		if _, err := h.Factory(ctx, b.Name, ""); err == nil {
			return b.Name, nil
		} else {
			why = append(why, err.Error())
		}
	}
	return "", fmt.Errorf("no backend runs here (%s): %w", strings.Join(why, "; "), vm.ErrUnsupported)
}

// Factory opens (once) the named backend's factory on this host; accel is
// a hint for backends with a choice of accelerator ("" for the default).
func (h *Host) Factory(ctx context.Context, backend, accel string) (vm.Factory, error) {
	if backend == "" {
		b, err := h.defaultBackend(ctx)
		if err != nil {
			return nil, err
		}
		backend = b
	}
	b, err := h.backend(backend)
	if err != nil {
		return nil, err
	}
	key := factoryKey{b.Name, accel}
	h.mu.Lock()
	f, ok := h.factories[key]
	h.mu.Unlock()
	if ok {
		return f, nil
	}
	f, err = b.Open(ctx, BackendEnv{Home: h.o.Home, HostID: h.id, Accel: accel})
	if err != nil {
		return nil, fmt.Errorf("backend %s: %w", b.Name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if prev, ok := h.factories[key]; ok {
		return prev, nil
	}
	h.factories[key] = f
	return f, nil
}

// Info describes this host as a backend's snapshots would record it and as
// the restore rules see it.
func (h *Host) Info(ctx context.Context, backend string) (vm.HostInfo, error) {
	f, err := h.Factory(ctx, backend, "")
	if err != nil {
		return vm.HostInfo{}, err
	}
	return f.Host(), nil
}

// DefaultStore is the URL of the host's own package store.
func (h *Host) DefaultStore() string { return filepath.Join(h.o.Home, "packages") }

// Store opens (once) the package store at url: a directory or
// s3://bucket/prefix; "" is the host's own store.
func (h *Host) Store(ctx context.Context, url string) (teleport.Store, error) {
	if url == "" {
		url = h.DefaultStore()
	}
	h.mu.Lock()
	s, ok := h.stores[url]
	h.mu.Unlock()
	if ok {
		return s, nil
	}
	s, err := h.o.OpenStore(ctx, url)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if prev, ok := h.stores[url]; ok {
		return prev, nil
	}
	h.stores[url] = s
	return s, nil
}

// service is the teleport service of one backend and store of this host.
func (h *Host) service(ctx context.Context, f vm.Factory, st teleport.Store, op string) *service.Service {
	opts := []service.Option{service.WithLogger(h.o.Log)}
	if h.o.Clock != nil {
		opts = append(opts, service.WithClock(h.o.Clock))
	}
	perCall, _ := ctx.Value(stepsKey{}).(StepObserver)
	if h.o.OnStep != nil || perCall != nil {
		opts = append(opts, service.WithStepObserver(func(step string, d time.Duration) {
			if h.o.OnStep != nil {
				h.o.OnStep(op, step, d)
			}
			if perCall != nil {
				perCall(op, step, d)
			}
		}))
	}
	return service.New(st, f, opts...)
}

// StepObserver is told each step of a long operation (see Options.OnStep).
type StepObserver func(op, step string, d time.Duration)

type stepsKey struct{}

// WithSteps returns a context whose operations also tell f their steps,
// beside Options.OnStep: one caller's progress (a daemon streaming it to
// its client).
func WithSteps(ctx context.Context, f StepObserver) context.Context {
	return context.WithValue(ctx, stepsKey{}, f)
}

func (h *Host) now() time.Time {
	if h.o.Clock != nil {
		return h.o.Clock.Now()
	}
	return time.Now()
}

// vmLock serialises this process's operations on one VM name.
type vmLock struct {
	ch   chan struct{}
	refs int
}

// lockVM waits for the VM name to be free in this process, or ctx.
func (h *Host) lockVM(ctx context.Context, name string) (func(), error) {
	h.mu.Lock()
	l := h.locks[name]
	if l == nil {
		l = &vmLock{ch: make(chan struct{}, 1)}
		h.locks[name] = l
	}
	l.refs++
	h.mu.Unlock()
	release := func() {
		h.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(h.locks, name)
		}
		h.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, fmt.Errorf("vm %s: waiting for another operation on it: %w", name, ctx.Err())
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
