package vm_test

import (
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/kelpie/teleport/vm"
)

// Restore staging: a backend copies each payload to its staging file and
// checks its SHA-256 in the same, pipelined pass (vm.Stage). The baseline
// is the obvious two-pass way: vm.VerifyPayloads, then io.Copy.
// The payload is a section of a file, as the service hands a restore
// the blob in a store/fs package (a *vm.SectionPayload); the Whole
// variants read a *vm.FilePayload, where io.Copy can use copy_file_range.
const benchPayloadBytes = 64 << 20

func benchPayload(b *testing.B) (*vm.Snapshot, string) {
	b.Helper()
	dir := b.TempDir()
	p := filepath.Join(dir, "payload")
	fh, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(fh, rand.Reader, benchPayloadBytes); err != nil {
		b.Fatal(err)
	}
	fh.Close()
	sum, err := vm.HashFile(p)
	if err != nil {
		b.Fatal(err)
	}
	fp, _ := vm.NewFilePayload(p)
	md := vm.SnapshotMetadata{SnapshotID: "bench", DeviceStateSHA256: sum.SHA256, DeviceStateSize: sum.Size}
	return vm.NewSnapshot(md, fp, nil, nil), dir
}

// sectionOf turns the file payload into a section payload over the file.
func sectionOf(b *testing.B, snap *vm.Snapshot) *vm.Snapshot {
	fh, err := os.Open(snap.DeviceState.(*vm.FilePayload).Path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { fh.Close() })
	return vm.NewSnapshot(snap.Metadata, &vm.SectionPayload{R: fh, N: snap.DeviceState.Size()}, nil, nil)
}

func BenchmarkStageSectionOnePass(b *testing.B) {
	snap, dir := benchPayload(b)
	benchOnePass(b, sectionOf(b, snap), dir)
}

func BenchmarkStageSectionBaselineTwoPass(b *testing.B) {
	snap, dir := benchPayload(b)
	benchTwoPass(b, sectionOf(b, snap), dir)
}

func BenchmarkStageWholeOnePass(b *testing.B) {
	snap, dir := benchPayload(b)
	benchOnePass(b, snap, dir)
}

func BenchmarkStageWholeBaselineTwoPass(b *testing.B) {
	snap, dir := benchPayload(b)
	benchTwoPass(b, snap, dir)
}

func benchOnePass(b *testing.B, snap *vm.Snapshot, dir string) {
	out := filepath.Join(dir, "staged")
	b.SetBytes(benchPayloadBytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		os.Remove(out)
		err := vm.Stage(snap, func(r io.Reader) error {
			fh, err := os.Create(out)
			if err != nil {
				return err
			}
			_, err = io.Copy(fh, r)
			if cerr := fh.Close(); err == nil {
				err = cerr
			}
			return err
		}, nil)
		if err != nil {
			b.Fatal(err)
		}
	}
}

func benchTwoPass(b *testing.B, snap *vm.Snapshot, dir string) {
	out := filepath.Join(dir, "staged")
	b.SetBytes(benchPayloadBytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		os.Remove(out)
		if err := vm.VerifyPayloads(snap); err != nil {
			b.Fatal(err)
		}
		rc, err := snap.DeviceState.Open()
		if err != nil {
			b.Fatal(err)
		}
		fh, err := os.Create(out)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.Copy(fh, rc); err != nil {
			b.Fatal(err)
		}
		fh.Close()
		rc.Close()
	}
}
