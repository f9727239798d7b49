package blob

// KLP1 version 2, the compact format (docs/klp1-v2.md is the byte-level
// specification): a header page, then page-aligned sections. Guest memory
// is a page map over fixed-size windows of the image; the pages of a
// window that hold data form one chunk, compressed on its own (zstd, or
// raw when that does not pay) and addressed by the hash of its
// uncompressed bytes. The device state is a stream of such chunks. A
// blob file carries its chunks inline (a chunk data section); a package in
// a store carries none (flag FlagChunksElsewhere) and its chunks live in
// the store's chunk space.

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// Version 2 layout constants.
const (
	Version2 = 2
	// PageBytes is the page size of the memory page map and the alignment
	// of every section.
	PageBytes = 4096
	// HeaderPageBytes is the header's share of the blob: the first page.
	HeaderPageBytes = PageBytes
	// ChunkBytesDefault is the window (and largest chunk) size, chosen by
	// measurement on real guests (README, "Choosing the chunk size").
	ChunkBytesDefault = 64 << 10
	// ChunkBytesMax: a window's page bits fit one u64.
	ChunkBytesMax = 64 * PageBytes

	v2FixedBytes   = 72 // magic .. header digest
	v2SectionBytes = 72
	v2RefBytes     = 56
	v2PageBytes    = 16 + v2RefBytes // a page map entry
	v2SectionsMax  = 5
)

// FlagChunksElsewhere marks a blob whose chunks are not in it but in a
// package store's chunk space (the form a package's body takes).
const FlagChunksElsewhere = 1

// Section kinds, in the order the table lists them.
const (
	KindMetadata    = 1
	KindDeviceState = 2
	KindMemory      = 3
	KindChunkData   = 4
	KindDisk        = 5 // the workspace disk image: a page map like memory's
)

var kindNames = [...]string{"", "metadata", "device-state", "memory", "chunk-data", "disk"}

// KindName names a section kind.
func KindName(k uint32) string {
	if int(k) < len(kindNames) && k > 0 {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", k)
}

// HashID names the hash that addresses chunks.
type HashID uint32

// The hashes.
const (
	HashBLAKE3 HashID = 1 // BLAKE3-256
	HashSHA256 HashID = 2
)

func (h HashID) String() string {
	switch h {
	case HashBLAKE3:
		return "blake3"
	case HashSHA256:
		return "sha256"
	}
	return fmt.Sprintf("hash(%d)", uint32(h))
}

// Codec says how a chunk's bytes are stored.
type Codec uint8

// The codecs.
const (
	CodecRaw  Codec = 0 // the bytes themselves
	CodecZstd Codec = 1 // one zstd frame
)

func (c Codec) String() string {
	switch c {
	case CodecRaw:
		return "raw"
	case CodecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Error categories of version 2 (with those of version 1). Both match
// vm.ErrCorrupt's meaning for a snapshot: the bytes are wrong.
var (
	// ErrMalformed: the structure (header, section table, page map, a
	// chunk reference) breaks a rule of the format.
	ErrMalformed = errors.New("malformed KLP1 blob")
	// ErrChunkMismatch: a chunk's bytes do not decode to its length or do
	// not match its hash, or the chunk is missing.
	ErrChunkMismatch = errors.New("bad chunk")
)

// SectionV2 is one entry of the section table.
type SectionV2 struct {
	Kind         uint32
	Offset       uint64
	Length       uint64
	LogicalBytes uint64
	Count        uint64
	SHA256       [32]byte // zero for the chunk data section
}

// HeaderV2 is the decoded header page.
type HeaderV2 struct {
	Flags      uint32
	ChunkBytes uint32
	Hash       HashID
	FileBytes  uint64
	Sections   []SectionV2
}

// Section returns the section of kind k, if any.
func (h *HeaderV2) Section(k uint32) (SectionV2, bool) {
	for _, s := range h.Sections {
		if s.Kind == k {
			return s, true
		}
	}
	return SectionV2{}, false
}

// ChunkRef is a reference to one chunk.
type ChunkRef struct {
	ID          teleport.ChunkID
	DataOffset  uint64 // within the chunk data section; 0 in a store's package
	RawBytes    uint32
	StoredBytes uint32
	Codec       Codec
}

// Info is what a store keeps of the chunk.
func (r ChunkRef) Info() teleport.ChunkInfo {
	return teleport.ChunkInfo{StoredBytes: r.StoredBytes, RawBytes: r.RawBytes, Codec: uint8(r.Codec)}
}

// PageEntry is one entry of the memory page map: the pages of window
// Window that Pages marks hold the chunk's bytes, in page order.
type PageEntry struct {
	Window uint64
	Pages  uint64
	Ref    ChunkRef
}

func malformed(format string, args ...any) error {
	return &corruptError{fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)}
}

// corruptError is a v2 decoding error: its category (ErrMalformed,
// ErrChunkMismatch) and vm.ErrCorrupt, since for a snapshot it means the
// bytes are wrong.
type corruptError struct{ err error }

func (e *corruptError) Error() string { return e.err.Error() }
func (e *corruptError) Unwrap() error { return e.err }

// Is makes every v2 decoding error match vm.ErrCorrupt.
func (e *corruptError) Is(target error) bool { return target == vm.ErrCorrupt }

func (h *HeaderV2) marshal() []byte {
	b := make([]byte, HeaderPageBytes)
	copy(b[0:4], Magic)
	le := binary.LittleEndian
	le.PutUint32(b[4:], Version2)
	le.PutUint32(b[8:], h.Flags)
	le.PutUint32(b[12:], PageBytes)
	le.PutUint32(b[16:], h.ChunkBytes)
	le.PutUint32(b[20:], uint32(h.Hash))
	le.PutUint32(b[24:], uint32(len(h.Sections)))
	le.PutUint64(b[32:], h.FileBytes)
	for i, s := range h.Sections {
		e := b[v2FixedBytes+i*v2SectionBytes:]
		le.PutUint32(e[0:], s.Kind)
		le.PutUint64(e[8:], s.Offset)
		le.PutUint64(e[16:], s.Length)
		le.PutUint64(e[24:], s.LogicalBytes)
		le.PutUint64(e[32:], s.Count)
		copy(e[40:72], s.SHA256[:])
	}
	sum := sha256.Sum256(b)
	copy(b[40:72], sum[:])
	return b
}

// parseHeaderV2 decodes and checks a header page against the blob's real
// size: every field, the table and the header digest.
func parseHeaderV2(b []byte, size int64) (*HeaderV2, error) {
	if len(b) < HeaderPageBytes {
		return nil, fmt.Errorf("%w: a version 2 header is %d bytes, the blob has %d", ErrTruncated, HeaderPageBytes, len(b))
	}
	b = b[:HeaderPageBytes]
	le := binary.LittleEndian
	var zeroed [HeaderPageBytes]byte
	copy(zeroed[:], b)
	clear(zeroed[40:72])
	if sum := sha256.Sum256(zeroed[:]); string(sum[:]) != string(b[40:72]) {
		return nil, malformed("the header page does not match its digest")
	}
	h := &HeaderV2{Flags: le.Uint32(b[8:]), ChunkBytes: le.Uint32(b[16:]), Hash: HashID(le.Uint32(b[20:])), FileBytes: le.Uint64(b[32:])}
	n := le.Uint32(b[24:])
	switch pb := le.Uint32(b[12:]); {
	case h.Flags&^FlagChunksElsewhere != 0:
		return nil, malformed("unknown flags %#x", h.Flags)
	case pb != PageBytes:
		return nil, malformed("page size %d (this version has %d)", pb, PageBytes)
	case h.ChunkBytes < PageBytes || h.ChunkBytes > ChunkBytesMax || bits.OnesCount32(h.ChunkBytes) != 1:
		return nil, malformed("chunk size %d (want a power of two from %d to %d)", h.ChunkBytes, PageBytes, ChunkBytesMax)
	case h.Hash != HashBLAKE3 && h.Hash != HashSHA256:
		return nil, malformed("unknown hash id %d", uint32(h.Hash))
	case n == 0 || n > v2SectionsMax:
		return nil, malformed("%d sections (want 1..%d)", n, v2SectionsMax)
	case le.Uint32(b[28:]) != 0:
		return nil, malformed("reserved header field is not zero")
	case h.FileBytes > math.MaxInt64 || int64(h.FileBytes) != size:
		if int64(h.FileBytes) > size || h.FileBytes > math.MaxInt64 {
			return nil, fmt.Errorf("%w: header declares %d bytes, blob has %d", ErrTruncated, h.FileBytes, size)
		}
		return nil, fmt.Errorf("%w: header declares %d bytes, blob has %d (trailing data)", ErrLengthMismatch, h.FileBytes, size)
	}
	end := v2FixedBytes + int(n)*v2SectionBytes
	for _, c := range b[end:] {
		if c != 0 {
			return nil, malformed("bytes after the section table in the header page are not zero")
		}
	}
	for i := 0; i < int(n); i++ {
		e := b[v2FixedBytes+i*v2SectionBytes:]
		s := SectionV2{Kind: le.Uint32(e[0:]), Offset: le.Uint64(e[8:]), Length: le.Uint64(e[16:]), LogicalBytes: le.Uint64(e[24:]), Count: le.Uint64(e[32:])}
		copy(s.SHA256[:], e[40:72])
		if le.Uint32(e[4:]) != 0 {
			return nil, malformed("reserved field of section %d is not zero", i)
		}
		if err := h.checkSection(s, i); err != nil {
			return nil, err
		}
		h.Sections = append(h.Sections, s)
	}
	if _, ok := h.Section(KindMetadata); !ok {
		return nil, malformed("no metadata section")
	}
	_, data := h.Section(KindChunkData)
	if data && h.Flags&FlagChunksElsewhere != 0 {
		return nil, malformed("a chunk data section in a blob whose chunks are elsewhere")
	}
	// Sections must not overlap: sort a copy by offset.
	byOff := slices.Clone(h.Sections)
	slices.SortFunc(byOff, func(a, b SectionV2) int { return cmpU64(a.Offset, b.Offset) })
	for i := 1; i < len(byOff); i++ {
		if byOff[i-1].Offset+byOff[i-1].Length > byOff[i].Offset {
			return nil, malformed("sections %s and %s overlap", KindName(byOff[i-1].Kind), KindName(byOff[i].Kind))
		}
	}
	return h, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// checkSection checks one table entry on its own and against the header.
func (h *HeaderV2) checkSection(s SectionV2, i int) error {
	name := KindName(s.Kind)
	switch {
	case s.Kind < KindMetadata || s.Kind > KindDisk:
		return malformed("section %d has unknown kind %d", i, s.Kind)
	case i > 0 && h.Sections[i-1].Kind >= s.Kind:
		return malformed("section %s is out of order or repeated", name)
	case s.Offset%PageBytes != 0 || s.Offset < HeaderPageBytes:
		return malformed("%s section at %d is not page-aligned after the header", name, s.Offset)
	case s.Length > h.FileBytes || s.Offset > h.FileBytes-s.Length:
		return fmt.Errorf("%w: %s section %d+%d ends past the blob's %d bytes", ErrTruncated, name, s.Offset, s.Length, h.FileBytes)
	}
	var zero [32]byte
	switch s.Kind {
	case KindMetadata:
		if s.LogicalBytes != s.Length || s.Count != 0 {
			return malformed("metadata section: logical bytes %d, count %d (want %d, 0)", s.LogicalBytes, s.Count, s.Length)
		}
	case KindChunkData:
		if s.LogicalBytes != s.Length || s.Count != 0 || s.SHA256 != zero {
			return malformed("chunk data section: logical bytes %d, count %d, digest set (want %d, 0, none)", s.LogicalBytes, s.Count, s.Length)
		}
	case KindDeviceState:
		// count = ceil(logical / chunk), and the table is count refs.
		cb := uint64(h.ChunkBytes)
		want := s.LogicalBytes/cb + min(s.LogicalBytes%cb, 1)
		if s.Count != want {
			return malformed("device state of %d bytes in %d chunks of %d bytes (want %d)", s.LogicalBytes, s.Count, cb, want)
		}
		if hi, lo := bits.Mul64(s.Count, v2RefBytes); hi != 0 || lo != s.Length {
			return malformed("device state table is %d bytes for %d chunks", s.Length, s.Count)
		}
	case KindMemory, KindDisk:
		// At most one entry per window of the image.
		cb := uint64(h.ChunkBytes)
		windows := s.LogicalBytes/cb + min(s.LogicalBytes%cb, 1)
		if s.Count > windows {
			return malformed("%s page map has %d entries for %d windows", name, s.Count, windows)
		}
		if hi, lo := bits.Mul64(s.Count, v2PageBytes); hi != 0 || lo != s.Length {
			return malformed("%s page map is %d bytes for %d entries", name, s.Length, s.Count)
		}
		if s.LogicalBytes > math.MaxInt64 {
			return malformed("%s image of %d bytes", name, s.LogicalBytes)
		}
	}
	return nil
}

func putRef(b []byte, r ChunkRef) {
	le := binary.LittleEndian
	copy(b[0:32], r.ID[:])
	le.PutUint64(b[32:], r.DataOffset)
	le.PutUint32(b[40:], r.RawBytes)
	le.PutUint32(b[44:], r.StoredBytes)
	b[48] = byte(r.Codec)
	clear(b[49:56])
}

func getRef(b []byte) (ChunkRef, error) {
	le := binary.LittleEndian
	var r ChunkRef
	copy(r.ID[:], b[0:32])
	r.DataOffset = le.Uint64(b[32:])
	r.RawBytes = le.Uint32(b[40:])
	r.StoredBytes = le.Uint32(b[44:])
	r.Codec = Codec(b[48])
	for _, c := range b[49:56] {
		if c != 0 {
			return r, malformed("chunk %s: reserved bytes are not zero", r.ID.Short())
		}
	}
	return r, nil
}

// checkRef checks a reference against the header's rules and, for a blob
// with chunks inline, against the chunk data section.
func (h *HeaderV2) checkRef(r ChunkRef, data SectionV2, inline bool) error {
	switch {
	case r.RawBytes == 0 || r.RawBytes > h.ChunkBytes:
		return malformed("chunk %s of %d bytes (chunks have 1..%d)", r.ID.Short(), r.RawBytes, h.ChunkBytes)
	case r.Codec == CodecRaw && r.StoredBytes != r.RawBytes:
		return malformed("raw chunk %s stores %d of its %d bytes", r.ID.Short(), r.StoredBytes, r.RawBytes)
	case r.Codec == CodecZstd && (r.StoredBytes == 0 || r.StoredBytes >= r.RawBytes):
		return malformed("compressed chunk %s stores %d bytes for %d", r.ID.Short(), r.StoredBytes, r.RawBytes)
	case r.Codec != CodecRaw && r.Codec != CodecZstd:
		return malformed("chunk %s has unknown compression id %d", r.ID.Short(), uint8(r.Codec))
	case !inline && r.DataOffset != 0:
		return malformed("chunk %s has a data offset in a blob whose chunks are elsewhere", r.ID.Short())
	case inline && (r.DataOffset > data.Length || uint64(r.StoredBytes) > data.Length-r.DataOffset):
		return malformed("chunk %s at %d+%d lies outside the %d-byte chunk data section", r.ID.Short(), r.DataOffset, r.StoredBytes, data.Length)
	}
	return nil
}

// pagesRawBytes is how many bytes the marked pages of window w hold in an
// image of size bytes, or an error when a marked page lies outside it.
func pagesRawBytes(w, pages uint64, chunkBytes uint32, size uint64) (uint64, error) {
	per := uint(chunkBytes / PageBytes)
	if per < 64 && pages>>per != 0 {
		return 0, malformed("window %d marks pages beyond its %d", w, per)
	}
	if pages == 0 {
		return 0, malformed("window %d marks no pages", w)
	}
	base := w * uint64(chunkBytes) // the caller checked w against size
	last := base + uint64(63-bits.LeadingZeros64(pages))*PageBytes
	if last >= size {
		return 0, malformed("window %d marks a page at %d, past the %d-byte image", w, last, size)
	}
	n := uint64(bits.OnesCount64(pages)) * PageBytes
	if size-last < PageBytes {
		n -= PageBytes - (size - last) // the image's last page is short
	}
	return n, nil
}

// v2Blob is an opened version 2 blob: its header and tables, checked.
type v2Blob struct {
	h      *HeaderV2
	r      io.ReaderAt
	size   int64
	meta   SectionV2
	state  []ChunkRef
	stateN int64
	mem    []PageEntry
	memN   int64
	disk   []PageEntry // the workspace disk's page map
	diskN  int64
	data   SectionV2
	inline bool
}

// readSection reads a table or metadata section whole (the caller has
// checked it lies within the blob, so this allocates no more than the blob
// really holds) and checks its digest.
func readSection(r io.ReaderAt, s SectionV2) ([]byte, error) {
	b := make([]byte, s.Length)
	if _, err := r.ReadAt(b, int64(s.Offset)); err != nil && !(errors.Is(err, io.EOF) && len(b) == 0) {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: %s section ends early", ErrTruncated, KindName(s.Kind))
		}
		return nil, fmt.Errorf("read %s section: %w", KindName(s.Kind), err)
	}
	if sum := sha256.Sum256(b); sum != s.SHA256 {
		return nil, malformed("%s section does not match its digest", KindName(s.Kind))
	}
	return b, nil
}

// readBlob opens a version 2 blob: header, tables and every reference,
// checked against the format's rules; chunk bytes are read (and verified)
// only when used.
func readV2(r io.ReaderAt, size int64, hb []byte) (*v2Blob, error) {
	h, err := parseHeaderV2(hb, size)
	if err != nil {
		return nil, err
	}
	b := &v2Blob{h: h, r: r, size: size, inline: h.Flags&FlagChunksElsewhere == 0}
	b.meta, _ = h.Section(KindMetadata)
	b.data, _ = h.Section(KindChunkData)
	if s, ok := h.Section(KindDeviceState); ok {
		tb, err := readSection(r, s)
		if err != nil {
			return nil, err
		}
		b.state = make([]ChunkRef, s.Count)
		for i := range b.state {
			ref, err := getRef(tb[i*v2RefBytes:])
			if err != nil {
				return nil, err
			}
			if err := h.checkRef(ref, b.data, b.inline); err != nil {
				return nil, fmt.Errorf("device state: %w", err)
			}
			if want := min(uint64(h.ChunkBytes), s.LogicalBytes-uint64(i)*uint64(h.ChunkBytes)); uint64(ref.RawBytes) != want {
				return nil, malformed("device state chunk %d has %d bytes (want %d)", i, ref.RawBytes, want)
			}
			b.state[i] = ref
		}
		b.stateN = int64(s.LogicalBytes)
	}
	for _, k := range []uint32{KindMemory, KindDisk} {
		s, ok := h.Section(k)
		if !ok {
			continue
		}
		pm, err := readPageMap(r, h, s, b.data, b.inline)
		if err != nil {
			return nil, err
		}
		if k == KindMemory {
			b.mem, b.memN = pm, int64(s.LogicalBytes)
		} else {
			b.disk, b.diskN = pm, int64(s.LogicalBytes)
		}
	}
	// One id, one reference: a chunk's bytes and how they are stored are
	// the same wherever it is used.
	seen := make(map[teleport.ChunkID]ChunkRef, len(b.state)+len(b.mem))
	check := func(r ChunkRef) error {
		if prev, ok := seen[r.ID]; ok && prev != r {
			return malformed("chunk %s is referenced twice with different lengths, codecs or offsets", r.ID.Short())
		}
		seen[r.ID] = r
		return nil
	}
	for _, r := range b.state {
		if err := check(r); err != nil {
			return nil, err
		}
	}
	for _, e := range slices.Concat(b.mem, b.disk) {
		if err := check(e.Ref); err != nil {
			return nil, err
		}
	}
	if err := b.checkPadding(); err != nil {
		return nil, err
	}
	return b, nil
}

// readPageMap reads and checks the page map section s (memory or disk).
func readPageMap(r io.ReaderAt, h *HeaderV2, s SectionV2, data SectionV2, inline bool) ([]PageEntry, error) {
	name := KindName(s.Kind)
	tb, err := readSection(r, s)
	if err != nil {
		return nil, err
	}
	pm := make([]PageEntry, s.Count)
	windows := s.LogicalBytes/uint64(h.ChunkBytes) + min(s.LogicalBytes%uint64(h.ChunkBytes), 1)
	le := binary.LittleEndian
	for i := range pm {
		e := tb[i*v2PageBytes:]
		pe := PageEntry{Window: le.Uint64(e[0:]), Pages: le.Uint64(e[8:])}
		switch {
		case pe.Window >= windows:
			return nil, malformed("%s page map: window %d is past the %d-byte image", name, pe.Window, s.LogicalBytes)
		case i > 0 && pe.Window <= pm[i-1].Window:
			return nil, malformed("%s page map: window %d follows window %d (overlapping or out of order)", name, pe.Window, pm[i-1].Window)
		}
		n, err := pagesRawBytes(pe.Window, pe.Pages, h.ChunkBytes, s.LogicalBytes)
		if err != nil {
			return nil, fmt.Errorf("%s page map: %w", name, err)
		}
		if pe.Ref, err = getRef(e[16:]); err != nil {
			return nil, err
		}
		if err := h.checkRef(pe.Ref, data, inline); err != nil {
			return nil, fmt.Errorf("%s page map: %w", name, err)
		}
		if uint64(pe.Ref.RawBytes) != n {
			return nil, malformed("%s page map: window %d marks %d bytes of pages, its chunk %s has %d", name, pe.Window, n, pe.Ref.ID.Short(), pe.Ref.RawBytes)
		}
		pm[i] = pe
	}
	return pm, nil
}

// checkPadding: each section starts at the first page boundary after the
// one before it in the blob, the padding between them is zero, and the
// blob ends where its last section does, so that a blob has one layout.
func (b *v2Blob) checkPadding() error {
	secs := slices.Clone(b.h.Sections)
	slices.SortFunc(secs, func(x, y SectionV2) int { return cmpU64(x.Offset, y.Offset) })
	pos := uint64(HeaderPageBytes)
	var buf [PageBytes]byte
	for _, s := range secs {
		if want := roundUpPage(pos); s.Offset != want {
			return malformed("%s section at %d, want %d (the first page boundary after what precedes it)", KindName(s.Kind), s.Offset, want)
		}
		p := buf[:s.Offset-pos]
		if _, err := b.r.ReadAt(p, int64(pos)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read blob padding: %w", err)
		}
		for _, c := range p {
			if c != 0 {
				return malformed("padding at %d is not zero", pos)
			}
		}
		pos = s.Offset + s.Length
	}
	if pos != b.h.FileBytes {
		return malformed("%d bytes follow the last section", b.h.FileBytes-pos)
	}
	return nil
}

func roundUpPage(n uint64) uint64 { return (n + PageBytes - 1) &^ (PageBytes - 1) }
