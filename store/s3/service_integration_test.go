package s3

import (
	"bytes"
	"context"
	"strconv"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// A simulated VM teleports from one host to another through the server,
// each host with its own store client.
func TestIntegrationTeleportThroughS3(t *testing.T) {
	a := realStore(t, "", nil)
	b := realStore(t, a.prefix, nil) // another host's client, same bucket and prefix
	ctx := context.Background()
	const memBytes = 24 << 20 // several parts and chunks
	mk := func(st teleport.Store, host string) (*sim.Factory, *service.Service) {
		f := sim.NewFactory(sim.Options{HostID: host, MemoryBytes: memBytes})
		n := 0
		return f, service.New(st, f, service.WithClock(f.Options().Clock),
			service.WithIDs(func() string { n++; return host + "-pkg-" + strconv.Itoa(n) }))
	}
	fa, sa := mk(a, "host-a")
	_, sb := mk(b, "host-b")
	src, err := fa.Create(ctx, vm.Config{VCPUs: 2, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{"counter": "41", "name": "agent"} {
		if _, err := src.Exec(ctx, "set", []string{k, v}, vm.ExecOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	src.Exec(ctx, "incr", []string{"counter"}, vm.ExecOptions{})
	pkg, err := sa.Out(ctx, src, service.OutRequest{AgentID: "ag-1", AgentState: []byte("st"), Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	if src.State() != vm.StateStopped {
		t.Fatalf("source %s after a move", src.State())
	}
	if pkg.SizeBytes < memBytes {
		t.Fatalf("package of %d bytes is smaller than guest memory", pkg.SizeBytes)
	}
	dst, got, err := sb.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(ctx)
	g := dst.(*sim.VM).GuestState()
	if dst.State() != vm.StateRunning || g["counter"] != "42" || g["name"] != "agent" || string(got.AgentState) != "st" {
		t.Fatalf("restored %s with %v", dst.State(), g)
	}
	res, err := dst.Exec(ctx, "get", []string{"counter"}, vm.ExecOptions{})
	if err != nil || !bytes.Contains(res.Stdout, []byte("42")) {
		t.Fatalf("guest answers %+v (%v)", res, err)
	}
}
