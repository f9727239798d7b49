package qemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

const testDiskBytes = 128 << 20

// workspaceFiles are files written into a guest's /workspace from this
// host, kept to compare byte for byte.
type workspaceFiles map[string][]byte

// write puts a new file of random bytes (a few hundred KiB, not page
// aligned) into the guest's workspace.
func (w workspaceFiles) write(t *testing.T, ctx context.Context, inst vm.Instance, name string, n int) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	if _, err := inst.(*Instance).CopyToGuest(ctx, bytes.NewReader(b), WorkspaceDir+"/"+name, 0o644); err != nil {
		t.Fatal(err)
	}
	w[name] = b
}

// check reads every file back from the disk itself (the guest's page
// cache dropped first: a restored guest's cache is in its restored RAM)
// and compares it byte for byte.
func (w workspaceFiles) check(t *testing.T, ctx context.Context, inst vm.Instance) {
	t.Helper()
	mustShell(t, ctx, inst, "sync && echo 3 > /proc/sys/vm/drop_caches")
	for name, want := range w {
		var got bytes.Buffer
		if _, err := inst.(*Instance).CopyFromGuest(ctx, WorkspaceDir+"/"+name, &got); err != nil {
			t.Fatalf("%s: read %s: %v", inst.ID(), name, err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("%s: %s differs (%d bytes, want %d)", inst.ID(), name, got.Len(), len(want))
		}
	}
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func diskConfig(name string) vm.Config {
	cfg := testConfig(name, 256)
	cfg.Disk = vm.Disk{SizeBytes: testDiskBytes}
	return cfg
}

// The workspace disk through a chain of five suspend/resume and teleport
// cycles between two homes, with a write before each: every file ever
// written is there byte for byte, read from the disk, after every cycle,
// and the guest never rebooted. The disk is ext4 on /dev/vda, sparse on
// the host, and nothing writes to it after boot by itself.
func TestDiskChain(t *testing.T) {
	ctx := testCtx(t, 6*time.Minute)
	fa, fb := newTestFactory(t, "host-a"), newTestFactory(t, "host-b")
	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	svc := map[*Factory]*service.Service{fa: newService(st, fa), fb: newService(st, fb)}
	inst := vm.Instance(bootVM(t, ctx, fa, diskConfig("ws-0")))
	if got := mustShell(t, ctx, inst, "grep ' /workspace ' /proc/mounts | cut -d' ' -f1-3"); got != "/dev/vda /workspace ext4" {
		t.Fatalf("/workspace is %q", got)
	}
	disk := inst.(*Instance).diskPath()
	alloc := allocatedBytes(t, disk)
	if alloc > testDiskBytes/4 {
		t.Fatalf("a fresh %d MiB disk has %d bytes allocated: not sparse", testDiskBytes>>20, alloc)
	}
	// No lazy initialisation: an idle guest writes nothing to its disk.
	writes := func() string { return mustShell(t, ctx, inst, "awk '{print $5}' /sys/block/vda/stat") }
	w0 := writes()
	time.Sleep(3 * time.Second)
	if w1 := writes(); w1 != w0 || allocatedBytes(t, disk) != alloc {
		t.Fatalf("an idle guest wrote to its disk: %s -> %s writes, %d -> %d bytes allocated", w0, w1, alloc, allocatedBytes(t, disk))
	}
	boot := bootID(t, ctx, inst)

	files := workspaceFiles{}
	// Both package formats: version 1 carries the disk in a section of
	// its own (its allocated blocks), version 2 in the blob, chunked like
	// memory, so that a second package stores only the chunks that
	// changed.
	steps := []struct {
		kind     teleport.SnapshotKind
		from, to *Factory
		format   int
	}{
		{teleport.KindSuspend, fa, fa, blob.Version2},
		{teleport.KindTeleport, fa, fb, blob.Version1},
		{teleport.KindSuspend, fb, fb, blob.Version1},
		{teleport.KindTeleport, fb, fa, blob.Version2},
		{teleport.KindTeleport, fa, fb, blob.Version2},
	}
	from := fa
	for i, s := range steps {
		if s.from != from {
			t.Fatal("the chain is broken")
		}
		// The files so far on the disk itself, the new one dirty in the
		// guest's page cache: both must come through.
		mustShell(t, ctx, inst, "sync")
		files.write(t, ctx, inst, fmt.Sprintf("file-%d", i), 300<<10+i*4097)
		pkg, err := svc[s.from].Out(ctx, inst, service.OutRequest{AgentID: "ws", Kind: s.kind, Format: s.format})
		if err != nil {
			t.Fatalf("cycle %d (%s): Out: %v", i+1, s.kind, err)
		}
		sec, ok := pkg.Section(teleport.SectionDisk)
		d := pkg.Disk
		if d == nil || d.SizeBytes != testDiskBytes || d.Filesystem != "ext4" || pkg.Format != s.format {
			t.Fatalf("cycle %d: v%d package, disk %+v", i+1, pkg.Format, d)
		}
		t.Logf("cycle %d: %s v%d: %d bytes stored, %d new; disk %s", i+1, s.kind, pkg.Format, pkg.StoredBytes, pkg.NewBytes, d.Format)
		switch {
		case s.format == blob.Version1 && (!ok || d.InBlob() || sec.SHA256 != d.SHA256 || sec.Size != d.PayloadBytes):
			t.Fatalf("cycle %d: v1 disk %+v, section %+v", i+1, d, sec)
		case s.format == blob.Version1 && sec.Size > 16<<20:
			// Only allocated blocks travel: the metadata, the journal's
			// used part and the files, not the disk's size.
			t.Errorf("cycle %d: the disk section is %d bytes for %d KiB of files", i+1, sec.Size, len(files)*300)
		case s.format == blob.Version2 && (ok || !d.InBlob()):
			t.Fatalf("cycle %d: v2 disk %+v, section %v: want the disk in the blob", i+1, d, ok)
		case s.format == blob.Version2 && pkg.StoredBytes > 48<<20:
			// Zero pages of guest RAM and of the disk cost nothing.
			t.Errorf("cycle %d: %d bytes stored for a 256 MiB guest with a %d MiB disk", i+1, pkg.StoredBytes, testDiskBytes>>20)
		case i == len(steps)-1 && pkg.NewBytes*2 > pkg.StoredBytes:
			// The second version 2 teleport in a row: only what changed
			// since (a file on the disk, the pages the guest touched).
			t.Errorf("cycle %d: %d of %d bytes new, want the chunks of the previous package reused", i+1, pkg.NewBytes, pkg.StoredBytes)
		}
		inst.Destroy(ctx) // a move stopped it; its name is free again
		name := fmt.Sprintf("ws-%d", i+1)
		restored, _, err := svc[s.to].In(ctx, pkg.ID, vm.Config{Name: name}, service.InOptions{})
		if err != nil {
			t.Fatalf("cycle %d (%s): In: %v", i+1, s.kind, err)
		}
		inst, from = restored, s.to
		t.Cleanup(func() { restored.Destroy(context.Background()) })
		files.check(t, ctx, inst)
		if b := bootID(t, ctx, inst); b != boot {
			t.Fatalf("cycle %d: the guest rebooted", i+1)
		}
		if err := st.Delete(ctx, pkg.ID); err != nil {
			t.Fatal(err)
		}
	}
	// And the guest goes on writing to the disk it was restored with.
	files.write(t, ctx, inst, "after", 1<<20)
	files.check(t, ctx, inst)
}

// qemuWrapper is a QEMU binary that records in marker each time it is
// started for a VM (not for --version), to tell whether a refusal came
// before QEMU started.
func qemuWrapper(t *testing.T) (bin, marker string) {
	t.Helper()
	dir := t.TempDir()
	bin, marker = filepath.Join(dir, "qemu-wrapper"), filepath.Join(dir, "started")
	real, err := exec.LookPath(binaryDefault)
	if err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("#!/bin/sh\n[ \"$1\" = --version ] || echo started >> %q\nexec %q \"$@\"\n", marker, real)
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, marker
}

// A package whose disk section was damaged at rest is refused, as a
// checksum mismatch, before QEMU starts, and leaves no VM; the same
// package undamaged restores.
func TestDiskCorruptRefused(t *testing.T) {
	ctx := testCtx(t, 3*time.Minute)
	fa := newTestFactory(t, "host-a")
	bin, marker := qemuWrapper(t)
	fb, err := NewFactory(ctx, Options{Home: t.TempDir(), HostID: "host-b", Accel: AccelTCG, Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	src := bootVM(t, ctx, fa, diskConfig("ws"))
	files := workspaceFiles{}
	files.write(t, ctx, src, "data", 256<<10)
	// Version 1: the disk is a section of its own (a version 2 disk's
	// chunks are checked like memory's: blob tests).
	pkg, err := newService(st, fa).Out(ctx, src, service.OutRequest{AgentID: "ws", Kind: teleport.KindTeleport, KeepSource: true, Format: blob.Version1})
	if err != nil {
		t.Fatal(err)
	}
	sec, _ := pkg.Section(teleport.SectionDisk)
	body := st.BlobPath(pkg.ID)
	orig, err := os.ReadFile(body)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(orig)
	bad[sec.Offset+sec.Size/2] ^= 0x40
	if err := os.WriteFile(body, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	sb := newService(st, fb)
	_, _, err = sb.In(ctx, pkg.ID, vm.Config{Name: "ws"}, service.InOptions{})
	if !errors.Is(err, teleport.ErrChecksumMismatch) || !strings.Contains(err.Error(), "disk") {
		t.Fatalf("In of a damaged disk: %v, want a checksum refusal naming the disk", err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("QEMU was started for a package whose disk fails its checksum")
	}
	if infos, _ := fb.List(ctx); len(infos) != 0 {
		t.Fatalf("the refused restore left %v", infos)
	}
	if err := os.WriteFile(body, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	dst, _, err := sb.In(ctx, pkg.ID, vm.Config{Name: "ws"}, service.InOptions{})
	if err != nil {
		t.Fatalf("In of the undamaged package: %v", err)
	}
	defer dst.Destroy(context.Background())
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("the wrapper did not record QEMU's start: the check above proves nothing")
	}
	files.check(t, ctx, dst)
}

// A checkpoint carries the disk, not a tar of /workspace: the disk
// image, frozen consistent while the source runs on, restores into a
// freshly booted VM with every file byte for byte.
func TestDiskCheckpoint(t *testing.T) {
	ctx := testCtx(t, 3*time.Minute)
	fa, fb := newTestFactory(t, "host-a"), newTestFactory(t, "host-b")
	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	src := bootVM(t, ctx, fa, diskConfig("ws"))
	files := workspaceFiles{}
	files.write(t, ctx, src, "a", 200<<10)
	files.write(t, ctx, src, "dir/b", 64<<10+1)
	img, err := src.ExportDisk(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// The guest's workspace was thawed: it writes on.
	mustShell(t, ctx, src, "echo more > /workspace/after-export")
	pkg, err := newService(st, fa).Out(ctx, src, service.OutRequest{AgentID: "ws", Kind: teleport.KindCheckpoint, KeepSource: true, Disk: img})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := pkg.Section(teleport.SectionDisk); !ok || pkg.Disk == nil {
		t.Fatalf("checkpoint without its disk: %+v", pkg.Sections)
	}
	dst, _, err := newService(st, fb).In(ctx, pkg.ID, vm.Config{Name: "fresh", VCPUs: 1, MemoryMiB: 256}, service.InOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(context.Background())
	if bootID(t, ctx, dst) == bootID(t, ctx, src) {
		t.Fatal("the checkpoint restored the VM instead of booting a fresh one")
	}
	files.check(t, ctx, dst)
	if out, _ := shell(ctx, dst, "cat /workspace/after-export"); out != "" {
		t.Fatalf("a write after the export reached the checkpoint: %q", out)
	}
}
