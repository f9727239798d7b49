package host_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

func guestKey(t *testing.T, h *host.Host, name, key string) string {
	t.Helper()
	res, err := h.Exec(context.Background(), name, "get", []string{key}, vm.ExecOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(res.Stdout))
}

// ForkVM makes N copies named PREFIX1..PREFIXN from one snapshot while the
// source runs on; each copy gets its own hostname, agent id and RNG state,
// and the guest state the source had.
func TestForkVM(t *testing.T) {
	ctx := context.Background()
	h := openHost(t, t.TempDir(), host.Options{})
	if _, err := h.CreateVM(ctx, host.VMSpec{Name: "src"}); err != nil {
		t.Fatal(err)
	}
	h.Exec(ctx, "src", "set", []string{"work", "42"}, vm.ExecOptions{})
	h.Exec(ctx, "src", "set", []string{sim.KeyRNG, "source-state"}, vm.ExecOptions{})
	res, err := h.ForkVM(ctx, "src", host.ForkRequest{Count: 3, Prefix: "f"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 3 {
		t.Fatalf("forks: %+v", res.VMs)
	}
	rng := map[string]string{"source-state": "src"}
	for i, v := range res.VMs {
		name := "f" + string(rune('1'+i))
		if v.Name != name || v.State != "running" || v.AgentID != name || v.Hostname != name {
			t.Fatalf("fork %d: %+v", i, v)
		}
		if got := guestKey(t, h, name, "work"); got != "42" {
			t.Fatalf("fork %s lost the source's state: %q", name, got)
		}
		if got := guestKey(t, h, name, sim.KeyHostname); got != name {
			t.Fatalf("fork %s's guest hostname is %q", name, got)
		}
		r := guestKey(t, h, name, sim.KeyRNG)
		if other, dup := rng[r]; dup {
			t.Fatalf("fork %s shares its RNG state with %s", name, other)
		}
		rng[r] = name
	}
	if got := guestKey(t, h, "src", sim.KeyRNG); got != "source-state" {
		t.Fatalf("the source's RNG state changed: %q", got)
	}
	if v, err := h.VM(ctx, "src"); err != nil || v.State != "running" {
		t.Fatalf("source after the fork: %+v, %v", v, err)
	}
}

// A paused source forks too, and stays paused.
func TestForkPausedSource(t *testing.T) {
	ctx := context.Background()
	h := openHost(t, t.TempDir(), host.Options{})
	if _, err := h.CreateVM(ctx, host.VMSpec{Name: "src"}); err != nil {
		t.Fatal(err)
	}
	if err := h.PauseVM(ctx, "src"); err != nil {
		t.Fatal(err)
	}
	res, err := h.ForkVM(ctx, "src", host.ForkRequest{Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 2 || res.VMs[0].Name != "src-1" || res.VMs[1].State != "running" {
		t.Fatalf("forks of a paused source: %+v", res.VMs)
	}
	if v, _ := h.VM(ctx, "src"); v.State != "paused" {
		t.Fatalf("the paused source is %s after the fork", v.State)
	}
	out, err := h.TeleportOut(ctx, "src", host.OutRequest{KeepSource: true})
	if err != nil || out.Warning != "" {
		t.Fatalf("a copy of a paused source: %+v, %v", out, err)
	}
}

// A fork is refused before the source pauses when a copy's name is taken,
// when a fixed host port would be published by several copies, or when
// the count is out of range; nothing is made.
func TestForkRefusals(t *testing.T) {
	ctx := context.Background()
	h := openHost(t, t.TempDir(), host.Options{})
	for _, n := range []string{"src", "f2"} {
		if _, err := h.CreateVM(ctx, host.VMSpec{Name: n}); err != nil {
			t.Fatal(err)
		}
	}
	fixed := []vm.Publish{{HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}}
	for name, tc := range map[string]struct {
		req  host.ForkRequest
		want error
	}{
		"taken name":       {host.ForkRequest{Count: 3, Prefix: "f"}, vm.ErrAlreadyExists},
		"fixed port twice": {host.ForkRequest{Count: 2, Prefix: "g", Publish: fixed}, vm.ErrInvalidConfig},
		"zero copies":      {host.ForkRequest{Count: 0}, vm.ErrInvalidConfig},
		"too many copies":  {host.ForkRequest{Count: host.ForkCountMax + 1}, vm.ErrInvalidConfig},
	} {
		if _, err := h.ForkVM(ctx, "src", tc.req); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	vms, _ := h.VMs(ctx)
	if len(vms) != 2 {
		t.Fatalf("refused forks left %+v", vms)
	}
}

// A restore keeps the identity of a move and gives a copy its own: a
// package made with KeepSource, or any package restored with Fork.
func TestTeleportInIdentity(t *testing.T) {
	ctx := context.Background()
	h := openHost(t, t.TempDir(), host.Options{})
	if _, err := h.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		t.Fatal(err)
	}
	h.Exec(ctx, "agent", "set", []string{sim.KeyRNG, "state"}, vm.ExecOptions{})
	copyOut, err := h.TeleportOut(ctx, "agent", host.OutRequest{KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if !copyOut.Package.SourceKept || copyOut.Package.AgentID != "agent" {
		t.Fatalf("copy package %+v", copyOut.Package)
	}
	in, err := h.TeleportIn(ctx, copyOut.Package.ID, host.InRequest{Name: "copy"})
	if err != nil {
		t.Fatal(err)
	}
	if in.VM.AgentID != "copy" || guestKey(t, h, "copy", sim.KeyHostname) != "copy" || guestKey(t, h, "copy", sim.KeyRNG) == "state" {
		t.Fatalf("a copy of a kept source: %+v", in.VM)
	}
	moveOut, err := h.TeleportOut(ctx, "agent", host.OutRequest{})
	if err != nil {
		t.Fatal(err)
	}
	moved, err := h.TeleportIn(ctx, moveOut.Package.ID, host.InRequest{Name: "moved"})
	if err != nil {
		t.Fatal(err)
	}
	if moved.VM.AgentID != "agent" || guestKey(t, h, "moved", sim.KeyRNG) != "state" || guestKey(t, h, "moved", sim.KeyHostname) != "" {
		t.Fatalf("a move changed the agent's identity: %+v", moved.VM)
	}
	forked, err := h.TeleportIn(ctx, moveOut.Package.ID, host.InRequest{Name: "forked", Fork: true})
	if err != nil {
		t.Fatal(err)
	}
	if forked.VM.AgentID != "forked" || guestKey(t, h, "forked", sim.KeyHostname) != "forked" || guestKey(t, h, "forked", sim.KeyRNG) == "state" {
		t.Fatalf("--fork: %+v", forked.VM)
	}
}
