package service_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/mem"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

func diskImage(b []byte, sum string) *vm.DiskImage {
	return vm.NewDiskImage(vm.DiskMetadata{SizeBytes: 64 << 20, Filesystem: "ext4", Format: "test", PayloadBytes: int64(len(b)), SHA256: sum},
		vm.BytesPayload(b), nil)
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// A checkpoint's disk becomes the package's disk section, after the blob,
// with its own checksum, and the manifest records it and the network; a
// disk payload that is not what its metadata says is refused before
// anything is visible; a copy is marked so. A backend that cannot take a
// disk refuses the restore.
func TestCheckpointCarriesItsDisk(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	src := running(t, a, nil)
	data := []byte("the disk's allocated blocks")
	pkg, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, KeepSource: true, Disk: diskImage(data, sha(data))})
	if err != nil {
		t.Fatal(err)
	}
	sec, ok := pkg.Section(teleport.SectionDisk)
	if !ok || pkg.Disk == nil || sec.SHA256 != sha(data) || sec.Size != int64(len(data)) || !pkg.SourceKept {
		t.Fatalf("package %+v, disk section %+v", pkg, sec)
	}
	r, err := store.Open(ctx, pkg.ID)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(io.NewSectionReader(r, sec.Offset, sec.Size))
	r.Close()
	if string(got) != string(data) {
		t.Fatalf("disk section holds %q", got)
	}

	_, err = a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindCheckpoint, KeepSource: true, PackageID: "bad-disk",
		Disk: diskImage(data, sha([]byte("other")))})
	if !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("a disk that is not its checksum: %v", err)
	}
	if _, err := store.Stat(ctx, "bad-disk"); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("the refused package is visible: %v", err)
	}

	b := newHost(store, sim.Options{HostID: "b"})
	_, _, err = b.svc.In(ctx, pkg.ID, vm.Config{VCPUs: 1, MemoryMiB: 256}, service.InOptions{})
	if !errors.Is(err, vm.ErrNoDisk) || errors.Is(err, vm.ErrLeftBehind) {
		t.Fatalf("a disk into a backend without disks: %v", err)
	}
}

// A restore that makes a second live copy gives the guest its identity
// before In returns: its hostname and a reseeded RNG, different for each
// copy; without one the copies share the source's.
func TestInGivesCopiesTheirIdentity(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	a := newHost(store, sim.Options{HostID: "a"})
	src := running(t, a, map[string]string{sim.KeyRNG: "shared"})
	pkg, err := a.svc.Out(ctx, src, service.OutRequest{AgentID: "ag", Kind: teleport.KindTeleport, KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{"shared": true}
	for i, name := range []string{"c1", "c2"} {
		e := make([]byte, 32)
		e[0] = byte(i + 1)
		inst, _, err := a.svc.In(ctx, pkg.ID, vm.Config{}, service.InOptions{Identity: &vm.Identity{Hostname: name, Entropy: e}})
		if err != nil {
			t.Fatal(err)
		}
		g := guest(inst)
		if g[sim.KeyHostname] != name || seen[g[sim.KeyRNG]] {
			t.Fatalf("copy %s: guest %v", name, g)
		}
		seen[g[sim.KeyRNG]] = true
	}
	plain, _, err := a.svc.In(ctx, pkg.ID, vm.Config{}, service.InOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if g := guest(plain); g[sim.KeyRNG] != "shared" {
		t.Fatalf("a restore without an identity changed the guest: %v", g)
	}
	// Too little entropy is refused, and the VM removed.
	if _, _, err := a.svc.In(ctx, pkg.ID, vm.Config{}, service.InOptions{Identity: &vm.Identity{Hostname: "c3", Entropy: []byte{1}}}); !errors.Is(err, vm.ErrInvalidConfig) {
		t.Fatalf("1 byte of entropy: %v", err)
	}
}
