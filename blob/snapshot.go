package blob

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// The one mapping between a vm.Snapshot and a KLP1 blob: the metadata
// section is the snapshot's metadata as JSON, the snapshot section its
// device state, the memory section its guest memory. Every writer of a
// snapshot blob (the teleport service, `kelpie vm snapshot`, the
// simulation) and every reader goes through EncodeSnapshot and
// OpenSnapshot.

// EncodeSnapshot writes snap as a version 1 blob to w, streaming each
// payload once, and returns the bytes written. While it streams it checks
// each payload against the size and SHA-256 the metadata records: a
// payload that changed after its checksum was taken, or a non-empty
// payload without a recorded checksum, would make a blob that no host can
// restore, so it fails with vm.ErrCorrupt instead. Any payload streams,
// whatever it is backed by.
func EncodeSnapshot(w io.Writer, snap *vm.Snapshot) (int64, error) {
	md := snap.Metadata
	meta, err := md.Marshal()
	if err != nil {
		return 0, fmt.Errorf("snapshot %s: encode metadata: %w", md.SnapshotID, err)
	}
	type payload struct {
		name string
		p    vm.Payload
		size int64
		sum  string
	}
	ps := [2]payload{{vm.SectionDeviceState, snap.DeviceState, md.DeviceStateSize, md.DeviceStateSHA256},
		{vm.SectionMemory, snap.Memory, md.MemorySize, md.MemorySHA256}}
	var secs [2]Section
	var hashes [2]*vm.AsyncHash
	sums := [2]string{}
	defer func() {
		for i, h := range hashes {
			if h != nil && sums[i] == "" {
				h.Sum() // ends its goroutine
			}
		}
	}()
	for i, p := range ps {
		n := vm.PayloadSize(p.p)
		switch {
		case n != p.size:
			return 0, fmt.Errorf("snapshot %s: %s payload has %d bytes, its metadata says %d: %w", md.SnapshotID, p.name, n, p.size, vm.ErrCorrupt)
		case n == 0:
			continue
		case p.sum == "":
			return 0, fmt.Errorf("snapshot %s: %s payload has no recorded checksum, so no host could restore it: %w", md.SnapshotID, p.name, vm.ErrCorrupt)
		}
		rc, err := p.p.Open()
		if err != nil {
			return 0, fmt.Errorf("snapshot %s: open %s payload: %w", md.SnapshotID, p.name, err)
		}
		defer rc.Close()
		hashes[i] = vm.NewAsyncHash(sha256.New())
		secs[i] = Section{R: io.TeeReader(rc, hashes[i]), N: n}
	}
	written, err := Encode(w, Section{R: bytes.NewReader(meta), N: int64(len(meta))}, secs[0], secs[1])
	for i, h := range hashes {
		if h == nil {
			continue
		}
		sums[i] = hex.EncodeToString(h.Sum())
		if err == nil && sums[i] != ps[i].sum {
			err = fmt.Errorf("snapshot %s: %s payload differs from its recorded checksum (sha256 %.12s, recorded %.12s): %w", md.SnapshotID, ps[i].name, sums[i], ps[i].sum, vm.ErrCorrupt)
		}
	}
	return written, err
}

// OpenSnapshot maps the blob of the given size in r onto a vm.Snapshot:
// it validates the header, parses the metadata (at most 1 MiB, whatever
// the header claims) and returns payloads that read the sections from r on
// demand, never whole. Their checksums are verified where they are used
// (vm.Stage), not here.
func OpenSnapshot(r io.ReaderAt, size int64) (*vm.Snapshot, error) {
	b, err := Open(r, size)
	if err != nil {
		return nil, err
	}
	md, err := vm.ParseMetadata(b.Metadata())
	if err != nil {
		return nil, err
	}
	var state, memory vm.Payload
	if n := int64(b.Header.SnapshotLen); n > 0 {
		state = &vm.SectionPayload{R: r, Offset: b.SnapshotOffset(), N: n}
	}
	if n := int64(b.Header.MemoryLen); n > 0 {
		memory = &vm.SectionPayload{R: r, Offset: b.MemoryOffset(), N: n}
	}
	return vm.NewSnapshot(md, state, memory, nil), nil
}

// ErrNotItsManifest: a package's blob is not the one its manifest
// describes (its metadata or its sections differ).
var ErrNotItsManifest = errors.New("blob does not match its manifest")

// OpenPackage maps the blob of a package, whose body of size bytes r
// holds, onto a vm.Snapshot (OpenSnapshot), after checking that the blob is
// the one the manifest describes: its metadata section byte for byte the
// manifest's copy, its payload sizes the recorded ones. The payloads'
// checksums are verified where they are used (vm.Stage). A mismatch is
// ErrNotItsManifest, a malformed blob one of the format's errors
// (ErrorKind), anything else a failed read.
func OpenPackage(pkg *teleport.Package, r io.ReaderAt, size int64) (*vm.Snapshot, error) {
	sec, ok := pkg.Section(teleport.SectionBlob)
	if !ok {
		// A package from before sections is all blob.
		sec = teleport.Section{Name: teleport.SectionBlob, Size: size}
	}
	if sec.Offset < 0 || sec.Size < 0 || sec.Offset > size-sec.Size {
		return nil, fmt.Errorf("package %s: its blob section ends at %d of a %d-byte body: %w", pkg.ID, sec.Offset+sec.Size, size, ErrNotItsManifest)
	}
	br := io.NewSectionReader(r, sec.Offset, sec.Size)
	b, err := Open(br, sec.Size)
	if err != nil {
		return nil, err
	}
	if pkg.Snapshot != nil {
		want, err := pkg.Snapshot.Marshal()
		if err != nil {
			return nil, err
		}
		got := make([]byte, min(b.Header.MetadataLen, uint64(len(want))+1))
		if _, err := io.ReadFull(b.Metadata(), got); err != nil {
			return nil, fmt.Errorf("package %s: read the blob's metadata: %w", pkg.ID, err)
		}
		if b.Header.MetadataLen != uint64(len(want)) || !bytes.Equal(got, want) {
			return nil, fmt.Errorf("package %s: the blob's metadata is not the manifest's: %w", pkg.ID, ErrNotItsManifest)
		}
	}
	snap, err := OpenSnapshot(br, sec.Size)
	if err != nil {
		return nil, err
	}
	md := snap.Metadata
	if vm.PayloadSize(snap.DeviceState) != md.DeviceStateSize || vm.PayloadSize(snap.Memory) != md.MemorySize {
		return nil, fmt.Errorf("package %s: the blob's sections have %d and %d bytes, its metadata says %d and %d: %w", pkg.ID,
			vm.PayloadSize(snap.DeviceState), vm.PayloadSize(snap.Memory), md.DeviceStateSize, md.MemorySize, ErrNotItsManifest)
	}
	return snap, nil
}
