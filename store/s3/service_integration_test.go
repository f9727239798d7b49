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
	// Version 2: the guest's memory is mostly zero pages, which cost
	// nothing; its chunks went to the store's chunk space.
	if pkg.Format != 2 || pkg.LogicalBytes < memBytes || pkg.Chunks == 0 || pkg.StoredBytes >= memBytes/100 {
		t.Fatalf("package: format %d, logical %d, stored %d bytes in %d chunks; want v2 standing for the %d-byte memory in far fewer",
			pkg.Format, pkg.LogicalBytes, pkg.StoredBytes, pkg.Chunks, memBytes)
	}
	// Version 1 carries the memory whole.
	src2, err := fa.Create(ctx, vm.Config{VCPUs: 2, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := src2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	p1, err := sa.Out(ctx, src2, service.OutRequest{AgentID: "ag-2", Kind: teleport.KindTeleport, Format: 1})
	if err != nil {
		t.Fatal(err)
	}
	if p1.SizeBytes < memBytes || p1.Format != 1 || p1.Chunks != 0 {
		t.Fatalf("v1 package of %d bytes (format %d, %d chunks): want the whole memory", p1.SizeBytes, p1.Format, p1.Chunks)
	}
	d1, _, err := sb.In(ctx, p1.ID, vm.Config{}, service.InOptions{})
	if err != nil {
		t.Fatalf("v1 package: %v", err)
	}
	d1.Destroy(ctx)
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
