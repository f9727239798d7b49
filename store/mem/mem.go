// Package mem is an in-memory package store for unit tests. It keeps whole
// bodies and its chunk space in memory, so it is never used for real
// snapshots. It has no GC: its chunks live as long as the store.
package mem

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"sync"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

type entry struct {
	manifest []byte // JSON, so callers never share our copy
	blob     []byte
}

// Store is an in-memory teleport.Store. The zero value is not usable: call New.
type Store struct {
	mu     sync.Mutex
	pkgs   map[string]entry
	chunks *chunks.Space
}

var _ teleport.ChunkStore = (*Store)(nil)

// New returns an empty store.
func New() *Store {
	return &Store{pkgs: map[string]entry{}, chunks: chunks.New(chunks.NewMemBucket(nil), chunks.Options{})}
}

// OpenChunks gives access to a committed package's chunks.
func (s *Store) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	return s.chunks.Open(ctx, pkg.ChunkPacks)
}

// Create starts a package upload.
func (s *Store) Create(ctx context.Context, id string) (teleport.Writer, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pkgs[id]; ok {
		return nil, fmt.Errorf("create package %s: %w", id, teleport.ErrAlreadyExists)
	}
	return &writer{s: s, id: id, Writer: chunks.Writer{Space: s.chunks}}, nil
}

type writer struct {
	chunks.Writer
	s    *Store
	id   string
	buf  bytes.Buffer
	done bool
}

var _ teleport.ChunkWriter = (*writer)(nil)

func (w *writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("write package %s: %w", w.id, teleport.ErrCommitted)
	}
	return w.buf.Write(p)
}

func (w *writer) Commit(ctx context.Context, m *teleport.Package) error {
	if w.done {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrCommitted)
	}
	w.done = true
	if err := ctx.Err(); err != nil {
		return err
	}
	sum := sha256.Sum256(w.buf.Bytes())
	hexSum := hex.EncodeToString(sum[:])
	n := int64(w.buf.Len())
	if m.ID == "" {
		m.ID = w.id
	}
	if m.ID != w.id {
		return fmt.Errorf("commit package %s: manifest names %s: %w", w.id, m.ID, teleport.ErrInvalidPackage)
	}
	if (m.SizeBytes != 0 && m.SizeBytes != n) || (m.BlobSHA256 != "" && m.BlobSHA256 != hexSum) {
		return fmt.Errorf("commit package %s: blob does not match manifest: %w", w.id, teleport.ErrChecksumMismatch)
	}
	m.SizeBytes, m.BlobSHA256 = n, hexSum
	if err := w.Seal(ctx, m, n); err != nil {
		return err
	}
	// After the store's own fields, so that the sections are checked
	// against the bytes actually written.
	if err := m.Validate(); err != nil {
		return err
	}
	if err := w.CheckDeadline(); err != nil {
		return err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return err
	}
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	if _, ok := w.s.pkgs[w.id]; ok {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrAlreadyExists)
	}
	w.s.pkgs[w.id] = entry{manifest: mb, blob: bytes.Clone(w.buf.Bytes())}
	return nil
}

func (w *writer) Abort(ctx context.Context) error {
	w.done = true
	w.buf = bytes.Buffer{}
	return w.Writer.Abort(ctx)
}

type reader struct{ *bytes.Reader }

func (r reader) Close() error { return nil }

func (s *Store) get(id string) (entry, error) {
	if err := teleport.ValidateID(id); err != nil {
		return entry{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.pkgs[id]
	if !ok {
		return entry{}, fmt.Errorf("package %s: %w", id, teleport.ErrNotFound)
	}
	return e, nil
}

// Open returns random access to a blob.
func (s *Store) Open(ctx context.Context, id string) (teleport.Reader, error) {
	e, err := s.get(id)
	if err != nil {
		return nil, err
	}
	return reader{bytes.NewReader(e.blob)}, nil
}

// Stat returns a copy of a manifest.
func (s *Store) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	e, err := s.get(id)
	if err != nil {
		return nil, err
	}
	var m teleport.Package
	if err := json.Unmarshal(e.manifest, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// List returns manifests sorted by id.
func (s *Store) List(ctx context.Context) ([]*teleport.Package, error) {
	s.mu.Lock()
	ids := make([]string, 0, len(s.pkgs))
	for id := range s.pkgs {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	sort.Strings(ids)
	out := []*teleport.Package{}
	for _, id := range ids {
		m, err := s.Stat(ctx, id)
		if err != nil {
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

// Delete removes a package.
func (s *Store) Delete(ctx context.Context, id string) error {
	if _, err := s.get(id); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pkgs, id)
	return nil
}
