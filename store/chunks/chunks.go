// Package chunks is the chunk space every package store shares: chunks
// packed into pack objects, uploads that add only what the space lacks,
// readers that fetch a package's chunks in parallel, and the GC rule of
// teleport.ChunkID's documentation (condemn, then sweep after a grace
// period; an upload commits within half of it). A store supplies the
// little it needs (a Bucket: whole objects, streamed objects, ranged
// reads, listing by prefix, a clock), so that the filesystem store, the S3
// store and the simulation's store run this same code.
//
// Layout under the bucket:
//
//	packs/<name>.pack   chunks' stored bytes, back to back
//	packs/<name>.idx    the pack's index, written once the pack is durable
//	dead/<name>         the pack is condemned: uploads treat it as absent
//
// It must never let an upload rely on a condemned pack, remove a pack a
// committed manifest lists, or remove a pack that has not been condemned
// for a whole grace period.
package chunks

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/internal/plant"
	"github.com/kelpie/teleport/internal/workpool"
)

// Object is one object of a bucket listing.
type Object struct {
	Key     string
	Size    int64
	ModTime time.Time // by the bucket's clock (Bucket.Now)
}

// ObjectWriter streams one object; it becomes visible, whole and durable,
// only when Close returns nil.
type ObjectWriter interface {
	io.Writer
	Close(ctx context.Context) error
	Abort(ctx context.Context) error
}

// Bucket is where a chunk space keeps its objects. Keys are relative to
// the chunk space. A missing object is teleport.ErrNotFound.
type Bucket interface {
	// Put writes a small object whole and durably.
	Put(ctx context.Context, key string, b []byte) error
	// Create streams a large object.
	Create(ctx context.Context, key string) (ObjectWriter, error)
	// Get reads a small object whole, failing past limit bytes.
	Get(ctx context.Context, key string, limit int64) ([]byte, error)
	// ReadAt fills p from object key at off.
	ReadAt(ctx context.Context, key string, p []byte, off int64) error
	// List returns the objects whose keys start with prefix, by key.
	List(ctx context.Context, prefix string) ([]Object, error)
	// Delete removes an object; a missing one is no error.
	Delete(ctx context.Context, key string) error
	// Now reads the clock that stamps ModTime.
	Now(ctx context.Context) (time.Time, error)
}

// Defaults.
const (
	// GraceDefault: a chunk no package needs is condemned when older than
	// this, and removed after this long condemned; an upload must commit
	// within half of it.
	GraceDefault = time.Hour
	// PackBytesMaxDefault: an upload starts a new pack past this.
	PackBytesMaxDefault = 1 << 30
	// ReadWorkersDefault: ranged reads in flight per FetchChunks.
	ReadWorkersDefault = 4
	// Spans of a pack read at once, and the gap worth reading through.
	readSpanMaxBytes = 8 << 20
	readGapMaxBytes  = 256 << 10
	indexMaxBytes    = 256 << 20
)

// Options configure a Space. Zero values take the defaults.
type Options struct {
	Grace        time.Duration
	PackBytesMax int64
	ReadWorkers  int
	// ReadSpanBytes bounds one ranged read (default 8 MiB).
	ReadSpanBytes int64
	// Clock is the uploader's own clock, for its deadline (default: the
	// system's, monotonic).
	Clock func() time.Time
	// NewName names packs (default: random).
	NewName func() string
}

// Space is a chunk space over a bucket. Safe for concurrent use.
type Space struct {
	b    Bucket
	o    Options
	bugs plant.ChunkBugs

	mu    sync.Mutex
	index map[string]*packIndex // pack indexes read so far: they never change
}

func init() {
	plant.SetChunkBugs = func(s any, b plant.ChunkBugs) { s.(*Space).bugs = b }
}

// New returns the chunk space of b.
func New(b Bucket, o Options) *Space {
	if o.Grace <= 0 {
		o.Grace = GraceDefault
	}
	if o.PackBytesMax <= 0 {
		o.PackBytesMax = PackBytesMaxDefault
	}
	if o.ReadWorkers <= 0 {
		o.ReadWorkers = ReadWorkersDefault
	}
	if o.ReadSpanBytes <= 0 {
		o.ReadSpanBytes = readSpanMaxBytes
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.NewName == nil {
		o.NewName = randomName
	}
	return &Space{b: b, o: o, index: map[string]*packIndex{}}
}

// Grace is the space's grace period.
func (s *Space) Grace() time.Duration { return s.o.Grace }

func randomName() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

const (
	packsDir  = "packs/"
	deadDir   = "dead/"
	packExt   = ".pack"
	indexExt  = ".idx"
	indexHead = 16
	entryLen  = 56
)

func packKey(name string) string  { return packsDir + name + packExt }
func indexKey(name string) string { return packsDir + name + indexExt }
func deadKey(name string) string  { return deadDir + name }

// loc is where a chunk is stored.
type loc struct {
	pack string
	off  uint64
	info teleport.ChunkInfo
}

// packIndex is a pack's index: every chunk in it.
type packIndex struct {
	name   string
	chunks map[teleport.ChunkID]loc
}

// encodeIndex: "KLPX" | u32 1 | u32 count | u32 0 | count × (id[32] |
// u64 offset | u32 stored | u32 raw | u8 codec | 7 zero) | sha256 of all
// before it.
func encodeIndex(entries []indexEntry) []byte {
	b := make([]byte, indexHead+len(entries)*entryLen, indexHead+len(entries)*entryLen+32)
	copy(b, "KLPX")
	le := binary.LittleEndian
	le.PutUint32(b[4:], 1)
	le.PutUint32(b[8:], uint32(len(entries)))
	for i, e := range entries {
		p := b[indexHead+i*entryLen:]
		copy(p, e.id[:])
		le.PutUint64(p[32:], e.off)
		le.PutUint32(p[40:], e.info.StoredBytes)
		le.PutUint32(p[44:], e.info.RawBytes)
		p[48] = e.info.Codec
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

type indexEntry struct {
	id   teleport.ChunkID
	off  uint64
	info teleport.ChunkInfo
}

func decodeIndex(name string, b []byte) (*packIndex, error) {
	bad := func(why string) error {
		return fmt.Errorf("chunk pack %s: index %s: %w", name, why, teleport.ErrStore)
	}
	if len(b) < indexHead+32 || string(b[:4]) != "KLPX" || binary.LittleEndian.Uint32(b[4:]) != 1 {
		return nil, bad("is not a version 1 pack index")
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if s := sha256.Sum256(body); string(s[:]) != string(sum) {
		return nil, bad("does not match its checksum")
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if uint64(len(body)) != indexHead+uint64(n)*entryLen {
		return nil, bad("has the wrong length")
	}
	ix := &packIndex{name: name, chunks: make(map[teleport.ChunkID]loc, n)}
	le := binary.LittleEndian
	for i := 0; i < int(n); i++ {
		p := body[indexHead+i*entryLen:]
		var id teleport.ChunkID
		copy(id[:], p)
		ix.chunks[id] = loc{pack: name, off: le.Uint64(p[32:]), info: teleport.ChunkInfo{StoredBytes: le.Uint32(p[40:]), RawBytes: le.Uint32(p[44:]), Codec: p[48]}}
	}
	return ix, nil
}

// readIndex returns pack name's index, from the cache when it has been
// read before (indexes are written once and never change).
func (s *Space) readIndex(ctx context.Context, name string) (*packIndex, error) {
	s.mu.Lock()
	ix := s.index[name]
	s.mu.Unlock()
	if ix != nil {
		return ix, nil
	}
	b, err := s.b.Get(ctx, indexKey(name), indexMaxBytes)
	if err != nil {
		return nil, err
	}
	if ix, err = decodeIndex(name, b); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.index[name] = ix
	s.mu.Unlock()
	return ix, nil
}

// listing is a snapshot of the bucket: packs with their newest object's
// time and whether they have an index, and condemned packs.
type listing struct {
	packs   map[string]time.Time
	indexed map[string]bool
	dead    map[string]time.Time
	names   []string // packs, sorted
}

func (s *Space) list(ctx context.Context) (*listing, error) {
	l := &listing{packs: map[string]time.Time{}, indexed: map[string]bool{}, dead: map[string]time.Time{}}
	objs, err := s.b.List(ctx, packsDir)
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		rest := strings.TrimPrefix(o.Key, packsDir)
		name, ext := rest, ""
		if i := strings.LastIndexByte(rest, '.'); i >= 0 {
			name, ext = rest[:i], rest[i:]
		}
		if teleport.ValidatePackName(name) != nil || (ext != packExt && ext != indexExt) {
			continue
		}
		if t, ok := l.packs[name]; !ok || o.ModTime.After(t) {
			l.packs[name] = o.ModTime
		}
		if ext == indexExt {
			l.indexed[name] = true
		}
	}
	dead, err := s.b.List(ctx, deadDir)
	if err != nil {
		return nil, err
	}
	for _, o := range dead {
		if name := strings.TrimPrefix(o.Key, deadDir); teleport.ValidatePackName(name) == nil {
			l.dead[name] = o.ModTime
		}
	}
	for n := range l.packs {
		l.names = append(l.names, n)
	}
	sort.Strings(l.names)
	return l, nil
}

// Upload adds one package's chunks to the space. Its methods are safe for
// concurrent use.
type Upload struct {
	s       *Space
	started time.Time
	base    string

	mu      sync.Mutex
	present map[teleport.ChunkID]loc // live chunks the space held when the upload began
	refs    map[teleport.ChunkID]loc // chunks the package refers to
	newN    int
	newB    int64

	wmu    sync.Mutex // the pack being written
	cur    ObjectWriter
	curN   string
	curOff uint64
	curIx  []indexEntry
	seq    int
	packs  []string // this upload's packs, sealed
	err    error
	done   bool
}

// Begin starts an upload: it reads which chunks the space holds, and
// starts the clock of rule 4 (teleport.ChunkID).
func (s *Space) Begin(ctx context.Context) (*Upload, error) {
	u := &Upload{s: s, started: s.o.Clock(), base: s.o.NewName(), refs: map[teleport.ChunkID]loc{}}
	l, err := s.list(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the chunk space: %w", err)
	}
	u.present = map[teleport.ChunkID]loc{}
	for _, name := range l.names {
		if _, condemned := l.dead[name]; condemned || !l.indexed[name] {
			continue // rule 2: a condemned pack is absent
		}
		ix, err := s.readIndex(ctx, name)
		if errors.Is(err, teleport.ErrNotFound) {
			continue // swept meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read the chunk space: %w", err)
		}
		for id, lc := range ix.chunks {
			if _, ok := u.present[id]; !ok {
				u.present[id] = lc
			}
		}
	}
	return u, nil
}

// Ref reports whether the space holds chunk id; when it does, the package
// refers to it.
func (u *Upload) Ref(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if lc, ok := u.refs[id]; ok {
		return lc.info, true, nil
	}
	lc, ok := u.present[id]
	if !ok {
		return teleport.ChunkInfo{}, false, nil
	}
	u.refs[id] = lc
	return lc.info, true, nil
}

// Put adds a chunk to the upload's pack; the package refers to it. The
// pack becomes durable and visible at Seal.
func (u *Upload) Put(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) error {
	if int(info.StoredBytes) != len(stored) {
		return fmt.Errorf("chunk %s: %d stored bytes, its info says %d: %w", id.Short(), len(stored), info.StoredBytes, teleport.ErrInvalidPackage)
	}
	u.mu.Lock()
	_, have := u.refs[id]
	u.mu.Unlock()
	if have {
		return nil
	}
	u.wmu.Lock()
	defer u.wmu.Unlock()
	if u.err != nil {
		return u.err
	}
	if u.done {
		return fmt.Errorf("chunk upload already sealed: %w", teleport.ErrCommitted)
	}
	if u.cur != nil && u.curOff+uint64(len(stored)) > uint64(u.s.o.PackBytesMax) {
		if err := u.sealCurrent(ctx); err != nil {
			return err
		}
	}
	if u.cur == nil {
		u.curN = fmt.Sprintf("%s-%d", u.base, u.seq)
		u.seq++
		w, err := u.s.b.Create(ctx, packKey(u.curN))
		if err != nil {
			u.err = err
			return err
		}
		u.cur, u.curOff, u.curIx = w, 0, nil
	}
	if _, err := u.cur.Write(stored); err != nil {
		u.err = fmt.Errorf("write chunk pack %s: %w", u.curN, err)
		return u.err
	}
	lc := loc{pack: u.curN, off: u.curOff, info: info}
	u.curIx = append(u.curIx, indexEntry{id: id, off: u.curOff, info: info})
	u.curOff += uint64(len(stored))
	u.mu.Lock()
	u.refs[id] = lc
	u.newN++
	u.newB += int64(len(stored))
	u.mu.Unlock()
	return nil
}

// sealCurrent makes the current pack durable, then its index (which makes
// it visible to other uploads).
func (u *Upload) sealCurrent(ctx context.Context) error {
	w, name := u.cur, u.curN
	u.cur = nil
	if err := w.Close(ctx); err != nil {
		u.err = fmt.Errorf("seal chunk pack %s: %w", name, err)
		return u.err
	}
	u.packs = append(u.packs, name)
	if err := u.s.b.Put(ctx, indexKey(name), encodeIndex(u.curIx)); err != nil {
		u.err = fmt.Errorf("write the index of chunk pack %s: %w", name, err)
		return u.err
	}
	u.s.mu.Lock()
	ix := &packIndex{name: name, chunks: make(map[teleport.ChunkID]loc, len(u.curIx))}
	for _, e := range u.curIx {
		ix.chunks[e.id] = loc{pack: name, off: e.off, info: e.info}
	}
	u.s.index[name] = ix
	u.s.mu.Unlock()
	return nil
}

// Refs is what a committed package records of its chunks.
type Refs struct {
	Packs       []string // sorted
	Chunks      int
	NewChunks   int
	StoredBytes int64 // the stored size of every chunk the package refers to
	NewBytes    int64 // of those it put
}

// Seal makes every chunk the upload put durable and returns what the
// package's manifest must record. It fails when the upload is past its
// deadline (CheckDeadline).
func (u *Upload) Seal(ctx context.Context) (Refs, error) {
	u.wmu.Lock()
	defer u.wmu.Unlock()
	if u.err != nil {
		return Refs{}, u.err
	}
	if u.cur != nil {
		if err := u.sealCurrent(ctx); err != nil {
			return Refs{}, err
		}
	}
	u.done = true
	u.mu.Lock()
	defer u.mu.Unlock()
	packs := map[string]bool{}
	r := Refs{Chunks: len(u.refs), NewChunks: u.newN, NewBytes: u.newB}
	for _, lc := range u.refs {
		packs[lc.pack] = true
		r.StoredBytes += int64(lc.info.StoredBytes)
	}
	for p := range packs {
		r.Packs = append(r.Packs, p)
	}
	sort.Strings(r.Packs)
	return r, u.CheckDeadline()
}

// CheckDeadline fails once the upload has run for half the grace period
// (rule 4): its commit must not happen then, or a chunk it relies on could
// be removed. A store calls it last thing before it publishes a manifest.
func (u *Upload) CheckDeadline() error {
	if d := u.s.o.Clock().Sub(u.started); d >= u.s.o.Grace/2 {
		return fmt.Errorf("the upload took %v, more than half the chunk space's grace period of %v, so the chunks it found present may be gone; upload again: %w",
			d.Round(time.Millisecond), u.s.o.Grace, teleport.ErrStore)
	}
	return nil
}

// Remaining is how long the upload may still take before its commit.
func (u *Upload) Remaining() time.Duration {
	return u.s.o.Grace/2 - u.s.o.Clock().Sub(u.started)
}

// Abort discards the pack being written. Packs already sealed stay for GC:
// another upload may have found them present.
func (u *Upload) Abort(ctx context.Context) error {
	u.wmu.Lock()
	defer u.wmu.Unlock()
	u.done = true
	if u.cur != nil {
		w := u.cur
		u.cur = nil
		return w.Abort(ctx)
	}
	return nil
}

// Reader fetches the chunks of one package.
type Reader struct {
	s    *Space
	locs map[teleport.ChunkID]loc
}

var _ teleport.ChunkReader = (*Reader)(nil)

// Open reads the indexes of packs, those a committed package lists.
func (s *Space) Open(ctx context.Context, packs []string) (*Reader, error) {
	r := &Reader{s: s, locs: map[teleport.ChunkID]loc{}}
	for _, p := range packs {
		if err := teleport.ValidatePackName(p); err != nil {
			return nil, err
		}
		ix, err := s.readIndex(ctx, p)
		if errors.Is(err, teleport.ErrNotFound) {
			return nil, fmt.Errorf("chunk pack %s is gone: %w", p, teleport.ErrChunkMissing)
		}
		if err != nil {
			return nil, err
		}
		for id, lc := range ix.chunks {
			if _, ok := r.locs[id]; !ok {
				r.locs[id] = lc
			}
		}
	}
	return r, nil
}

// Close releases nothing: a Reader holds no connections.
func (r *Reader) Close() error { return nil }

// span is one ranged read of a pack.
type span struct {
	pack       string
	start, end uint64
	ids        []teleport.ChunkID
}

// FetchChunks reads the chunks pack by pack, neighbours in one ranged
// read, ReadWorkers reads at a time; fn runs on the reading goroutine.
func (r *Reader) FetchChunks(ctx context.Context, ids []teleport.ChunkID, fn func(teleport.ChunkID, []byte) error) error {
	type item struct {
		id teleport.ChunkID
		lc loc
	}
	items := make([]item, 0, len(ids))
	for _, id := range ids {
		lc, ok := r.locs[id]
		if !ok {
			return fmt.Errorf("chunk %s is in none of the package's packs: %w", id.Short(), teleport.ErrChunkMissing)
		}
		items = append(items, item{id, lc})
	}
	slices.SortFunc(items, func(a, b item) int {
		if c := strings.Compare(a.lc.pack, b.lc.pack); c != 0 {
			return c
		}
		switch {
		case a.lc.off < b.lc.off:
			return -1
		case a.lc.off > b.lc.off:
			return 1
		}
		return 0
	})
	var spans []span
	maxSpan := uint64(r.s.o.ReadSpanBytes)
	for _, it := range items {
		o, e := it.lc.off, it.lc.off+uint64(it.lc.info.StoredBytes)
		if n := len(spans); n > 0 {
			last := &spans[n-1]
			if last.pack == it.lc.pack && o <= last.end+readGapMaxBytes && max(e, last.end)-last.start <= maxSpan {
				last.end = max(last.end, e)
				last.ids = append(last.ids, it.id)
				continue
			}
		}
		spans = append(spans, span{pack: it.lc.pack, start: o, end: e, ids: []teleport.ChunkID{it.id}})
	}
	bufs := make([][]byte, r.s.o.ReadWorkers)
	return workpool.Run(ctx, r.s.o.ReadWorkers, len(spans), func(w, i int) error {
		sp := spans[i]
		n := int(sp.end - sp.start)
		if cap(bufs[w]) < n {
			bufs[w] = make([]byte, n)
		}
		buf := bufs[w][:n]
		if err := r.s.b.ReadAt(ctx, packKey(sp.pack), buf, int64(sp.start)); err != nil {
			if errors.Is(err, teleport.ErrNotFound) {
				return fmt.Errorf("chunk %s: pack %s is gone: %w", sp.ids[0].Short(), sp.pack, teleport.ErrChunkMissing)
			}
			return fmt.Errorf("read chunk pack %s at %d: %w", sp.pack, sp.start, err)
		}
		for _, id := range sp.ids {
			lc := r.locs[id]
			if err := fn(id, buf[lc.off-sp.start:lc.off-sp.start+uint64(lc.info.StoredBytes)]); err != nil {
				return err
			}
		}
		return nil
	})
}

// GC applies the rule to the space: with referenced, the packs every
// committed manifest lists (read after GC has read the clock), it acquits
// condemned packs a package needs again, removes those condemned for a
// whole grace period, and condemns packs no package needs that are older
// than the grace period. It returns how many packs it removed. A failure
// of referenced stops it before it touches anything.
func (s *Space) GC(ctx context.Context, referenced func(ctx context.Context) (map[string]bool, error)) (int, error) {
	now, err := s.b.Now(ctx)
	if err != nil {
		return 0, fmt.Errorf("chunk gc: read the clock: %w", err)
	}
	refs, err := referenced(ctx)
	if err != nil {
		return 0, fmt.Errorf("chunk gc: %w", err)
	}
	l, err := s.list(ctx)
	if err != nil {
		return 0, fmt.Errorf("chunk gc: %w", err)
	}
	cutoff := now.Add(-s.o.Grace)
	removed := 0
	deadNames := make([]string, 0, len(l.dead))
	for n := range l.dead {
		deadNames = append(deadNames, n)
	}
	sort.Strings(deadNames)
	for _, name := range deadNames {
		switch {
		case refs[name]:
			if err := s.b.Delete(ctx, deadKey(name)); err != nil { // acquitted
				return removed, fmt.Errorf("chunk gc: acquit %s: %w", name, err)
			}
		case !l.dead[name].After(cutoff):
			if err := s.remove(ctx, name); err != nil {
				return removed, err
			}
			removed++
		}
	}
	for _, name := range l.names {
		if refs[name] {
			continue
		}
		if _, condemned := l.dead[name]; condemned {
			continue
		}
		if s.bugs.SweepWithoutGrace {
			// The planted bug: remove what no committed manifest lists,
			// there and then.
			if err := s.remove(ctx, name); err != nil {
				return removed, err
			}
			removed++
			continue
		}
		if l.packs[name].After(cutoff) {
			continue // rule 1: young packs may belong to an upload in flight
		}
		if err := s.b.Put(ctx, deadKey(name), nil); err != nil {
			return removed, fmt.Errorf("chunk gc: condemn %s: %w", name, err)
		}
	}
	return removed, nil
}

// remove sweeps a pack: its index first, so that no upload finds it
// present, then its bytes, then its condemnation.
func (s *Space) remove(ctx context.Context, name string) error {
	for _, k := range []string{indexKey(name), packKey(name), deadKey(name)} {
		if err := s.b.Delete(ctx, k); err != nil {
			return fmt.Errorf("chunk gc: remove %s: %w", k, err)
		}
	}
	s.mu.Lock()
	delete(s.index, name)
	s.mu.Unlock()
	return nil
}

// Referenced collects the packs that manifests list, for GC.
func Referenced(pkgs []*teleport.Package) map[string]bool {
	refs := map[string]bool{}
	for _, p := range pkgs {
		for _, n := range p.ChunkPacks {
			refs[n] = true
		}
	}
	return refs
}

// Fill records refs in a manifest about to be committed whose body is
// bodyBytes long: the chunk fields a store sets (teleport.ChunkWriter).
// A package with no chunks stores only its body.
func Fill(m *teleport.Package, refs Refs, bodyBytes int64) {
	m.ChunkPacks = refs.Packs
	m.Chunks, m.NewChunks = refs.Chunks, refs.NewChunks
	m.StoredBytes = bodyBytes + refs.StoredBytes
	m.NewBytes = bodyBytes + refs.NewBytes
}

// Writer is the chunk half of a store's package Writer: the upload
// begins at the first RefChunk or PutChunk, so a package without chunks
// never reads the chunk space. Safe for concurrent use.
type Writer struct {
	Space *Space

	mu  sync.Mutex
	up  *Upload
	err error
}

func (w *Writer) upload(ctx context.Context) (*Upload, error) {
	w.mu.Lock()
	up, err := w.up, w.err
	w.mu.Unlock()
	if up != nil || err != nil {
		return up, err
	}
	// Begin reads the bucket: no lock is held meanwhile. Of two first
	// callers, one upload wins; the other has made nothing yet.
	up, err = w.Space.Begin(ctx)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.up == nil && w.err == nil {
		w.up, w.err = up, err
	}
	return w.up, w.err
}

// RefChunk implements teleport.ChunkWriter.
func (w *Writer) RefChunk(ctx context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	up, err := w.upload(ctx)
	if err != nil {
		return teleport.ChunkInfo{}, false, err
	}
	return up.Ref(ctx, id)
}

// PutChunk implements teleport.ChunkWriter.
func (w *Writer) PutChunk(ctx context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) error {
	up, err := w.upload(ctx)
	if err != nil {
		return err
	}
	return up.Put(ctx, id, info, stored)
}

// Seal makes the chunks durable and fills m's chunk fields (Fill) for a
// body of bodyBytes; the store calls it in Commit before it publishes m.
func (w *Writer) Seal(ctx context.Context, m *teleport.Package, bodyBytes int64) error {
	w.mu.Lock()
	up := w.up
	w.mu.Unlock()
	var refs Refs
	if up != nil {
		var err error
		if refs, err = up.Seal(ctx); err != nil {
			return err
		}
	}
	Fill(m, refs, bodyBytes)
	return nil
}

// CheckDeadline is the upload's (rule 4); nil when no chunk was used.
func (w *Writer) CheckDeadline() error {
	w.mu.Lock()
	up := w.up
	w.mu.Unlock()
	if up == nil {
		return nil
	}
	return up.CheckDeadline()
}

// Abort discards the pack being written, if any.
func (w *Writer) Abort(ctx context.Context) error {
	w.mu.Lock()
	up := w.up
	w.mu.Unlock()
	if up == nil {
		return nil
	}
	return up.Abort(ctx)
}

// Packs lists the packs the package refers to so far, sorted.
func (w *Writer) Packs() []string {
	w.mu.Lock()
	up := w.up
	w.mu.Unlock()
	if up == nil {
		return nil
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	set := map[string]bool{}
	for _, lc := range up.refs {
		set[lc.pack] = true
	}
	out := make([]string, 0, len(set))
	for p := range set {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// Remaining is how long the upload may still take before its commit (the
// whole half grace period when no chunk was used yet).
func (w *Writer) Remaining() time.Duration {
	w.mu.Lock()
	up := w.up
	w.mu.Unlock()
	if up == nil {
		return w.Space.o.Grace / 2
	}
	return up.Remaining()
}

// Locate says where chunk id lies: its pack, offset and stored length
// (0 when the reader's packs do not hold it).
func (r *Reader) Locate(id teleport.ChunkID) (pack string, off int64, n int) {
	lc, ok := r.locs[id]
	if !ok {
		return "", 0, 0
	}
	return lc.pack, int64(lc.off), int(lc.info.StoredBytes)
}
