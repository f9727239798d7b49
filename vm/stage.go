package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
)

// Section names as errors and users see them.
const (
	SectionDeviceState = "device-state"
	SectionMemory      = "memory"
	SectionDisk        = "disk"
)

// A Sink consumes one payload section (writes it to a staging file,
// decodes it into guest RAM, ...). It must read r to its end or fail.
type Sink func(r io.Reader) error

// Stage is the one stage-and-verify path of every backend: it hands each
// payload of snap to its sink exactly once, and in that same pass checks
// that the payload has the size and SHA-256 its metadata records. Nothing a
// sink produced may be used unless Stage returns nil.
//
// A nil sink means the section must be empty. A non-empty section without
// a recorded checksum, a payload shorter or longer than recorded, and a
// checksum mismatch are ErrCorrupt, reported as such even when the damage
// also made the sink fail (the rest of the payload is then read and hashed
// so the two can be told apart). A payload that could not be read is
// reported as the read error it is: it says nothing about the snapshot.
//
// A backend without workspace disks stages with Stage, which refuses a
// snapshot that carries one; one with disks uses StageWithDisk.
func Stage(snap *Snapshot, deviceState, memory Sink) error {
	return StageWithDisk(context.Background(), snap, deviceState, memory, nil)
}

// DiskTarget is where a backend stages a workspace disk. A payload in the
// backend's own encoding streams into Stream; a raw disk image
// (DiskFormatImage) is written into a fresh file at Path, at its offsets,
// holes kept (without a Path it streams into Stream like any payload).
type DiskTarget struct {
	Stream Sink
	Path   string
}

// StageImage is StageWithDisk for a backend that loads guest memory from
// a RAM file: the memory payload goes into dst, a fresh file of the guest
// RAM's size, at its offsets, and pages that hold nothing stay holes. A
// memory image whose chunks carry their own hashes (ImagePayload) and has
// no recorded checksum is written in parallel, every chunk verified; any
// other payload streams through its recorded checksum as in Stage, its
// zero pages skipped. disk is where the workspace disk goes (nil: the
// backend has none, and a snapshot with one is refused). As with Stage,
// dst may be used only if StageImage returns nil.
func StageImage(ctx context.Context, snap *Snapshot, deviceState Sink, dst *os.File, disk *DiskTarget) error {
	return besideDisk(ctx, snap, disk, func(ctx context.Context, owner string) error {
		return stageImage(ctx, owner, snap, deviceState, dst)
	})
}

// besideDisk runs stage (the device state and memory) while snap's disk
// is staged into disk on a goroutine of its own; a failure of stage stops
// the disk's chunk fetches. The first error in section order is returned,
// after both are done.
func besideDisk(ctx context.Context, snap *Snapshot, disk *DiskTarget, stage func(ctx context.Context, owner string) error) error {
	md := snap.Metadata
	owner := "snapshot " + md.SnapshotID
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	diskErr := make(chan error, 1)
	go func() { diskErr <- StageDisk(ctx, owner, snap.Disk, md.Disk, disk) }()
	err := stage(ctx, owner)
	if err != nil {
		cancel()
	}
	if derr := <-diskErr; err == nil {
		err = derr
	}
	return err
}

func stageImage(ctx context.Context, owner string, snap *Snapshot, deviceState Sink, dst *os.File) error {
	md := snap.Metadata
	if err := StagePayload(owner, SectionDeviceState, snap.DeviceState, md.DeviceStateSize, md.DeviceStateSHA256, deviceState); err != nil {
		return err
	}
	img, ok := snap.Memory.(ImagePayload)
	if !ok || md.MemorySHA256 != "" {
		return StagePayload(owner, SectionMemory, snap.Memory, md.MemorySize, md.MemorySHA256, func(r io.Reader) error {
			return writeSparse(dst, r)
		})
	}
	if got := img.Size(); got != md.MemorySize {
		return fmt.Errorf("%s: %s section has %d bytes, metadata says %d: %w", owner, SectionMemory, got, md.MemorySize, ErrCorrupt)
	}
	if err := img.WriteImage(ctx, dst); err != nil {
		return fmt.Errorf("%s: stage %s section: %w", owner, SectionMemory, err)
	}
	return nil
}

// writeSparse copies r into dst from offset 0, skipping pages of zeros so
// that they stay holes in a fresh file.
func writeSparse(dst *os.File, r io.Reader) error {
	const page = 4096
	buf := make([]byte, 1<<20)
	var zero [page]byte
	var off int64
	for {
		n, err := io.ReadFull(r, buf)
		b := buf[:n]
		for len(b) > 0 {
			// A run of pages that hold data goes out in one write.
			run := 0
			for run < len(b) && !bytes.Equal(b[run:min(run+page, len(b))], zero[:min(page, len(b)-run)]) {
				run += min(page, len(b)-run)
			}
			if run > 0 {
				if _, werr := dst.WriteAt(b[:run], off); werr != nil {
					return werr
				}
			} else {
				run = min(page, len(b))
			}
			b, off = b[run:], off+int64(run)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// StageWithDisk is Stage with a target for the workspace disk payload
// too, verified the same way against Metadata.Disk. The disk is staged
// beside the other sections (its own reader, its own sink); the first
// error in section order is the one returned, after every section is done.
func StageWithDisk(ctx context.Context, snap *Snapshot, deviceState, memory Sink, disk *DiskTarget) error {
	md := snap.Metadata
	return besideDisk(ctx, snap, disk, func(_ context.Context, owner string) error {
		if err := StagePayload(owner, SectionDeviceState, snap.DeviceState, md.DeviceStateSize, md.DeviceStateSHA256, deviceState); err != nil {
			return err
		}
		return StagePayload(owner, SectionMemory, snap.Memory, md.MemorySize, md.MemorySHA256, memory)
	})
}

// StageDisk is StagePayload for a workspace disk described by md (nil: the
// payload must be empty) into t (nil: the backend has no disks): a
// snapshot's, or one that travels without a VM snapshot (a checkpoint's).
// A raw disk image whose chunks carry their own hashes is written into
// t.Path chunk by chunk, in parallel, each verified. owner names it in
// errors. On failure, what was written at t.Path must not be used.
func StageDisk(ctx context.Context, owner string, p Payload, md *DiskMetadata, t *DiskTarget) error {
	var size int64
	var sum string
	if md != nil {
		size, sum = md.PayloadBytes, md.SHA256
	}
	var sink Sink
	if t != nil {
		sink = t.Stream
	}
	if !md.InBlob() || t == nil || t.Path == "" {
		return StagePayload(owner, SectionDisk, p, size, sum, sink)
	}
	if md.PayloadBytes != md.SizeBytes {
		return fmt.Errorf("%s: %s section: a raw image of %d bytes for a %d-byte disk: %w", owner, SectionDisk, md.PayloadBytes, md.SizeBytes, ErrCorrupt)
	}
	f, err := os.OpenFile(t.Path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(md.SizeBytes)
	if err == nil {
		img, ok := p.(ImagePayload)
		switch {
		case ok && sum == "" && img.Size() != size:
			err = fmt.Errorf("%s: %s section has %d bytes, metadata says %d: %w", owner, SectionDisk, img.Size(), size, ErrCorrupt)
		case ok && sum == "":
			if err = img.WriteImage(ctx, f); err != nil {
				err = fmt.Errorf("%s: stage %s section: %w", owner, SectionDisk, err)
			}
		default:
			err = StagePayload(owner, SectionDisk, p, size, sum, func(r io.Reader) error { return writeSparse(f, r) })
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// VerifyPayloads checks every payload of s against the sizes and checksums
// its metadata records, reading each once.
func VerifyPayloads(s *Snapshot) error {
	return StageWithDisk(context.Background(), s, drain, drain, &DiskTarget{Stream: drain})
}

func drain(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

// StagePayload is Stage for one payload of whatever (a snapshot's section,
// a package's workspace): it hands p to sink once and checks, in the same
// pass, that it has size bytes with SHA-256 sum (hex). owner names what p
// belongs to in errors ("snapshot S", "package P").
func StagePayload(owner, section string, p Payload, size int64, sum string, sink Sink) error {
	snapID := owner
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("%s: %s section "+format+": %w", append(append([]any{snapID, section}, args...), ErrCorrupt)...)
	}
	if got := PayloadSize(p); got != size {
		return corrupt("has %d bytes, metadata says %d", got, size)
	}
	if size == 0 {
		return nil
	}
	_, selfVerifying := p.(ImagePayload)
	switch {
	case sum == "" && !selfVerifying:
		return corrupt("has no recorded checksum")
	case sink == nil:
		return corrupt("has %d bytes where this layout has none", size)
	}
	rc, err := p.Open()
	if err != nil {
		return fmt.Errorf("%s: open %s section: %w", snapID, section, err)
	}
	defer rc.Close()
	vr := &verifyingReader{r: rc, left: size, h: NewAsyncHash(sha256.New())}
	serr := sink(vr)
	unread := vr.left
	// Whatever the sink did, hash the rest: only the checksum can say
	// whether the bytes were wrong.
	if vr.left > 0 && vr.readErr == nil && !vr.short {
		io.Copy(io.Discard, vr)
	}
	got := hex.EncodeToString(vr.h.Sum())
	switch {
	case vr.readErr != nil:
		return fmt.Errorf("%s: read %s section: %w", snapID, section, vr.readErr)
	case vr.short:
		return corrupt("ended after %d of %d bytes", size-vr.left, size)
	}
	var one [1]byte
	if n, err := io.ReadFull(rc, one[:]); n > 0 {
		return corrupt("has more than the %d bytes recorded", size)
	} else if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: read %s section: %w", snapID, section, err)
	}
	if sum != "" && got != sum {
		return corrupt("checksum mismatch (sha256 %.12s, metadata says %.12s)", got, sum)
	}
	if serr == nil && unread > 0 {
		serr = fmt.Errorf("the sink stopped %d bytes before the end", unread)
	}
	if serr != nil {
		return fmt.Errorf("%s: stage %s section: %w", snapID, section, serr)
	}
	return nil
}

// verifyingReader yields at most left bytes of r and hashes what it
// yields. It tells a payload that ended early (short) apart from one whose
// reads failed (readErr).
type verifyingReader struct {
	r       io.Reader
	left    int64
	h       *AsyncHash
	short   bool
	readErr error
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.left == 0 {
		return 0, io.EOF
	}
	if v.readErr != nil {
		return 0, v.readErr
	}
	if v.short {
		return 0, io.ErrUnexpectedEOF
	}
	if int64(len(p)) > v.left {
		p = p[:v.left]
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.h.Write(p[:n])
		v.left -= int64(n)
	}
	switch {
	case errors.Is(err, io.EOF):
		if v.left > 0 {
			v.short = true
			return n, io.ErrUnexpectedEOF
		}
		return n, io.EOF
	case err != nil:
		v.readErr = err
	}
	return n, err
}

// AsyncHash hashes what is written to it on a goroutine of its own, so
// that hashing overlaps with the work of the writer (on two cores SHA-256
// costs about as much as copying or decoding the bytes). Memory is
// bounded: a few copies of recent writes.
type AsyncHash struct {
	h    hash.Hash
	ch   chan []byte
	free chan []byte
	done chan struct{}
}

// NewAsyncHash starts hashing with h.
func NewAsyncHash(h hash.Hash) *AsyncHash {
	a := &AsyncHash{h: h, ch: make(chan []byte, 4), free: make(chan []byte, 6), done: make(chan struct{})}
	go func() {
		for b := range a.ch {
			a.h.Write(b)
			select {
			case a.free <- b[:0]:
			default:
			}
		}
		close(a.done)
	}()
	return a
}

// Write queues a copy of p for hashing.
func (a *AsyncHash) Write(p []byte) (int, error) {
	var b []byte
	select {
	case b = <-a.free:
	default:
	}
	b = append(b, p...)
	a.ch <- b
	return len(p), nil
}

// Sum waits for everything written and returns the hash. Call it once.
func (a *AsyncHash) Sum() []byte {
	close(a.ch)
	<-a.done
	return a.h.Sum(nil)
}
