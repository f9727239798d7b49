package host_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
)

// Two Kelpie hosts in one program, with the simulated backend: a VM moves
// from host-a to host-b through a filesystem package store, memory and
// all. With the QEMU backend (host.DefaultBackends) the same calls move a
// real VM.
func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "kelpie-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	store := filepath.Join(dir, "packages")
	open := func(name string) *host.Host {
		h, err := host.Open(ctx, host.Options{Home: filepath.Join(dir, name), Backends: []host.Backend{host.SimBackend()}})
		if err != nil {
			log.Fatal(err)
		}
		return h
	}
	a, b := open("host-a"), open("host-b")
	defer a.Close()
	defer b.Close()

	if _, err := a.CreateVM(ctx, host.VMSpec{Name: "agent"}); err != nil {
		log.Fatal(err)
	}
	if _, err := a.Exec(ctx, "agent", "set", []string{"task", "summarise-logs"}, vm.ExecOptions{}); err != nil {
		log.Fatal(err)
	}
	out, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("package kind:", out.Package.Kind, "- source removed:", out.SourceRemoved)

	in, err := b.TeleportIn(ctx, out.Package.ID, host.InRequest{Store: store, Name: "agent"})
	if err != nil {
		log.Fatal(err)
	}
	res, err := b.Exec(ctx, "agent", "get", []string{"task"}, vm.ExecOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("on host-b the VM is %s and remembers: %s", in.VM.State, res.Stdout)
	// Output:
	// package kind: teleport - source removed: true
	// on host-b the VM is running and remembers: summarise-logs
}

// Suspend keeps a whole VM in a package on its own host, with no
// hypervisor running; resume brings it back under its name.
func ExampleHost_SuspendVM() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "kelpie-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	h, err := host.Open(ctx, host.Options{Home: dir, Backends: []host.Backend{host.SimBackend()}})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	h.CreateVM(ctx, host.VMSpec{Name: "agent"})
	h.Exec(ctx, "agent", "set", []string{"turn", "7"}, vm.ExecOptions{})

	pkg, err := h.SuspendVM(ctx, "agent", "")
	if err != nil {
		log.Fatal(err)
	}
	info, _ := h.VM(ctx, "agent")
	fmt.Println("suspended into a", pkg.Kind, "package; the VM is", info.State)

	if _, err := h.ResumeVM(ctx, "agent"); err != nil {
		log.Fatal(err)
	}
	res, _ := h.Exec(ctx, "agent", "get", []string{"turn"}, vm.ExecOptions{})
	fmt.Printf("resumed; turn = %s", res.Stdout)
	// Output:
	// suspended into a suspend package; the VM is suspended
	// resumed; turn = 7
}

// Every restore rule, for one package on one host: here a suspend package
// looked at from another host.
func ExampleHost_ExplainPackage() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "kelpie-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	store := filepath.Join(dir, "packages")
	open := func(name, id string) *host.Host {
		h, err := host.Open(ctx, host.Options{Home: filepath.Join(dir, name), HostID: id, Backends: []host.Backend{host.SimBackend()}})
		if err != nil {
			log.Fatal(err)
		}
		return h
	}
	a, b := open("a", "host-a"), open("b", "host-b")
	defer a.Close()
	defer b.Close()
	a.CreateVM(ctx, host.VMSpec{Name: "agent"})
	out, err := a.TeleportOut(ctx, "agent", host.OutRequest{Store: store, Kind: "suspend", KeepSource: true})
	if err != nil {
		log.Fatal(err)
	}
	e, err := b.ExplainPackage(ctx, store, out.Package.ID)
	if err != nil {
		log.Fatal(err)
	}
	for _, r := range e.Rules {
		fmt.Printf("%-13s %v\n", r.Rule, r.OK)
	}
	fmt.Println("can restore on host-b:", e.CanRestore)
	// Output:
	// manifest      true
	// architecture  true
	// base-image    true
	// host          false
	// backend       true
	// backend-facts true
	// can restore on host-b: false
}

// Verify re-reads a package and checks every section against the
// checksums its manifest records.
func ExampleHost_VerifyPackage() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "kelpie-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	h, err := host.Open(ctx, host.Options{Home: dir, Backends: []host.Backend{host.SimBackend()}})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	h.CreateVM(ctx, host.VMSpec{Name: "agent"})
	out, err := h.TeleportOut(ctx, "agent", host.OutRequest{KeepSource: true})
	if err != nil {
		log.Fatal(err)
	}
	v, err := h.VerifyPackage(ctx, "", out.Package.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ok:", v.OK, "sections:", v.Sections)
	// Output:
	// ok: true sections: [blob chunks]
}
