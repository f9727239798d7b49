package blob

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// The one mapping between a vm.Snapshot and a KLP1 blob of either
// version: the metadata section is the snapshot's metadata as JSON, the
// snapshot (version 2: device state) section its device state, the memory
// section its guest memory. Every writer of a
// snapshot blob (the teleport service, `kelpie vm snapshot`, the
// simulation) and every reader goes through EncodeSnapshot and
// OpenSnapshot.

// EncodeOptions tune EncodeSnapshot.
type EncodeOptions struct {
	// Format is Version1 or Version2 (0: FormatDefault).
	Format int
	// V2 tunes a version 2 blob.
	V2 V2Options
}

// FormatDefault is the format a snapshot is packed in unless asked.
const FormatDefault = Version2

// ParseFormat reads a format name: v1, v2 (or 1, 2).
func ParseFormat(s string) (int, error) {
	switch s {
	case "v1", "1":
		return Version1, nil
	case "v2", "2":
		return Version2, nil
	}
	return 0, fmt.Errorf("blob format %q: want v1 or v2: %w", s, ErrUnsupportedVersion)
}

// EncodeSnapshot writes snap as a blob of o.Format to w, streaming each
// payload once. While it streams it checks each payload against the size
// and SHA-256 the metadata records: a payload that changed after its
// checksum was taken, or a non-empty payload without a recorded checksum,
// would make a blob that no host can restore, so it fails with
// vm.ErrCorrupt instead. The one exception is a raw memory image
// (vm.MemoryFormatImage) in a version 2 blob: its chunks' hashes stand
// for its checksum. Any payload streams, whatever it is backed by; a
// version 2 blob with its chunks inline needs w to be a file.
func EncodeSnapshot(ctx context.Context, w io.Writer, snap *vm.Snapshot, o EncodeOptions) (*Encoded, error) {
	md := snap.Metadata
	meta, err := md.Marshal()
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: encode metadata: %w", md.SnapshotID, err)
	}
	if o.Format == 0 {
		o.Format = FormatDefault
	}
	if o.Format != Version1 && o.Format != Version2 {
		return nil, fmt.Errorf("blob format %d: %w", o.Format, ErrUnsupportedVersion)
	}
	type payload struct {
		name string
		p    vm.Payload
		size int64
		sum  string
	}
	ps := [2]payload{{vm.SectionDeviceState, snap.DeviceState, md.DeviceStateSize, md.DeviceStateSHA256},
		{vm.SectionMemory, snap.Memory, md.MemorySize, md.MemorySHA256}}
	for i, p := range ps {
		n := vm.PayloadSize(p.p)
		switch {
		case n != p.size:
			return nil, fmt.Errorf("snapshot %s: %s payload has %d bytes, its metadata says %d: %w", md.SnapshotID, p.name, n, p.size, vm.ErrCorrupt)
		case n == 0 || p.sum != "":
		case i == 1 && md.MemoryFormat == vm.MemoryFormatImage && o.Format == Version2:
		case i == 1 && md.MemoryFormat == vm.MemoryFormatImage:
			return nil, fmt.Errorf("snapshot %s: a raw memory image without a checksum goes only in a version 2 blob: %w", md.SnapshotID, vm.ErrCorrupt)
		default:
			return nil, fmt.Errorf("snapshot %s: %s payload has no recorded checksum, so no host could restore it: %w", md.SnapshotID, p.name, vm.ErrCorrupt)
		}
	}
	// A raw disk image goes in the blob (version 2 only); a disk in any
	// other encoding travels beside it, in a package section of its own.
	var disk Input
	if md.Disk.InBlob() {
		if o.Format != Version2 {
			return nil, fmt.Errorf("snapshot %s: a raw disk image goes only in a version 2 blob: %w", md.SnapshotID, vm.ErrCorrupt)
		}
		if n := vm.PayloadSize(snap.Disk); n != md.Disk.SizeBytes || md.Disk.PayloadBytes != n {
			return nil, fmt.Errorf("snapshot %s: disk payload has %d bytes, its metadata says %d: %w", md.SnapshotID, n, md.Disk.SizeBytes, vm.ErrCorrupt)
		}
		disk = Input{Payload: snap.Disk, SHA256: md.Disk.SHA256}
	}
	if o.Format == Version2 {
		res, err := EncodeV2(ctx, w, meta, Input{Payload: snap.DeviceState, SHA256: md.DeviceStateSHA256},
			Input{Payload: snap.Memory, SHA256: md.MemorySHA256}, disk, o.V2)
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: %w", md.SnapshotID, err)
		}
		return res, nil
	}
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
		if n == 0 {
			continue
		}
		rc, err := p.p.Open()
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: open %s payload: %w", md.SnapshotID, p.name, err)
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
	if err != nil {
		return nil, err
	}
	return &Encoded{Format: Version1, Bytes: written, LogicalBytes: md.DeviceStateSize + md.MemorySize}, nil
}

// OpenSnapshot maps the blob of the given size in r, of either version,
// onto a vm.Snapshot: it validates the header (and a version 2 blob's
// tables), parses the metadata (at most 1 MiB, whatever the header
// claims) and returns payloads that read the sections from r on demand,
// never whole. A version 1 blob's checksums are verified where the
// payloads are used (vm.Stage); a version 2 blob's chunks are verified as
// they are read, and its memory payload (and disk payload, when the blob
// carries the workspace disk) is a vm.ImagePayload. A version 2 blob whose
// chunks live in a package store reads them through o.Chunks.
func OpenSnapshot(r io.ReaderAt, size int64, o OpenOptions) (*vm.Snapshot, error) {
	b, err := openBlob(r, size, o)
	if err != nil {
		return nil, err
	}
	return b.snapshot(r)
}

// openedBlob is a blob of either version, its header (and a version 2
// blob's tables) checked.
type openedBlob struct {
	v1 *Blob
	v2 *V2
}

func openBlob(r io.ReaderAt, size int64, o OpenOptions) (openedBlob, error) {
	v, err := Version(r, size)
	if err != nil {
		return openedBlob{}, err
	}
	if v == Version2 {
		b, err := OpenV2(r, size, o)
		return openedBlob{v2: b}, err
	}
	b, err := Open(r, size)
	return openedBlob{v1: b}, err
}

// metadata is the raw metadata section.
func (ob openedBlob) metadata() io.Reader {
	if ob.v2 != nil {
		return ob.v2.Metadata()
	}
	return ob.v1.Metadata()
}

// snapshot maps the blob, which r holds, onto a vm.Snapshot.
func (ob openedBlob) snapshot(r io.ReaderAt) (*vm.Snapshot, error) {
	md, err := vm.ParseMetadata(ob.metadata())
	if err != nil {
		return nil, err
	}
	if b := ob.v2; b != nil {
		state, err := b.DeviceState()
		if err != nil {
			return nil, err
		}
		mem, err := b.Memory()
		if err != nil {
			return nil, err
		}
		var memory vm.Payload
		if mem != nil {
			memory = mem
		}
		snap := vm.NewSnapshot(md, state, memory, nil)
		// The disk section is the raw disk image the metadata says is in
		// the blob, or absent.
		switch n := b.DiskBytes(); {
		case md.Disk.InBlob() && n != md.Disk.SizeBytes:
			return nil, malformed("the metadata records a %d-byte disk image in the blob, its disk section has %d", md.Disk.SizeBytes, n)
		case !md.Disk.InBlob() && n != 0:
			return nil, malformed("a %d-byte disk section that the metadata does not record", n)
		case n > 0:
			disk, err := b.Disk()
			if err != nil {
				return nil, err
			}
			snap.Disk = disk
		}
		return snap, nil
	}
	b := ob.v1
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
// checksums are verified where they are used (vm.Stage); a version 2
// blob's chunks are read through o.Chunks (the store's chunk space), each
// checked against its hash as it is read. A mismatch is
// ErrNotItsManifest, a malformed blob one of the format's errors
// (ErrorKind), anything else a failed read.
func OpenPackage(pkg *teleport.Package, r io.ReaderAt, size int64, o OpenOptions) (*vm.Snapshot, error) {
	sec, ok := pkg.Section(teleport.SectionBlob)
	if !ok {
		// A package from before sections is all blob.
		sec = teleport.Section{Name: teleport.SectionBlob, Size: size}
	}
	if sec.Offset < 0 || sec.Size < 0 || sec.Offset > size-sec.Size {
		return nil, fmt.Errorf("package %s: its blob section ends at %d of a %d-byte body: %w", pkg.ID, sec.Offset+sec.Size, size, ErrNotItsManifest)
	}
	br := io.NewSectionReader(r, sec.Offset, sec.Size)
	if o.Name == "" {
		o.Name = "package " + pkg.ID
	}
	ob, err := openBlob(br, sec.Size, o)
	if err != nil {
		return nil, err
	}
	if pkg.Snapshot != nil {
		want, err := pkg.Snapshot.Marshal()
		if err != nil {
			return nil, err
		}
		got, err := io.ReadAll(io.LimitReader(ob.metadata(), int64(len(want))+1))
		if err != nil {
			return nil, fmt.Errorf("package %s: read the blob's metadata: %w", pkg.ID, err)
		}
		if !bytes.Equal(got, want) {
			return nil, fmt.Errorf("package %s: the blob's metadata is not the manifest's: %w", pkg.ID, ErrNotItsManifest)
		}
	}
	snap, err := ob.snapshot(br)
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
