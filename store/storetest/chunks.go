package storetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport"
)

// ChunkHarness is what RunChunks needs to know about a store with a
// chunk space (teleport.ChunkStore).
type ChunkHarness struct {
	// New returns an empty store whose chunk space has grace period Grace,
	// and a func that makes d pass for its chunk space (its clock and its
	// uploaders'), or nil when only real time can: the suite then sleeps.
	New   func(t *testing.T) (teleport.Store, func(d time.Duration))
	Grace time.Duration
	// RealTime says New's stores have no func to move time (the suite
	// sizes some tests by it before it makes a store).
	RealTime bool
	// Slack is added to every sleep or advance (a server whose times have
	// whole seconds needs one more).
	Slack time.Duration
	// Concurrent sizes the test of GC running beside uploads: uploaders,
	// uploads each (default 4 and 6).
	Uploaders, Uploads int
}

// ChunkOf returns a chunk: its id, the stored bytes (here the raw bytes
// themselves, codec 0) and its info.
func ChunkOf(seed uint64, n int) (teleport.ChunkID, []byte, teleport.ChunkInfo) {
	b := Payload(seed, n)
	return sha256.Sum256(b), b, teleport.ChunkInfo{StoredBytes: uint32(n), RawBytes: uint32(n)}
}

// ChunkManifest is a version 2 manifest for id (the body is opaque to a
// store).
func ChunkManifest(id string) *teleport.Package {
	m := Manifest(id)
	m.Format = 2
	return m
}

// Chunk is one chunk for PutChunks.
type Chunk = chunk

type chunk struct {
	id   teleport.ChunkID
	b    []byte
	info teleport.ChunkInfo
}

// NewChunk returns n deterministic bytes as a chunk (ChunkOf).
func NewChunk(seed uint64, n int) Chunk { return newChunk(seed, n) }

func newChunk(seed uint64, n int) chunk {
	id, b, info := ChunkOf(seed, n)
	return chunk{id, b, info}
}

// PutChunks uploads a package that refers to chunks: each is put unless
// the store holds it already. It returns the committed manifest, or the
// commit's error.
func PutChunks(ctx context.Context, s teleport.Store, id string, body []byte, cs ...chunk) (*teleport.Package, error) {
	w, err := s.Create(ctx, id)
	if err != nil {
		return nil, err
	}
	cw, ok := w.(teleport.ChunkWriter)
	if !ok {
		w.Abort(ctx)
		return nil, fmt.Errorf("%T is not a teleport.ChunkWriter", w)
	}
	for _, c := range cs {
		info, have, err := cw.RefChunk(ctx, c.id)
		if err != nil {
			w.Abort(ctx)
			return nil, err
		}
		if have {
			if info != c.info {
				w.Abort(ctx)
				return nil, fmt.Errorf("chunk %s: the store describes it as %+v, it is %+v", c.id.Short(), info, c.info)
			}
			continue
		}
		if err := cw.PutChunk(ctx, c.id, c.info, c.b); err != nil {
			w.Abort(ctx)
			return nil, err
		}
	}
	if err := write(w, body); err != nil {
		w.Abort(ctx)
		return nil, err
	}
	m := ChunkManifest(id)
	if err := w.Commit(ctx, m); err != nil {
		return nil, err
	}
	return m, nil
}

// fetch reads every chunk of committed package id and checks its bytes.
func fetch(ctx context.Context, s teleport.Store, id string, cs ...chunk) error {
	cst := s.(teleport.ChunkStore)
	m, err := s.Stat(ctx, id)
	if err != nil {
		return err
	}
	r, err := cst.OpenChunks(ctx, m)
	if err != nil {
		return err
	}
	defer r.Close()
	want := map[teleport.ChunkID][]byte{}
	ids := make([]teleport.ChunkID, 0, len(cs))
	for _, c := range cs {
		if _, ok := want[c.id]; !ok {
			ids = append(ids, c.id)
		}
		want[c.id] = c.b
	}
	var mu sync.Mutex
	got := map[teleport.ChunkID]bool{}
	err = r.FetchChunks(ctx, ids, func(id teleport.ChunkID, b []byte) error {
		if !bytes.Equal(b, want[id]) {
			return fmt.Errorf("chunk %s: wrong bytes", id.Short())
		}
		mu.Lock()
		defer mu.Unlock()
		if got[id] {
			return fmt.Errorf("chunk %s delivered twice", id.Short())
		}
		got[id] = true
		return nil
	})
	if err == nil && len(got) != len(ids) {
		err = fmt.Errorf("%d of %d chunks delivered", len(got), len(ids))
	}
	return err
}

func mustFetch(t *testing.T, s teleport.Store, id string, cs ...chunk) {
	t.Helper()
	if err := fetch(context.Background(), s, id, cs...); err != nil {
		t.Fatalf("chunks of %s: %v", id, err)
	}
}

// RunChunks runs the chunk space suite: chunks shared between packages
// and stored once, exact accounting, nothing visible from an aborted
// upload, and, for a store with GC, the rule of teleport.ChunkID (a chunk
// no package needs is condemned, then removed a grace period later; one a
// package needs is never removed, even when GC runs beside the uploads
// that rely on it; an upload past its deadline commits nothing). It skips
// a store without a chunk space.
func RunChunks(t *testing.T, h ChunkHarness) {
	ctx := context.Background()
	var mu sync.Mutex
	moves := map[teleport.Store]func(time.Duration){}
	newStore := func(t *testing.T) teleport.Store {
		t.Helper()
		s, move := h.New(t)
		if _, ok := s.(teleport.ChunkStore); !ok {
			t.Skipf("%T has no chunk space", s)
		}
		mu.Lock()
		moves[s] = move
		mu.Unlock()
		return s
	}
	moverOf := func(s teleport.Store) func(time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		return moves[s]
	}
	advance := func(t *testing.T, s teleport.Store, d time.Duration) {
		if move := moverOf(s); move != nil {
			move(d + h.Slack)
			return
		}
		time.Sleep(d + h.Slack)
	}
	a, b, c := newChunk(101, 70000), newChunk(102, 1), newChunk(103, 65536)

	t.Run("SharedAndCountedOnce", func(t *testing.T) {
		s := newStore(t)
		body := Payload(104, 9000)
		m1, err := PutChunks(ctx, s, "first", body, a, b, a)
		if err != nil {
			t.Fatal(err)
		}
		want := int64(len(body) + len(a.b) + len(b.b))
		if m1.Chunks != 2 || m1.NewChunks != 2 || m1.StoredBytes != want || m1.NewBytes != want || len(m1.ChunkPacks) == 0 {
			t.Fatalf("first package: chunks %d new %d stored %d new bytes %d packs %v; want 2, 2, %d, %d", m1.Chunks, m1.NewChunks, m1.StoredBytes, m1.NewBytes, m1.ChunkPacks, want, want)
		}
		m2, err := PutChunks(ctx, s, "second", body, b, c, a)
		if err != nil {
			t.Fatal(err)
		}
		if m2.Chunks != 3 || m2.NewChunks != 1 || m2.NewBytes != int64(len(body)+len(c.b)) || m2.StoredBytes != int64(len(body)+len(a.b)+len(b.b)+len(c.b)) {
			t.Fatalf("second package: chunks %d new %d stored %d new bytes %d", m2.Chunks, m2.NewChunks, m2.StoredBytes, m2.NewBytes)
		}
		got, err := s.Stat(ctx, "second")
		if err != nil || got.Chunks != 3 || got.NewChunks != 1 || got.StoredBytes != m2.StoredBytes || len(got.ChunkPacks) != len(m2.ChunkPacks) {
			t.Fatalf("Stat: %+v %v", got, err)
		}
		mustFetch(t, s, "first", a, b)
		mustFetch(t, s, "second", a, b, c)
		// Deleting one package leaves the other's chunks.
		if err := s.Delete(ctx, "first"); err != nil {
			t.Fatal(err)
		}
		mustFetch(t, s, "second", a, b, c)
	})

	t.Run("AbortedUploadLeavesNoChunk", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "aborted")
		if err != nil {
			t.Fatal(err)
		}
		cw := w.(teleport.ChunkWriter)
		if _, have, err := cw.RefChunk(ctx, c.id); err != nil || have {
			t.Fatalf("RefChunk of a chunk no one put: %v %v", have, err)
		}
		if err := cw.PutChunk(ctx, c.id, c.info, c.b); err != nil {
			t.Fatal(err)
		}
		if _, have, _ := cw.RefChunk(ctx, c.id); !have {
			t.Fatal("an upload does not see the chunk it put")
		}
		if err := w.Abort(ctx); err != nil {
			t.Fatal(err)
		}
		w2, err := s.Create(ctx, "after")
		if err != nil {
			t.Fatal(err)
		}
		defer w2.Abort(ctx)
		if _, have, err := w2.(teleport.ChunkWriter).RefChunk(ctx, c.id); err != nil || have {
			t.Fatalf("a chunk of an aborted upload is present: %v %v", have, err)
		}
		mustNotExist(t, s, "aborted")
	})

	t.Run("MissingChunk", func(t *testing.T) {
		s := newStore(t)
		if _, err := PutChunks(ctx, s, "p", nil, a); err != nil {
			t.Fatal(err)
		}
		m, _ := s.Stat(ctx, "p")
		r, err := s.(teleport.ChunkStore).OpenChunks(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		err = r.FetchChunks(ctx, []teleport.ChunkID{b.id}, func(teleport.ChunkID, []byte) error { return nil })
		if !errors.Is(err, teleport.ErrChunkMissing) {
			t.Fatalf("FetchChunks of a chunk the package lacks: %v, want ErrChunkMissing", err)
		}
	})

	gcOf := func(t *testing.T, s teleport.Store) teleport.GarbageCollector {
		t.Helper()
		gc, ok := s.(teleport.GarbageCollector)
		if !ok {
			t.Skipf("%T has no GC", s)
		}
		return gc
	}
	mustGC := func(t *testing.T, gc teleport.GarbageCollector) int {
		t.Helper()
		n, err := gc.GC(ctx)
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
		return n
	}

	t.Run("GCCondemnsThenSweeps", func(t *testing.T) {
		s := newStore(t)
		gc := gcOf(t, s)
		if _, err := PutChunks(ctx, s, "kept", nil, a); err != nil {
			t.Fatal(err)
		}
		if _, err := PutChunks(ctx, s, "gone", nil, c); err != nil {
			t.Fatal(err)
		}
		gone, _ := s.Stat(ctx, "gone")
		if err := s.Delete(ctx, "gone"); err != nil {
			t.Fatal(err)
		}
		// Young packs are spared: an upload in flight may rely on them.
		mustGC(t, gc)
		present := func() bool {
			w, err := s.Create(ctx, "probe")
			if err != nil {
				t.Fatal(err)
			}
			defer w.Abort(ctx)
			_, have, err := w.(teleport.ChunkWriter).RefChunk(ctx, c.id)
			if err != nil {
				t.Fatal(err)
			}
			return have
		}
		if !present() {
			t.Fatal("GC condemned a pack younger than the grace period")
		}
		advance(t, s, h.Grace)
		if n := mustGC(t, gc); n != 0 {
			t.Fatalf("the first GC after the grace period removed %d packs: it must only condemn", n)
		}
		if present() {
			t.Fatal("a condemned chunk is still present to uploads")
		}
		if err := fetch(ctx, s, "kept", a); err != nil {
			t.Fatalf("a package's chunks after GC: %v", err)
		}
		advance(t, s, h.Grace)
		if n := mustGC(t, gc); n < 1 {
			t.Fatalf("GC a grace period after the condemnation removed %d packs, want the deleted package's", n)
		}
		r, err := s.(teleport.ChunkStore).OpenChunks(ctx, gone)
		if err == nil {
			err = r.FetchChunks(ctx, []teleport.ChunkID{c.id}, func(teleport.ChunkID, []byte) error { return nil })
			r.Close()
		}
		if !errors.Is(err, teleport.ErrChunkMissing) {
			t.Fatalf("the deleted package's chunk after the sweep: %v, want ErrChunkMissing", err)
		}
		mustFetch(t, s, "kept", a)
	})

	t.Run("GCAcquitsWhatAnUploadReliedOn", func(t *testing.T) {
		s := newStore(t)
		gc := gcOf(t, s)
		if _, err := PutChunks(ctx, s, "old", nil, a, b); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, "old"); err != nil {
			t.Fatal(err)
		}
		advance(t, s, h.Grace)
		// An upload finds the chunks present, then GC condemns their pack,
		// then the upload commits: the pack must stay.
		w, err := s.Create(ctx, "new")
		if err != nil {
			t.Fatal(err)
		}
		cw := w.(teleport.ChunkWriter)
		for _, ch := range []chunk{a, b} {
			if _, have, err := cw.RefChunk(ctx, ch.id); err != nil || !have {
				t.Fatalf("RefChunk: %v %v", have, err)
			}
		}
		mustGC(t, gc)
		if err := w.Commit(ctx, ChunkManifest("new")); err != nil {
			t.Fatal(err)
		}
		advance(t, s, h.Grace)
		mustGC(t, gc)
		advance(t, s, h.Grace)
		mustGC(t, gc)
		mustFetch(t, s, "new", a, b)
	})

	t.Run("LateCommitCommitsNothing", func(t *testing.T) {
		if h.RealTime && h.Grace > 30*time.Second {
			t.Skip("needs a clock the test can move, or a short grace period")
		}
		s := newStore(t)
		w, err := s.Create(ctx, "late")
		if err != nil {
			t.Fatal(err)
		}
		cw := w.(teleport.ChunkWriter)
		if _, _, err := cw.RefChunk(ctx, a.id); err != nil {
			t.Fatal(err)
		}
		if err := cw.PutChunk(ctx, a.id, a.info, a.b); err != nil {
			t.Fatal(err)
		}
		advance(t, s, h.Grace/2)
		if err := w.Commit(ctx, ChunkManifest("late")); !errors.Is(err, teleport.ErrStore) {
			t.Fatalf("Commit half a grace period after the first look: %v, want ErrStore", err)
		}
		mustNotExist(t, s, "late")
	})

	t.Run("GCBesideUploads", func(t *testing.T) {
		s := newStore(t)
		gc := gcOf(t, s)
		move := moverOf(s)
		uploaders, uploads := h.Uploaders, h.Uploads
		if uploaders == 0 {
			uploaders, uploads = 4, 6
		}
		// A pool of chunks the uploads share: each upload takes a few,
		// some shared with earlier ones, and every other package is
		// deleted again, so GC has packs to condemn and sweep while
		// others rely on them.
		pool := make([]chunk, 24)
		for i := range pool {
			pool[i] = newChunk(200+uint64(i), 4000+i*997)
		}
		type done struct {
			id string
			cs []chunk
		}
		var (
			mu        sync.Mutex // guards committed and gcErr
			committed []done
			failed    atomic.Int64
			stop      = make(chan struct{})
			wg        sync.WaitGroup
			gcErr     error
			gcRuns    atomic.Int64
			gcRemoved atomic.Int64
		)
		gcDone := make(chan struct{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(gcDone)
			for {
				select {
				case <-stop:
					return
				default:
				}
				n, err := gc.GC(ctx)
				if err != nil {
					mu.Lock()
					gcErr = err
					mu.Unlock()
					return
				}
				gcRuns.Add(1)
				gcRemoved.Add(int64(n))
				// Time passes beside the uploads, a bit at a time: slowly
				// enough that most uploads commit within their deadline,
				// fast enough that packs are condemned and swept meanwhile.
				if move != nil {
					time.Sleep(2 * time.Millisecond)
					move(h.Grace / 12)
				} else {
					time.Sleep(h.Grace / 16)
				}
			}
		}()
		// On real time, uploads go on for two grace periods, so that GC
		// condemns and sweeps packs while they run.
		// On a clock the test moves, for as many GC runs as take two grace
		// periods of it.
		until := time.Now().Add(2*h.Grace + h.Slack)
		more := func(i int) bool {
			select {
			case <-gcDone:
				return false // GC failed: the test is over
			default:
			}
			if move == nil {
				return i < uploads || time.Now().Before(until)
			}
			return i < uploads || (gcRuns.Load() < 2*12+6 && i < 6*uploads)
		}
		var uw sync.WaitGroup
		for u := 0; u < uploaders; u++ {
			uw.Add(1)
			go func() {
				defer uw.Done()
				r := rand.New(rand.NewPCG(uint64(u), 99))
				for i := 0; more(i); i++ {
					id := fmt.Sprintf("u%d-%d", u, i)
					// Shared chunks, and one of its own: the pack of a deleted
					// package then becomes garbage.
					cs := []chunk{newChunk(uint64(1000+u*100000+i), 3000)}
					for k := 0; k < 3; k++ {
						cs = append(cs, pool[r.IntN(len(pool))])
					}
					if _, err := PutChunks(ctx, s, id, Payload(uint64(u*100+i), 500), cs...); err != nil {
						// A commit past its deadline is refused, safely.
						if !errors.Is(err, teleport.ErrStore) {
							t.Errorf("upload %s: %v", id, err)
						}
						failed.Add(1)
						continue
					}
					if i%2 == 1 {
						if err := s.Delete(ctx, id); err != nil {
							t.Errorf("delete %s: %v", id, err)
						}
						continue
					}
					mu.Lock()
					committed = append(committed, done{id, cs})
					mu.Unlock()
					// What is committed stays whole while GC runs.
					if err := fetch(ctx, s, id, cs...); err != nil {
						t.Errorf("chunks of %s right after its commit: %v", id, err)
					}
				}
			}()
		}
		uw.Wait()
		close(stop)
		wg.Wait()
		if gcErr != nil {
			t.Fatalf("GC beside uploads: %v", gcErr)
		}
		// Two more grace periods of GC: whatever it could remove is gone,
		// and no committed package lost a chunk.
		for i := 0; i < 2; i++ {
			advance(t, s, h.Grace)
			mustGC(t, gc)
		}
		for _, d := range committed {
			mustFetch(t, s, d.id, d.cs...)
		}
		if len(committed) == 0 {
			t.Fatalf("no upload committed (%d failed)", failed.Load())
		}
		t.Logf("%d packages committed and kept, %d commits refused, %d GC runs beside them removed %d entries", len(committed), failed.Load(), gcRuns.Load(), gcRemoved.Load())
	})
}
