package fs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/storetest"
)

func TestGCConformance(t *testing.T) {
	storetest.RunGC(t, storetest.GCHarness{
		New:    func(t *testing.T) teleport.Store { return open(t) },
		Orphan: orphan,
	})
}

func open(t *testing.T) *Store {
	t.Helper()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var orphans atomic.Int64

// orphan leaves an upload as a crashed writer does: written to, never
// committed nor aborted, and unlocked, since a dead process's flocks go
// with its file descriptors.
func orphan(t *testing.T, s teleport.Store) string {
	t.Helper()
	id := fmt.Sprintf("orphan-%d", orphans.Add(1))
	w, err := s.Create(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(storetest.Payload(5, 100000)); err != nil {
		t.Fatal(err)
	}
	w.(*writer).f.Close()
	return id
}

// setHook sets a test hook for the rest of the test.
func setHook[T any](t *testing.T, hook *T, f T) {
	*hook = f
	t.Cleanup(func() {
		var zero T
		*hook = zero
	})
}

type gcResult struct {
	n   int
	err error
}

// gcInWindow is called from inside a window the store lock guards. It
// starts GC and returns once GC has either finished (it did not wait for
// the window to close: the bug) or is waiting for the store lock.
func gcInWindow(t *testing.T, s *Store, waiting <-chan struct{}) <-chan gcResult {
	done := make(chan gcResult, 1)
	go func() {
		n, err := s.GC(context.Background())
		done <- gcResult{n, err}
	}()
	select {
	case <-waiting:
	case r := <-done:
		done <- r
	case <-time.After(10 * time.Second):
		t.Fatal("GC neither ran nor waited for the store lock")
	}
	return done
}

// gcWaiting reports on the returned channel when GC waits for the store lock.
func gcWaiting(t *testing.T) <-chan struct{} {
	waiting := make(chan struct{}, 1)
	setHook(t, &hookLockWait, func(exclusive bool) {
		if exclusive {
			select {
			case waiting <- struct{}{}:
			default:
			}
		}
	})
	return waiting
}

// Between making an upload's directory and locking its blob, the upload is
// not locked by its writer; GC run in that window must leave it alone.
func TestGCSparesUploadBeingCreated(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	waiting := gcWaiting(t)
	var gc <-chan gcResult
	setHook(t, &hookCreateWindow, func(string) { gc = gcInWindow(t, s, waiting) })
	w, err := s.Create(ctx, "p")
	if err != nil {
		t.Fatalf("Create with GC in its window: %v", err)
	}
	hookCreateWindow = nil
	if r := <-gc; r.err != nil || r.n != 0 {
		t.Fatalf("GC in Create's window removed %d (%v), want 0", r.n, r.err)
	}
	body := storetest.Payload(1, 50000)
	if _, err := w.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(ctx, storetest.Manifest("p")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(s.BlobPath("p")); !bytes.Equal(b, body) {
		t.Fatal("blob differs")
	}
}

// Delete moves a package into a trash directory under .tmp; GC run while
// the trash directory exists must leave it alone, or Delete fails with a
// false "not found" and the package stays.
func TestGCSparesRunningDelete(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	storetest.Put(t, s, "doomed", []byte("bytes"))
	waiting := gcWaiting(t)
	var gc <-chan gcResult
	setHook(t, &hookDeleteWindow, func(string) { gc = gcInWindow(t, s, waiting) })
	if err := s.Delete(ctx, "doomed"); err != nil {
		t.Fatalf("Delete with GC in its window: %v", err)
	}
	hookDeleteWindow = nil
	if r := <-gc; r.err != nil || r.n != 0 {
		t.Fatalf("GC in Delete's window removed %d (%v), want 0", r.n, r.err)
	}
	if _, err := s.Stat(ctx, "doomed"); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("after Delete: %v", err)
	}
}

// Uploads that commit or abort while GC runs leave .tmp on their own; GC
// counts only what it removed itself.
func TestGCCountsOnlyWhatItRemoves(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	committing, err := s.Create(ctx, "committing")
	if err != nil {
		t.Fatal(err)
	}
	aborting, err := s.Create(ctx, "aborting")
	if err != nil {
		t.Fatal(err)
	}
	orphan(t, s)
	setHook(t, &hookGCListed, func() {
		if err := committing.Commit(ctx, storetest.Manifest("committing")); err != nil {
			t.Errorf("Commit while GC runs: %v", err)
		}
		if err := aborting.Abort(ctx); err != nil {
			t.Errorf("Abort while GC runs: %v", err)
		}
	})
	if n, err := s.GC(ctx); err != nil || n != 1 {
		t.Fatalf("GC removed %d (%v), want 1 (the orphan)", n, err)
	}
	if _, err := s.Stat(ctx, "committing"); err != nil {
		t.Fatal(err)
	}
	if left := tmpEntries(t, s); len(left) != 0 {
		t.Fatalf(".tmp after GC: %v", left)
	}
}

// tmpEntries lists .tmp but for the store lock.
func tmpEntries(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.root, tmpDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if e.Name() != lockFile {
			out = append(out, e.Name())
		}
	}
	return out
}

var errInjected = errors.New("injected failure")

// The package is visible once renamed into place; when the sync after the
// rename fails, Commit must take it back before reporting the failure.
func TestCommitSyncFailureUnpublishes(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	setHook(t, &hookSyncPackages, func() error { return errInjected })
	w, err := s.Create(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("body"))
	err = w.Commit(ctx, storetest.Manifest("p"))
	if !errors.Is(err, teleport.ErrStore) || !strings.Contains(err.Error(), errInjected.Error()) {
		t.Fatalf("Commit with a failing sync: %v, want ErrStore naming the failure", err)
	}
	if strings.Contains(err.Error(), "may be visible") {
		t.Fatalf("Commit says the package may be visible though it was taken back: %v", err)
	}
	if _, err := s.Stat(ctx, "p"); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Commit failed but Stat says %v", err)
	}
	if l, _ := s.List(ctx); len(l) != 0 {
		t.Fatalf("Commit failed but List shows %d packages", len(l))
	}
	if left := tmpEntries(t, s); len(left) != 0 {
		t.Fatalf(".tmp after a taken-back commit: %v", left)
	}
	hookSyncPackages = nil
	storetest.Put(t, s, "p", []byte("again")) // the id is free
}

// When taking the package back fails too, the error says it may be visible.
func TestCommitUnpublishFailureSaysMayBeVisible(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	setHook(t, &hookSyncPackages, func() error { return errInjected })
	setHook(t, &hookTakeBack, func() error { return errors.New("cannot take back") })
	w, err := s.Create(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	err = w.Commit(ctx, storetest.Manifest("p"))
	if !errors.Is(err, teleport.ErrStore) || !strings.Contains(err.Error(), "may be visible") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Commit: %v, want one line saying the package may be visible", err)
	}
	if _, err := s.Stat(ctx, "p"); err != nil {
		t.Fatalf("the package is in fact visible, Stat says %v", err)
	}
}

// Taking back is for our own package only: one deleted and committed again
// by another upload meanwhile stays.
func TestCommitTakeBackSparesAnotherUpload(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	setHook(t, &hookSyncPackages, func() error {
		hookSyncPackages = nil
		if err := s.Delete(ctx, "p"); err != nil {
			t.Errorf("Delete: %v", err)
		}
		storetest.Put(t, s, "p", []byte("theirs"))
		return errInjected
	})
	w, err := s.Create(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("ours"))
	if err := w.Commit(ctx, storetest.Manifest("p")); !errors.Is(err, teleport.ErrStore) || strings.Contains(err.Error(), "may be visible") {
		t.Fatalf("Commit: %v", err)
	}
	if b, _ := os.ReadFile(s.BlobPath("p")); string(b) != "theirs" {
		t.Fatalf("blob %q, want the other upload's", b)
	}
}

// The store lock is a flock, so it keeps a GC in another process off
// this process's uploads and deletes just as it does within one process.
func TestGCInAnotherProcess(t *testing.T) {
	if os.Getenv("KELPIE_FS_GC_HELPER") != "" {
		t.Skip("in helper")
	}
	ctx := context.Background()
	s := open(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperGCLoop$")
	cmd.Env = append(os.Environ(), "KELPIE_FS_GC_HELPER="+s.Root())
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	if !scanFor(sc, "HELPER-GC-RUNNING") {
		t.Fatal("helper never started collecting")
	}
	var kept []string
	for i := range 60 {
		id := fmt.Sprintf("x-%d", i)
		w, err := s.Create(ctx, id)
		if err != nil {
			t.Fatalf("Create(%s) alongside another process's GC: %v", id, err)
		}
		if _, err := w.Write(storetest.Payload(uint64(i), 10000+i)); err != nil {
			t.Fatal(err)
		}
		if err := w.Commit(ctx, storetest.Manifest(id)); err != nil {
			t.Fatalf("Commit(%s) alongside another process's GC: %v", id, err)
		}
		if i%2 == 0 {
			kept = append(kept, id)
			continue
		}
		if err := s.Delete(ctx, id); err != nil {
			t.Fatalf("Delete(%s) alongside another process's GC: %v", id, err)
		}
	}
	stdin.Close()
	if !scanFor(sc, "HELPER-GC-REMOVED 0 ") {
		t.Fatal("the other process's GC removed something, or failed (see its output)")
	}
	cmd.Wait()
	for i, id := range kept {
		b, err := os.ReadFile(s.BlobPath(id))
		if err != nil || !bytes.Equal(b, storetest.Payload(uint64(2*i), 10000+2*i)) {
			t.Fatalf("package %s damaged (%v)", id, err)
		}
	}
}

func scanFor(sc *bufio.Scanner, prefix string) bool {
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), prefix) {
			return true
		}
	}
	return false
}

// TestHelperGCLoop is the other process of TestGCInAnotherProcess: it
// collects in a loop until its stdin closes, then reports what it removed.
func TestHelperGCLoop(t *testing.T) {
	root := os.Getenv("KELPIE_FS_GC_HELPER")
	if root == "" {
		t.Skip("helper for TestGCInAnotherProcess")
	}
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(stop) }()
	fmt.Println("HELPER-GC-RUNNING")
	removed, runs := 0, 0
	for {
		select {
		case <-stop:
			fmt.Printf("HELPER-GC-REMOVED %d in %d runs\n", removed, runs)
			return
		default:
		}
		n, err := s.GC(context.Background())
		if err != nil {
			fmt.Printf("HELPER-GC-FAILED %v\n", err)
			return
		}
		removed += n
		runs++
	}
}
