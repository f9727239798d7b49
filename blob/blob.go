// Package blob reads and writes the versioned snapshot blob, format version 1
// ("KLP1"), byte-compatible with Kelpie's layout:
//
//	"KLP1" | version u32 LE | metadata_len u64 LE | snapshot_len u64 LE |
//	memory_len u64 LE | metadata | snapshot | memory
//
// Everything here streams: sections are copied from readers of known size and
// exposed as readers. The decoder never allocates in proportion to a length
// the input claims, and rejects lengths whose sum wraps around 64 bits.
package blob

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
)

// Format constants.
const (
	Magic      = "KLP1"
	Version1   = 1
	HeaderSize = 32
)

// Error categories. Messages carry the word a user looks for: magic,
// version, truncated, length.
var (
	ErrBadMagic           = errors.New("bad magic: not a KLP1 snapshot blob")
	ErrUnsupportedVersion = errors.New("unsupported blob version")
	ErrTruncated          = errors.New("blob truncated")
	ErrLengthMismatch     = errors.New("blob length mismatch")
)

// errVersion2 tells a version 1 reader that the blob is version 2 (see
// OpenV2 and Version).
var errVersion2 = fmt.Errorf("%w 2 where version 1 is expected", ErrUnsupportedVersion)

// Version reads a blob's format version from its first bytes (1 or 2),
// checking only the magic.
func Version(r io.ReaderAt, size int64) (uint32, error) {
	var b [8]byte
	n, err := r.ReadAt(b[:min(max(size, 0), 8)], 0)
	if n < 4 {
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("read blob header: %w", err)
		}
		if n > 0 && string(b[:n]) != Magic[:n] {
			return 0, fmt.Errorf("%w (starts with %q)", ErrBadMagic, b[:n])
		}
		return 0, fmt.Errorf("%w: header has %d of %d bytes", ErrTruncated, n, HeaderSize)
	}
	if string(b[:4]) != Magic {
		return 0, fmt.Errorf("%w (starts with %q)", ErrBadMagic, b[:4])
	}
	if n < 8 {
		return 0, fmt.Errorf("%w: header has %d of %d bytes", ErrTruncated, n, HeaderSize)
	}
	v := binary.LittleEndian.Uint32(b[4:8])
	if v != Version1 && v != Version2 {
		return v, fmt.Errorf("%w %d (this build reads versions %d and %d)", ErrUnsupportedVersion, v, Version1, Version2)
	}
	return v, nil
}

// ErrorKind names the category of a decode error as the test vectors do:
// "magic", "version", "truncated", "length", and for version 2 "malformed"
// and "chunk", or "" when err is none of them.
func ErrorKind(err error) string {
	switch {
	case errors.Is(err, ErrBadMagic):
		return "magic"
	case errors.Is(err, ErrUnsupportedVersion):
		return "version"
	case errors.Is(err, ErrTruncated):
		return "truncated"
	case errors.Is(err, ErrLengthMismatch):
		return "length"
	case errors.Is(err, ErrMalformed):
		return "malformed"
	case errors.Is(err, ErrChunkMismatch):
		return "chunk"
	}
	return ""
}

// Header is the fixed 32-byte start of a blob.
type Header struct {
	Version     uint32
	MetadataLen uint64
	SnapshotLen uint64
	MemoryLen   uint64
}

// Marshal encodes the header.
func (h Header) Marshal() [HeaderSize]byte {
	var b [HeaderSize]byte
	copy(b[0:4], Magic)
	binary.LittleEndian.PutUint32(b[4:8], h.Version)
	binary.LittleEndian.PutUint64(b[8:16], h.MetadataLen)
	binary.LittleEndian.PutUint64(b[16:24], h.SnapshotLen)
	binary.LittleEndian.PutUint64(b[24:32], h.MemoryLen)
	return b
}

// TotalLen is the whole blob's length the header implies. It fails with
// ErrLengthMismatch when the sum does not fit in an int64 (a header whose
// lengths wrap must be rejected, not trusted).
func (h Header) TotalLen() (int64, error) {
	sum := uint64(HeaderSize)
	for _, n := range []uint64{h.MetadataLen, h.SnapshotLen, h.MemoryLen} {
		var carry uint64
		sum, carry = bits.Add64(sum, n, 0)
		if carry != 0 || sum > math.MaxInt64 {
			return 0, fmt.Errorf("section lengths %d+%d+%d overflow: %w", h.MetadataLen, h.SnapshotLen, h.MemoryLen, ErrLengthMismatch)
		}
	}
	return int64(sum), nil
}

// ParseHeader decodes and validates a header.
func ParseHeader(b []byte) (Header, error) {
	var h Header
	if len(b) < HeaderSize {
		if len(b) >= 4 && string(b[:4]) != Magic {
			return h, fmt.Errorf("%w (starts with %q)", ErrBadMagic, b[:4])
		}
		return h, fmt.Errorf("%w: header has %d of %d bytes", ErrTruncated, len(b), HeaderSize)
	}
	if string(b[0:4]) != Magic {
		return h, fmt.Errorf("%w (starts with %q)", ErrBadMagic, b[:4])
	}
	h.Version = binary.LittleEndian.Uint32(b[4:8])
	if h.Version == Version2 {
		return h, errVersion2
	}
	if h.Version != Version1 {
		return h, fmt.Errorf("%w %d (this build reads versions %d and %d)", ErrUnsupportedVersion, h.Version, Version1, Version2)
	}
	h.MetadataLen = binary.LittleEndian.Uint64(b[8:16])
	h.SnapshotLen = binary.LittleEndian.Uint64(b[16:24])
	h.MemoryLen = binary.LittleEndian.Uint64(b[24:32])
	if _, err := h.TotalLen(); err != nil {
		return h, err
	}
	return h, nil
}

// ReadHeader reads and validates a header from a stream.
func ReadHeader(r io.Reader) (Header, error) {
	var b [HeaderSize]byte
	n, err := io.ReadFull(r, b[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return Header{}, fmt.Errorf("read blob header: %w", err)
	}
	return ParseHeader(b[:n])
}

// Section is one input to Encode: a reader that yields exactly N bytes. A
// nil R with N == 0 is an empty section.
type Section struct {
	R io.Reader
	N int64
}

// Encode writes a version 1 blob to w, streaming each section, and returns
// the bytes written. A section reader that yields fewer or more than its N
// bytes fails with ErrLengthMismatch. Memory use is constant: when w and the
// section readers are files, the copy runs in the kernel.
func Encode(w io.Writer, metadata, snapshot, memory Section) (int64, error) {
	secs := []struct {
		name string
		s    Section
	}{{"metadata", metadata}, {"snapshot", snapshot}, {"memory", memory}}
	for _, sec := range secs {
		if sec.s.N < 0 || (sec.s.R == nil && sec.s.N != 0) {
			return 0, fmt.Errorf("%s section: %w: %d bytes declared with no reader", sec.name, ErrLengthMismatch, sec.s.N)
		}
	}
	h := Header{Version: Version1, MetadataLen: uint64(metadata.N), SnapshotLen: uint64(snapshot.N), MemoryLen: uint64(memory.N)}
	if _, err := h.TotalLen(); err != nil {
		return 0, err
	}
	hb := h.Marshal()
	n, err := w.Write(hb[:])
	written := int64(n)
	if err != nil {
		return written, fmt.Errorf("write blob header: %w", err)
	}
	for _, sec := range secs {
		if sec.s.N == 0 {
			if sec.s.R != nil {
				if err := expectEOF(sec.s.R); err != nil {
					return written, fmt.Errorf("%s section: %w", sec.name, err)
				}
			}
			continue
		}
		m, err := io.CopyN(w, sec.s.R, sec.s.N)
		written += m
		if errors.Is(err, io.EOF) {
			return written, fmt.Errorf("%s section: %w: reader ended after %d of %d bytes", sec.name, ErrLengthMismatch, m, sec.s.N)
		}
		if err != nil {
			return written, fmt.Errorf("%s section: %w", sec.name, err)
		}
		if err := expectEOF(sec.s.R); err != nil {
			return written, fmt.Errorf("%s section: %w", sec.name, err)
		}
	}
	return written, nil
}

func expectEOF(r io.Reader) error {
	var one [1]byte
	for {
		n, err := r.Read(one[:])
		if n > 0 {
			return fmt.Errorf("%w: reader has more bytes than declared", ErrLengthMismatch)
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// Blob is a decoded blob over random-access storage.
type Blob struct {
	Header Header
	r      io.ReaderAt
	size   int64
}

// Open validates the header of a blob of the given size stored in r and
// checks that the sections exactly fill it.
func Open(r io.ReaderAt, size int64) (*Blob, error) {
	var hb [HeaderSize]byte
	n, err := r.ReadAt(hb[:min(int64(HeaderSize), max(size, 0))], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read blob header: %w", err)
	}
	h, err := ParseHeader(hb[:n])
	if err != nil {
		return nil, err
	}
	total, _ := h.TotalLen()
	if total > size {
		return nil, fmt.Errorf("%w: header declares %d bytes, blob has %d", ErrTruncated, total, size)
	}
	if total < size {
		return nil, fmt.Errorf("%w: header declares %d bytes, blob has %d (trailing data)", ErrLengthMismatch, total, size)
	}
	return &Blob{Header: h, r: r, size: size}, nil
}

// Size is the blob's total length.
func (b *Blob) Size() int64 { return b.size }

// MetadataOffset, SnapshotOffset and MemoryOffset locate the sections.
func (b *Blob) MetadataOffset() int64 { return HeaderSize }

// SnapshotOffset is where the snapshot section starts.
func (b *Blob) SnapshotOffset() int64 { return HeaderSize + int64(b.Header.MetadataLen) }

// MemoryOffset is where the memory section starts.
func (b *Blob) MemoryOffset() int64 { return b.SnapshotOffset() + int64(b.Header.SnapshotLen) }

// Metadata returns a reader over the metadata section.
func (b *Blob) Metadata() *io.SectionReader {
	return io.NewSectionReader(b.r, b.MetadataOffset(), int64(b.Header.MetadataLen))
}

// Snapshot returns a reader over the snapshot section.
func (b *Blob) Snapshot() *io.SectionReader {
	return io.NewSectionReader(b.r, b.SnapshotOffset(), int64(b.Header.SnapshotLen))
}

// Memory returns a reader over the memory section.
func (b *Blob) Memory() *io.SectionReader {
	return io.NewSectionReader(b.r, b.MemoryOffset(), int64(b.Header.MemoryLen))
}

// SectionNames are the sections in blob order.
var SectionNames = [3]string{"metadata", "snapshot", "memory"}

// Decode reads a blob from a stream, calling fn once per section in order
// with a reader limited to that section. fn must consume its reader or
// return an error; unread bytes are skipped. Decode fails with ErrTruncated
// if the stream ends early and ErrLengthMismatch if bytes follow the blob.
func Decode(r io.Reader, fn func(name string, sec io.Reader, n int64) error) (Header, error) {
	h, err := ReadHeader(r)
	if err != nil {
		return h, err
	}
	for i, n := range []uint64{h.MetadataLen, h.SnapshotLen, h.MemoryLen} {
		lr := &io.LimitedReader{R: r, N: int64(n)}
		if err := fn(SectionNames[i], lr, int64(n)); err != nil {
			return h, err
		}
		if lr.N > 0 {
			if _, err := io.Copy(io.Discard, lr); err != nil {
				return h, fmt.Errorf("%s section: %w", SectionNames[i], err)
			}
		}
		if lr.N > 0 {
			return h, fmt.Errorf("%w: %s section is %d bytes short", ErrTruncated, SectionNames[i], lr.N)
		}
	}
	if err := expectEOF(r); err != nil {
		return h, fmt.Errorf("after memory section: %w", err)
	}
	return h, nil
}
