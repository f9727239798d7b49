package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// Progress of a package upload or download, for people (a bar with bytes,
// rate and ETA on a terminal) and for programs (JSON lines with --json).
// Both go to stderr; stdout stays the command's answer.
//
// Wiring, for a command that moves packages:
//
//	st = withProgress(e, st, *asJSON)
//
// wraps a store so that every Create counts what is written and every Open
// what is read. The counting wrappers also stand alone (countingWriter,
// countingReaderAt).

const (
	progressBarMinBytes   = 16 << 20 // smaller transfers finish before a bar helps
	progressTTYInterval   = 200 * time.Millisecond
	progressJSONInterval  = time.Second
	progressRateSmoothing = 0.3 // weight of the newest sample in the rate
	progressBarWidthChars = 24
)

// progress tracks one transfer. A nil *progress is valid and does nothing.
type progress struct {
	out   io.Writer
	op    string // "upload", "download"
	id    string
	total int64 // 0: unknown (an upload's size is known only at commit)
	json  bool
	now   func() time.Time

	pos atomic.Int64 // bytes done: written, or the furthest byte read

	mu       sync.Mutex
	start    time.Time
	last     time.Time // last line emitted
	lastPos  int64
	rate     float64 // bytes/s, smoothed
	shown    bool    // a terminal line is on screen
	finished bool
}

// newProgress returns a tracker when stderr is a terminal or asJSON is set,
// else nil (no output at all).
func newProgress(e *env, op, id string, total int64, asJSON bool) *progress {
	if !asJSON && !isTerminal(e) {
		return nil
	}
	return newProgressTo(e.stderr, op, id, total, asJSON, time.Now)
}

func newProgressTo(out io.Writer, op, id string, total int64, asJSON bool, now func() time.Time) *progress {
	t := now()
	return &progress{out: out, op: op, id: id, total: total, json: asJSON, now: now, start: t, last: t}
}

// isTerminal reports whether stderr is a character device (a terminal),
// without a dependency: good enough to decide between a bar and silence.
func isTerminal(e *env) bool {
	f, ok := e.stderr.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0 && e.getenv("TERM") != "dumb"
}

// add records n more bytes done.
func (p *progress) add(n int64) {
	if p == nil || n <= 0 {
		return
	}
	p.update(p.pos.Add(n))
}

// reach records that the transfer got to byte end (reads may repeat or
// overlap: only the furthest point counts).
func (p *progress) reach(end int64) {
	if p == nil {
		return
	}
	for {
		cur := p.pos.Load()
		if end <= cur {
			return
		}
		if p.pos.CompareAndSwap(cur, end) {
			p.update(end)
			return
		}
	}
}

// update emits a line when the interval has passed. Concurrent callers
// never wait for each other: one renders, the rest skip.
func (p *progress) update(pos int64) {
	if !p.mu.TryLock() {
		return
	}
	defer p.mu.Unlock()
	if p.finished {
		return
	}
	now := p.now()
	interval := progressTTYInterval
	if p.json {
		interval = progressJSONInterval
	}
	if now.Sub(p.last) < interval {
		return
	}
	p.sample(now, pos)
	if !p.json && max(p.total, pos) < progressBarMinBytes {
		return
	}
	p.emit("progress", now, pos, nil)
}

func (p *progress) sample(now time.Time, pos int64) {
	if dt := now.Sub(p.last).Seconds(); dt > 0 {
		inst := float64(pos-p.lastPos) / dt
		if p.rate == 0 {
			p.rate = inst
		} else {
			p.rate = progressRateSmoothing*inst + (1-progressRateSmoothing)*p.rate
		}
	}
	p.last, p.lastPos = now, pos
}

// finish emits the final line: done, or failed with err.
func (p *progress) finish(err error) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.finished {
		return
	}
	p.finished = true
	now := p.now()
	pos := p.pos.Load()
	if p.total == 0 && err == nil {
		p.total = pos
	}
	if !p.json && !p.shown {
		return // nothing on screen to close
	}
	if el := now.Sub(p.start).Seconds(); el > 0 {
		p.rate = float64(pos) / el // the final line states the average
	}
	p.emit("done", now, pos, err)
}

type progressLine struct {
	Event     string  `json:"event"` // "progress" or "done"
	Op        string  `json:"op"`
	ID        string  `json:"id"`
	Bytes     int64   `json:"bytes"`
	Total     int64   `json:"total_bytes,omitempty"`
	Rate      float64 `json:"rate_bytes_per_s"`
	ETASec    float64 `json:"eta_s,omitempty"`
	ElapsedS  float64 `json:"elapsed_s"`
	OK        *bool   `json:"ok,omitempty"`
	ErrorText string  `json:"error,omitempty"`
}

func (p *progress) eta(pos int64) float64 {
	if p.total <= 0 || p.rate <= 0 || pos >= p.total {
		return 0
	}
	return float64(p.total-pos) / p.rate
}

func (p *progress) emit(event string, now time.Time, pos int64, err error) {
	if p.json {
		l := progressLine{Event: event, Op: p.op, ID: p.id, Bytes: pos, Total: p.total, Rate: round1(p.rate),
			ETASec: round1(p.eta(pos)), ElapsedS: round1(now.Sub(p.start).Seconds())}
		if event == "done" {
			ok := err == nil
			l.OK = &ok
			if err != nil {
				l.ErrorText = strings.ReplaceAll(err.Error(), "\n", " ")
			}
		}
		b, _ := json.Marshal(l)
		fmt.Fprintf(p.out, "%s\n", b)
		return
	}
	line := fmt.Sprintf("%s %s  %s", p.op, p.id, humanBytes(pos))
	if p.total > 0 {
		frac := min(float64(pos)/float64(p.total), 1)
		fill := int(frac * progressBarWidthChars)
		line += fmt.Sprintf(" / %s  [%s%s] %3.0f%%", humanBytes(p.total), strings.Repeat("#", fill), strings.Repeat(".", progressBarWidthChars-fill), frac*100)
	}
	line += fmt.Sprintf("  %s/s", humanBytes(int64(p.rate)))
	switch {
	case event == "done" && err != nil:
		line += "  failed"
	case event == "done":
		line += fmt.Sprintf("  in %s", now.Sub(p.start).Round(100*time.Millisecond))
	default:
		if eta := p.eta(pos); eta > 0 {
			line += fmt.Sprintf("  ETA %s", (time.Duration(eta) * time.Second).Round(time.Second))
		}
	}
	// \r returns to the line start, \x1b[K clears what a longer line left.
	fmt.Fprintf(p.out, "\r%s\x1b[K", line)
	p.shown = true
	if event == "done" {
		fmt.Fprint(p.out, "\n")
	}
}

func round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }

// countingWriter counts what passes into w.
type countingWriter struct {
	w io.Writer
	p *progress
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.p.add(int64(n))
	return n, err
}

// countingReaderAt reports the furthest byte read through r.
type countingReaderAt struct {
	r io.ReaderAt
	p *progress
}

func (c countingReaderAt) ReadAt(b []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(b, off)
	c.p.reach(off + int64(n))
	return n, err
}

// withProgress wraps st so that uploads and downloads report progress;
// st itself when there is nowhere to report to. A store with a chunk
// space stays one, its chunks counted too.
func withProgress(e *env, st teleport.Store, asJSON bool) teleport.Store {
	if !asJSON && !isTerminal(e) {
		return st
	}
	ps := &progressStore{Store: st, e: e, json: asJSON}
	if cs, ok := st.(teleport.ChunkStore); ok {
		return &progressChunkStore{progressStore: ps, cs: cs}
	}
	return ps
}

type progressChunkStore struct {
	*progressStore
	cs teleport.ChunkStore
}

var _ teleport.ChunkStore = (*progressChunkStore)(nil)

func (s *progressChunkStore) Create(ctx context.Context, id string) (teleport.Writer, error) {
	w, err := s.progressStore.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	pw := w.(*progressWriter)
	if cw, ok := pw.Writer.(teleport.ChunkWriter); ok {
		return &progressChunkWriter{progressWriter: pw, cw: cw}, nil
	}
	return w, nil
}

// OpenChunks reports the chunks' download as its own progress.
func (s *progressChunkStore) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	r, err := s.cs.OpenChunks(ctx, pkg)
	if err != nil {
		return nil, err
	}
	total := max(pkg.StoredBytes-pkg.SizeBytes, 0)
	return &progressChunks{ChunkReader: r, p: newProgressTo(s.e.stderr, "download chunks", pkg.ID, total, s.json, time.Now)}, nil
}

type progressChunks struct {
	teleport.ChunkReader
	p   *progress
	mu  sync.Mutex
	err error
}

func (r *progressChunks) FetchChunks(ctx context.Context, ids []teleport.ChunkID, fn func(teleport.ChunkID, []byte) error) error {
	err := r.ChunkReader.FetchChunks(ctx, ids, func(id teleport.ChunkID, b []byte) error {
		r.mu.Lock()
		r.p.add(int64(len(b)))
		r.mu.Unlock()
		return fn(id, b)
	})
	if err != nil {
		r.mu.Lock()
		r.err = err
		r.mu.Unlock()
	}
	return err
}

func (r *progressChunks) Close() error {
	r.mu.Lock()
	err := r.err
	r.mu.Unlock()
	r.p.finish(err)
	return r.ChunkReader.Close()
}

type progressChunkWriter struct {
	*progressWriter
	cw teleport.ChunkWriter
	mu sync.Mutex
}

var _ teleport.ChunkWriter = (*progressChunkWriter)(nil)

func (w *progressChunkWriter) RefChunk(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	return w.cw.RefChunk(ctx, id)
}

// PutChunk counts the chunks uploaded: they are most of the bytes.
func (w *progressChunkWriter) PutChunk(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) error {
	err := w.cw.PutChunk(ctx, id, info, stored)
	w.mu.Lock()
	w.p.add(int64(len(stored)))
	w.mu.Unlock()
	return err
}

type progressStore struct {
	teleport.Store
	e    *env
	json bool
}

func (s *progressStore) Create(ctx context.Context, id string) (teleport.Writer, error) {
	w, err := s.Store.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	return &progressWriter{Writer: w, p: newProgressTo(s.e.stderr, "upload", id, 0, s.json, time.Now)}, nil
}

func (s *progressStore) Open(ctx context.Context, id string) (teleport.Reader, error) {
	r, err := s.Store.Open(ctx, id)
	if err != nil {
		return nil, err
	}
	return &progressReader{Reader: r, p: newProgressTo(s.e.stderr, "download", id, r.Size(), s.json, time.Now)}, nil
}

// GC passes through, so a wrapped store still collects its orphans.
func (s *progressStore) GC(ctx context.Context) (int, error) {
	gc, ok := s.Store.(teleport.GarbageCollector)
	if !ok {
		return 0, fmt.Errorf("this store keeps no orphans to collect: %w", vm.ErrUnsupported)
	}
	return gc.GC(ctx)
}

type progressWriter struct {
	teleport.Writer
	p *progress
}

func (w *progressWriter) Write(b []byte) (int, error) {
	n, err := w.Writer.Write(b)
	w.p.add(int64(n))
	return n, err
}

// ReadFrom keeps the store's fast path (filling its buffers directly)
// while counting.
func (w *progressWriter) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := w.Writer.(io.ReaderFrom); ok {
		return rf.ReadFrom(countingReader{r, w.p})
	}
	return io.Copy(countingWriter{w.Writer, w.p}, r)
}

// countingReader counts what is read from r.
type countingReader struct {
	r io.Reader
	p *progress
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.p.add(int64(n))
	return n, err
}

func (w *progressWriter) Commit(ctx context.Context, m *teleport.Package) error {
	err := w.Writer.Commit(ctx, m)
	w.p.finish(err)
	return err
}

func (w *progressWriter) Abort(ctx context.Context) error {
	err := w.Writer.Abort(ctx)
	w.p.finish(fmt.Errorf("upload aborted"))
	return err
}

type progressReader struct {
	teleport.Reader
	p       *progress
	mu      sync.Mutex
	readErr error // the last failed read, reported when the reader closes
}

func (r *progressReader) ReadAt(b []byte, off int64) (int, error) {
	n, err := r.Reader.ReadAt(b, off)
	r.p.reach(off + int64(n))
	if err != nil && !errors.Is(err, io.EOF) {
		r.mu.Lock()
		r.readErr = err
		r.mu.Unlock()
	}
	return n, err
}

func (r *progressReader) Close() error {
	r.mu.Lock()
	err := r.readErr
	r.mu.Unlock()
	r.p.finish(err)
	return r.Reader.Close()
}
