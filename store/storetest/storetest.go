// Package storetest is the conformance suite every teleport.Store passes
// (Run), and the one every teleport.GarbageCollector passes too (RunGC).
// It must assume nothing about how a store keeps its bytes (no files, no
// objects, no clock): what it cannot do through the Store interface, a
// harness does for it.
package storetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// Manifest returns a valid manifest for id, for tests.
func Manifest(id string) *teleport.Package {
	return &teleport.Package{
		ID: id, AgentID: "agent-" + id, SourceArch: vm.ArchX86_64, Kind: teleport.KindTeleport,
		BaseImageVersion: "1.0.0", CreatedAt: time.Unix(1700000000, 0).UTC(), SourceHostID: "host-a", Backend: "sim",
		AgentState: []byte("state"),
		Snapshot:   &vm.SnapshotMetadata{SnapshotID: "snap-" + id, Backend: "sim", Architecture: vm.ArchX86_64},
	}
}

// Payload returns n deterministic bytes.
func Payload(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// Checkpoint returns a valid checkpoint manifest for id whose body is blob
// then workspace, back to back, with both sections listed, and that body.
func Checkpoint(id string, blob, workspace []byte) (*teleport.Package, []byte) {
	m := Manifest(id)
	m.Kind, m.Snapshot = teleport.KindCheckpoint, nil
	m.Sections = []teleport.Section{
		SectionOf(teleport.SectionBlob, 0, blob),
		SectionOf(teleport.SectionWorkspace, int64(len(blob)), workspace),
	}
	return m, append(bytes.Clone(blob), workspace...)
}

// SectionOf describes b as section name starting at off.
func SectionOf(name string, off int64, b []byte) teleport.Section {
	sum := sha256.Sum256(b)
	return teleport.Section{Name: name, Offset: off, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:])}
}

// Put writes and commits a package with the given blob.
func Put(t testing.TB, s teleport.Store, id string, blob []byte) *teleport.Package {
	t.Helper()
	m := Manifest(id)
	PutManifest(t, s, m, blob)
	return m
}

// PutManifest writes body and commits it with m.
func PutManifest(t testing.TB, s teleport.Store, m *teleport.Package, body []byte) {
	t.Helper()
	ctx := context.Background()
	w, err := s.Create(ctx, m.ID)
	if err != nil {
		t.Fatalf("Create(%s): %v", m.ID, err)
	}
	if err := write(w, body); err != nil {
		w.Abort(ctx)
		t.Fatalf("Write(%s): %v", m.ID, err)
	}
	if err := w.Commit(ctx, m); err != nil {
		t.Fatalf("Commit(%s): %v", m.ID, err)
	}
}

// write sends b in uneven chunks, as a stream would.
func write(w io.Writer, b []byte) error {
	for off := 0; off < len(b); {
		n := min(len(b)-off, 1+off%7777)
		if _, err := w.Write(b[off : off+n]); err != nil {
			return err
		}
		off += n
	}
	return nil
}

func readAll(t testing.TB, s teleport.Store, id string) []byte {
	t.Helper()
	r, err := s.Open(context.Background(), id)
	if err != nil {
		t.Fatalf("Open(%s): %v", id, err)
	}
	defer r.Close()
	b, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustNotExist(t testing.TB, s teleport.Store, id string) {
	t.Helper()
	ctx := context.Background()
	if _, err := s.Stat(ctx, id); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Stat(%s) = %v, want ErrNotFound", id, err)
	}
	if _, err := s.Open(ctx, id); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Open(%s) = %v, want ErrNotFound", id, err)
	}
	l, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range l {
		if m.ID == id {
			t.Fatalf("List shows %s", id)
		}
	}
}

// Run runs the suite. newStore returns an empty store for each subtest.
func Run(t *testing.T, newStore func(t *testing.T) teleport.Store) {
	ctx := context.Background()

	t.Run("RoundTrip", func(t *testing.T) {
		s := newStore(t)
		blob := Payload(1, 3<<20+17)
		m := Put(t, s, "pkg-1", blob)
		sum := sha256.Sum256(blob)
		if m.SizeBytes != int64(len(blob)) || m.BlobSHA256 != hex.EncodeToString(sum[:]) {
			t.Fatalf("commit set size %d sha %s", m.SizeBytes, m.BlobSHA256)
		}
		got, err := s.Stat(ctx, "pkg-1")
		if err != nil {
			t.Fatal(err)
		}
		if got.ID != "pkg-1" || got.AgentID != m.AgentID || got.Kind != m.Kind || got.BlobSHA256 != m.BlobSHA256 ||
			!got.CreatedAt.Equal(m.CreatedAt) || string(got.AgentState) != "state" || got.Snapshot == nil || got.Snapshot.SnapshotID != "snap-pkg-1" {
			t.Fatalf("Stat returned %+v, committed %+v", got, m)
		}
		if b := readAll(t, s, "pkg-1"); !bytes.Equal(b, blob) {
			t.Fatalf("blob differs after round trip (%d vs %d bytes)", len(b), len(blob))
		}
	})

	t.Run("RandomAccess", func(t *testing.T) {
		s := newStore(t)
		blob := Payload(2, 1<<20)
		Put(t, s, "ra", blob)
		r, err := s.Open(ctx, "ra")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if r.Size() != int64(len(blob)) {
			t.Fatalf("Size %d, want %d", r.Size(), len(blob))
		}
		for _, off := range []int64{0, 1, 4095, 4096, 500000, int64(len(blob)) - 10} {
			buf := make([]byte, 10)
			if _, err := r.ReadAt(buf, off); err != nil {
				t.Fatalf("ReadAt(%d): %v", off, err)
			}
			if !bytes.Equal(buf, blob[off:off+10]) {
				t.Fatalf("ReadAt(%d) wrong bytes", off)
			}
		}
		if _, err := r.ReadAt(make([]byte, 20), int64(len(blob))-10); !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt past end: %v, want io.EOF", err)
		}
	})

	t.Run("EmptyBlob", func(t *testing.T) {
		s := newStore(t)
		Put(t, s, "empty", nil)
		if b := readAll(t, s, "empty"); len(b) != 0 {
			t.Fatalf("got %d bytes", len(b))
		}
	})

	t.Run("InvisibleUntilCommit", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "pending")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte("half a blob")); err != nil {
			t.Fatal(err)
		}
		mustNotExist(t, s, "pending")
		if err := w.Commit(ctx, Manifest("pending")); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Stat(ctx, "pending"); err != nil {
			t.Fatalf("after commit: %v", err)
		}
	})

	t.Run("AbortLeavesNothing", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "aborted")
		if err != nil {
			t.Fatal(err)
		}
		w.Write(Payload(3, 1000))
		if err := w.Abort(ctx); err != nil {
			t.Fatal(err)
		}
		mustNotExist(t, s, "aborted")
		if err := w.Commit(ctx, Manifest("aborted")); !errors.Is(err, teleport.ErrCommitted) {
			t.Fatalf("Commit after Abort: %v, want ErrCommitted", err)
		}
		mustNotExist(t, s, "aborted")
		// The id is free again.
		Put(t, s, "aborted", []byte("x"))
	})

	t.Run("CanceledCommitLeavesNothing", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "canceled")
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte("data"))
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := w.Commit(cctx, Manifest("canceled")); err == nil {
			t.Fatal("Commit with a canceled context succeeded")
		}
		mustNotExist(t, s, "canceled")
	})

	t.Run("ChecksumMismatchRefused", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "bad-sum")
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte("data"))
		m := Manifest("bad-sum")
		m.BlobSHA256 = strings.Repeat("0", 64)
		if err := w.Commit(ctx, m); !errors.Is(err, teleport.ErrChecksumMismatch) {
			t.Fatalf("Commit: %v, want ErrChecksumMismatch", err)
		}
		mustNotExist(t, s, "bad-sum")
	})

	t.Run("InvalidManifestRefused", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Create(ctx, "bad-manifest")
		if err != nil {
			t.Fatal(err)
		}
		m := Manifest("bad-manifest")
		m.Kind = "sideways"
		if err := w.Commit(ctx, m); !errors.Is(err, teleport.ErrInvalidPackage) {
			t.Fatalf("Commit: %v, want ErrInvalidPackage", err)
		}
		mustNotExist(t, s, "bad-manifest")
	})

	t.Run("DuplicateID", func(t *testing.T) {
		s := newStore(t)
		Put(t, s, "dup", []byte("first"))
		if _, err := s.Create(ctx, "dup"); !errors.Is(err, teleport.ErrAlreadyExists) {
			t.Fatalf("Create of a committed id: %v, want ErrAlreadyExists", err)
		}
		if b := readAll(t, s, "dup"); string(b) != "first" {
			t.Fatalf("first package changed: %q", b)
		}
	})

	t.Run("ConcurrentPublishersOneWins", func(t *testing.T) {
		s := newStore(t)
		const n = 4
		var ws []teleport.Writer
		for i := 0; i < n; i++ {
			w, err := s.Create(ctx, "race")
			if err != nil {
				t.Fatalf("writer %d: %v", i, err)
			}
			w.Write([]byte{byte('a' + i)})
			ws = append(ws, w)
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i, w := range ws {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = w.Commit(ctx, Manifest("race"))
			}()
		}
		wg.Wait()
		wins := 0
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil:
				wins++
				winner = i
			case !errors.Is(err, teleport.ErrAlreadyExists):
				t.Fatalf("loser %d: %v, want ErrAlreadyExists", i, err)
			}
		}
		if wins != 1 {
			t.Fatalf("%d publishers won, want exactly 1", wins)
		}
		if b := readAll(t, s, "race"); len(b) != 1 || b[0] != byte('a'+winner) {
			t.Fatalf("blob %q is not the winner's", b)
		}
	})

	t.Run("Delete", func(t *testing.T) {
		s := newStore(t)
		Put(t, s, "del", []byte("x"))
		if err := s.Delete(ctx, "del"); err != nil {
			t.Fatal(err)
		}
		mustNotExist(t, s, "del")
		if err := s.Delete(ctx, "del"); !errors.Is(err, teleport.ErrNotFound) {
			t.Fatalf("second Delete: %v, want ErrNotFound", err)
		}
		Put(t, s, "del", []byte("again"))
	})

	t.Run("ListSorted", func(t *testing.T) {
		s := newStore(t)
		l, err := s.List(ctx)
		if err != nil || len(l) != 0 {
			t.Fatalf("empty store lists %d (%v)", len(l), err)
		}
		for _, id := range []string{"c", "a", "b-2", "b-10"} {
			Put(t, s, id, []byte(id))
		}
		l, err = s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, m := range l {
			ids = append(ids, m.ID)
		}
		if strings.Join(ids, ",") != "a,b-10,b-2,c" {
			t.Fatalf("List = %v", ids)
		}
	})

	t.Run("InvalidIDs", func(t *testing.T) {
		s := newStore(t)
		for _, id := range []string{"", "../x", "a/b", ".hidden", "-flag", "sp ace", "nul\x00", strings.Repeat("a", 129), "ünicode"} {
			if _, err := s.Create(ctx, id); !errors.Is(err, teleport.ErrInvalidID) {
				t.Errorf("Create(%q): %v, want ErrInvalidID", id, err)
			}
			if _, err := s.Stat(ctx, id); !errors.Is(err, teleport.ErrInvalidID) {
				t.Errorf("Stat(%q): %v, want ErrInvalidID", id, err)
			}
			if _, err := s.Open(ctx, id); !errors.Is(err, teleport.ErrInvalidID) {
				t.Errorf("Open(%q): %v, want ErrInvalidID", id, err)
			}
			if err := s.Delete(ctx, id); !errors.Is(err, teleport.ErrInvalidID) {
				t.Errorf("Delete(%q): %v, want ErrInvalidID", id, err)
			}
		}
		Put(t, s, strings.Repeat("a", 128), []byte("max length id"))
	})

	// The store checks the sections against the bytes it received, so a
	// manifest that mislocates them never becomes visible.
	t.Run("SectionsMustFillBody", func(t *testing.T) {
		s := newStore(t)
		blob, ws := Payload(20, 70000), Payload(21, 30000)
		for _, tc := range []struct {
			name string
			edit func(m *teleport.Package)
		}{
			{"short", func(m *teleport.Package) { m.Sections[1].Size-- }},
			{"long", func(m *teleport.Package) { m.Sections[1].Size += 5 }},
			{"blob-only", func(m *teleport.Package) { m.Sections = m.Sections[:1] }},
			{"gap", func(m *teleport.Package) { m.Sections[1].Offset++; m.Sections[1].Size-- }},
		} {
			m, body := Checkpoint("sections-"+tc.name, blob, ws)
			tc.edit(m)
			w, err := s.Create(ctx, m.ID)
			if err != nil {
				t.Fatal(err)
			}
			if err := write(w, body); err != nil {
				t.Fatal(err)
			}
			if err := w.Commit(ctx, m); !errors.Is(err, teleport.ErrInvalidPackage) {
				t.Fatalf("%s: Commit of sections that do not fill the body: %v, want ErrInvalidPackage", tc.name, err)
			}
			mustNotExist(t, s, m.ID)
		}
		m, body := Checkpoint("sections-short", blob, ws) // the refused id is free
		PutManifest(t, s, m, body)
		got, err := s.Stat(ctx, m.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.Sections, m.Sections) || got.SizeBytes != int64(len(body)) {
			t.Fatalf("Stat: sections %+v size %d, committed %+v size %d", got.Sections, got.SizeBytes, m.Sections, len(body))
		}
	})

	// A checkpoint's body is its blob then its workspace; each reads back
	// by its own offset.
	t.Run("TwoSections", func(t *testing.T) {
		s := newStore(t)
		blob, ws := Payload(22, 1<<20+3), Payload(23, 200001)
		m, body := Checkpoint("two", blob, ws)
		PutManifest(t, s, m, body)
		got, err := s.Stat(ctx, "two")
		if err != nil {
			t.Fatal(err)
		}
		r, err := s.Open(ctx, "two")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if r.Size() != int64(len(body)) || got.SizeBytes != r.Size() {
			t.Fatalf("body of %d bytes (manifest %d), wrote %d", r.Size(), got.SizeBytes, len(body))
		}
		for _, part := range []struct {
			name string
			want []byte
		}{{teleport.SectionBlob, blob}, {teleport.SectionWorkspace, ws}} {
			name, want := part.name, part.want
			sec, ok := got.Section(name)
			if !ok {
				t.Fatalf("Stat lost section %s: %+v", name, got.Sections)
			}
			b, err := io.ReadAll(io.NewSectionReader(r, sec.Offset, sec.Size))
			if err != nil {
				t.Fatalf("read section %s: %v", name, err)
			}
			sum := sha256.Sum256(b)
			if !bytes.Equal(b, want) || hex.EncodeToString(sum[:]) != sec.SHA256 {
				t.Fatalf("section %s differs after a round trip (%d bytes, want %d)", name, len(b), len(want))
			}
		}
	})
}
