package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kelpie/teleport"
)

// GCHarness is what RunGC needs to know about a store that implements
// teleport.GarbageCollector.
type GCHarness struct {
	// New returns an empty store.
	New func(t *testing.T) teleport.Store
	// Orphan makes an upload whose writer is gone, as a crashed process
	// leaves it (written to, never committed nor aborted, whatever kept it
	// alive stopped), and returns its id. The upload must leave GC
	// something to remove once it is old enough.
	Orphan func(t *testing.T, s teleport.Store) string
	// Expire makes time pass so that orphans are old enough for GC; nil
	// when GC needs no time. RunGC calls it only while no live upload is
	// open: a store may judge uploads by age, and a live one is only
	// guaranteed to look alive while time passes at its usual pace.
	Expire func(t *testing.T, s teleport.Store)
}

// RunGC runs the garbage collection suite: GC never removes a committed
// package or a live upload, removes (and counts) an orphan, and runs
// alongside uploads and deletes without failing any. It skips a store that
// has no GC.
func RunGC(t *testing.T, h GCHarness) {
	ctx := context.Background()
	newStore := func(t *testing.T) (teleport.Store, teleport.GarbageCollector) {
		t.Helper()
		s := h.New(t)
		gc, ok := s.(teleport.GarbageCollector)
		if !ok {
			t.Skipf("%T has no GC", s)
		}
		return s, gc
	}
	expire := func(t *testing.T, s teleport.Store) {
		if h.Expire != nil {
			h.Expire(t, s)
		}
	}

	t.Run("KeepsCommitted", func(t *testing.T) {
		s, gc := newStore(t)
		blobs := map[string][]byte{"kept-a": Payload(30, 300000), "kept-b": nil}
		for _, id := range []string{"kept-a", "kept-b"} {
			Put(t, s, id, blobs[id])
		}
		m, body := Checkpoint("kept-c", Payload(31, 100000), Payload(32, 5000))
		PutManifest(t, s, m, body)
		blobs["kept-c"] = body
		expire(t, s)
		if n, err := gc.GC(ctx); err != nil || n != 0 {
			t.Fatalf("GC of a store with only committed packages removed %d (%v), want 0", n, err)
		}
		for _, id := range []string{"kept-a", "kept-b", "kept-c"} {
			mustBeIntact(t, s, id, blobs[id])
		}
	})

	t.Run("SparesLiveUpload", func(t *testing.T) {
		s, gc := newStore(t)
		body := Payload(33, 400000)
		w, err := s.Create(ctx, "live")
		if err != nil {
			t.Fatal(err)
		}
		if err := write(w, body[:len(body)/2]); err != nil {
			t.Fatal(err)
		}
		if n, err := gc.GC(ctx); err != nil || n != 0 {
			t.Fatalf("GC with a live upload removed %d (%v), want 0", n, err)
		}
		if err := write(w, body[len(body)/2:]); err != nil {
			t.Fatalf("Write after GC: %v", err)
		}
		if err := w.Commit(ctx, Manifest("live")); err != nil {
			t.Fatalf("Commit after GC: %v", err)
		}
		mustBeIntact(t, s, "live", body)
	})

	t.Run("RemovesOrphan", func(t *testing.T) {
		s, gc := newStore(t)
		kept := Payload(34, 200000)
		Put(t, s, "kept", kept)
		id := h.Orphan(t, s)
		mustNotExist(t, s, id)
		expire(t, s)
		// An upload begun after the orphan aged is alive and stays so.
		live, err := s.Create(ctx, "live")
		if err != nil {
			t.Fatal(err)
		}
		liveBody := Payload(35, 150000)
		if err := write(live, liveBody); err != nil {
			t.Fatal(err)
		}
		n, err := gc.GC(ctx)
		if err != nil || n < 1 {
			t.Fatalf("GC removed %d (%v), want the orphan", n, err)
		}
		mustNotExist(t, s, id)
		mustBeIntact(t, s, "kept", kept)
		if err := live.Commit(ctx, Manifest("live")); err != nil {
			t.Fatalf("live upload broken by GC: %v", err)
		}
		mustBeIntact(t, s, "live", liveBody)
		if n, err := gc.GC(ctx); err != nil || n != 0 {
			t.Fatalf("second GC removed %d (%v), want 0: nothing is left to remove", n, err)
		}
		again := Payload(36, 90000)
		Put(t, s, id, again)
		mustBeIntact(t, s, id, again)
	})

	// GC runs in a loop while uploads and deletes go on. Nothing is
	// orphaned, so GC must remove nothing, and no operation may fail.
	t.Run("Concurrent", func(t *testing.T) {
		s, gc := newStore(t)
		const workers, perWorker = 4, 10
		gctx, stop := context.WithCancel(ctx)
		var runs, removed atomic.Int64
		gcDone := make(chan error, 1)
		go func() {
			for gctx.Err() == nil {
				n, err := gc.GC(ctx)
				if err != nil {
					gcDone <- err
					return
				}
				runs.Add(1)
				removed.Add(int64(n))
			}
			gcDone <- nil
		}()
		type pkg struct {
			id   string
			body []byte
		}
		var mu sync.Mutex
		var kept []pkg
		var deleted []string
		var wg sync.WaitGroup
		for k := range workers {
			wg.Go(func() {
				for i := range perWorker {
					id := fmt.Sprintf("c%d-%d", k, i)
					body := Payload(uint64(1000+k*perWorker+i), 20000+7919*i)
					if err := put(ctx, s, id, body); err != nil {
						t.Errorf("upload %s alongside GC: %v", id, err)
						return
					}
					if i%2 == 1 {
						if err := s.Delete(ctx, id); err != nil {
							t.Errorf("Delete(%s) alongside GC: %v", id, err)
							return
						}
						mu.Lock()
						deleted = append(deleted, id)
						mu.Unlock()
						continue
					}
					mu.Lock()
					kept = append(kept, pkg{id, body})
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		stop()
		if err := <-gcDone; err != nil {
			t.Fatalf("GC alongside uploads: %v", err)
		}
		t.Logf("%d GC runs alongside %d uploads", runs.Load(), workers*perWorker)
		if n := removed.Load(); n != 0 {
			t.Errorf("GC removed %d entries while nothing was orphaned", n)
		}
		for _, p := range kept {
			mustBeIntact(t, s, p.id, p.body)
		}
		for _, id := range deleted {
			mustNotExist(t, s, id)
		}
		if n, err := gc.GC(ctx); err != nil || n != 0 {
			t.Fatalf("GC after the uploads removed %d (%v), want 0", n, err)
		}
	})
}

// put is Put for goroutines: it reports instead of failing the test.
func put(ctx context.Context, s teleport.Store, id string, body []byte) error {
	w, err := s.Create(ctx, id)
	if err != nil {
		return err
	}
	if err := write(w, body); err != nil {
		return errors.Join(err, w.Abort(ctx))
	}
	return w.Commit(ctx, Manifest(id))
}

// mustBeIntact checks that package id is committed with body.
func mustBeIntact(t testing.TB, s teleport.Store, id string, body []byte) {
	t.Helper()
	m, err := s.Stat(context.Background(), id)
	if err != nil {
		t.Fatalf("Stat(%s): %v", id, err)
	}
	want := SectionOf(teleport.SectionBlob, 0, body)
	if m.SizeBytes != want.Size || m.BlobSHA256 != want.SHA256 {
		t.Fatalf("package %s: manifest says %d bytes sha256 %s, committed %d bytes %s", id, m.SizeBytes, m.BlobSHA256, want.Size, want.SHA256)
	}
	if b := readAll(t, s, id); !bytes.Equal(b, body) {
		t.Fatalf("package %s: body differs (%d bytes, want %d)", id, len(b), len(body))
	}
}
