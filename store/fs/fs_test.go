package fs_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) teleport.Store {
		s, err := fs.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

// An upload whose writer vanished (its process died) is invisible and GC
// removes it; a live upload is left alone.
func TestGCRemovesOrphansOnly(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := fs.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	live, err := s.Create(ctx, "live")
	if err != nil {
		t.Fatal(err)
	}
	live.Write([]byte("still writing"))
	// Simulate a dead writer: an upload directory nobody holds a lock on.
	orphan := filepath.Join(dir, ".tmp", "orphan.123")
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(orphan, "blob"), []byte("half"), 0o644)
	if l, _ := s.List(ctx); len(l) != 0 {
		t.Fatalf("orphan visible: %v", l)
	}
	n, err := s.GC(ctx)
	if err != nil || n != 1 {
		t.Fatalf("GC removed %d (%v), want 1", n, err)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatal("orphan still there")
	}
	if err := live.Commit(ctx, storetest.Manifest("live")); err != nil {
		t.Fatalf("live upload broken by GC: %v", err)
	}
}

// testClock is the system clock moved on by a test.
type testClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

func TestChunkConformance(t *testing.T) {
	const grace = time.Hour
	storetest.RunChunks(t, storetest.ChunkHarness{
		Grace: grace,
		New: func(t *testing.T) (teleport.Store, func(time.Duration)) {
			c := &testClock{}
			s, err := fs.OpenWith(t.TempDir(), fs.Options{ChunkGrace: grace, Clock: c.Now})
			if err != nil {
				t.Fatal(err)
			}
			return s, c.advance
		},
		Uploaders: 4, Uploads: 8,
	})
}
