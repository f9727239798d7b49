package blob_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
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
			n, err := blob.EncodeSnapshot(&buf, snap)
			if err != nil || n != int64(buf.Len()) {
				t.Fatalf("EncodeSnapshot = %d, %v (wrote %d)", n, err, buf.Len())
			}
			got, err := blob.OpenSnapshot(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
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
			if _, err := blob.EncodeSnapshot(io.Discard, snap); !errors.Is(err, vm.ErrCorrupt) {
				t.Fatalf("EncodeSnapshot = %v, want ErrCorrupt", err)
			}
		})
	}
	// A metadata-only blob (a checkpoint's) needs no checksums.
	md := vm.SnapshotMetadata{SnapshotID: "cp", Layout: vm.LayoutNone}
	var buf bytes.Buffer
	if _, err := blob.EncodeSnapshot(&buf, vm.NewSnapshot(md, nil, nil, nil)); err != nil {
		t.Fatal(err)
	}
	got, err := blob.OpenSnapshot(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
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
