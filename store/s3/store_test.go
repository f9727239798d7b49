package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/storetest"
)

const fakeBucket = "kelpie-unit"

// Small parts and chunks so that a few MiB exercise multipart uploads and
// read-ahead; the fake relaxes S3's 5 MiB part floor to match.
const (
	testPartBytes  = 64 << 10
	testChunkBytes = 64 << 10
)

func newFakeStore(t testing.TB, tweak func(*Options)) (*Store, *fakeS3) {
	t.Helper()
	f, srv := newFakeS3(t)
	f.minPart = testPartBytes
	return fakeClient(t, srv.URL, tweak), f
}

// fakeClient is another Store value (another host's client) on the fake
// server at url.
func fakeClient(t testing.TB, url string, tweak func(*Options)) *Store {
	t.Helper()
	o := Options{Bucket: fakeBucket, Prefix: "unit", Endpoint: url, Region: "us-east-1", PathStyle: true,
		ReadChunkBytes: testChunkBytes, ReadAheadChunks: 3, UploadConcurrency: 3,
		BackoffBase: time.Millisecond, BackoffMax: 5 * time.Millisecond, LeaseTTL: time.Minute,
		Credentials: credentials.NewStaticCredentialsProvider("AKIDUNIT", "unit-secret", "")}
	if tweak != nil {
		tweak(&o)
	}
	s, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	s.o.PartSizeBytes = testPartBytes
	return s
}

func TestConformanceFake(t *testing.T) {
	storetest.Run(t, func(t *testing.T) teleport.Store {
		s, _ := newFakeStore(t, nil)
		return s
	})
}

func TestChunkConformanceFake(t *testing.T) {
	const grace = time.Hour
	storetest.RunChunks(t, storetest.ChunkHarness{
		Grace: grace,
		New: func(t *testing.T) (teleport.Store, func(time.Duration)) {
			var f *fakeS3
			s, f := newFakeStore(t, func(o *Options) {
				o.ChunkGrace = grace
				o.ChunkClock = func() time.Time {
					f.mu.Lock()
					defer f.mu.Unlock()
					return f.now
				}
			})
			return s, f.advance
		},
	})
}

func TestGCConformanceFake(t *testing.T) {
	var mu sync.Mutex
	fakes := map[teleport.Store]*fakeS3{}
	storetest.RunGC(t, storetest.GCHarness{
		New: func(t *testing.T) teleport.Store {
			s, f := newFakeStore(t, nil)
			mu.Lock()
			fakes[s] = f
			mu.Unlock()
			return s
		},
		Orphan: func(t *testing.T, s teleport.Store) string {
			return orphan(t, s.(*Store), 3*testPartBytes)
		},
		Expire: func(t *testing.T, s teleport.Store) {
			mu.Lock()
			f := fakes[s]
			mu.Unlock()
			f.advance(2 * time.Minute) // LeaseTTL is 1 min
		},
	})
}

var orphans atomic.Int64

// orphan leaves an upload as a process that died mid-upload does: n bytes
// of parts on the server, no abort, no more lease refreshes.
func orphan(t testing.TB, s *Store, n int) string {
	t.Helper()
	ctx := context.Background()
	id := fmt.Sprintf("orphan-%d", orphans.Add(1))
	w, err := s.Create(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(storetest.Payload(15, n)); err != nil {
		t.Fatal(err)
	}
	up := w.(*writer).up
	if err := up.wait(ctx); err != nil {
		t.Fatal(err)
	}
	if up.mpID == "" {
		t.Fatalf("orphan %s sent no part: GC would have nothing to remove", id)
	}
	up.cancel()
	return id
}

func put(t *testing.T, s *Store, id string, blob []byte) {
	t.Helper()
	storetest.Put(t, s, id, blob)
}

func TestParseURL(t *testing.T) {
	env := map[string]string{"KELPIE_S3_ENDPOINT": "http://127.0.0.1:9000", "KELPIE_S3_REGION": "eu-west-1"}
	getenv := func(k string) string { return env[k] }
	for _, tc := range []struct {
		url, bucket, prefix, endpoint, region string
		pathStyle                             bool
		unsafe                                bool
		noEnv                                 bool
		err                                   string
	}{
		{url: "s3://bkt/some/prefix", bucket: "bkt", prefix: "/some/prefix", endpoint: "http://127.0.0.1:9000", region: "eu-west-1", pathStyle: true},
		{url: "s3://bkt", bucket: "bkt", noEnv: true},
		{url: "s3://bkt/p?endpoint=http://127.0.0.1:1&region=us-east-1&path_style=false", bucket: "bkt", prefix: "/p", endpoint: "http://127.0.0.1:1", region: "us-east-1"},
		{url: "s3://bkt/p?part_size_mib=16&concurrency=8", bucket: "bkt", prefix: "/p", endpoint: "http://127.0.0.1:9000", region: "eu-west-1", pathStyle: true},
		{url: "s3://bkt/p?unsafe_no_conditional_put=true", bucket: "bkt", prefix: "/p", endpoint: "http://127.0.0.1:9000", region: "eu-west-1", pathStyle: true, unsafe: true},
		{url: "s3://bkt/p?unsafe_no_conditional_put=maybe", err: "unsafe_no_conditional_put \"maybe\" is not a boolean"},
		{url: "s3://bkt/p?unsafe=1", err: "unsafe_no_conditional_put)"},
		{url: "s3://Bad_Bucket/p", err: "lowercase"},
		{url: "s3://b/p", err: "3..63"},
		{url: "s3://bkt/a/../b", err: "'..'"},
		{url: "s3://bkt/p?endpont=x", err: "unknown parameter"},
		{url: "s3://bkt/p?path_style=maybe", err: "not a boolean"},
		{url: "s3://bkt/p?part_size_mib=1", err: "part_size_mib"},
		{url: "s3://key:secret@bkt/p", err: "credentials"},
		{url: "http://bkt/p", err: "want s3://"},
	} {
		t.Run(tc.url, func(t *testing.T) {
			ge := getenv
			if tc.noEnv {
				ge = nil
			}
			o, err := ParseURL(tc.url, ge)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, teleport.ErrStore) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.Bucket != tc.bucket || o.Prefix != tc.prefix || o.Endpoint != tc.endpoint || o.Region != tc.region || o.PathStyle != tc.pathStyle ||
				o.UnsafeNoConditionalPut != tc.unsafe {
				t.Fatalf("got %+v", o)
			}
		})
	}
}

// KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT opts out like the URL parameter,
// which wins over it.
func TestParseURLUnsafeEnv(t *testing.T) {
	for _, tc := range []struct {
		url, env string
		want     bool
		err      bool
	}{
		{"s3://bkt/p", "1", true, false},
		{"s3://bkt/p", "", false, false},
		{"s3://bkt/p", "0", false, false},
		{"s3://bkt/p?unsafe_no_conditional_put=false", "1", false, false},
		{"s3://bkt/p", "yes please", false, true},
	} {
		o, err := ParseURL(tc.url, func(k string) string {
			if k == "KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT" {
				return tc.env
			}
			return ""
		})
		if (err != nil) != tc.err || o.UnsafeNoConditionalPut != tc.want {
			t.Errorf("ParseURL(%q) with KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT=%q: unsafe %v, err %v", tc.url, tc.env, o.UnsafeNoConditionalPut, err)
		}
	}
}

// A multi-part blob goes up as a multipart upload with bounded buffers and
// comes back identical, sequentially (read-ahead) and at random.
func TestMultipartAndReadAhead(t *testing.T) {
	s, f := newFakeStore(t, nil)
	blob := storetest.Payload(7, 3<<20+12345)
	put(t, s, "big", blob)
	if n := f.count("POST create-mp"); n != 1 {
		t.Fatalf("%d multipart uploads started, want 1", n)
	}
	if n, want := f.count("PUT part"), (len(blob)+testPartBytes-1)/testPartBytes; n != want {
		t.Fatalf("%d parts sent, want %d", n, want)
	}
	if f.openUploads() != 0 || len(f.keys(fakeBucket+"/unit/uploads/")) != 0 {
		t.Fatal("upload or lease left behind after commit")
	}

	r, err := s.Open(context.Background(), "big")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	gets := f.count("GET object")
	var got bytes.Buffer
	_, err = io.Copy(&got, io.NewSectionReader(r, 0, r.Size())) // 32 KiB reads
	if err != nil || !bytes.Equal(got.Bytes(), blob) {
		t.Fatalf("sequential read differs (%v)", err)
	}
	chunks := (len(blob) + testChunkBytes - 1) / testChunkBytes
	if n := f.count("GET object") - gets; n > chunks+sequentialRunReads+1 {
		t.Fatalf("%d GETs for %d chunks: read-ahead is not batching", n, chunks)
	}
	rr := r.(*reader)
	if rr.nbuf > rr.ahead+1 {
		t.Fatalf("%d chunk buffers, bound is %d", rr.nbuf, rr.ahead+1)
	}
	for _, tc := range []struct{ off, n int64 }{{0, 1}, {5, 200000}, {int64(len(blob)) - 3, 3}, {1 << 20, 1 << 20}, {77, testChunkBytes * 5}} {
		buf := make([]byte, tc.n)
		if _, err := r.ReadAt(buf, tc.off); err != nil || !bytes.Equal(buf, blob[tc.off:tc.off+tc.n]) {
			t.Fatalf("ReadAt(%d, %d): %v or wrong bytes", tc.off, tc.n, err)
		}
	}
}

// A blob altered in the bucket fails the read that completes a sequential
// pass.
func TestFullReadVerifiesSHA256(t *testing.T) {
	s, f := newFakeStore(t, nil)
	blob := storetest.Payload(8, 500000)
	put(t, s, "v", blob)
	f.mu.Lock()
	for k, o := range f.objects {
		if strings.Contains(k, "/blobs/v/") {
			o.data = bytes.Clone(o.data)
			o.data[123456] ^= 1
			f.objects[k] = o
		}
	}
	f.mu.Unlock()
	r, err := s.Open(context.Background(), "v")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, err = io.Copy(io.Discard, io.NewSectionReader(r, 0, r.Size()))
	if !errors.Is(err, teleport.ErrChecksumMismatch) {
		t.Fatalf("full read of a damaged blob: %v, want ErrChecksumMismatch", err)
	}
}

// Throttling and 5xx are retried with backoff; the request succeeds.
func TestRetriesThrottlingAnd5xx(t *testing.T) {
	s, f := newFakeStore(t, nil)
	var mu sync.Mutex
	failures := map[string]int{"part": 2, "complete": 1, "object": 1}
	f.fault = func(r *http.Request, kind string) faultAction {
		mu.Lock()
		defer mu.Unlock()
		if failures[kind] > 0 {
			failures[kind]--
			if kind == "part" {
				return faultAction{status: 503, code: "SlowDown"}
			}
			return faultAction{status: 500, code: "InternalError"}
		}
		return faultAction{}
	}
	blob := storetest.Payload(9, 5*testPartBytes+1)
	put(t, s, "retried", blob)
	if s.retries.Load() != 4 {
		t.Fatalf("%d retries, want 4", s.retries.Load())
	}
	if b := readAll(t, s, "retried"); !bytes.Equal(b, blob) {
		t.Fatal("blob differs")
	}
}

func readAll(t *testing.T, s *Store, id string) []byte {
	t.Helper()
	r, err := s.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A body cut mid-transfer is fetched again.
func TestCutDownloadRetried(t *testing.T) {
	s, f := newFakeStore(t, nil)
	blob := storetest.Payload(10, 10*testChunkBytes)
	put(t, s, "cut", blob)
	var mu sync.Mutex
	cuts := 3
	f.fault = func(r *http.Request, kind string) faultAction {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") && cuts > 0 {
			cuts--
			return faultAction{cut: true}
		}
		return faultAction{}
	}
	if b := readAll(t, s, "cut"); !bytes.Equal(b, blob) {
		t.Fatal("blob differs after cut downloads")
	}
	if cuts != 0 || s.retries.Load() < 3 {
		t.Fatalf("cuts left %d, retries %d", cuts, s.retries.Load())
	}
}

// A server that keeps failing gives a one-line error naming the attempts,
// within the backoff budget, and the package stays invisible.
func TestRetriesGiveUp(t *testing.T) {
	s, f := newFakeStore(t, func(o *Options) { o.MaxAttempts = 4 })
	f.fault = func(r *http.Request, kind string) faultAction {
		if kind == "part" {
			return faultAction{status: 503, code: "ServiceUnavailable"}
		}
		return faultAction{}
	}
	w, err := s.Create(context.Background(), "doomed")
	if err != nil {
		t.Fatal(err)
	}
	_, werr := w.Write(storetest.Payload(11, 10*testPartBytes))
	cerr := w.Commit(context.Background(), storetest.Manifest("doomed"))
	err = errors.Join(werr, cerr)
	if !errors.Is(err, teleport.ErrStore) || !strings.Contains(err.Error(), "after 4 attempts") || !strings.Contains(err.Error(), "ServiceUnavailable") {
		t.Fatalf("error %q: want ErrStore naming ServiceUnavailable after 4 attempts", err)
	}
	if strings.Contains(cerr.Error(), "\n") {
		t.Fatalf("multi-line error %q", cerr)
	}
	if _, err := s.Stat(context.Background(), "doomed"); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Stat after failed upload: %v", err)
	}
	if f.openUploads() != 0 {
		t.Fatal("multipart upload left open after a failed commit")
	}
}

func TestErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		status int
		code   string
		is     []error
		msg    string
	}{
		{403, "SignatureDoesNotMatch", []error{teleport.ErrStore, ErrCredentials}, "refused the credentials (SignatureDoesNotMatch)"},
		{403, "InvalidAccessKeyId", []error{teleport.ErrStore, ErrCredentials}, "AWS_ACCESS_KEY_ID"},
		{403, "AccessDenied", []error{teleport.ErrStore, ErrCredentials}, "AccessDenied"},
		{404, "NoSuchBucket", []error{teleport.ErrStore}, `bucket "kelpie-unit" does not exist`},
		{400, "InvalidArgument", []error{teleport.ErrStore}, "InvalidArgument"},
	} {
		t.Run(tc.code, func(t *testing.T) {
			s, f := newFakeStore(t, nil)
			f.fault = func(*http.Request, string) faultAction { return faultAction{status: tc.status, code: tc.code} }
			_, err := s.Stat(context.Background(), "x")
			for _, want := range tc.is {
				if !errors.Is(err, want) {
					t.Errorf("%v is not %v", err, want)
				}
			}
			if errors.Is(err, teleport.ErrNotFound) || err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q, want one containing %q", err, tc.msg)
			}
			if s.retries.Load() != 0 {
				t.Errorf("%d retries of a permanent error", s.retries.Load())
			}
		})
	}
}

// The manifest PUT lands but its reply is lost: the retry's 412 must be
// recognised as our own win, not a loss.
func TestPublishLostAckIsSuccess(t *testing.T) {
	s, f := newFakeStore(t, nil)
	var mu sync.Mutex
	lost := false
	f.fault = func(r *http.Request, kind string) faultAction {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/") && !lost {
			lost = true
			return faultAction{lose: true}
		}
		return faultAction{}
	}
	put(t, s, "acked", []byte("blob"))
	if !lost {
		t.Fatal("fault never fired")
	}
	if b := readAll(t, s, "acked"); string(b) != "blob" {
		t.Fatalf("blob %q", b)
	}
}

// A canceled upload context stops the upload: writes fail, nothing is
// visible, nothing is left open.
func TestCanceledUploadLeavesNothing(t *testing.T) {
	s, f := newFakeStore(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	w, err := s.Create(ctx, "half")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(storetest.Payload(12, 5*testPartBytes)); err != nil {
		t.Fatal(err)
	}
	cancel()
	var werr error
	for i := 0; i < 100 && werr == nil; i++ {
		_, werr = w.Write(storetest.Payload(13, testPartBytes))
	}
	if !errors.Is(werr, context.Canceled) {
		t.Fatalf("Write after cancel: %v", werr)
	}
	if err := w.Abort(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(context.Background(), "half"); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatal(err)
	}
	if f.openUploads() != 0 || len(f.keys(fakeBucket+"/unit/blobs/")) != 0 || len(f.keys(fakeBucket+"/unit/uploads/")) != 0 {
		t.Fatalf("left behind: %d uploads, %v", f.openUploads(), f.keys(fakeBucket+"/"))
	}
}

// An upload whose process died (it stops refreshing its lease, never
// aborts) is left alone by GC until its lease expires, then removed; a live
// upload and published packages are never touched.
func TestGCRemovesDeadUploadsOnly(t *testing.T) {
	ctx := context.Background()
	s, f := newFakeStore(t, nil)
	put(t, s, "kept", storetest.Payload(14, 3*testPartBytes))

	dead, err := s.Create(ctx, "dead")
	if err != nil {
		t.Fatal(err)
	}
	dead.Write(storetest.Payload(15, 3*testPartBytes))
	dw := dead.(*writer)
	dw.up.wait(ctx)
	dw.up.cancel() // the process is gone: no abort, no more lease refreshes
	// A blob completed but never published (died between the two).
	if err := s.putBytes(ctx, "put", s.blobKey(blobRel("dead2", "x1")), []byte("orphan"), false); err != nil {
		t.Fatal(err)
	}

	if n, err := s.GC(ctx); err != nil || n != 0 {
		t.Fatalf("GC before the lease expired removed %d (%v)", n, err)
	}
	f.advance(2 * time.Minute)
	live, err := s.Create(ctx, "live") // its lease is fresh
	if err != nil {
		t.Fatal(err)
	}
	live.Write(storetest.Payload(16, 3*testPartBytes))
	n, err := s.GC(ctx)
	if err != nil || n != 2 {
		t.Fatalf("GC removed %d (%v), want 2 (a multipart upload and a blob)", n, err)
	}
	if got := f.keys(fakeBucket + "/unit/blobs/"); len(got) != 1 || !strings.Contains(got[0], "/blobs/kept/") {
		t.Fatalf("blobs after GC: %v", got)
	}
	if f.openUploads() != 1 {
		t.Fatalf("%d multipart uploads open, want the live one", f.openUploads())
	}
	if err := live.Commit(ctx, storetest.Manifest("live")); err != nil {
		t.Fatalf("live upload broken by GC: %v", err)
	}
	if b := readAll(t, s, "kept"); !bytes.Equal(b, storetest.Payload(14, 3*testPartBytes)) {
		t.Fatal("published package damaged by GC")
	}
	if got := f.keys(fakeBucket + "/unit/uploads/"); len(got) != 0 {
		t.Fatalf("leases left: %v", got)
	}
}

// Parallel read-ahead keeps memory bounded however large the read.
func TestLargeReadAtIsDirect(t *testing.T) {
	s, _ := newFakeStore(t, nil)
	blob := storetest.Payload(17, 40*testChunkBytes+3)
	put(t, s, "large", blob)
	r, err := s.Open(context.Background(), "large")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, len(blob))
	if n, err := r.ReadAt(buf, 0); err != nil || n != len(blob) || !bytes.Equal(buf, blob) {
		t.Fatalf("ReadAt whole: %d, %v", n, err)
	}
	if rr := r.(*reader); rr.nbuf != 0 {
		t.Fatalf("a direct read allocated %d chunk buffers", rr.nbuf)
	}
	sum := sha256.Sum256(blob)
	if m, _ := s.Stat(context.Background(), "large"); m.BlobSHA256 != hex.EncodeToString(sum[:]) {
		t.Fatal("manifest sha differs")
	}
}

// No credentials anywhere: the message says what to set.
func TestMissingCredentials(t *testing.T) {
	s, _ := newFakeStore(t, func(o *Options) {
		o.Credentials = aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{}, errors.New("no EC2 IMDS role found")
		})
	})
	_, err := s.Stat(context.Background(), "x")
	if !errors.Is(err, ErrCredentials) || !errors.Is(err, teleport.ErrStore) || !strings.Contains(err.Error(), "no AWS credentials found") {
		t.Fatalf("error %v", err)
	}
}
