package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// backendOpener makes a factory for one backend on this host.
type backendOpener func(ctx context.Context, e *env, hostID string) (vm.Factory, error)

// backends maps a --backend name to its opener; each backend's file adds
// itself in init. Lookups go through backendNames for a stable order.
var backends = map[string]backendOpener{
	"sim": func(ctx context.Context, e *env, hostID string) (vm.Factory, error) {
		return sim.NewFactory(sim.Options{HostID: hostID, Arch: vm.HostArchitecture(), BaseImageVersion: baseImageVersion}), nil
	},
}

// baseImageVersion is the guest image version this build boots.
const baseImageVersion = "1.0.0"

func backendNames() []string {
	var n []string
	for k := range backends {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// defaultBackend is KELPIE_BACKEND, else qemu when built in, else sim.
func defaultBackend(e *env) string {
	if b := e.getenv("KELPIE_BACKEND"); b != "" {
		return b
	}
	if _, ok := backends["qemu"]; ok {
		return "qemu"
	}
	return "sim"
}

func openFactory(ctx context.Context, e *env, backend string) (vm.Factory, error) {
	if backend == "" {
		backend = defaultBackend(e)
	}
	open, ok := backends[backend]
	if !ok {
		return nil, usagef("unknown backend %q (this build has: %s)", backend, strings.Join(backendNames(), ", "))
	}
	id, err := hostID(e)
	if err != nil {
		return nil, err
	}
	return open(ctx, e, id)
}

// hostTarget describes this host for restore rules.
func hostTarget(ctx context.Context, e *env) (vm.HostInfo, error) {
	f, err := openFactory(ctx, e, "")
	if err != nil {
		return vm.HostInfo{}, err
	}
	return f.Host(), nil
}

// hostID is this home's stable host id, made on first use. Two homes on one
// machine are two hosts.
func hostID(e *env) (string, error) {
	if id := e.getenv("KELPIE_HOST_ID"); id != "" {
		return id, nil
	}
	dir := home(e)
	p := filepath.Join(dir, "host-id")
	if b, err := os.ReadFile(p); err == nil {
		if id := strings.TrimSpace(string(b)); id != "" {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read host id: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create KELPIE_HOME %s: %w", dir, err)
	}
	var b [8]byte
	rand.Read(b[:])
	id := "host-" + hex.EncodeToString(b[:])
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("write host id: %w", err)
	}
	// Link, not rename: if another kelpie made the id first, keep theirs.
	if err := os.Link(tmp, p); err != nil {
		os.Remove(tmp)
		if b, rerr := os.ReadFile(p); rerr == nil && strings.TrimSpace(string(b)) != "" {
			return strings.TrimSpace(string(b)), nil
		}
		return "", fmt.Errorf("write host id: %w", err)
	}
	os.Remove(tmp)
	return id, nil
}

// newPackageID makes a fresh random package id.
func newPackageID(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return fmt.Sprintf("%s-%s", prefix, hex.EncodeToString(b[:]))
}
