package blob

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"runtime"
	"slices"
	"sync"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/internal/workpool"
	"github.com/kelpie/teleport/vm"
)

// Reading a version 2 blob: the tables are loaded (and checked) when it is
// opened; chunk bytes are fetched, decompressed and verified only when a
// payload is read. A blob whose chunks are elsewhere reads them through a
// teleport.ChunkReader (a package store's); a blob file reads its own.

// inlineChunks serves a blob file's own chunk data section.
type inlineChunks struct {
	b       *v2Blob
	refs    map[teleport.ChunkID]ChunkRef
	workers int
}

var _ teleport.ChunkReader = (*inlineChunks)(nil)

// Ranges of the chunk data section read at once.
const (
	inlineRangeMaxBytes = 1 << 20
	inlineGapMaxBytes   = 64 << 10
)

func (c *inlineChunks) Close() error { return nil }

// FetchChunks reads neighbouring chunks with one read, a few ranges in
// parallel.
func (c *inlineChunks) FetchChunks(ctx context.Context, ids []teleport.ChunkID, fn func(teleport.ChunkID, []byte) error) error {
	refs := make([]ChunkRef, 0, len(ids))
	for _, id := range ids {
		r, ok := c.refs[id]
		if !ok {
			return fmt.Errorf("chunk %s is not in this blob: %w", id.Short(), teleport.ErrChunkMissing)
		}
		refs = append(refs, r)
	}
	ranges := coalesce(refs, func(r ChunkRef) uint64 { return r.DataOffset }, inlineRangeMaxBytes, inlineGapMaxBytes)
	base := int64(c.b.data.Offset)
	bufs := make([][]byte, max(c.workers, 1))
	return workpool.Run(ctx, c.workers, len(ranges), func(w, i int) error {
		rg := ranges[i]
		n := int(rg.end - rg.start)
		if cap(bufs[w]) < n {
			bufs[w] = make([]byte, n)
		}
		buf := bufs[w][:n]
		if m, err := c.b.r.ReadAt(buf, base+int64(rg.start)); m != n {
			return fmt.Errorf("read chunk data at %d: %w", rg.start, err)
		}
		for _, r := range rg.refs {
			if err := fn(r.ID, buf[r.DataOffset-rg.start:r.DataOffset-rg.start+uint64(r.StoredBytes)]); err != nil {
				return err
			}
		}
		return nil
	})
}

// span is a run of chunks read with one request.
type span struct {
	start, end uint64
	refs       []ChunkRef
}

// coalesce groups refs (sorted here by offset) into spans of at most
// maxBytes whose chunks lie at most gapBytes apart.
func coalesce(refs []ChunkRef, off func(ChunkRef) uint64, maxBytes, gapBytes uint64) []span {
	refs = slices.Clone(refs)
	slices.SortFunc(refs, func(a, b ChunkRef) int { return cmpU64(off(a), off(b)) })
	var out []span
	for _, r := range refs {
		o, e := off(r), off(r)+uint64(r.StoredBytes)
		if n := len(out); n > 0 {
			last := &out[n-1]
			if o >= last.start && o <= last.end+gapBytes && max(e, last.end)-last.start <= maxBytes {
				last.end = max(last.end, e)
				last.refs = append(last.refs, r)
				continue
			}
		}
		out = append(out, span{start: o, end: e, refs: []ChunkRef{r}})
	}
	return out
}

// chunkBufs recycles raw chunk buffers of restores.
var chunkBufs = sync.Pool{New: func() any { b := make([]byte, ChunkBytesMax); return &b }}

// v2Payload is a section of a version 2 blob as a snapshot payload.
type v2Payload struct {
	b       *v2Blob
	src     teleport.ChunkReader
	where   string // "package X", a file name: named in every error
	image   bool
	pages   []PageEntry // an image's page map (memory or disk)
	imageN  int64       // an image's length
	workers int
}

var _ vm.ImagePayload = (*v2Payload)(nil)

// Size is the section's logical length: the device state, or the whole
// memory image.
func (p *v2Payload) Size() int64 {
	if p.image {
		return p.imageN
	}
	return p.b.stateN
}

func (p *v2Payload) fail(err error) error {
	if errors.Is(err, teleport.ErrChunkMissing) {
		return &corruptError{fmt.Errorf("%s: %w: %w", p.where, err, ErrChunkMismatch)}
	}
	return err
}

// WriteImage writes the memory image's pages into dst at their offsets:
// each distinct chunk is fetched once, decompressed, verified and written
// wherever the page map uses it, from several goroutines at once. Pages
// the map leaves out are not written.
func (p *v2Payload) WriteImage(ctx context.Context, dst io.WriterAt) error {
	if !p.image {
		return fmt.Errorf("the device state is not a memory image: %w", vm.ErrUnsupported)
	}
	uses := make(map[teleport.ChunkID][]int, len(p.pages))
	var ids []teleport.ChunkID
	for i, e := range p.pages {
		if _, ok := uses[e.Ref.ID]; !ok {
			ids = append(ids, e.Ref.ID)
		}
		uses[e.Ref.ID] = append(uses[e.Ref.ID], i)
	}
	cb := uint64(p.b.h.ChunkBytes)
	err := p.src.FetchChunks(ctx, ids, func(id teleport.ChunkID, stored []byte) error {
		idx := uses[id]
		if idx == nil {
			return fmt.Errorf("%s: the store returned chunk %s, which was not asked for: %w", p.where, id.Short(), teleport.ErrStore)
		}
		ref := p.pages[idx[0]].Ref
		var buf []byte
		if ref.Codec != CodecRaw { // a raw chunk is used as it is
			bp := chunkBufs.Get().(*[]byte)
			defer chunkBufs.Put(bp)
			buf = *bp
		}
		raw, err := decodeChunk(p.b.h.Hash, ref, stored, buf, p.where)
		if err != nil {
			return err
		}
		for _, i := range idx {
			e := p.pages[i]
			if err := scatter(dst, e, raw, e.Window*cb); err != nil {
				return fmt.Errorf("write memory window %d: %w", e.Window, err)
			}
		}
		return nil
	})
	return p.fail(err)
}

// scatter writes a window's pages from raw, one write per run of
// neighbouring pages.
func scatter(dst io.WriterAt, e PageEntry, raw []byte, base uint64) error {
	pos := 0
	pages := e.Pages
	for pages != 0 {
		first := bits.TrailingZeros64(pages)
		run := bits.TrailingZeros64(^(pages >> first)) // set bits from first on
		if first+run >= 64 {
			pages = 0
		} else {
			pages &^= (1<<run - 1) << first
		}
		n := min(run*PageBytes, len(raw)-pos)
		if _, err := dst.WriteAt(raw[pos:pos+n], int64(base)+int64(first)*PageBytes); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

// Open streams the section: the device state, or the whole memory image
// with zeros where the page map has nothing. Chunks are fetched a batch
// at a time, in parallel, and verified before their bytes are read.
func (p *v2Payload) Open() (io.ReadCloser, error) {
	return &v2Stream{p: p, ctx: context.Background()}, nil
}

// streamBatchChunks: chunks fetched ahead of a stream, in one batch.
const streamBatchChunks = 32

type v2Stream struct {
	p     *v2Payload
	ctx   context.Context
	next  int   // the next table entry to fetch
	pos   int64 // stream offset of pending[0]
	raws  map[teleport.ChunkID][]byte
	queue []int  // fetched table entries, in order
	cur   []byte // bytes ready to read
	err   error
}

func (s *v2Stream) Close() error { return nil }

func (s *v2Stream) entries() int {
	if s.p.image {
		return len(s.p.pages)
	}
	return len(s.p.b.state)
}

func (s *v2Stream) ref(i int) ChunkRef {
	if s.p.image {
		return s.p.pages[i].Ref
	}
	return s.p.b.state[i]
}

// fetch loads the next batch of chunks.
func (s *v2Stream) fetch() error {
	end := min(s.next+streamBatchChunks, s.entries())
	s.raws = make(map[teleport.ChunkID][]byte, end-s.next)
	var ids []teleport.ChunkID
	for i := s.next; i < end; i++ {
		id := s.ref(i).ID
		if _, ok := s.raws[id]; !ok {
			s.raws[id] = nil
			ids = append(ids, id)
		}
		s.queue = append(s.queue, i)
	}
	var mu sync.Mutex
	refs := map[teleport.ChunkID]ChunkRef{}
	for i := s.next; i < end; i++ {
		refs[s.ref(i).ID] = s.ref(i)
	}
	s.next = end
	err := s.p.src.FetchChunks(s.ctx, ids, func(id teleport.ChunkID, stored []byte) error {
		ref, ok := refs[id]
		if !ok {
			return fmt.Errorf("%s: the store returned chunk %s, which was not asked for: %w", s.p.where, id.Short(), teleport.ErrStore)
		}
		raw, err := decodeChunk(s.p.b.h.Hash, ref, stored, make([]byte, ref.RawBytes, ref.RawBytes+16), s.p.where)
		if err != nil {
			return err
		}
		if ref.Codec == CodecRaw {
			raw = slices.Clone(raw) // stored is valid only during the call
		}
		mu.Lock()
		s.raws[id] = raw
		mu.Unlock()
		return nil
	})
	return s.p.fail(err)
}

func (s *v2Stream) Read(out []byte) (int, error) {
	total := s.p.Size()
	for len(s.cur) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		if s.pos >= total {
			return 0, io.EOF
		}
		if len(s.queue) == 0 && s.next < s.entries() {
			if s.err = s.fetch(); s.err != nil {
				return 0, s.err
			}
		}
		s.cur = s.produce(total)
	}
	n := copy(out, s.cur)
	s.cur = s.cur[n:]
	s.pos += int64(n)
	return n, nil
}

// produce returns the next piece of the stream at s.pos: zeros up to the
// next window with data, or that window's bytes.
func (s *v2Stream) produce(total int64) []byte {
	if !s.p.image {
		i := s.queue[0]
		s.queue = s.queue[1:]
		return s.raws[s.ref(i).ID]
	}
	cb := int64(s.p.b.h.ChunkBytes)
	if len(s.queue) == 0 {
		return zeroRun(total - s.pos)
	}
	e := s.p.pages[s.queue[0]]
	start := int64(e.Window) * cb
	if s.pos < start {
		return zeroRun(start - s.pos)
	}
	s.queue = s.queue[1:]
	n := min(cb, total-start)
	w := make([]byte, n)
	raw := s.raws[e.Ref.ID]
	pos := 0
	for pg := 0; pg*PageBytes < int(n); pg++ {
		if e.Pages&(1<<pg) == 0 {
			continue
		}
		pos += copy(w[pg*PageBytes:min(int64(pg+1)*PageBytes, n)], raw[pos:])
	}
	return w
}

var zeros64k = make([]byte, 64<<10)

func zeroRun(n int64) []byte { return zeros64k[:min(n, int64(len(zeros64k)))] }

// workersDefault is how many chunks a restore decodes at once.
func workersDefault(w int) int {
	if w > 0 {
		return w
	}
	return runtime.GOMAXPROCS(0)
}

// OpenOptions tune reading a blob.
type OpenOptions struct {
	// Chunks fetches the chunks of a blob that carries none (a package's
	// body in a store with a chunk space).
	Chunks teleport.ChunkReader
	// Name names the blob in errors ("package X"); default "blob".
	Name string
	// Workers decode chunks in parallel (default: one per CPU; 1 keeps
	// everything on the caller's goroutine).
	Workers int
}

// V2 is an opened version 2 blob.
type V2 struct {
	b    *v2Blob
	o    OpenOptions
	srcs teleport.ChunkReader
}

// OpenV2 opens a version 2 blob of size bytes in r and checks its header,
// section table, page map and every chunk reference (not the chunks'
// bytes: those are verified as they are read).
func OpenV2(r io.ReaderAt, size int64, o OpenOptions) (*V2, error) {
	if o.Name == "" {
		o.Name = "blob"
	}
	o.Workers = workersDefault(o.Workers)
	hb := make([]byte, min(max(size, 0), HeaderPageBytes))
	if n, err := r.ReadAt(hb, 0); n < len(hb) {
		return nil, fmt.Errorf("read blob header: %w", err)
	}
	if _, err := ParseHeader(hb); err != nil && !errors.Is(err, errVersion2) {
		return nil, err
	} else if err == nil {
		return nil, fmt.Errorf("%w: this is a version 1 blob", ErrUnsupportedVersion)
	}
	b, err := readV2(r, size, hb)
	if err != nil {
		return nil, err
	}
	v := &V2{b: b, o: o, srcs: o.Chunks}
	if b.inline {
		refs := map[teleport.ChunkID]ChunkRef{}
		for _, r := range b.state {
			refs[r.ID] = r
		}
		for _, e := range slices.Concat(b.mem, b.disk) {
			refs[e.Ref.ID] = e.Ref
		}
		v.srcs = &inlineChunks{b: b, refs: refs, workers: o.Workers}
	}
	return v, nil
}

// Header is the blob's header.
func (v *V2) Header() *HeaderV2 { return v.b.h }

// Inline reports whether the chunks are in the blob (a blob file).
func (v *V2) Inline() bool { return v.b.inline }

// Metadata returns a reader over the metadata section.
func (v *V2) Metadata() *io.SectionReader {
	return io.NewSectionReader(v.b.r, int64(v.b.meta.Offset), int64(v.b.meta.Length))
}

// DeviceStateRefs are the device state's chunks, in stream order.
func (v *V2) DeviceStateRefs() []ChunkRef { return v.b.state }

// PageMap is the memory page map.
func (v *V2) PageMap() []PageEntry { return v.b.mem }

// DeviceStateBytes and MemoryBytes are the logical section sizes.
func (v *V2) DeviceStateBytes() int64 { return v.b.stateN }

// MemoryBytes is the memory image's size.
func (v *V2) MemoryBytes() int64 { return v.b.memN }

// DeviceState is the device state as a payload (nil when empty).
func (v *V2) DeviceState() (vm.Payload, error) {
	if v.b.stateN == 0 {
		return nil, nil
	}
	if v.srcs == nil {
		return nil, fmt.Errorf("%s: its chunks live in a package store, and none was given: %w", v.o.Name, vm.ErrUnsupported)
	}
	return &v2Payload{b: v.b, src: v.srcs, where: v.o.Name, workers: v.o.Workers}, nil
}

// Memory is the memory image as a payload (nil when empty).
func (v *V2) Memory() (vm.ImagePayload, error) {
	if v.b.memN == 0 {
		return nil, nil
	}
	if v.srcs == nil {
		return nil, fmt.Errorf("%s: its chunks live in a package store, and none was given: %w", v.o.Name, vm.ErrUnsupported)
	}
	return &v2Payload{b: v.b, src: v.srcs, where: v.o.Name, image: true, pages: v.b.mem, imageN: v.b.memN, workers: v.o.Workers}, nil
}

// DiskPageMap is the workspace disk's page map.
func (v *V2) DiskPageMap() []PageEntry { return v.b.disk }

// DiskBytes is the workspace disk image's size (0: none).
func (v *V2) DiskBytes() int64 { return v.b.diskN }

// Disk is the workspace disk image as a payload (nil when the blob has
// none).
func (v *V2) Disk() (vm.ImagePayload, error) {
	if v.b.diskN == 0 {
		return nil, nil
	}
	if v.srcs == nil {
		return nil, fmt.Errorf("%s: its chunks live in a package store, and none was given: %w", v.o.Name, vm.ErrUnsupported)
	}
	return &v2Payload{b: v.b, src: v.srcs, where: v.o.Name, image: true, pages: v.b.disk, imageN: v.b.diskN, workers: v.o.Workers}, nil
}

// Stats summarises a blob's chunks: distinct chunks and their stored
// bytes, by codec, and the pages of the memory image that hold data.
type Stats struct {
	Chunks      int   `json:"chunks"`
	StoredBytes int64 `json:"stored_bytes"`
	ZstdChunks  int   `json:"zstd_chunks"`
	RawChunks   int   `json:"raw_chunks"`
	DataPages   int64 `json:"data_pages"`
	// DiskDataPages: the pages of the workspace disk image that hold data.
	DiskDataPages int64 `json:"disk_data_pages,omitempty"`
}

// Stats counts the blob's distinct chunks.
func (v *V2) Stats() Stats {
	var st Stats
	seen := map[teleport.ChunkID]bool{}
	count := func(r ChunkRef) {
		if seen[r.ID] {
			return
		}
		seen[r.ID] = true
		st.Chunks++
		st.StoredBytes += int64(r.StoredBytes)
		if r.Codec == CodecZstd {
			st.ZstdChunks++
		} else {
			st.RawChunks++
		}
	}
	for _, r := range v.b.state {
		count(r)
	}
	for _, e := range v.b.mem {
		count(e.Ref)
		st.DataPages += int64(bits.OnesCount64(e.Pages))
	}
	for _, e := range v.b.disk {
		count(e.Ref)
		st.DiskDataPages += int64(bits.OnesCount64(e.Pages))
	}
	return st
}
