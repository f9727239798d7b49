// Package fs is the filesystem package store, the embedded default
// ($KELPIE_HOME/packages). A package is a directory holding its blob and
// manifest; it is built under .tmp and renamed into place on commit, so a
// crash mid-write leaves nothing visible.
//
// Layout under the root:
//
//	packages/<id>/blob           the body: the package's sections back to back
//	packages/<id>/manifest.json  the teleport.Package
//	.tmp/<id>.<random>/          an upload in progress, its blob locked by its writer
//	.tmp/deleted.<random>/       a package being deleted
//	.tmp/unpublished.<random>/   a package a failed Commit takes back
//	.tmp/.lock                   the store lock, which keeps GC off entries being made or used
//	chunks/                      the chunk space (store/chunks): packs/, dead/, and tmp/ for
//	                             objects being written, each locked by its writer
//
// The store works across processes on one host: locks are flock(2), and a
// process that dies releases its own. GC removes what dead writers left.
// The store must never show a package before its blob and manifest are on
// disk, fail a Commit whose package stays visible, or let GC remove
// anything a live writer or a running Delete holds.
package fs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

const (
	packagesDir  = "packages"
	tmpDir       = ".tmp"
	blobFile     = "blob"
	manifestFile = "manifest.json"
)

// Store is a package store rooted at a directory.
type Store struct {
	root   string
	bucket *bucket
	chunks *chunks.Space
}

var _ teleport.ChunkStore = (*Store)(nil)
var _ teleport.GarbageCollector = (*Store)(nil)

// Options tune a Store; the zero value is the default.
type Options struct {
	// ChunkGrace is the chunk space's grace period (chunks.GraceDefault).
	ChunkGrace time.Duration
	// Clock replaces the system clock for the chunk space (tests make time
	// pass with it).
	Clock func() time.Time
}

// Open opens (creating if needed) a store rooted at dir.
func Open(dir string) (*Store, error) { return OpenWith(dir, Options{}) }

// OpenWith opens a store with options.
func OpenWith(dir string, o Options) (*Store, error) {
	if dir == "" {
		return nil, fmt.Errorf("store directory is empty: %w", teleport.ErrStore)
	}
	for _, d := range []string{packagesDir, tmpDir} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("open store %s: %v: %w", dir, err, teleport.ErrStore)
		}
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	s := &Store{root: dir}
	b, err := newBucket(dir, o.Clock, s.lock)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %v: %w", dir, err, teleport.ErrStore)
	}
	s.bucket, s.chunks = b, chunks.New(b, chunks.Options{Grace: o.ChunkGrace, Clock: o.Clock, ReadWorkers: 2})
	return s, nil
}

// OpenChunks gives access to a committed package's chunks.
func (s *Store) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	return s.chunks.Open(ctx, pkg.ChunkPacks)
}

// Root is the store's directory.
func (s *Store) Root() string { return s.root }

func (s *Store) pkgDir(id string) string { return filepath.Join(s.root, packagesDir, id) }

// BlobPath is where a committed package's blob lives (for tools that want
// the file itself, such as a backend adopting a memory section).
func (s *Store) BlobPath(id string) string { return filepath.Join(s.pkgDir(id), blobFile) }

func storeErr(op, id string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s package %s: %w", op, id, err)
	}
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s package %s: %w", op, id, teleport.ErrNotFound)
	}
	return fmt.Errorf("%s package %s: %v: %w", op, id, err, teleport.ErrStore)
}

// The store lock, .tmp/.lock, keeps GC off the entries under .tmp that no
// writer's own lock protects: Create holds it shared from making an
// upload's directory until the upload's blob is locked, Delete (and a
// Commit taking its package back) for as long as their entry sits in .tmp,
// and GC holds it exclusively while it scans and removes. So every entry
// under .tmp is protected from the moment it exists; after that, an upload
// is protected by the lock on its blob until it is renamed or removed.
//
// flock(2) locks belong to an open file, so every holder opens the lock
// file itself: goroutines of one process then exclude each other just as
// processes do.
const lockFile = ".lock" // an id never starts with '.', so no upload has this name

// flock cannot wait on a context, so a busy lock is polled.
const (
	lockPollMinInterval = time.Millisecond
	lockPollMaxInterval = 20 * time.Millisecond
)

// Test hooks, nil in production. They let tests act inside the windows the
// store lock guards, and fail steps a real filesystem will not fail on cue.
var (
	hookCreateWindow func(dir string)     // Create: the upload's directory exists, its blob is not locked yet
	hookDeleteWindow func(trash string)   // Delete: the trash directory exists, the package is not in it yet
	hookGCListed     func()               // GC: .tmp is listed, nothing removed yet
	hookLockWait     func(exclusive bool) // the store lock is busy and the caller is about to wait
	hookSyncPackages func() error         // Commit: fails the sync of packages/ after the rename
	hookTakeBack     func() error         // Commit: fails taking a package back
)

// lock takes the store lock, shared (syscall.LOCK_SH) or exclusive
// (syscall.LOCK_EX), waiting while ctx allows. Closing the returned file
// releases it.
func (s *Store) lock(ctx context.Context, how int) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(s.root, tmpDir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	wait := lockPollMinInterval
	for {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, err
		}
		if hookLockWait != nil {
			hookLockWait(how == syscall.LOCK_EX)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			f.Close()
			return nil, ctx.Err()
		case <-t.C:
		}
		wait = min(2*wait, lockPollMaxInterval)
	}
}

// Create starts writing a package.
func (s *Store) Create(ctx context.Context, id string) (teleport.Writer, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(s.pkgDir(id)); err == nil {
		return nil, fmt.Errorf("create package %s: %w", id, teleport.ErrAlreadyExists)
	}
	l, err := s.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return nil, storeErr("create", id, err)
	}
	defer l.Close()
	dir, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), id+".")
	if err != nil {
		return nil, storeErr("create", id, err)
	}
	if hookCreateWindow != nil {
		hookCreateWindow(dir)
	}
	f, err := os.OpenFile(filepath.Join(dir, blobFile), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		os.RemoveAll(dir)
		return nil, storeErr("create", id, err)
	}
	// The lock tells GC this upload is alive; it dies with the process.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		os.RemoveAll(dir)
		f.Close()
		return nil, storeErr("create", id, err)
	}
	return &writer{s: s, id: id, dir: dir, f: f, h: sha256.New(), Writer: chunks.Writer{Space: s.chunks}}, nil
}

// writer is one upload. Its directory leaves .tmp (renamed into place or
// removed) before its blob's lock is released, so an unlocked upload in
// .tmp is always a dead one.
type writer struct {
	chunks.Writer
	s    *Store
	id   string
	dir  string
	f    *os.File
	h    hash.Hash
	n    int64
	done bool
}

func (w *writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("write package %s: %w", w.id, teleport.ErrCommitted)
	}
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	if err != nil {
		return n, storeErr("write", w.id, err)
	}
	return n, nil
}

func (w *writer) Commit(ctx context.Context, m *teleport.Package) (err error) {
	if w.done {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrCommitted)
	}
	w.done = true
	published := false
	defer func() {
		if err != nil && !published {
			os.RemoveAll(w.dir)
		}
		w.f.Close()
	}()
	if err := ctx.Err(); err != nil {
		return err
	}
	sum := hex.EncodeToString(w.h.Sum(nil))
	if m.ID == "" {
		m.ID = w.id
	}
	if m.ID != w.id {
		return fmt.Errorf("commit package %s: manifest names %s: %w", w.id, m.ID, teleport.ErrInvalidPackage)
	}
	if (m.SizeBytes != 0 && m.SizeBytes != w.n) || (m.BlobSHA256 != "" && m.BlobSHA256 != sum) {
		return fmt.Errorf("commit package %s: wrote %d bytes sha256 %s, manifest expects %d bytes %s: %w", w.id, w.n, sum, m.SizeBytes, m.BlobSHA256, teleport.ErrChecksumMismatch)
	}
	m.SizeBytes, m.BlobSHA256 = w.n, sum
	// The chunks are durable before the manifest refers to them.
	if err := w.Seal(ctx, m, w.n); err != nil {
		return err
	}
	// After the store's own fields, so that the sections are checked
	// against the bytes actually written.
	if err := m.Validate(); err != nil {
		return err
	}
	if err := w.f.Sync(); err != nil {
		return storeErr("commit", w.id, err)
	}
	mb, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return storeErr("commit", w.id, err)
	}
	if err := writeFileSync(filepath.Join(w.dir, manifestFile), mb); err != nil {
		return storeErr("commit", w.id, err)
	}
	if err := syncDir(w.dir); err != nil {
		return storeErr("commit", w.id, err)
	}
	// The chunk rule's last check comes just before the package appears.
	if err := w.CheckDeadline(); err != nil {
		return err
	}
	// rename(2) of a directory onto an existing non-empty one fails, so two
	// committers of one id cannot both win.
	if err := os.Rename(w.dir, w.s.pkgDir(w.id)); err != nil {
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrAlreadyExists)
		}
		return storeErr("commit", w.id, err)
	}
	published = true
	// The package is visible from here on: Commit returns nil exactly when
	// it is, so a failure now takes it back before it is reported.
	sync := func() error { return syncDir(filepath.Join(w.s.root, packagesDir)) }
	if hookSyncPackages != nil {
		sync = hookSyncPackages
	}
	if err := sync(); err != nil {
		if terr := w.takeBack(context.WithoutCancel(ctx)); terr != nil {
			return fmt.Errorf("commit package %s: %v, and taking it back failed (%v): the package may be visible: %w", w.id, err, terr, teleport.ErrStore)
		}
		return fmt.Errorf("commit package %s: %v (the package is not visible): %w", w.id, err, teleport.ErrStore)
	}
	return nil
}

// takeBack unpublishes the package this writer has just renamed into place:
// into a trash directory under .tmp, then removed. When the package there
// is not ours any more (deleted meanwhile, perhaps committed again by
// another upload), ours is not visible and the other stays.
func (w *writer) takeBack(ctx context.Context) error {
	own, err := w.f.Stat()
	if err != nil {
		return err
	}
	cur, err := os.Stat(w.s.BlobPath(w.id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !os.SameFile(own, cur) {
		return nil
	}
	l, err := w.s.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return err
	}
	defer l.Close()
	if hookTakeBack != nil {
		if err := hookTakeBack(); err != nil {
			return err
		}
	}
	trash, err := os.MkdirTemp(filepath.Join(w.s.root, tmpDir), "unpublished.")
	if err != nil {
		return err
	}
	if err := os.Rename(w.s.pkgDir(w.id), filepath.Join(trash, w.id)); err != nil {
		os.Remove(trash)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // deleted meanwhile
		}
		return err
	}
	// Best effort: the running system now agrees with Commit's error;
	// whether that survives a crash was the failed sync's job.
	syncDir(filepath.Join(w.s.root, packagesDir))
	os.RemoveAll(trash)
	return nil
}

func (w *writer) Abort(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	err := os.RemoveAll(w.dir) // before the lock goes: see writer
	w.f.Close()
	cerr := w.Writer.Abort(ctx)
	if err != nil {
		return storeErr("abort", w.id, err)
	}
	return cerr
}

type reader struct {
	*os.File
	size int64
}

func (r *reader) Size() int64 { return r.size }

// Open opens a committed package's body.
func (s *Store) Open(ctx context.Context, id string) (teleport.Reader, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	f, err := os.Open(s.BlobPath(id))
	if err != nil {
		return nil, storeErr("open", id, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, storeErr("open", id, err)
	}
	return &reader{File: f, size: fi.Size()}, nil
}

// Stat reads a committed package's manifest.
func (s *Store) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(s.pkgDir(id), manifestFile))
	if err != nil {
		return nil, storeErr("stat", id, err)
	}
	var m teleport.Package
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("stat package %s: manifest is not valid JSON (%v): %w", id, err, teleport.ErrInvalidPackage)
	}
	return &m, nil
}

// List returns the committed packages sorted by id.
func (s *Store) List(ctx context.Context) ([]*teleport.Package, error) {
	ents, err := os.ReadDir(filepath.Join(s.root, packagesDir))
	if err != nil {
		return nil, storeErr("list", "*", err)
	}
	out := []*teleport.Package{}
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if !e.IsDir() || teleport.ValidateID(e.Name()) != nil {
			continue
		}
		m, err := s.Stat(ctx, e.Name())
		if errors.Is(err, teleport.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Delete removes a committed package: it vanishes from view at once (a
// rename into a trash directory under .tmp), then its files are removed.
// It holds the store lock throughout, since nothing else tells GC that the
// trash directory is in use.
func (s *Store) Delete(ctx context.Context, id string) error {
	if err := teleport.ValidateID(id); err != nil {
		return err
	}
	l, err := s.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return storeErr("delete", id, err)
	}
	defer l.Close()
	trash, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), "deleted.")
	if err != nil {
		return storeErr("delete", id, err)
	}
	if hookDeleteWindow != nil {
		hookDeleteWindow(trash)
	}
	dst := filepath.Join(trash, id)
	if err := os.Rename(s.pkgDir(id), dst); err != nil {
		os.Remove(trash)
		return storeErr("delete", id, err)
	}
	if err := os.RemoveAll(trash); err != nil {
		return storeErr("delete", id, err)
	}
	return nil
}

// GC removes uploads whose writer is gone (its process died, or the writer
// was dropped without Commit or Abort) and leftovers of interrupted
// deletes, then runs the chunk space's rule (teleport.ChunkID) over the
// packs committed manifests list, and reports how many entries and packs
// it removed.
func (s *Store) GC(ctx context.Context) (int, error) {
	n, err := s.gcUploads(ctx)
	if err != nil {
		return n, err
	}
	m, err := s.chunks.GC(ctx, func(ctx context.Context) (map[string]bool, error) {
		pkgs, err := s.List(ctx)
		if err != nil {
			return nil, err
		}
		return chunks.Referenced(pkgs), nil
	})
	return n + m, err
}

// gcUploads removes dead entries under .tmp. With the store lock held
// exclusively, every entry there is either a live upload, whose blob its
// writer keeps locked, or dead.
func (s *Store) gcUploads(ctx context.Context) (int, error) {
	l, err := s.lock(ctx, syscall.LOCK_EX)
	if err != nil {
		return 0, storeErr("gc", "*", err)
	}
	defer l.Close()
	dir := filepath.Join(s.root, tmpDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, storeErr("gc", "*", err)
	}
	if hookGCListed != nil {
		hookGCListed()
	}
	removed := 0
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		if e.Name() == lockFile {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if e.IsDir() && inUse(filepath.Join(p, blobFile)) {
			continue
		}
		// Committed or aborted since the listing: nothing to remove, and
		// nothing to count.
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return removed, storeErr("gc", e.Name(), err)
		}
		removed++
	}
	n, err := s.bucket.gcTemp(ctx)
	return removed + n, err
}

// inUse reports whether a live writer holds the upload's lock.
func inUse(blob string) bool {
	f, err := os.Open(blob)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
