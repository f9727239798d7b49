package dst

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

// StoreOp names a store call, for the fault hook.
type StoreOp int

// The store calls.
const (
	StoreOpCreate StoreOp = iota
	StoreOpWrite
	StoreOpCommit
	StoreOpOpen
	StoreOpRead
	StoreOpStat
	StoreOpList
	StoreOpDelete
	StoreOpChunkPut  // the chunk space writes an object (a pack, its index)
	StoreOpChunkGet  // the chunk space reads an object
	StoreOpChunkList // the chunk space lists its objects
)

var storeOpNames = [...]string{"create", "write", "commit", "open", "read", "stat", "list", "delete", "chunk-put", "chunk-get", "chunk-list"}

func (o StoreOp) String() string {
	if int(o) >= 0 && int(o) < len(storeOpNames) {
		return storeOpNames[o]
	}
	return fmt.Sprintf("store-op(%d)", int(o))
}

// StoreOutcome is the fault hook's verdict on one store call.
type StoreOutcome int

// The outcomes. Fail and Timeout happen before the call takes effect;
// AckLost (commit and chunk-put only) after it; Interrupt (commit only)
// cuts the transfer part way through.
const (
	Proceed StoreOutcome = iota
	Fail
	Timeout
	AckLost
	Interrupt
)

// StoreFaults decides the fate of each store call. id is the package
// involved ("" for List) and n the bytes moved.
type StoreFaults interface {
	StoreFault(op StoreOp, id string, n int64) StoreOutcome
}

// StoreBugs are test-only switches that break the store on purpose, so the
// simulation can show its invariants catch them. The zero value is correct.
type StoreBugs struct {
	// PublishBeforeComplete makes Commit publish the manifest first and copy
	// the blob after it, so an interrupted commit leaves a visible package
	// whose blob is truncated (the classic "write in place" bug).
	PublishBeforeComplete bool
}

// StoreOptions configure a Store. The zero value is a correct, fault-free,
// unlimited store.
type StoreOptions struct {
	// Clock dates uploads for GC; nil means GC never finds anything stale.
	Clock interface{ Now() time.Time }
	// Faults decides injected failures; nil injects none.
	Faults StoreFaults
	// ObjectSizeMaxBytes bounds one package body (a quota); 0 means no
	// limit.
	ObjectSizeMaxBytes int64
	// UploadTTL is how long an unfinished upload may sit idle before GC
	// takes its writer for dead and removes it (default 1 h).
	UploadTTL time.Duration
	// ChunkGrace is the chunk space's grace period (default 20 s: short
	// against a run, so that condemnations and sweeps happen in one).
	ChunkGrace time.Duration
	// OnChunkViolation is told when GC removes a pack that a live upload
	// still refers to (the chunk rule broken); nil ignores it.
	OnChunkViolation func(detail string)
	Bugs             StoreBugs
}

const chunkGraceDefault = 20 * time.Second

const uploadTTLDefault = time.Hour

// Store is the simulated package store: a teleport.Store with atomic
// commit, orphaned uploads that GC removes, injectable faults at every call,
// and a god's-eye view (Peek, Committed, CorruptAtRest) that the simulator's
// checker reads without going through faults. Blobs are held in memory, so
// it is for simulated (small) snapshots only.
type Store struct {
	opts StoreOptions

	mu      sync.Mutex
	pkgs    map[string]*object
	uploads []*writer // unfinished uploads, in creation order
	version uint64

	objs    *chunks.MemBucket // the chunk space's objects
	space   *chunks.Space
	peek    *chunks.Space // the same objects, without faults
	packSeq int
	inGC    bool
}

type object struct {
	manifest []byte // JSON, so callers never share our copy
	blob     []byte // the package's body: all its sections
	version  uint64 // changes whenever the object does (commit, corruption)
}

var (
	_ teleport.ChunkStore       = (*Store)(nil)
	_ teleport.GarbageCollector = (*Store)(nil)
)

// NewStore returns an empty simulated store.
func NewStore(o StoreOptions) *Store {
	if o.UploadTTL <= 0 {
		o.UploadTTL = uploadTTLDefault
	}
	if o.ChunkGrace <= 0 {
		o.ChunkGrace = chunkGraceDefault
	}
	s := &Store{opts: o, pkgs: map[string]*object{}}
	s.objs = chunks.NewMemBucket(s.now)
	co := chunks.Options{Grace: o.ChunkGrace, Clock: s.now, ReadWorkers: 1, NewName: func() string {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.packSeq++
		return fmt.Sprintf("p%d", s.packSeq)
	}}
	s.space = chunks.New(&simBucket{s: s, faults: true}, co)
	s.peek = chunks.New(&simBucket{s: s}, co)
	return s
}

func (s *Store) now() time.Time {
	if s.opts.Clock == nil {
		return time.Time{}
	}
	return s.opts.Clock.Now()
}

// fault asks the hook about one call and turns Fail and Timeout into
// errors; other outcomes are the caller's to act on.
func (s *Store) fault(op StoreOp, id string, n int64) (StoreOutcome, error) {
	if s.opts.Faults == nil {
		return Proceed, nil
	}
	switch out := s.opts.Faults.StoreFault(op, id, n); out {
	case Fail:
		return out, fmt.Errorf("store %s %s: %w: %w", op, id, ErrInjected, teleport.ErrStore)
	case Timeout:
		return out, fmt.Errorf("store %s %s: no answer in time: %w: %w: %w", op, id, ErrInjected, context.DeadlineExceeded, teleport.ErrStore)
	default:
		return out, nil
	}
}

// Create starts a package upload.
func (s *Store) Create(ctx context.Context, id string) (teleport.Writer, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := s.fault(StoreOpCreate, id, 0); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pkgs[id]; ok {
		return nil, fmt.Errorf("create package %s: %w", id, teleport.ErrAlreadyExists)
	}
	w := &writer{s: s, id: id, last: s.now(), Writer: chunks.Writer{Space: s.space}}
	s.uploads = append(s.uploads, w)
	return w, nil
}

type writer struct {
	chunks.Writer
	s       *Store
	id      string
	buf     []byte
	done    bool
	expired bool // GC removed the upload: nothing more can land
	last    time.Time
}

func (w *writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("write package %s: %w", w.id, teleport.ErrCommitted)
	}
	if _, err := w.s.fault(StoreOpWrite, w.id, int64(len(p))); err != nil {
		return 0, err
	}
	now := w.s.now()
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	if w.expired {
		return 0, fmt.Errorf("write package %s: the upload expired: %w", w.id, teleport.ErrStore)
	}
	if max := w.s.opts.ObjectSizeMaxBytes; max > 0 && int64(len(w.buf))+int64(len(p)) > max {
		return 0, fmt.Errorf("write package %s: blob would exceed the %d-byte object limit: %w", w.id, max, teleport.ErrStore)
	}
	w.buf = append(w.buf, p...)
	w.last = now
	return len(p), nil
}

// Commit publishes the blob and manifest atomically: the object is built
// completely, then inserted under the lock in one step.
func (w *writer) Commit(ctx context.Context, m *teleport.Package) error {
	if w.done {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrCommitted)
	}
	w.done = true
	s := w.s
	s.mu.Lock()
	expired, blob := w.expired, w.buf
	s.mu.Unlock()
	if expired {
		return fmt.Errorf("commit package %s: the upload expired: %w", w.id, teleport.ErrStore)
	}
	if err := ctx.Err(); err != nil {
		s.drop(w)
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	out, err := s.fault(StoreOpCommit, w.id, int64(len(blob)))
	if err != nil {
		if out == Fail {
			s.drop(w) // refused: the store discarded the staged bytes
		}
		return err // a timeout leaves the staged upload as an orphan
	}
	sum := sha256.Sum256(blob)
	hexSum := hex.EncodeToString(sum[:])
	n := int64(len(blob))
	if m.ID == "" {
		m.ID = w.id
	}
	if m.ID != w.id {
		s.drop(w)
		return fmt.Errorf("commit package %s: manifest names %s: %w", w.id, m.ID, teleport.ErrInvalidPackage)
	}
	if (m.SizeBytes != 0 && m.SizeBytes != n) || (m.BlobSHA256 != "" && m.BlobSHA256 != hexSum) {
		s.drop(w)
		return fmt.Errorf("commit package %s: blob does not match manifest: %w", w.id, teleport.ErrChecksumMismatch)
	}
	m.SizeBytes, m.BlobSHA256 = n, hexSum
	// The chunks are durable before the manifest refers to them.
	if err := w.Seal(ctx, m, n); err != nil {
		s.drop(w)
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	if err := m.Validate(); err != nil {
		s.drop(w)
		return err
	}
	// The chunk rule's last check comes just before the package appears.
	if err := w.CheckDeadline(); err != nil {
		s.drop(w)
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	mb, err := json.Marshal(m)
	if err != nil {
		s.drop(w)
		return fmt.Errorf("commit package %s: %v: %w", w.id, err, teleport.ErrInvalidPackage)
	}
	if out == Interrupt {
		cut := blob[:len(blob)/2]
		if !s.opts.Bugs.PublishBeforeComplete {
			// The transfer broke off: what arrived stays staged, invisible,
			// until GC.
			s.mu.Lock()
			w.buf = cut
			s.mu.Unlock()
			return fmt.Errorf("commit package %s: transfer cut after %d of %d bytes: %w: %w", w.id, len(cut), n, ErrInjected, teleport.ErrStore)
		}
		// The planted bug: the manifest went up first, so the package is
		// visible with half a blob.
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.pkgs[w.id]; !ok {
			s.version++
			s.pkgs[w.id] = &object{manifest: mb, blob: bytes.Clone(cut), version: s.version}
		}
		s.dropLocked(w)
		return fmt.Errorf("commit package %s: transfer cut after %d of %d bytes: %w: %w", w.id, len(cut), n, ErrInjected, teleport.ErrStore)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(w)
	if _, ok := s.pkgs[w.id]; ok {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrAlreadyExists)
	}
	s.version++
	s.pkgs[w.id] = &object{manifest: mb, blob: blob, version: s.version}
	w.buf = nil
	if out == AckLost {
		return fmt.Errorf("commit package %s: connection lost before the answer: %w: %w", w.id, ErrInjected, teleport.ErrStore)
	}
	return nil
}

// Abort discards the upload. Abort needs no answer from the store, so it is
// never a fault point.
func (w *writer) Abort(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	w.s.drop(w)
	return w.Writer.Abort(ctx)
}

func (s *Store) drop(w *writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(w)
}

func (s *Store) dropLocked(w *writer) {
	for i, u := range s.uploads {
		if u == w {
			s.uploads = append(s.uploads[:i], s.uploads[i+1:]...)
			w.buf = nil
			return
		}
	}
}

type reader struct {
	s    *Store
	id   string
	data []byte
}

func (r *reader) Size() int64  { return int64(len(r.data)) }
func (r *reader) Close() error { return nil }

func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read package %s: negative offset %d: %w", r.id, off, teleport.ErrStore)
	}
	if _, err := r.s.fault(StoreOpRead, r.id, int64(len(p))); err != nil {
		return 0, err
	}
	if off >= int64(len(r.data)) {
		return 0, io.EOF
	}
	n := copy(p, r.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *Store) get(op StoreOp, id string) (*object, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	if _, err := s.fault(op, id, 0); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.pkgs[id]
	if !ok {
		return nil, fmt.Errorf("%s package %s: %w", op, id, teleport.ErrNotFound)
	}
	return o, nil
}

// Open returns random access to a committed blob.
func (s *Store) Open(ctx context.Context, id string) (teleport.Reader, error) {
	o, err := s.get(StoreOpOpen, id)
	if err != nil {
		return nil, err
	}
	// Objects are replaced, never changed in place, so the reader keeps a
	// consistent view.
	return &reader{s: s, id: id, data: o.blob}, nil
}

// Stat returns a copy of a committed manifest.
func (s *Store) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	o, err := s.get(StoreOpStat, id)
	if err != nil {
		return nil, err
	}
	return decodeManifest(id, o.manifest)
}

func decodeManifest(id string, b []byte) (*teleport.Package, error) {
	var m teleport.Package
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("package %s: manifest unreadable: %v: %w", id, err, teleport.ErrStore)
	}
	return &m, nil
}

// List returns every committed manifest, sorted by id.
func (s *Store) List(ctx context.Context) ([]*teleport.Package, error) {
	if _, err := s.fault(StoreOpList, "", 0); err != nil {
		return nil, err
	}
	ids := s.Committed()
	out := []*teleport.Package{}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		m, err := decodeManifest(id, s.pkgs[id].manifest)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// Delete removes a committed package.
func (s *Store) Delete(ctx context.Context, id string) error {
	if _, err := s.get(StoreOpDelete, id); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pkgs[id]; !ok {
		return fmt.Errorf("delete package %s: %w", id, teleport.ErrNotFound)
	}
	delete(s.pkgs, id)
	return nil
}

// GC removes uploads idle for UploadTTL: their writer crashed or walked
// away. A writer that writes again within the TTL keeps its upload, and a
// committed package is never touched: the rules of the real stores, with
// idleness on the simulated clock for a lock or a lease. It is the store's
// own lifecycle rule, so it is never a fault point.
func (s *Store) GC(ctx context.Context) (int, error) {
	now := s.now()
	s.mu.Lock()
	if s.inGC {
		s.mu.Unlock()
		return 0, nil
	}
	s.inGC = true
	removed := 0
	kept := s.uploads[:0]
	for _, u := range s.uploads {
		if !u.last.Add(s.opts.UploadTTL).After(now) {
			u.buf, u.expired = nil, true
			removed++
			continue
		}
		kept = append(kept, u)
	}
	s.uploads = kept
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inGC = false
		s.mu.Unlock()
	}()
	n, err := s.space.GC(context.WithValue(ctx, gcKey{}, true), func(context.Context) (map[string]bool, error) {
		s.mu.Lock()
		defer s.mu.Unlock()
		refs := map[string]bool{}
		for _, o := range s.pkgs {
			m, err := decodeManifest("", o.manifest)
			if err != nil {
				return nil, err
			}
			for _, p := range m.ChunkPacks {
				refs[p] = true
			}
		}
		return refs, nil
	})
	return removed + n, err
}

// gcKey marks the chunk space's calls made by GC, which are the store's
// own lifecycle and never fault points.
type gcKey struct{}

// OpenChunks gives access to a committed package's chunks.
func (s *Store) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	if _, err := s.fault(StoreOpOpen, pkg.ID, 0); err != nil {
		return nil, err
	}
	return s.space.Open(ctx, pkg.ChunkPacks)
}

// simBucket is the chunk space's bucket: the store's objects, dated by
// the simulated clock, every call a fault point (unless made by GC, or
// for the god's-eye view).
type simBucket struct {
	s      *Store
	faults bool
}

func (b *simBucket) fault(ctx context.Context, op StoreOp, key string, n int64) (StoreOutcome, error) {
	if !b.faults || ctx.Value(gcKey{}) != nil {
		return Proceed, nil
	}
	return b.s.fault(op, key, n)
}

func (b *simBucket) Put(ctx context.Context, key string, data []byte) error {
	out, err := b.fault(ctx, StoreOpChunkPut, key, int64(len(data)))
	if err != nil {
		return err
	}
	if err := b.s.objs.Put(ctx, key, data); err != nil {
		return err
	}
	if out == AckLost {
		return fmt.Errorf("chunk space put %s: connection lost before the answer: %w: %w", key, ErrInjected, teleport.ErrStore)
	}
	return nil
}

type simObjectWriter struct {
	b    *simBucket
	key  string
	buf  []byte
	done bool
}

func (b *simBucket) Create(ctx context.Context, key string) (chunks.ObjectWriter, error) {
	return &simObjectWriter{b: b, key: key}, nil
}

func (w *simObjectWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	return len(p), nil
}

func (w *simObjectWriter) Close(ctx context.Context) error {
	if w.done {
		return fmt.Errorf("chunk object %s: %w", w.key, teleport.ErrCommitted)
	}
	w.done = true
	return w.b.Put(ctx, w.key, w.buf)
}

func (w *simObjectWriter) Abort(context.Context) error { w.done, w.buf = true, nil; return nil }

func (b *simBucket) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	if _, err := b.fault(ctx, StoreOpChunkGet, key, 0); err != nil {
		return nil, err
	}
	return b.s.objs.Get(ctx, key, limit)
}

func (b *simBucket) ReadAt(ctx context.Context, key string, p []byte, off int64) error {
	if _, err := b.fault(ctx, StoreOpChunkGet, key, int64(len(p))); err != nil {
		return err
	}
	return b.s.objs.ReadAt(ctx, key, p, off)
}

func (b *simBucket) List(ctx context.Context, prefix string) ([]chunks.Object, error) {
	if _, err := b.fault(ctx, StoreOpChunkList, prefix, 0); err != nil {
		return nil, err
	}
	return b.s.objs.List(ctx, prefix)
}

// Delete is only ever GC's: it checks the chunk rule as it removes a
// pack's bytes, against every upload still in flight.
func (b *simBucket) Delete(ctx context.Context, key string) error {
	s := b.s
	if err := s.objs.Delete(ctx, key); err != nil {
		return err
	}
	pack, isPack := strings.CutSuffix(strings.TrimPrefix(key, "packs/"), ".pack")
	if !isPack || s.opts.OnChunkViolation == nil {
		return nil
	}
	s.mu.Lock()
	var live []*writer
	for _, u := range s.uploads {
		if !u.expired && slices.Contains(u.Packs(), pack) && u.Remaining() > 0 {
			live = append(live, u)
		}
	}
	s.mu.Unlock()
	if len(live) > 0 {
		s.opts.OnChunkViolation(fmt.Sprintf("GC removed chunk pack %s, which the upload of package %s in flight refers to", pack, live[0].id))
	}
	return nil
}

func (b *simBucket) Now(context.Context) (time.Time, error) { return b.s.now(), nil }

// The god's-eye view of the chunk space.

// PeekChunks reads a committed package's chunks without faults.
func (s *Store) PeekChunks(ctx context.Context, packs []string) (teleport.ChunkReader, error) {
	return s.peek.Open(ctx, packs)
}

// ChunkLocation says where chunk c lies, as cr (a PeekChunks reader)
// finds it: its pack, offset and stored length (0 if not found).
func (s *Store) ChunkLocation(cr teleport.ChunkReader, c teleport.ChunkID) (pack string, off int64, n int) {
	r, ok := cr.(*chunks.Reader)
	if !ok {
		return "", 0, 0
	}
	return r.Locate(c)
}

// ChunkObjects lists the chunk space's objects.
func (s *Store) ChunkObjects() []string { return s.objs.Keys() }

// ChunkVersion changes whenever the chunk space's objects do.
func (s *Store) ChunkVersion() uint64 { return s.objs.Version() }

// CorruptChunkAtRest flips one bit of a pack of the chunk space (bit is
// taken modulo the pack's bits) and returns the offset hit.
func (s *Store) CorruptChunkAtRest(pack string, bit uint64) (int64, error) {
	return s.objs.FlipBit("packs/"+pack+".pack", bit)
}

// The god's-eye view: what the checker reads, bypassing faults.

// Committed returns the ids of committed packages, sorted.
func (s *Store) Committed() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.pkgs))
	for id := range s.pkgs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Object is a committed package as the store holds it.
type Object struct {
	Manifest []byte
	Blob     []byte
	// Version changes whenever the object does, so checks can be cached.
	Version uint64
}

// Peek returns a committed package without faults. The slices must not be
// modified.
func (s *Store) Peek(id string) (Object, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.pkgs[id]
	if !ok {
		return Object{}, false
	}
	return Object{Manifest: o.manifest, Blob: o.blob, Version: o.version}, true
}

// CorruptAtRest flips one bit of a committed blob (bit is taken modulo the
// blob's length in bits) and returns the byte offset it hit.
func (s *Store) CorruptAtRest(id string, bit uint64) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.pkgs[id]
	if !ok {
		return 0, fmt.Errorf("corrupt package %s: %w", id, teleport.ErrNotFound)
	}
	if len(o.blob) == 0 {
		return 0, fmt.Errorf("corrupt package %s: empty blob: %w", id, teleport.ErrInvalidPackage)
	}
	bit %= uint64(len(o.blob)) * 8
	b := bytes.Clone(o.blob) // copy on write: open readers keep their view
	b[bit/8] ^= 1 << (bit % 8)
	s.version++
	s.pkgs[id] = &object{manifest: o.manifest, blob: b, version: s.version}
	return int64(bit / 8), nil
}

// PendingUploads counts unfinished uploads (in progress or orphaned).
func (s *Store) PendingUploads() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.uploads)
}
