package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

// bucket keeps the chunk space's objects as files under chunks/: a key
// "packs/x.pack" is the file chunks/packs/x.pack. Whole objects are
// written to chunks/tmp, synced and renamed into place; an object being
// streamed is locked by its writer (flock), so GC can tell it from one a
// dead process left.
type bucket struct {
	dir   string
	clock func() time.Time
	// lock takes the store lock (see Store.lock): held shared while a
	// temporary file is made and locked, exclusively by GC.
	lock func(ctx context.Context, how int) (*os.File, error)
}

var _ chunks.Bucket = (*bucket)(nil)

const (
	chunksDir    = "chunks"
	chunksTmpDir = "tmp"
)

func newBucket(root string, clock func() time.Time, lock func(context.Context, int) (*os.File, error)) (*bucket, error) {
	b := &bucket{dir: filepath.Join(root, chunksDir), clock: clock, lock: lock}
	for _, d := range []string{"packs", "dead", chunksTmpDir} {
		if err := os.MkdirAll(filepath.Join(b.dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func (b *bucket) path(key string) (string, error) {
	clean := filepath.Clean(key)
	if key == "" || clean != key || strings.HasPrefix(key, "/") || strings.HasPrefix(key, "..") || strings.HasPrefix(key, chunksTmpDir+"/") {
		return "", fmt.Errorf("chunk space key %q: %w", key, teleport.ErrStore)
	}
	return filepath.Join(b.dir, key), nil
}

func objErr(op, key string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s %s: %w", op, key, teleport.ErrNotFound)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s %s: %w", op, key, err)
	}
	return fmt.Errorf("%s %s: %v: %w", op, key, err, teleport.ErrStore)
}

// Put writes a whole object: temp file, fsync, rename, directory fsync.
func (b *bucket) Put(ctx context.Context, key string, data []byte) error {
	w, err := b.Create(ctx, key)
	if err != nil {
		return err
	}
	if _, err := w.Write(data); err != nil {
		w.Abort(ctx)
		return err
	}
	return w.Close(ctx)
}

type fileWriter struct {
	b    *bucket
	key  string
	dst  string
	f    *os.File
	done bool
}

// Create streams an object into a locked temporary file.
func (b *bucket) Create(ctx context.Context, key string) (chunks.ObjectWriter, error) {
	dst, err := b.path(key)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l, err := b.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return nil, objErr("create", key, err)
	}
	defer l.Close()
	f, err := os.CreateTemp(filepath.Join(b.dir, chunksTmpDir), "obj.")
	if err != nil {
		return nil, objErr("create", key, err)
	}
	// The lock tells GC the temporary file is alive; it dies with the
	// process.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, objErr("create", key, err)
	}
	return &fileWriter{b: b, key: key, dst: dst, f: f}, nil
}

func (w *fileWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	if err != nil {
		return n, objErr("write", w.key, err)
	}
	return n, nil
}

func (w *fileWriter) Close(ctx context.Context) error {
	if w.done {
		return fmt.Errorf("object %s: %w", w.key, teleport.ErrCommitted)
	}
	w.done = true
	fail := func(err error) error {
		w.f.Close()
		os.Remove(w.f.Name())
		return objErr("write", w.key, err)
	}
	if err := w.f.Sync(); err != nil {
		return fail(err)
	}
	// The object's time is the bucket's clock's (the system's in
	// production; a test's moves it): GC judges ages by that clock alone.
	now := w.b.clock()
	if err := os.Chtimes(w.f.Name(), now, now); err != nil {
		return fail(err)
	}
	// Renamed before the lock goes (with the file), so an unlocked
	// temporary file is always a dead one.
	if err := os.Rename(w.f.Name(), w.dst); err != nil {
		return fail(err)
	}
	w.f.Close()
	if err := syncDir(filepath.Dir(w.dst)); err != nil {
		return objErr("write", w.key, err)
	}
	return nil
}

func (w *fileWriter) Abort(context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	err := os.Remove(w.f.Name())
	w.f.Close()
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return objErr("abort", w.key, err)
	}
	return nil
}

// Get reads a whole small object.
func (b *bucket) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	p, err := b.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, objErr("read", key, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, objErr("read", key, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("object %s is larger than %d bytes: %w", key, limit, teleport.ErrStore)
	}
	return data, nil
}

// ReadAt fills p from the object at off.
func (b *bucket) ReadAt(ctx context.Context, key string, p []byte, off int64) error {
	path, err := b.path(key)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return objErr("read", key, err)
	}
	defer f.Close()
	if n, err := f.ReadAt(p, off); n != len(p) {
		if err == nil || errors.Is(err, io.EOF) {
			return fmt.Errorf("read %s: %d bytes at %d: the object ends first: %w", key, len(p), off, teleport.ErrStore)
		}
		return objErr("read", key, err)
	}
	return nil
}

// List lists one directory of the space (every prefix the chunk space
// uses is a directory, "packs/" or "dead/").
func (b *bucket) List(ctx context.Context, prefix string) ([]chunks.Object, error) {
	dir, err := b.path(strings.TrimSuffix(prefix, "/"))
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, objErr("list", prefix, err)
	}
	var out []chunks.Object
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, objErr("list", prefix, err)
		}
		out = append(out, chunks.Object{Key: prefix + e.Name(), Size: fi.Size(), ModTime: fi.ModTime()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// Delete removes an object.
func (b *bucket) Delete(ctx context.Context, key string) error {
	p, err := b.path(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return objErr("delete", key, err)
	}
	return nil
}

// Now is the clock that stamps file times.
func (b *bucket) Now(context.Context) (time.Time, error) { return b.clock(), nil }

// gcTemp removes temporary files no live writer holds, and reports how
// many. The caller holds the store lock exclusively, so every file there
// is locked by its writer or dead.
func (b *bucket) gcTemp(ctx context.Context) (int, error) {
	dir := filepath.Join(b.dir, chunksTmpDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, objErr("list", chunksTmpDir, err)
	}
	n := 0
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		p := filepath.Join(dir, e.Name())
		if inUse(p) {
			continue
		}
		if err := os.Remove(p); err == nil {
			n++
		} else if !errors.Is(err, fs.ErrNotExist) {
			return n, objErr("gc", e.Name(), err)
		}
	}
	return n, nil
}
