// Package fs is the filesystem package store, the embedded default
// ($KELPIE_HOME/packages). A package is a directory holding its blob and
// manifest; it is built under .tmp and renamed into place on commit, so a
// crash mid-write leaves nothing visible.
//
// Layout under the root:
//
//	packages/<id>/blob           the body: the package's sections back to back
//	packages/<id>/manifest.json  the teleport.Package
//	.tmp/                        uploads in progress (each locked by its writer)
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

	"github.com/kelpie/teleport"
)

const (
	packagesDir  = "packages"
	tmpDir       = ".tmp"
	blobFile     = "blob"
	manifestFile = "manifest.json"
)

// Store is a package store rooted at a directory.
type Store struct {
	root string
}

var _ teleport.Store = (*Store)(nil)
var _ teleport.GarbageCollector = (*Store)(nil)

// Open opens (creating if needed) a store rooted at dir.
func Open(dir string) (*Store, error) {
	if dir == "" {
		return nil, fmt.Errorf("store directory is empty: %w", teleport.ErrStore)
	}
	for _, d := range []string{packagesDir, tmpDir} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("open store %s: %v: %w", dir, err, teleport.ErrStore)
		}
	}
	return &Store{root: dir}, nil
}

// Root is the store's directory.
func (s *Store) Root() string { return s.root }

func (s *Store) pkgDir(id string) string { return filepath.Join(s.root, packagesDir, id) }

// BlobPath is where a committed package's blob lives (for tools that want
// the file itself, such as a backend adopting a memory section).
func (s *Store) BlobPath(id string) string { return filepath.Join(s.pkgDir(id), blobFile) }

func storeErr(op, id string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s package %s: %w", op, id, teleport.ErrNotFound)
	}
	return fmt.Errorf("%s package %s: %v: %w", op, id, err, teleport.ErrStore)
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
	dir, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), id+".")
	if err != nil {
		return nil, storeErr("create", id, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, blobFile), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		os.RemoveAll(dir)
		return nil, storeErr("create", id, err)
	}
	// The lock tells GC this upload is alive; it dies with the process.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		os.RemoveAll(dir)
		return nil, storeErr("create", id, err)
	}
	return &writer{s: s, id: id, dir: dir, f: f, h: sha256.New()}, nil
}

type writer struct {
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
	defer func() {
		if err != nil {
			w.f.Close()
			os.RemoveAll(w.dir)
		}
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
	// rename(2) of a directory onto an existing non-empty one fails, so two
	// committers of one id cannot both win.
	if err := os.Rename(w.dir, w.s.pkgDir(w.id)); err != nil {
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrAlreadyExists)
		}
		return storeErr("commit", w.id, err)
	}
	w.f.Close()
	if err := syncDir(filepath.Join(w.s.root, packagesDir)); err != nil {
		return storeErr("commit", w.id, err)
	}
	return nil
}

func (w *writer) Abort(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	w.f.Close()
	if err := os.RemoveAll(w.dir); err != nil {
		return storeErr("abort", w.id, err)
	}
	return nil
}

type reader struct {
	*os.File
	size int64
}

func (r *reader) Size() int64 { return r.size }

// Open opens a committed package's blob.
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
// rename), then its files are removed.
func (s *Store) Delete(ctx context.Context, id string) error {
	if err := teleport.ValidateID(id); err != nil {
		return err
	}
	trash, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), "deleted.")
	if err != nil {
		return storeErr("delete", id, err)
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

// GC removes uploads whose writer is gone (its process died or it never
// committed nor aborted) and leftovers of interrupted deletes.
func (s *Store) GC(ctx context.Context) (int, error) {
	dir := filepath.Join(s.root, tmpDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, storeErr("gc", "*", err)
	}
	removed := 0
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		p := filepath.Join(dir, e.Name())
		if e.IsDir() && inUse(filepath.Join(p, blobFile)) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return removed, storeErr("gc", e.Name(), err)
		}
		removed++
	}
	return removed, nil
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
