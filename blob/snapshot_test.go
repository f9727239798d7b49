package blob_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// streamOnly is a payload that is neither a file nor bytes: it streams.
type streamOnly struct{ b []byte }

func (s streamOnly) Size() int64 { return int64(len(s.b)) }
func (s streamOnly) Open() (io.ReadCloser, error) {
	return io.NopCloser(io.MultiReader(bytes.NewReader(s.b))), nil
}

func snapshotOf(state, mem []byte, p func([]byte) vm.Payload) *vm.Snapshot {
	md := vm.SnapshotMetadata{SnapshotID: "s1", VMID: "vm", Architecture: vm.ArchX86_64, IsFullSnapshot: true,
		Backend: "sim", Layout: vm.LayoutSplit,
		DeviceStateSHA256: sha(state), DeviceStateSize: int64(len(state)), MemorySHA256: sha(mem), MemorySize: int64(len(mem))}
	return vm.NewSnapshot(md, p(state), p(mem), nil)
}

// Every kind of payload streams into the blob and comes back byte for
// byte; the metadata section is the snapshot's metadata. (A copy of this
// mapping in the CLI used to write an empty section for any payload that
// was not a file, while the metadata still recorded its size.)
func TestSnapshotRoundTrip(t *testing.T) {
	state, mem := []byte("device state"), bytes.Repeat([]byte("ram!"), 5000)
	dir := t.TempDir()
	file := func(b []byte) vm.Payload {
		p := filepath.Join(dir, sha(b)[:8])
		os.WriteFile(p, b, 0o600)
		fp, err := vm.NewFilePayload(p)
		if err != nil {
			t.Fatal(err)
		}
		return fp
	}
	for name, mk := range map[string]func([]byte) vm.Payload{
		"file":   file,
		"bytes":  func(b []byte) vm.Payload { return vm.BytesPayload(b) },
		"stream": func(b []byte) vm.Payload { return streamOnly{b} },
	} {
		t.Run(name, func(t *testing.T) {
			snap := snapshotOf(state, mem, mk)
			var buf bytes.Buffer
			res, err := blob.EncodeSnapshot(context.Background(), &buf, snap, blob.EncodeOptions{Format: blob.Version1})
			if err != nil || res.Bytes != int64(buf.Len()) {
				t.Fatalf("EncodeSnapshot = %+v, %v (wrote %d)", res, err, buf.Len())
			}
			got, err := blob.OpenSnapshot(bytes.NewReader(buf.Bytes()), int64(buf.Len()), blob.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Metadata.SnapshotID != "s1" || got.Metadata.MemorySHA256 != sha(mem) {
				t.Fatalf("metadata %+v", got.Metadata)
			}
			if err := vm.VerifyPayloads(got); err != nil {
				t.Fatalf("round trip: %v", err)
			}
			for sec, want := range map[string][]byte{"device state": state, "memory": mem} {
				p := got.DeviceState
				if sec == "memory" {
					p = got.Memory
				}
				rc, _ := p.Open()
				b, _ := io.ReadAll(rc)
				if !bytes.Equal(b, want) {
					t.Fatalf("%s section differs", sec)
				}
			}
		})
	}
}

// fileBuf is an in-memory file (Write and WriteAt), for blobs with their
// chunks inline.
type fileBuf struct{ b []byte }

func (f *fileBuf) Write(p []byte) (int, error) { f.b = append(f.b, p...); return len(p), nil }
func (f *fileBuf) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(f.b) {
		f.b = append(f.b, make([]byte, end-len(f.b))...)
	}
	return copy(f.b[off:], p), nil
}

// Both versions map a snapshot the same way: a version 2 blob gives back
// the metadata and both payloads, its memory as a self-verifying image
// that a backend can stage into a RAM file, holes kept.
func TestSnapshotRoundTripV2(t *testing.T) {
	state, mem := []byte("device state"), make([]byte, 1<<20)
	copy(mem[300000:], bytes.Repeat([]byte("ram!"), 5000))
	snap := snapshotOf(state, mem, func(b []byte) vm.Payload { return vm.BytesPayload(b) })
	w := &fileBuf{}
	res, err := blob.EncodeSnapshot(context.Background(), w, snap, blob.EncodeOptions{})
	if err != nil || res.Format != blob.Version2 || res.Bytes != int64(len(w.b)) {
		t.Fatalf("EncodeSnapshot = %+v, %v", res, err)
	}
	got, err := blob.OpenSnapshot(bytes.NewReader(w.b), int64(len(w.b)), blob.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Metadata.SnapshotID != "s1" || got.Metadata.MemorySHA256 != sha(mem) {
		t.Fatalf("metadata %+v", got.Metadata)
	}
	if err := vm.VerifyPayloads(got); err != nil {
		t.Fatal(err)
	}
	if _, ok := got.Memory.(vm.ImagePayload); !ok {
		t.Fatalf("memory payload %T is not an image", got.Memory)
	}
	ram, err := os.Create(filepath.Join(t.TempDir(), "ram"))
	if err != nil {
		t.Fatal(err)
	}
	ram.Truncate(int64(len(mem)))
	if err := vm.StageImage(context.Background(), got, func(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }, ram, nil); err != nil {
		t.Fatal(err)
	}
	back, _ := os.ReadFile(ram.Name())
	if !bytes.Equal(back, mem) {
		t.Fatal("staged memory differs")
	}
	// A raw image without a checksum goes into version 2 only, and a
	// version 2 restore verifies it by its chunks.
	snap.Metadata.MemoryFormat, snap.Metadata.MemorySHA256 = vm.MemoryFormatImage, ""
	if _, err := blob.EncodeSnapshot(context.Background(), io.Discard, snap, blob.EncodeOptions{Format: blob.Version1}); !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("v1 of an unchecksummed image: %v", err)
	}
	w = &fileBuf{}
	if _, err := blob.EncodeSnapshot(context.Background(), w, snap, blob.EncodeOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err = blob.OpenSnapshot(bytes.NewReader(w.b), int64(len(w.b)), blob.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.VerifyPayloads(got); err != nil {
		t.Fatal(err)
	}
	ram.Truncate(0)
	ram.Truncate(int64(len(mem)))
	if err := vm.StageImage(context.Background(), got, func(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }, ram, nil); err != nil {
		t.Fatal(err)
	}
	back, _ = os.ReadFile(ram.Name())
	if !bytes.Equal(back, mem) {
		t.Fatal("staged image differs")
	}
	// A flipped bit in a chunk is refused by the staging, naming it.
	i := bytes.Index(w.b, bytes.Repeat([]byte("ram!"), 8))
	if i < 0 {
		// The run is compressed: flip a byte of the chunk data instead.
		i = 4096 + 10
	}
	w.b[i] ^= 1
	got, err = blob.OpenSnapshot(bytes.NewReader(w.b), int64(len(w.b)), blob.OpenOptions{Name: "package p1"})
	if err != nil {
		t.Fatal(err)
	}
	err = vm.StageImage(context.Background(), got, func(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }, ram, nil)
	if !errors.Is(err, vm.ErrCorrupt) || !strings.Contains(err.Error(), "package p1: chunk ") {
		t.Fatalf("damaged chunk: %v", err)
	}
}

// A blob no host could restore is never written: a payload without its
// checksum, one that changed after the checksum was taken, or one whose
// size is not the recorded one.
func TestEncodeSnapshotRefuses(t *testing.T) {
	state, mem := []byte("device state"), []byte("memory")
	for name, mut := range map[string]func(s *vm.Snapshot){
		"no checksum":       func(s *vm.Snapshot) { s.Metadata.MemorySHA256 = "" },
		"changed payload":   func(s *vm.Snapshot) { s.Memory = vm.BytesPayload("MEMORY") },
		"wrong size":        func(s *vm.Snapshot) { s.Metadata.DeviceStateSize++ },
		"payload vanishes":  func(s *vm.Snapshot) { s.Memory = nil },
		"state no checksum": func(s *vm.Snapshot) { s.Metadata.DeviceStateSHA256 = "" },
	} {
		t.Run(name, func(t *testing.T) {
			snap := snapshotOf(state, mem, func(b []byte) vm.Payload { return vm.BytesPayload(b) })
			mut(snap)
			for _, f := range []int{blob.Version1, blob.Version2} {
				w := &fileBuf{}
				if _, err := blob.EncodeSnapshot(context.Background(), w, snap, blob.EncodeOptions{Format: f}); !errors.Is(err, vm.ErrCorrupt) {
					t.Fatalf("EncodeSnapshot v%d = %v, want ErrCorrupt", f, err)
				}
			}
		})
	}
	// A metadata-only blob (a checkpoint's) needs no checksums.
	md := vm.SnapshotMetadata{SnapshotID: "cp", Layout: vm.LayoutNone}
	var buf bytes.Buffer
	if _, err := blob.EncodeSnapshot(context.Background(), &buf, vm.NewSnapshot(md, nil, nil, nil), blob.EncodeOptions{Format: blob.Version1}); err != nil {
		t.Fatal(err)
	}
	got, err := blob.OpenSnapshot(bytes.NewReader(buf.Bytes()), int64(buf.Len()), blob.OpenOptions{})
	if err != nil || got.DeviceState != nil || got.Memory != nil || got.Metadata.SnapshotID != "cp" {
		t.Fatalf("metadata-only blob: %+v, %v", got, err)
	}
}

// UnpackFile's promise: on error, the files it already wrote are gone.
func TestUnpackFileRemovesPartialOutput(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"md", "st", "mem"} {
		os.WriteFile(filepath.Join(dir, n), []byte(n+" bytes"), 0o600)
	}
	b := filepath.Join(dir, "blob")
	if err := blob.PackFiles(b, filepath.Join(dir, "md"), filepath.Join(dir, "st"), filepath.Join(dir, "mem")); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	// The last section cannot be renamed into place: a non-empty directory
	// holds its name.
	if err := os.MkdirAll(filepath.Join(out, "memory", "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := blob.UnpackFile(b, out)
	if err == nil || !strings.Contains(err.Error(), "memory") {
		t.Fatalf("UnpackFile = %v, want a failure on the memory section", err)
	}
	for _, n := range []string{"metadata", "snapshot"} {
		if _, err := os.Stat(filepath.Join(out, n)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind after the failed unpack (%v)", n, err)
		}
	}
}

// A version 2 blob carries a raw workspace disk image the way it carries
// memory: chunked, holes free, each chunk verified where it is staged;
// version 1 refuses one, and a blob whose disk section the metadata does
// not record (or the other way round) does not open.
func TestSnapshotDiskImageV2(t *testing.T) {
	ctx := context.Background()
	state, mem := []byte("device state"), make([]byte, 1<<20)
	copy(mem[4096:], "ram")
	disk := make([]byte, 4<<20)
	copy(disk[1024:], bytes.Repeat([]byte("superblock"), 100))
	// A file's bytes: random, so that its chunk is stored raw.
	file := make([]byte, 40000)
	rand.NewChaCha8([32]byte{1}).Read(file)
	copy(disk[3<<20:], file)
	snap := snapshotOf(state, mem, func(b []byte) vm.Payload { return vm.BytesPayload(b) })
	snap.Metadata.Disk = &vm.DiskMetadata{SizeBytes: int64(len(disk)), Filesystem: "ext4", Format: vm.DiskFormatImage, PayloadBytes: int64(len(disk))}
	snap.Disk = vm.BytesPayload(disk)
	if _, err := blob.EncodeSnapshot(ctx, &fileBuf{}, snap, blob.EncodeOptions{Format: blob.Version1}); !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("v1 with a raw disk image: %v, want ErrCorrupt", err)
	}
	w := &fileBuf{}
	res, err := blob.EncodeSnapshot(ctx, w, snap, blob.EncodeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(len(state) + len(mem) + len(disk)); res.LogicalBytes != want {
		t.Fatalf("logical bytes %d, want %d", res.LogicalBytes, want)
	}
	// Zero windows cost nothing: the disk's 4 MiB are stored in far less.
	if res.Bytes > 64<<10 {
		t.Fatalf("blob of %d bytes for a disk with %d bytes of data", res.Bytes, 1000+45000)
	}
	got, err := blob.OpenSnapshot(bytes.NewReader(w.b), int64(len(w.b)), blob.OpenOptions{Name: "blob d"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got.Disk.(vm.ImagePayload); !ok || !got.Metadata.Disk.InBlob() {
		t.Fatalf("disk payload %T, metadata %+v", got.Disk, got.Metadata.Disk)
	}
	if err := vm.VerifyPayloads(got); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ram, err := os.Create(filepath.Join(dir, "ram"))
	if err != nil {
		t.Fatal(err)
	}
	ram.Truncate(int64(len(mem)))
	diskPath := filepath.Join(dir, "disk.img")
	drain := func(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }
	if err := vm.StageImage(ctx, got, drain, ram, &vm.DiskTarget{Path: diskPath}); err != nil {
		t.Fatal(err)
	}
	back, _ := os.ReadFile(diskPath)
	if !bytes.Equal(back, disk) {
		t.Fatal("staged disk differs")
	}
	// blob unpack writes the disk out, and blob pack takes it back (and
	// refuses metadata that records a disk it is not given).
	blobFile := filepath.Join(dir, "snap.klp1")
	if err := os.WriteFile(blobFile, w.b, 0o644); err != nil {
		t.Fatal(err)
	}
	un := filepath.Join(dir, "un")
	if err := blob.UnpackFile(blobFile, un); err != nil {
		t.Fatal(err)
	}
	if back, _ := os.ReadFile(filepath.Join(un, "disk")); !bytes.Equal(back, disk) {
		t.Fatal("unpacked disk differs")
	}
	f := func(n string) string { return filepath.Join(un, n) }
	if _, err := blob.PackFilesV2(ctx, filepath.Join(dir, "nodisk.klp1"), f("metadata"), f("snapshot"), f("memory"), "", blob.V2Options{}); !errors.Is(err, blob.ErrMalformed) {
		t.Fatalf("pack without the disk the metadata records: %v, want ErrMalformed", err)
	}
	repacked := filepath.Join(dir, "repacked.klp1")
	if _, err := blob.PackFilesV2(ctx, repacked, f("metadata"), f("snapshot"), f("memory"), f("disk"), blob.V2Options{}); err != nil {
		t.Fatal(err)
	}
	rb, _ := os.ReadFile(repacked)
	again, err := blob.OpenSnapshot(bytes.NewReader(rb), int64(len(rb)), blob.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.VerifyPayloads(again); err != nil || vm.PayloadSize(again.Disk) != int64(len(disk)) {
		t.Fatalf("repacked blob: disk of %d bytes, %v", vm.PayloadSize(again.Disk), err)
	}
	// A backend without disks refuses the snapshot.
	if err := vm.StageImage(ctx, got, drain, ram, nil); !errors.Is(err, vm.ErrCorrupt) {
		t.Fatalf("staged into a backend without disks: %v", err)
	}
	// A damaged disk chunk is refused, naming the blob and the chunk.
	i := bytes.Index(w.b, file[:64])
	if i < 0 {
		t.Fatal("the disk's random chunk is not stored raw")
	}
	bad := bytes.Clone(w.b)
	bad[i] ^= 1
	got, err = blob.OpenSnapshot(bytes.NewReader(bad), int64(len(bad)), blob.OpenOptions{Name: "blob d"})
	if err != nil {
		t.Fatal(err)
	}
	err = vm.StageImage(ctx, got, drain, ram, &vm.DiskTarget{Path: diskPath})
	if !errors.Is(err, vm.ErrCorrupt) || !strings.Contains(err.Error(), "blob d: chunk ") {
		t.Fatalf("damaged disk chunk: %v", err)
	}
}
