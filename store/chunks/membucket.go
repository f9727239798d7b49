package chunks

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kelpie/teleport"
)

// MemBucket is a Bucket in memory, for the in-memory store and tests.
// Its clock is the caller's (nil: the zero time, so nothing ever ages).
type MemBucket struct {
	clock func() time.Time

	mu      sync.Mutex
	objs    map[string]memObject
	version uint64 // changes whenever an object does
}

type memObject struct {
	b   []byte
	mod time.Time
}

var _ Bucket = (*MemBucket)(nil)

// NewMemBucket returns an empty bucket on clock.
func NewMemBucket(clock func() time.Time) *MemBucket {
	if clock == nil {
		clock = func() time.Time { return time.Time{} }
	}
	return &MemBucket{clock: clock, objs: map[string]memObject{}}
}

// Put stores a copy of b.
func (m *MemBucket) Put(ctx context.Context, key string, b []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.objs[key] = memObject{b: bytes.Clone(b), mod: m.clock()}
	m.version++
	return nil
}

type memWriter struct {
	m   *MemBucket
	key string
	buf bytes.Buffer
}

// Create buffers the object until Close.
func (m *MemBucket) Create(ctx context.Context, key string) (ObjectWriter, error) {
	return &memWriter{m: m, key: key}, ctx.Err()
}

func (w *memWriter) Write(p []byte) (int, error) { return w.buf.Write(p) }

func (w *memWriter) Close(ctx context.Context) error { return w.m.Put(ctx, w.key, w.buf.Bytes()) }

func (w *memWriter) Abort(context.Context) error { w.buf = bytes.Buffer{}; return nil }

// Get returns a copy of an object.
func (m *MemBucket) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if !ok {
		return nil, fmt.Errorf("object %s: %w", key, teleport.ErrNotFound)
	}
	if int64(len(o.b)) > limit {
		return nil, fmt.Errorf("object %s is larger than %d bytes: %w", key, limit, teleport.ErrStore)
	}
	return bytes.Clone(o.b), nil
}

// ReadAt copies from an object.
func (m *MemBucket) ReadAt(ctx context.Context, key string, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if !ok {
		return fmt.Errorf("object %s: %w", key, teleport.ErrNotFound)
	}
	if off < 0 || off > int64(len(o.b)) || int64(len(p)) > int64(len(o.b))-off {
		return fmt.Errorf("object %s: %d bytes at %d past its %d: %w", key, len(p), off, len(o.b), teleport.ErrStore)
	}
	copy(p, o.b[off:])
	return nil
}

// List lists by key.
func (m *MemBucket) List(ctx context.Context, prefix string) ([]Object, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Object
	for k, o := range m.objs {
		if strings.HasPrefix(k, prefix) {
			out = append(out, Object{Key: k, Size: int64(len(o.b)), ModTime: o.mod})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// Delete removes an object.
func (m *MemBucket) Delete(ctx context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.objs, key)
	m.version++
	return nil
}

// Now is the bucket's clock.
func (m *MemBucket) Now(context.Context) (time.Time, error) { return m.clock(), nil }

// Keys lists every key, sorted (tests).
func (m *MemBucket) Keys() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ks := make([]string, 0, len(m.objs))
	for k := range m.objs {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Version changes whenever an object does (the simulation caches checks
// by it).
func (m *MemBucket) Version() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.version
}

// FlipBit flips one bit of object key (bit taken modulo its bits), as
// damage at rest would, and returns the byte offset it hit.
func (m *MemBucket) FlipBit(key string, bit uint64) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if !ok || len(o.b) == 0 {
		return 0, fmt.Errorf("object %s: %w", key, teleport.ErrNotFound)
	}
	bit %= uint64(len(o.b)) * 8
	b := bytes.Clone(o.b) // readers keep what they read
	b[bit/8] ^= 1 << (bit % 8)
	m.objs[key] = memObject{b: b, mod: o.mod}
	m.version++
	return int64(bit / 8), nil
}
