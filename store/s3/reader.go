package s3

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kelpie/teleport"
)

// reader is random access to one object by ranged GETs.
//
// A run of sequential reads (each starting where the last ended, as
// io.Copy over an io.SectionReader does) switches it to read-ahead: the
// object is fetched in ReadChunkBytes chunks, ReadAheadChunks of them in
// parallel ahead of the reader, into at most ReadAheadChunks+1 buffers.
// Other reads, and reads too large for the window, go straight into the
// caller's buffer (split into parallel ranged GETs when large), so memory
// stays bounded either way.
//
// When the object has been read in order from its first byte to its last,
// its SHA-256 is checked against the manifest's; a mismatch fails the read
// that reached the end.
type reader struct {
	s      *Store
	key    string
	size   int64
	ctx    context.Context // Open's: ReadAt has none of its own
	cancel context.CancelFunc
	cs     int64 // chunk size
	ahead  int

	mu     sync.Mutex
	chunks map[int64]*chunk
	free   [][]byte
	nbuf   int
	next   int64 // where the previous read ended
	run    int   // consecutive sequential reads
	closed bool
	wg     sync.WaitGroup

	// The whole-object check. Bytes served from chunks are hashed by a
	// goroutine of their own (the chunk stays referenced until then), so
	// hashing overlaps the caller's work; hmu keeps jobs in offset order.
	want     string    // expected SHA-256 (hex); "" skips the check
	h        hash.Hash // owned by the hasher; [0, hashNext) queued or done
	hashNext int64
	hmu      sync.Mutex
	jobs     chan hashJob
	bad      error
}

// hashJob is bytes to hash (b, kept alive by a reference on c), or a
// barrier (sync) the hasher closes when everything before it is hashed.
type hashJob struct {
	c    *chunk
	b    []byte
	sync chan struct{}
}

type chunk struct {
	idx      int64
	buf      []byte
	err      error
	done     chan struct{}
	finished bool // buf/err are final (set under reader.mu)
	refs     int  // ReadAts copying out of buf
	dropped  bool // evicted; its buffer returns to the pool when idle
}

var _ teleport.Reader = (*reader)(nil)

// sequentialRunReads: reads in a row that make a stream worth reading ahead.
const sequentialRunReads = 2

func (s *Store) newReader(ctx context.Context, key string, size int64, wantSHA string) *reader {
	rctx, cancel := context.WithCancel(ctx)
	r := &reader{s: s, key: key, size: size, ctx: rctx, cancel: cancel, cs: s.o.ReadChunkBytes, ahead: s.o.ReadAheadChunks,
		chunks: map[int64]*chunk{}, next: -1, want: wantSHA}
	if wantSHA != "" {
		r.h = sha256.New()
		r.jobs = make(chan hashJob, r.ahead+2)
		go r.hasher()
	}
	return r
}

func (r *reader) Size() int64 { return r.size }

// Close stops read-ahead and frees the buffers. Safe to call twice.
func (r *reader) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.cancel()
	r.mu.Unlock()
	r.wg.Wait()
	if r.jobs != nil {
		r.hmu.Lock()
		close(r.jobs)
		r.hmu.Unlock()
	}
	r.mu.Lock()
	r.chunks, r.free = map[int64]*chunk{}, nil
	r.mu.Unlock()
	return nil
}

// ReadAt reads len(p) bytes at off. It is safe for concurrent use.
func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("s3 read %s: negative offset %d", r.key, off)
	}
	if off >= r.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), r.size)
	dst := p[:end-off]

	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return 0, fmt.Errorf("s3 read %s: reader is closed: %w", r.key, teleport.ErrStore)
	}
	if off == r.next {
		r.run++
	} else {
		r.run = 0
	}
	r.next = end
	// Bytes [off, split) come from chunks, [split, end) straight from S3.
	var cs []*chunk
	split := off
	if span := (end-1)/r.cs - off/r.cs + 1; span <= int64(r.ahead) && (r.run >= sequentialRunReads || r.cached(off, end)) {
		if cs = r.chunksFor(off, end); cs != nil {
			split = end
		}
	}
	if cs == nil {
		cs, split = r.cachedPrefix(off, end)
	}
	r.mu.Unlock()

	var n int
	var err error
	if len(cs) > 0 {
		n, err = r.copyChunks(dst[:split-off], off, cs)
	}
	if err == nil && split < end {
		if err = r.fetchParallel(dst[split-off:], split); err == nil {
			n = len(dst)
		}
		if err == nil && r.h != nil {
			err = r.hashDirect(dst[split-off:], split)
		}
	}
	if err != nil {
		return n, err
	}
	if r.h != nil && end == r.size {
		if err := r.checkHash(); err != nil {
			return n, err
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// cached reports whether every chunk of [off, end) is present.
func (r *reader) cached(off, end int64) bool {
	for idx := off / r.cs; idx <= (end-1)/r.cs; idx++ {
		if r.chunks[idx] == nil {
			return false
		}
	}
	return true
}

// cachedPrefix (under mu) references the chunks already fetched or in
// flight that cover [off, split) for the largest such split: a read too big
// for the window still takes what read-ahead brought.
func (r *reader) cachedPrefix(off, end int64) ([]*chunk, int64) {
	var out []*chunk
	idx := off / r.cs
	for ; idx*r.cs < end; idx++ {
		c := r.chunks[idx]
		if c == nil {
			break
		}
		c.refs++
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, off
	}
	return out, min(end, idx*r.cs)
}

// chunksFor (under mu) returns the chunks covering [off, end), referenced,
// and starts read-ahead; nil when buffers ran out (the caller then reads
// directly).
func (r *reader) chunksFor(off, end int64) []*chunk {
	first, last := off/r.cs, (end-1)/r.cs
	lastIdx := (r.size - 1) / r.cs
	horizon := min(last+int64(r.ahead), lastIdx)
	// Chunks outside the window are behind the reader (or it jumped): free
	// them first so the window has buffers. Order does not matter here.
	for idx, c := range r.chunks {
		if idx < first || idx > horizon {
			r.drop(c)
		}
	}
	for idx := first; idx <= horizon; idx++ {
		if r.chunks[idx] == nil && !r.start(idx) {
			if idx <= last {
				return nil
			}
			break
		}
	}
	var out []*chunk
	for idx := first; idx <= last; idx++ {
		c := r.chunks[idx]
		c.refs++
		out = append(out, c)
	}
	return out
}

// start (under mu) begins fetching chunk idx; false when no buffer is free.
func (r *reader) start(idx int64) bool {
	var buf []byte
	switch {
	case len(r.free) > 0:
		buf = r.free[len(r.free)-1]
		r.free = r.free[:len(r.free)-1]
	case r.nbuf < r.ahead+1:
		r.nbuf++
		buf = make([]byte, r.cs)
	default:
		return false
	}
	off := idx * r.cs
	buf = buf[:min(r.cs, r.size-off)]
	c := &chunk{idx: idx, done: make(chan struct{})}
	r.chunks[idx] = c
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		err := r.fetch(r.ctx, buf, off)
		r.mu.Lock()
		c.buf, c.err, c.finished = buf, err, true
		if c.dropped && c.refs == 0 {
			r.recycle(c)
		}
		r.mu.Unlock()
		close(c.done)
	}()
	return true
}

// drop (under mu) evicts a chunk; its buffer is reused once nobody holds it.
func (r *reader) drop(c *chunk) {
	if r.chunks[c.idx] == c {
		delete(r.chunks, c.idx)
	}
	c.dropped = true
	if c.finished && c.refs == 0 {
		r.recycle(c)
	}
}

func (r *reader) recycle(c *chunk) {
	if c.buf != nil && !r.closed {
		r.free = append(r.free, c.buf[:cap(c.buf)])
	}
	c.buf = nil
}

func (r *reader) copyChunks(dst []byte, off int64, cs []*chunk) (int, error) {
	n := 0
	var err error
	var jobs []hashJob
	if r.h != nil {
		r.hmu.Lock()
		defer r.hmu.Unlock()
	}
	for _, c := range cs {
		if err == nil {
			select {
			case <-c.done:
			case <-r.ctx.Done():
				<-c.done
			}
			if c.err != nil {
				err = c.err
			} else {
				start := off + int64(n) - c.idx*r.cs
				k := copy(dst[n:], c.buf[start:])
				if r.h != nil {
					jobs = append(jobs, hashJob{c: c, b: c.buf[start : start+int64(k)]})
				}
				n += k
			}
		}
	}
	r.mu.Lock()
	if err == nil && len(jobs) > 0 && off <= r.hashNext && off+int64(n) > r.hashNext && !r.closed {
		// Queue the bytes the hash has not seen; each queued chunk keeps a
		// reference until the hasher is done with it.
		skip := r.hashNext - off
		q := jobs[:0]
		for _, j := range jobs {
			if skip >= int64(len(j.b)) {
				skip -= int64(len(j.b))
				continue
			}
			j.b = j.b[skip:]
			skip = 0
			j.c.refs++
			q = append(q, j)
		}
		jobs = q
		r.hashNext = off + int64(n)
	} else {
		jobs = nil
	}
	for _, c := range cs {
		c.refs--
		if c.err != nil {
			r.drop(c) // a later read tries again
		} else if c.dropped && c.refs == 0 {
			r.recycle(c)
		}
	}
	r.mu.Unlock()
	for _, j := range jobs {
		r.jobs <- j
	}
	return n, err
}

// hasher hashes queued bytes in order and releases their chunks.
func (r *reader) hasher() {
	for j := range r.jobs {
		if j.sync != nil {
			close(j.sync)
			continue
		}
		r.h.Write(j.b)
		r.mu.Lock()
		j.c.refs--
		if j.c.dropped && j.c.refs == 0 {
			r.recycle(j.c)
		}
		r.mu.Unlock()
	}
}

// drainHash (under hmu) waits until everything queued is hashed.
func (r *reader) drainHash() {
	done := make(chan struct{})
	r.jobs <- hashJob{sync: done}
	<-done
}

// hashDirect hashes bytes read straight into the caller's buffer, which
// is theirs once ReadAt returns: so inline, after the queue.
func (r *reader) hashDirect(dst []byte, off int64) error {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	r.mu.Lock()
	end := off + int64(len(dst))
	ok := off <= r.hashNext && end > r.hashNext && !r.closed
	next := r.hashNext
	r.mu.Unlock()
	if !ok {
		return nil
	}
	r.drainHash()
	r.h.Write(dst[next-off:])
	r.mu.Lock()
	r.hashNext = end
	r.mu.Unlock()
	return nil
}

// checkHash compares the whole-object hash once every byte has been
// hashed in order; a mismatch sticks.
func (r *reader) checkHash() error {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	r.mu.Lock()
	done, bad, closed := r.hashNext == r.size, r.bad, r.closed
	r.mu.Unlock()
	if bad != nil || !done || closed {
		return bad
	}
	r.drainHash()
	if got := hex.EncodeToString(r.h.Sum(nil)); got != r.want {
		bad = fmt.Errorf("s3 read %s/%s: blob sha256 %s, manifest says %s: %w", r.s.bucket, r.key, got[:16], r.want[:min(16, len(r.want))], teleport.ErrChecksumMismatch)
	}
	r.mu.Lock()
	r.bad = bad
	r.hashNext = r.size + 1 // checked: never again
	r.mu.Unlock()
	return bad
}

// fetchParallel reads [off, off+len(dst)) straight into dst, in up to
// ReadAheadChunks parallel ranged GETs of ReadChunkBytes.
func (r *reader) fetchParallel(dst []byte, off int64) error {
	if int64(len(dst)) <= r.cs {
		return r.fetch(r.ctx, dst, off)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	sem := make(chan struct{}, r.ahead)
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for pos := int64(0); pos < int64(len(dst)); pos += r.cs {
		piece := dst[pos:min(pos+r.cs, int64(len(dst)))]
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := r.fetch(ctx, piece, off+pos); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}()
	}
	wg.Wait()
	if first == nil && r.ctx.Err() != nil {
		first = r.s.wrap("get", r.key, 1, r.ctx.Err())
	}
	return first
}

// fetch fills dst with the object's bytes at off.
func (r *reader) fetch(ctx context.Context, dst []byte, off int64) error {
	err := r.s.getRange(ctx, r.key, dst, off)
	if errors.Is(err, teleport.ErrNotFound) {
		return fmt.Errorf("%w (the package was deleted while being read?)", err)
	}
	return err
}

// getRange fills dst with object key's bytes at off, retrying the whole
// range when the connection breaks mid-body.
func (s *Store) getRange(ctx context.Context, key string, dst []byte, off int64) error {
	if len(dst) == 0 {
		return nil
	}
	rng := fmt.Sprintf("bytes=%d-%d", off, off+int64(len(dst))-1)
	return s.do(ctx, "get", key, func(ctx context.Context) error {
		res, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &key, Range: &rng})
		if err != nil {
			return err
		}
		defer res.Body.Close()
		// A server that ignores Range answers 200 with the whole object.
		if res.ContentRange == nil && (off != 0 || aws.ToInt64(res.ContentLength) != int64(len(dst))) {
			return fmt.Errorf("server ignored Range %s: %w", rng, teleport.ErrStore)
		}
		if _, err := io.ReadFull(res.Body, dst); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("%w: %v", errShortBody, err)
			}
			return err
		}
		return nil
	})
}
