package dst

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/storetest"
)

func TestStoreConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) teleport.Store { return NewStore(StoreOptions{}) })
}

// The simulation's store collects garbage by the rules of the real ones:
// an upload whose writer is gone (idle past the TTL on the simulated
// clock) goes, a live upload and a committed package stay.
func TestStoreGCConformance(t *testing.T) {
	clocks := map[teleport.Store]*Clock{}
	storetest.RunGC(t, storetest.GCHarness{
		New: func(t *testing.T) teleport.Store {
			c := NewClock()
			s := NewStore(StoreOptions{Clock: c, UploadTTL: time.Minute})
			clocks[s] = c
			return s
		},
		Orphan: func(t *testing.T, s teleport.Store) string {
			w, err := s.Create(context.Background(), "orphan")
			if err != nil {
				t.Fatal(err)
			}
			w.Write([]byte("half a body"))
			return "orphan"
		},
		Expire: func(t *testing.T, s teleport.Store) { clocks[s].Advance(time.Minute) },
	})
}

// The simulation's store runs the chunk space every store shares, on the
// simulated clock.
func TestStoreChunkConformance(t *testing.T) {
	storetest.RunChunks(t, storetest.ChunkHarness{
		Grace: time.Minute,
		New: func(t *testing.T) (teleport.Store, func(time.Duration)) {
			c := NewClock()
			return NewStore(StoreOptions{Clock: c, ChunkGrace: time.Minute}), c.Advance
		},
	})
}

// scripted decides one outcome per store op, for tests.
type scripted map[StoreOp]StoreOutcome

func (s scripted) StoreFault(op StoreOp, id string, n int64) StoreOutcome { return s[op] }

func put(t *testing.T, s *Store, id string, blob []byte) error {
	t.Helper()
	w, err := s.Create(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(blob); err != nil {
		t.Fatal(err)
	}
	return w.Commit(context.Background(), storetest.Manifest(id))
}

func TestStoreCommitFaults(t *testing.T) {
	blob := storetest.Payload(7, 1000)
	for _, c := range []struct {
		name        string
		outcome     StoreOutcome
		bugs        StoreBugs
		wantErr     bool
		visible     bool
		pending     int
		wantBlobLen int
	}{
		{"proceed", Proceed, StoreBugs{}, false, true, 0, 1000},
		{"refused", Fail, StoreBugs{}, true, false, 0, 0},
		{"timeout leaves an orphan", Timeout, StoreBugs{}, true, false, 1, 0},
		{"ack lost took effect", AckLost, StoreBugs{}, true, true, 0, 1000},
		{"interrupted leaves an orphan", Interrupt, StoreBugs{}, true, false, 1, 0},
		{"interrupted with the planted bug is visible", Interrupt, StoreBugs{PublishBeforeComplete: true}, true, true, 0, 500},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := NewStore(StoreOptions{Faults: scripted{StoreOpCommit: c.outcome}, Bugs: c.bugs})
			err := put(t, s, "p", blob)
			if (err != nil) != c.wantErr {
				t.Fatalf("Commit: %v, want error %v", err, c.wantErr)
			}
			if err != nil && !errors.Is(err, teleport.ErrStore) {
				t.Fatalf("Commit error %v does not match ErrStore", err)
			}
			obj, ok := s.Peek("p")
			if ok != c.visible {
				t.Fatalf("visible %v, want %v", ok, c.visible)
			}
			if ok && len(obj.Blob) != c.wantBlobLen {
				t.Fatalf("blob %d bytes, want %d", len(obj.Blob), c.wantBlobLen)
			}
			if n := s.PendingUploads(); n != c.pending {
				t.Fatalf("%d uploads pending, want %d", n, c.pending)
			}
		})
	}
}

func TestStoreCallFaults(t *testing.T) {
	ctx := context.Background()
	for _, op := range []StoreOp{StoreOpStat, StoreOpOpen, StoreOpList, StoreOpDelete} {
		for _, out := range []StoreOutcome{Fail, Timeout} {
			s := NewStore(StoreOptions{Faults: scripted{op: out}})
			if err := put(t, s, "p", []byte("x")); err != nil {
				t.Fatal(err)
			}
			var err error
			switch op {
			case StoreOpStat:
				_, err = s.Stat(ctx, "p")
			case StoreOpOpen:
				_, err = s.Open(ctx, "p")
			case StoreOpList:
				_, err = s.List(ctx)
			case StoreOpDelete:
				err = s.Delete(ctx, "p")
			}
			if !errors.Is(err, teleport.ErrStore) || !errors.Is(err, ErrInjected) {
				t.Errorf("%s with %d: %v, want an injected ErrStore", op, out, err)
			}
			if _, ok := s.Peek("p"); !ok {
				t.Errorf("%s with %d took effect", op, out)
			}
		}
	}
	s := NewStore(StoreOptions{Faults: scripted{StoreOpRead: Fail}})
	if err := put(t, s, "p", []byte("data")); err != nil {
		t.Fatal(err)
	}
	r, err := s.Open(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadAt(make([]byte, 2), 0); !errors.Is(err, ErrInjected) {
		t.Fatalf("ReadAt: %v, want injected", err)
	}
}

func TestStoreObjectLimit(t *testing.T) {
	s := NewStore(StoreOptions{ObjectSizeMaxBytes: 10})
	w, err := s.Create(context.Background(), "big")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, 11)); !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("Write past the limit: %v", err)
	}
}

func TestStoreGC(t *testing.T) {
	ctx := context.Background()
	clock := NewClock()
	s := NewStore(StoreOptions{Clock: clock, UploadTTL: time.Minute})
	w, err := s.Create(ctx, "orphan")
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("half"))
	m, body := storetest.Checkpoint("kept", []byte("blob"), []byte("ws"))
	storetest.PutManifest(t, s, m, body)
	if n, _ := s.GC(ctx); n != 0 {
		t.Fatalf("GC before the TTL removed %d", n)
	}
	clock.Advance(time.Minute)
	if n, _ := s.GC(ctx); n != 1 {
		t.Fatalf("GC after the TTL removed %d, want 1 (the orphan upload)", n)
	}
	if _, ok := s.Peek("kept"); s.PendingUploads() != 0 || !ok {
		t.Fatalf("after GC: %d uploads, committed package kept: %v", s.PendingUploads(), ok)
	}
	if err := w.Commit(ctx, storetest.Manifest("orphan")); !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("Commit of a collected upload: %v, want ErrStore", err)
	}
	if _, ok := s.Peek("orphan"); ok {
		t.Fatal("a collected upload was committed")
	}
}

func TestStoreCorruptAtRest(t *testing.T) {
	ctx := context.Background()
	s := NewStore(StoreOptions{})
	blob := storetest.Payload(3, 64)
	if err := put(t, s, "p", blob); err != nil {
		t.Fatal(err)
	}
	r, err := s.Open(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	before, _ := s.Peek("p")
	off, err := s.CorruptAtRest("p", 8*64+13) // wraps to bit 13: byte 1
	if err != nil || off != 1 {
		t.Fatalf("CorruptAtRest: %d, %v", off, err)
	}
	after, _ := s.Peek("p")
	if after.Version == before.Version {
		t.Fatal("version did not change")
	}
	diff := 0
	for i := range blob {
		if after.Blob[i] != blob[i] {
			diff++
		}
	}
	if diff != 1 || after.Blob[1]^blob[1] != 1<<5 {
		t.Fatalf("%d bytes differ", diff)
	}
	old, _ := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	if !bytes.Equal(old, blob) {
		t.Fatal("a reader opened before the corruption saw it")
	}
}
