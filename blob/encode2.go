package blob

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// V2Options tune a version 2 encoding. The zero value is the default.
type V2Options struct {
	// Chunks, when set, receives the chunks (the store form: the blob then
	// carries none). Otherwise they go inline, and the writer must also be
	// an io.WriterAt (a file).
	Chunks teleport.ChunkWriter
	// ChunkBytes is the window size (default ChunkBytesDefault).
	ChunkBytes int
	// Hash addresses chunks (default HashDefault).
	Hash HashID
	// Workers chunk, hash and compress in parallel (default: one per
	// CPU). 1 runs everything on the caller's goroutine, in order: what
	// the deterministic simulation needs.
	Workers int
}

func (o *V2Options) setDefaults() error {
	if o.ChunkBytes == 0 {
		o.ChunkBytes = ChunkBytesDefault
	}
	if o.Hash == 0 {
		o.Hash = HashDefault
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	cb := o.ChunkBytes
	if cb < PageBytes || cb > ChunkBytesMax || cb&(cb-1) != 0 {
		return fmt.Errorf("chunk size %d: want a power of two from %d to %d: %w", cb, PageBytes, ChunkBytesMax, ErrMalformed)
	}
	if o.Hash != HashBLAKE3 && o.Hash != HashSHA256 {
		return fmt.Errorf("unknown hash %d: %w", o.Hash, ErrMalformed)
	}
	return nil
}

// Input is one section to encode: a payload, and the SHA-256 it must
// have ("" when none is recorded), checked as it streams.
type Input struct {
	Payload vm.Payload
	SHA256  string
	name    string
}

// Encoded describes a blob just written.
type Encoded struct {
	Format int
	Bytes  int64 // the blob's length
	// LogicalBytes: the device state, the memory image and the disk
	// image, in full.
	LogicalBytes int64
	// Chunks counts distinct chunks the blob refers to; NewChunks those it
	// stored (inline: all of them; a store: those it put), and NewBytes
	// their stored size.
	Chunks    int
	NewChunks int
	NewBytes  int64
	// ZstdChunks and RawChunks count new chunks by codec.
	ZstdChunks, RawChunks int
}

// EncodeV2 writes a version 2 blob of metadata (the raw section bytes),
// the device state stream, the memory image and the workspace disk image
// (each may be empty) to w. The images are chunked by window and their
// pages of zeros cost nothing; when an image's payload is a file, holes
// are skipped without being read. Memory use is bounded by the workers'
// buffers, whatever the sizes.
func EncodeV2(ctx context.Context, w io.Writer, metadata []byte, state, memory, disk Input, o V2Options) (*Encoded, error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	state.name, memory.name, disk.name = vm.SectionDeviceState, vm.SectionMemory, vm.SectionDisk
	res := &Encoded{Format: Version2}
	h := &HeaderV2{ChunkBytes: uint32(o.ChunkBytes), Hash: o.Hash}
	c := &chunker{ctx: ctx, o: o, res: res, emitted: map[teleport.ChunkID]ChunkRef{}}
	var wa io.WriterAt
	if o.Chunks != nil {
		h.Flags = FlagChunksElsewhere
		c.sink = storeSink{o.Chunks}
	} else {
		var ok bool
		if wa, ok = w.(io.WriterAt); !ok {
			return nil, fmt.Errorf("a version 2 blob with its chunks inline needs a file to write to")
		}
		c.sink = &inlineSink{wa: wa, base: HeaderPageBytes}
	}
	var stateRefs []ChunkRef
	var memEntries []PageEntry
	var stateN, memN int64
	var err error
	if state.Payload != nil && state.Payload.Size() > 0 {
		stateN = state.Payload.Size()
		if stateRefs, _, err = c.section(state, false); err != nil {
			return nil, err
		}
	}
	if memory.Payload != nil && memory.Payload.Size() > 0 {
		memN = memory.Payload.Size()
		if _, memEntries, err = c.section(memory, true); err != nil {
			return nil, err
		}
	}
	var diskEntries []PageEntry
	var diskN int64
	if disk.Payload != nil && disk.Payload.Size() > 0 {
		diskN = disk.Payload.Size()
		if _, diskEntries, err = c.section(disk, true); err != nil {
			return nil, err
		}
	}
	res.LogicalBytes = stateN + memN + diskN

	// The tables and metadata, each a page-aligned section after the
	// chunk data (inline) or the header (store).
	pos := uint64(HeaderPageBytes)
	type out struct {
		s SectionV2
		b []byte
	}
	var outs []out
	if is, ok := c.sink.(*inlineSink); ok {
		if n := is.off; n > 0 {
			outs = append(outs, out{s: SectionV2{Kind: KindChunkData, Offset: pos, Length: n, LogicalBytes: n}})
			pos = roundUpPage(pos + n)
		}
	}
	add := func(kind uint32, b []byte, logical, count uint64) {
		s := SectionV2{Kind: kind, Offset: pos, Length: uint64(len(b)), LogicalBytes: logical, Count: count, SHA256: sha256.Sum256(b)}
		outs = append(outs, out{s, b})
		pos = roundUpPage(pos + uint64(len(b)))
	}
	add(KindMetadata, metadata, uint64(len(metadata)), 0)
	if stateN > 0 {
		tb := make([]byte, len(stateRefs)*v2RefBytes)
		for i, r := range stateRefs {
			putRef(tb[i*v2RefBytes:], r)
		}
		add(KindDeviceState, tb, uint64(stateN), uint64(len(stateRefs)))
	}
	pageMap := func(kind uint32, entries []PageEntry, n int64) {
		tb := make([]byte, len(entries)*v2PageBytes)
		for i, e := range entries {
			b := tb[i*v2PageBytes:]
			binary.LittleEndian.PutUint64(b[0:], e.Window)
			binary.LittleEndian.PutUint64(b[8:], e.Pages)
			putRef(b[16:], e.Ref)
		}
		add(kind, tb, uint64(n), uint64(len(entries)))
	}
	if memN > 0 {
		pageMap(KindMemory, memEntries, memN)
	}
	if diskN > 0 {
		pageMap(KindDisk, diskEntries, diskN)
	}
	last := outs[len(outs)-1].s
	h.FileBytes = last.Offset + last.Length
	// The table lists kinds in order (the chunk data section, written
	// first, after the memory page map).
	for k := uint32(KindMetadata); k <= KindDisk; k++ {
		for _, o := range outs {
			if o.s.Kind == k {
				h.Sections = append(h.Sections, o.s)
			}
		}
	}
	hb := h.marshal()
	if wa != nil {
		for _, o := range outs {
			if o.b != nil {
				if _, err := wa.WriteAt(o.b, int64(o.s.Offset)); err != nil {
					return nil, fmt.Errorf("write %s section: %w", KindName(o.s.Kind), err)
				}
			}
		}
		// Zero padding between sections: a fresh file reads zeros there.
		if _, err := wa.WriteAt(hb, 0); err != nil {
			return nil, fmt.Errorf("write blob header: %w", err)
		}
		res.Bytes = int64(h.FileBytes)
		return res, nil
	}
	// The store form goes out as one stream, padding included.
	bw := bufio.NewWriterSize(w, 64<<10)
	n := int64(0)
	put := func(b []byte) error {
		m, err := bw.Write(b)
		n += int64(m)
		return err
	}
	if err := put(hb); err != nil {
		return nil, fmt.Errorf("write blob header: %w", err)
	}
	for _, o := range outs {
		if err := put(make([]byte, int64(o.s.Offset)-n)); err != nil {
			return nil, err
		}
		if err := put(o.b); err != nil {
			return nil, fmt.Errorf("write %s section: %w", KindName(o.s.Kind), err)
		}
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("write blob: %w", err)
	}
	res.Bytes = n
	return res, nil
}

// chunkSink receives a blob's new chunks in blob order.
type chunkSink interface {
	// lookup says whether the destination already holds the chunk (and
	// then refers to it). Safe for concurrent use.
	lookup(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error)
	// put stores a new chunk and returns its data offset.
	put(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) (uint64, error)
}

type storeSink struct{ cw teleport.ChunkWriter }

func (s storeSink) lookup(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	return s.cw.RefChunk(ctx, id)
}

func (s storeSink) put(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) (uint64, error) {
	return 0, s.cw.PutChunk(ctx, id, info, stored)
}

// inlineSink lays chunks out in the chunk data section: put assigns each
// its place, in blob order, and the write itself (writeAt) runs on a
// writer goroutine, several at once.
type inlineSink struct {
	wa   io.WriterAt
	base int64
	off  uint64
}

func (s *inlineSink) lookup(context.Context, teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	return teleport.ChunkInfo{}, false, nil
}

func (s *inlineSink) put(_ context.Context, _ teleport.ChunkID, _ teleport.ChunkInfo, stored []byte) (uint64, error) {
	off := s.off
	s.off += uint64(len(stored))
	return off, nil
}

func (s *inlineSink) writeAt(stored []byte, off uint64) error {
	if _, err := s.wa.WriteAt(stored, s.base+int64(off)); err != nil {
		return fmt.Errorf("write chunk data: %w", err)
	}
	return nil
}

// chunker cuts sections into chunks: workers read, hash and compress
// windows; the caller's goroutine emits them in order, so a blob's bytes
// depend only on its input.
type chunker struct {
	ctx  context.Context
	o    V2Options
	sink chunkSink
	res  *Encoded

	mu      sync.Mutex
	emitted map[teleport.ChunkID]ChunkRef // written by the emitter only
}

// job is one window on its way through the pipeline.
type job struct {
	window uint64
	off    int64
	n      int
	buf    []byte // the window as read, then its pages that hold data
	cbuf   []byte // compressed bytes
	raw    []byte
	pages  uint64
	id     teleport.ChunkID
	known  bool // the destination holds it
	info   teleport.ChunkInfo
	stored []byte
	codec  Codec
	err    error
	done   chan struct{}
	// write: the emitter placed stored at writeOff of the chunk data
	// section, and a writer must put it there.
	write    bool
	writeOff uint64
}

// source is what a section's chunker reads.
type source struct {
	size int64
	ra   io.ReaderAt // random access, when the payload has it
	f    *os.File    // its file, for holes
	r    io.Reader   // a stream otherwise
	c    io.Closer
}

func openSource(p vm.Payload) (*source, error) {
	s := &source{size: p.Size()}
	switch p := p.(type) {
	case *vm.FilePayload:
		f, err := os.Open(p.Path)
		if err != nil {
			return nil, err
		}
		s.ra, s.f, s.c = f, f, f
	case vm.BytesPayload:
		s.ra = bytes.NewReader(p)
	case *vm.SectionPayload:
		s.ra = io.NewSectionReader(p.R, p.Offset, p.N)
	default:
		rc, err := p.Open()
		if err != nil {
			return nil, err
		}
		s.r, s.c = rc, rc
	}
	return s, nil
}

func (s *source) close() {
	if s.c != nil {
		s.c.Close()
	}
}

// section chunks one input: a stream (device state) gives refs in order,
// an image (memory) page map entries.
func (c *chunker) section(in Input, image bool) ([]ChunkRef, []PageEntry, error) {
	src, err := openSource(in.Payload)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s payload: %w", in.name, err)
	}
	defer src.close()
	cb := int64(c.o.ChunkBytes)
	windows := uint64((src.size + cb - 1) / cb)
	var sum *vm.AsyncHash
	if in.SHA256 != "" {
		sum = vm.NewAsyncHash(sha256.New())
	}
	var refs []ChunkRef
	var entries []PageEntry
	hashed := int64(0) // bytes of the section fed to sum so far
	zeros := make([]byte, 0)
	if sum != nil {
		zeros = make([]byte, cb)
	}
	hashUpTo := func(off int64) {
		for hashed < off {
			n := min(off-hashed, cb)
			sum.Write(zeros[:n])
			hashed += n
		}
	}
	emit := func(j *job) error {
		if sum != nil {
			hashUpTo(j.off)
			if image {
				p := 0
				for i := 0; i < j.n; i += PageBytes {
					n := min(PageBytes, j.n-i)
					if j.pages&(1<<(i/PageBytes)) != 0 {
						sum.Write(j.raw[p : p+n])
						p += n
					} else {
						sum.Write(zeros[:n])
					}
				}
			} else {
				sum.Write(j.raw)
			}
			hashed = j.off + int64(j.n)
		}
		if len(j.raw) == 0 {
			return nil
		}
		ref, err := c.emit(j)
		if err != nil {
			return err
		}
		if image {
			entries = append(entries, PageEntry{Window: j.window, Pages: j.pages, Ref: ref})
		} else {
			refs = append(refs, ref)
		}
		return nil
	}
	if err := c.run(src, windows, image, emit); err != nil {
		if sum != nil {
			sum.Sum()
		}
		return nil, nil, fmt.Errorf("%s section: %w", in.name, err)
	}
	if err := src.checkEnd(); err != nil {
		if sum != nil {
			sum.Sum()
		}
		return nil, nil, fmt.Errorf("%s payload: %w", in.name, err)
	}
	if sum != nil {
		hashUpTo(src.size)
		if got := hex.EncodeToString(sum.Sum()); got != in.SHA256 {
			return nil, nil, fmt.Errorf("%s payload differs from its recorded checksum (sha256 %.12s, recorded %.12s): %w", in.name, got, in.SHA256, vm.ErrCorrupt)
		}
	}
	return refs, entries, nil
}

// checkEnd: a payload that grew past its declared size would be cut
// short silently.
func (s *source) checkEnd() error {
	switch {
	case s.f != nil:
		fi, err := s.f.Stat()
		if err != nil {
			return err
		}
		if fi.Size() != s.size {
			return fmt.Errorf("%w: the file has %d bytes, %d were declared", vm.ErrCorrupt, fi.Size(), s.size)
		}
	case s.r != nil:
		if err := expectEOF(s.r); err != nil {
			return fmt.Errorf("%w: %v", vm.ErrCorrupt, err)
		}
	}
	return nil
}

// run moves every window of src through the pipeline and hands each to
// emit in order.
func (c *chunker) run(src *source, windows uint64, image bool, emit func(*job) error) error {
	cb := c.o.ChunkBytes
	// next returns the next window to read, skipping holes of a file.
	w := uint64(0)
	next := func() (uint64, bool) {
		if w >= windows {
			return 0, false
		}
		if image && src.f != nil {
			d, ok := nextData(src.f, int64(w)*int64(cb))
			if !ok || d >= src.size {
				return 0, false
			}
			w = max(w, uint64(d)/uint64(cb))
		}
		cur := w
		w++
		return cur, true
	}
	newJob := func(win uint64, buf, cbuf []byte) *job {
		off := int64(win) * int64(cb)
		return &job{window: win, off: off, n: int(min(int64(cb), src.size-off)), buf: buf, cbuf: cbuf}
	}
	// A stream is read here, in order; random access is the workers'.
	fill := func(j *job) error {
		if src.ra != nil {
			return nil
		}
		if _, err := io.ReadFull(src.r, j.buf[:j.n]); err != nil {
			return fmt.Errorf("%w: the payload ended within window %d (%v)", vm.ErrCorrupt, j.window, err)
		}
		return nil
	}
	bound := encoder().MaxEncodedSize(cb)
	if c.o.Workers == 1 {
		buf, cbuf := make([]byte, cb), make([]byte, bound)
		for {
			if err := c.ctx.Err(); err != nil {
				return err
			}
			win, ok := next()
			if !ok {
				return nil
			}
			j := newJob(win, buf, cbuf)
			if err := fill(j); err != nil {
				return err
			}
			if c.process(j, src, image); j.err != nil {
				return j.err
			}
			if err := emit(j); err != nil {
				return err
			}
			if err := c.flush(j); err != nil {
				return err
			}
		}
	}

	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	inflight := 4 * c.o.Workers
	free := make(chan [2][]byte, inflight)
	for i := 0; i < inflight; i++ {
		free <- [2][]byte{make([]byte, cb), make([]byte, bound)}
	}
	work := make(chan *job, inflight)
	order := make(chan *job, inflight)
	var wg sync.WaitGroup
	for i := 0; i < c.o.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				if ctx.Err() == nil {
					c.process(j, src, image)
				} else {
					j.err = ctx.Err()
				}
				close(j.done)
			}
		}()
	}
	var genErr error
	go func() {
		defer close(order)
		defer close(work)
		for {
			win, ok := next()
			if !ok {
				return
			}
			var bufs [2][]byte
			select {
			case bufs = <-free:
			case <-ctx.Done():
				return
			}
			j := newJob(win, bufs[0], bufs[1])
			j.done = make(chan struct{})
			if err := fill(j); err != nil {
				genErr = err
				cancel()
				return
			}
			order <- j
			work <- j
		}
	}()
	// Writers put new chunks in place, several at once, and free the
	// buffers.
	writes := make(chan *job, inflight)
	var ww sync.WaitGroup
	var wmu sync.Mutex
	var writeErr error
	for i := 0; i < c.o.Workers; i++ {
		ww.Add(1)
		go func() {
			defer ww.Done()
			for j := range writes {
				if err := c.flush(j); err != nil {
					wmu.Lock()
					if writeErr == nil {
						writeErr = err
					}
					wmu.Unlock()
					cancel()
				}
				free <- [2][]byte{j.buf[:cap(j.buf)], j.cbuf[:cap(j.cbuf)]}
			}
		}()
	}
	var err error
	for j := range order {
		<-j.done
		if err == nil {
			if err = j.err; err == nil {
				err = emit(j)
			}
			if err != nil {
				cancel()
			}
		}
		if err == nil && j.write {
			writes <- j
			continue
		}
		free <- [2][]byte{j.buf[:cap(j.buf)], j.cbuf[:cap(j.cbuf)]}
	}
	close(writes)
	ww.Wait()
	wg.Wait()
	if err == nil {
		err = writeErr
	}
	if err == nil {
		err = genErr
	}
	if err == nil {
		err = c.ctx.Err()
	}
	return err
}

var zeroPage [PageBytes]byte

// process reads a window (random access), drops its pages of zeros
// (image), hashes what remains and compresses it unless the destination
// already holds it.
func (c *chunker) process(j *job, src *source, image bool) {
	b := j.buf[:j.n]
	if src.ra != nil {
		n, err := src.ra.ReadAt(b, j.off)
		if n == len(b) {
			err = nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				j.err = fmt.Errorf("%w: the payload ended within window %d", vm.ErrCorrupt, j.window)
			} else {
				j.err = fmt.Errorf("read window %d: %w", j.window, err)
			}
			return
		}
	}
	if image {
		k := 0
		for i := 0; i < len(b); i += PageBytes {
			p := b[i:min(i+PageBytes, len(b))]
			if bytes.Equal(p, zeroPage[:len(p)]) {
				continue
			}
			j.pages |= 1 << (i / PageBytes)
			if k != i {
				copy(b[k:], p)
			}
			k += len(p)
		}
		b = b[:k]
	}
	j.raw = b
	if len(b) == 0 {
		return
	}
	j.id = c.o.Hash.sum(b)
	c.mu.Lock()
	_, dup := c.emitted[j.id]
	c.mu.Unlock()
	if dup {
		return
	}
	info, ok, err := c.sink.lookup(c.ctx, j.id)
	if err != nil {
		j.err = err
		return
	}
	if ok {
		j.known, j.info = true, info
		return
	}
	j.stored, j.codec = compress(b, j.cbuf)
}

// flush writes a chunk the emitter placed in the chunk data section.
func (c *chunker) flush(j *job) error {
	if !j.write {
		return nil
	}
	j.write = false
	return c.sink.(*inlineSink).writeAt(j.stored, j.writeOff)
}

// emit turns a processed window into its reference, storing the chunk if
// it is new to the blob and its destination.
func (c *chunker) emit(j *job) (ChunkRef, error) {
	if ref, ok := c.emitted[j.id]; ok {
		return ref, nil
	}
	ref := ChunkRef{ID: j.id, RawBytes: uint32(len(j.raw))}
	switch {
	case j.known:
		ref.StoredBytes, ref.Codec = j.info.StoredBytes, Codec(j.info.Codec)
		if ref.RawBytes != j.info.RawBytes {
			return ref, fmt.Errorf("the store describes chunk %s as %d bytes, it has %d: %w", j.id.Short(), j.info.RawBytes, ref.RawBytes, teleport.ErrStore)
		}
	default:
		if j.stored == nil {
			// Another window of this blob had the chunk when this one was
			// processed and the destination did not: store it now.
			j.stored, j.codec = compress(j.raw, j.cbuf)
		}
		ref.StoredBytes, ref.Codec = uint32(len(j.stored)), j.codec
		off, err := c.sink.put(c.ctx, j.id, ref.Info(), j.stored)
		if err != nil {
			return ref, err
		}
		ref.DataOffset = off
		if _, inline := c.sink.(*inlineSink); inline {
			j.write, j.writeOff = true, off
		}
		c.res.NewChunks++
		c.res.NewBytes += int64(len(j.stored))
		if j.codec == CodecZstd {
			c.res.ZstdChunks++
		} else {
			c.res.RawChunks++
		}
	}
	c.mu.Lock()
	c.emitted[j.id] = ref
	c.mu.Unlock()
	c.res.Chunks++
	return ref, nil
}
