package s3

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/storetest"
)

const probeKeys = "/scratch/conditional-put-"

func ignoreIfNoneMatch(f *fakeS3) {
	f.mu.Lock()
	f.ignoreIfNoneMatch = true
	f.mu.Unlock()
}

// A server that ignores If-None-Match would let two hosts both publish one
// id, the second silently replacing the first: Create refuses before
// anything is uploaded, in one line naming the server and the way out.
func TestProbeRefusesServerIgnoringIfNoneMatch(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, nil)
	ignoreIfNoneMatch(f)
	_, err := s.Create(ctx, "p")
	if !errors.Is(err, ErrNoConditionalPut) || !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("Create on a server ignoring If-None-Match: %v, want ErrNoConditionalPut", err)
	}
	for _, want := range []string{s.endpoint, "ignores If-None-Match", "unsafe_no_conditional_put=true", "KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT=1"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("multi-line error %q", err)
	}
	if left := f.keys(fakeBucket + "/"); len(left) != 0 || f.openUploads() != 0 {
		t.Fatalf("refused Create left %v and %d multipart uploads", left, f.openUploads())
	}
	if n := f.count("POST create-mp") + len(f.requests("/uploads/")) + len(f.requests("/blobs/")); n != 0 {
		t.Fatalf("refused Create sent %d upload requests", n)
	}
	probes := len(f.requests(probeKeys))
	if probes != 3 {
		t.Fatalf("the probe sent %d requests, want 3: %v", probes, f.requests(probeKeys))
	}
	// The verdict is the Store's: no second probe, the same refusal.
	if _, err := s.Create(ctx, "q"); !errors.Is(err, ErrNoConditionalPut) {
		t.Fatalf("second Create: %v", err)
	}
	if n := len(f.requests(probeKeys)); n != probes {
		t.Fatalf("second Create probed again (%d requests)", n-probes)
	}
}

// The explicit opt-out publishes there anyway, and sends no probe.
func TestProbeOptOutPublishes(t *testing.T) {
	s, f := newFakeStore(t, func(o *Options) { o.UnsafeNoConditionalPut = true })
	ignoreIfNoneMatch(f)
	blob := storetest.Payload(40, 3*testPartBytes+1)
	put(t, s, "p", blob)
	if b := readAll(t, s, "p"); string(b) != string(blob) {
		t.Fatal("blob differs")
	}
	if n := len(f.requests("/scratch/")); n != 0 {
		t.Fatalf("opted-out store sent %d probe requests", n)
	}
}

// On a server that honours the condition the probe costs three requests,
// once per Store value, however many Creates run at once.
func TestProbeOncePerStore(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, nil)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			id := fmt.Sprintf("p%d", i)
			w, err := s.Create(ctx, id)
			if err != nil {
				t.Errorf("Create(%s): %v", id, err)
				return
			}
			w.Write([]byte(id))
			if err := w.Commit(ctx, storetest.Manifest(id)); err != nil {
				t.Errorf("Commit(%s): %v", id, err)
			}
		})
	}
	wg.Wait()
	got := f.requests(probeKeys)
	if len(got) != 3 || !strings.HasPrefix(got[0], "PUT ") || !strings.HasPrefix(got[1], "PUT ") || !strings.HasPrefix(got[2], "DELETE ") {
		t.Fatalf("probe requests %v, want PUT, PUT, DELETE", got)
	}
	if left := f.keys(fakeBucket + "/unit/scratch/"); len(left) != 0 {
		t.Fatalf("probe left %v", left)
	}
	put(t, s, "later", []byte("x"))
	if n := len(f.requests(probeKeys)); n != 3 {
		t.Fatalf("a later Create probed again")
	}
	other := fakeClient(t, s.endpoint, nil) // another host's client
	put(t, other, "other", []byte("y"))
	if n := len(f.requests(probeKeys)); n != 6 {
		t.Fatalf("%d probe requests after a second Store's first Create, want 6", n)
	}
}

// A probe the server fails to answer is no verdict: within a Create it is
// retried like any request, and when it still fails, the next Create
// probes again rather than remember "unsafe".
func TestProbeFailureIsNotAVerdict(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, func(o *Options) { o.MaxAttempts = 2 })
	var mu sync.Mutex
	failures := 0
	f.fault = func(r *http.Request, kind string) faultAction {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, probeKeys) && failures > 0 {
			failures--
			return faultAction{status: 500, code: "InternalError"}
		}
		return faultAction{}
	}
	mu.Lock()
	failures = 2 // both attempts of the first PUT
	mu.Unlock()
	_, err := s.Create(ctx, "p")
	if err == nil || errors.Is(err, ErrNoConditionalPut) || !errors.Is(err, teleport.ErrStore) {
		t.Fatalf("Create while the probe fails: %v, want a plain store error", err)
	}
	if left := f.keys(fakeBucket + "/unit/uploads/"); len(left) != 0 {
		t.Fatalf("Create uploaded a lease before the probe passed: %v", left)
	}
	mu.Lock()
	failures = 1 // one 500, then the retry succeeds
	mu.Unlock()
	retries := s.retries.Load()
	put(t, s, "p", []byte("x"))
	if s.retries.Load() == retries {
		t.Fatal("the failed probe request was not retried")
	}
	if n := len(f.requests(probeKeys)); n != 2+4 {
		t.Fatalf("%d probe requests, want 2 failed then 4 (one retried)", n)
	}
}

// An answer lost after the server acted must not fool the probe either way.
func TestProbeLostAnswers(t *testing.T) {
	for _, ignoring := range []bool{false, true} {
		t.Run(fmt.Sprintf("ignoring=%v", ignoring), func(t *testing.T) {
			s, f := newFakeStore(t, nil)
			if ignoring {
				ignoreIfNoneMatch(f)
			}
			// The first attempt of each probe PUT is carried out and its
			// answer lost; the retry then meets what that attempt did.
			var mu sync.Mutex
			seen := 0
			f.fault = func(r *http.Request, kind string) faultAction {
				mu.Lock()
				defer mu.Unlock()
				if r.Method == http.MethodPut && strings.Contains(r.URL.Path, probeKeys) {
					seen++
					if seen == 1 || seen == 3 {
						return faultAction{lose: true}
					}
				}
				return faultAction{}
			}
			_, err := s.Create(context.Background(), "p")
			if ignoring != errors.Is(err, ErrNoConditionalPut) || (!ignoring && err != nil) {
				t.Fatalf("Create: %v", err)
			}
			if seen != 4 {
				t.Fatalf("%d probe PUTs, want 4 (two lost answers, two retries)", seen)
			}
		})
	}
}

// Reading never probes, nor writes at all; GC writes only its clock probe.
func TestReadOnlyOperationsSendNoPut(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, nil)
	put(t, s, "p", storetest.Payload(41, 2*testPartBytes))
	reader := fakeClient(t, s.endpoint, nil)
	puts := func() int { return len(f.requests("")) - len(nonPuts(f)) }
	before := puts()
	if _, err := reader.Stat(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	if _, err := reader.List(ctx); err != nil {
		t.Fatal(err)
	}
	readAll(t, reader, "p")
	if n := puts() - before; n != 0 {
		t.Fatalf("Stat, List and Open sent %d PUTs", n)
	}
	conditional := f.count("PUT conditional")
	if _, err := reader.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.count("PUT conditional") - conditional; n != 0 || len(f.requests(probeKeys)) != 3 {
		t.Fatalf("GC sent %d conditional PUTs", n)
	}
}

func nonPuts(f *fakeS3) []string {
	var out []string
	for _, r := range f.requests("") {
		if !strings.HasPrefix(r, "PUT ") {
			out = append(out, r)
		}
	}
	return out
}

// A probe object left behind (its probe died) goes with GC once it is old,
// uncounted; a young one stays, so a running probe keeps its object.
func TestGCRemovesStaleScratch(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, nil)
	key := s.scratchKey("conditional-put")
	if err := s.putBytes(ctx, "put", key, nil, false); err != nil {
		t.Fatal(err)
	}
	f.advance(2 * time.Minute) // past LeaseTTL, not scratchAgeMin
	if n, err := s.GC(ctx); err != nil || n != 0 || len(f.keys(fakeBucket+"/"+key)) != 1 {
		t.Fatalf("GC removed %d (%v); young scratch left: %v", n, err, f.keys(fakeBucket+"/"+key))
	}
	f.advance(scratchAgeMin)
	if n, err := s.GC(ctx); err != nil || n != 0 {
		t.Fatalf("GC removed %d (%v), want 0 counted", n, err)
	}
	if left := f.keys(fakeBucket + "/unit/"); len(left) != 0 {
		t.Fatalf("left after GC: %v", left)
	}
}
