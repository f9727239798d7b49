package s3

// Integration tests against a real S3 server (SeaweedFS in CI, started by
// scripts/s3-test.sh). They are skipped when KELPIE_S3_ENDPOINT is unset.
// Each test works under its own random prefix and removes it afterwards.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/storetest"
)

// realEndpoint returns the server under test, or skips.
func realEndpoint(t testing.TB) (endpoint, bucket string) {
	t.Helper()
	endpoint = os.Getenv("KELPIE_S3_ENDPOINT")
	if endpoint == "" {
		t.Skip("KELPIE_S3_ENDPOINT is unset; run scripts/s3-test.sh to test against a real SeaweedFS server")
	}
	loopbackOnly(t, endpoint)
	bucket = os.Getenv("KELPIE_S3_BUCKET")
	if bucket == "" {
		bucket = "kelpie-test"
	}
	return endpoint, bucket
}

// loopbackOnly keeps these tests from ever talking to a remote service.
func loopbackOnly(t testing.TB, endpoint string) {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil || (u.Hostname() != "127.0.0.1" && u.Hostname() != "localhost" && u.Hostname() != "::1") {
		if os.Getenv("KELPIE_S3_ALLOW_REMOTE") != "1" {
			t.Fatalf("KELPIE_S3_ENDPOINT %q is not a loopback address (set KELPIE_S3_ALLOW_REMOTE=1 to allow)", endpoint)
		}
	}
}

var prefixSafe = regexp.MustCompile(`[^a-zA-Z0-9-]+`)

func testPrefix(t testing.TB) string {
	return fmt.Sprintf("it/%s-%08x", prefixSafe.ReplaceAllString(strings.ToLower(t.Name()), "-"), rand.Uint32())
}

// realStore opens a store on the server under a fresh prefix, removed with
// everything under it when the test ends.
func realStore(t testing.TB, prefix string, tweak func(*Options)) *Store {
	t.Helper()
	endpoint, bucket := realEndpoint(t)
	if prefix == "" {
		prefix = testPrefix(t)
	}
	o := Options{Bucket: bucket, Prefix: prefix, Endpoint: endpoint, PathStyle: true}
	if tweak != nil {
		tweak(&o)
	}
	s, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if os.Getenv("KELPIE_S3_HELPER") == "" { // a helper's parent cleans up
		t.Cleanup(func() { removeAll(t, s) })
	}
	return s
}

func removeAll(t testing.TB, s *Store) {
	ctx := context.Background()
	n, _ := s.abortStaleUploads(ctx, nil, func(*time.Time) bool { return false })
	var keys []string
	s.listObjects(ctx, s.prefix, func(o types.Object) error { keys = append(keys, aws.ToString(o.Key)); return nil })
	for _, k := range keys {
		if err := s.deleteObject(ctx, "cleanup", k); err != nil {
			t.Logf("cleanup: %v", err)
		}
	}
	_ = n
}

func TestIntegrationConformance(t *testing.T) {
	realEndpoint(t)
	storetest.Run(t, func(t *testing.T) teleport.Store { return realStore(t, "", nil) })
}

// GC against the real server, with real time: a short lease makes orphans
// old enough within seconds.
func TestIntegrationGCConformance(t *testing.T) {
	realEndpoint(t)
	const leaseTTL = 5 * time.Second
	storetest.RunGC(t, storetest.GCHarness{
		New: func(t *testing.T) teleport.Store {
			return realStore(t, "", func(o *Options) { o.LeaseTTL, o.PartSizeBytes = leaseTTL, partSizeMinBytes })
		},
		Orphan: func(t *testing.T, s teleport.Store) string {
			return orphan(t, s.(*Store), partSizeMinBytes+1)
		},
		// Last-Modified has whole seconds: wait out the lease and then some.
		Expire: func(t *testing.T, s teleport.Store) { time.Sleep(leaseTTL + 1500*time.Millisecond) },
	})
}

// The chunk space against the real server, with real time: a grace period
// of seconds condemns and sweeps packs while uploads that rely on them run.
func TestIntegrationChunkConformance(t *testing.T) {
	realEndpoint(t)
	if testing.Short() {
		t.Skip("-short: real-time grace periods take half a minute (the full pass runs it)")
	}
	const grace = 2 * time.Second
	storetest.RunChunks(t, storetest.ChunkHarness{
		Grace: grace,
		New: func(t *testing.T) (teleport.Store, func(time.Duration)) {
			return realStore(t, "", func(o *Options) { o.ChunkGrace = grace }), nil
		},
		RealTime: true,
		// Last-Modified has whole seconds.
		Slack:     1100 * time.Millisecond,
		Uploaders: 3, Uploads: 4,
	})
}

// The server under test must honour If-None-Match; the probe says so at
// the first Create, for three requests.
func TestIntegrationProbeConditionalPut(t *testing.T) {
	s := realStore(t, "", nil)
	before := s.attempts.Load()
	if err := s.checkConditionalPut(context.Background()); err != nil {
		t.Fatalf("probe on %s: %v", s.endpoint, err)
	}
	if n := s.attempts.Load() - before; n != 3 {
		t.Fatalf("the probe took %d requests, want 3", n)
	}
	var left []string
	s.listObjects(context.Background(), s.prefix, func(o types.Object) error { left = append(left, aws.ToString(o.Key)); return nil })
	if len(left) != 0 {
		t.Fatalf("the probe left %v", left)
	}
}

// The conditional manifest PUT is the only thing standing between two
// hosts and a doubly published id: hammer it. (SeaweedFS serialises
// conditional writes to one key with a lock it retries once a second, so
// each round takes about writers/2 seconds.)
func TestIntegrationPublishRace(t *testing.T) {
	s := realStore(t, "", nil)
	ctx := context.Background()
	const writers, rounds = 8, 6
	for round := 0; round < rounds; round++ {
		id := fmt.Sprintf("race-%d", round)
		var ws []teleport.Writer
		for i := 0; i < writers; i++ {
			// Separate clients, as separate hosts would be.
			c := s
			if i%2 == 1 {
				c = realStore(t, s.prefix, nil)
			}
			w, err := c.Create(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			w.Write([]byte{byte(i)})
			ws = append(ws, w)
		}
		errs := make([]error, writers)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i, w := range ws {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = w.Commit(ctx, storetest.Manifest(id))
			}()
		}
		t0 := time.Now()
		close(start)
		wg.Wait()
		t.Logf("round %d: commits took %v", round, time.Since(t0))
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil && winner >= 0:
				t.Fatalf("round %d: writers %d and %d both published", round, winner, i)
			case err == nil:
				winner = i
			case !errors.Is(err, teleport.ErrAlreadyExists):
				t.Fatalf("round %d: loser %d: %v", round, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: nobody won", round)
		}
		r, err := s.Open(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := r.ReadAt(b, 0); err != nil || b[0] != byte(winner) {
			t.Fatalf("round %d: blob %v (%v) is not winner %d's", round, b, err, winner)
		}
		r.Close()
	}
	// Losers cleaned up after themselves: one blob per id, no leases.
	var blobs, leases int
	s.listObjects(ctx, s.prefix+"blobs/", func(types.Object) error { blobs++; return nil })
	s.listObjects(ctx, s.prefix+"uploads/", func(types.Object) error { leases++; return nil })
	if blobs != rounds || leases != 0 {
		t.Fatalf("%d blobs and %d leases left, want %d and 0", blobs, leases, rounds)
	}
}

// stream is n deterministic pseudo-random bytes, generated as read.
type stream struct {
	r *rand.ChaCha8
	n int64
}

func newStream(seed byte, n int64) *stream {
	var s [32]byte
	s[0] = seed
	return &stream{r: rand.NewChaCha8(s), n: n}
}

func (s *stream) Read(p []byte) (int, error) {
	if s.n <= 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), s.n)]
	s.r.Read(p)
	s.n -= int64(len(p))
	return len(p), nil
}

// putStream uploads n generated bytes as package id; returns their SHA-256.
func putStream(ctx context.Context, t testing.TB, s teleport.Store, id string, seed byte, n int64) string {
	t.Helper()
	w, err := s.Create(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.CopyBuffer(io.MultiWriter(w, h), newStream(seed, n), make([]byte, 1<<20)); err != nil {
		w.Abort(ctx)
		t.Fatal(err)
	}
	if err := w.Commit(ctx, storetest.Manifest(id)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// readStream reads a package sequentially into h.
func readStream(ctx context.Context, s teleport.Store, id string, h hash.Hash) (int64, error) {
	r, err := s.Open(ctx, id)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	return io.CopyBuffer(h, io.NewSectionReader(r, 0, r.Size()), make([]byte, 256<<10))
}

func TestIntegrationRoundTrip1GiB(t *testing.T) {
	if testing.Short() {
		t.Skip("1 GiB round trip skipped in -short mode")
	}
	s := realStore(t, "", nil)
	ctx := context.Background()
	const size = 1 << 30
	t0 := time.Now()
	sum := putStream(ctx, t, s, "gib", 1, size)
	up := time.Since(t0)
	m, err := s.Stat(ctx, "gib")
	if err != nil {
		t.Fatal(err)
	}
	if m.SizeBytes != size || m.BlobSHA256 != sum {
		t.Fatalf("manifest says %d bytes %s, sent %d bytes %s", m.SizeBytes, m.BlobSHA256, size, sum)
	}
	t0 = time.Now()
	h := sha256.New()
	n, err := readStream(ctx, s, "gib", h)
	if err != nil || n != size {
		t.Fatalf("read back %d bytes: %v", n, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != sum {
		t.Fatalf("read back sha256 %s, uploaded %s", got, sum)
	}
	t.Logf("1 GiB: upload %.0f MB/s, download+verify %.0f MB/s", size/up.Seconds()/1e6, size/time.Since(t0).Seconds()/1e6)
}

// Canceling the upload's context halfway leaves nothing visible; once the
// lease expires GC removes the abandoned multipart upload.
func TestIntegrationCanceledUploadThenGC(t *testing.T) {
	s := realStore(t, "", func(o *Options) { o.LeaseTTL = 3 * time.Second })
	ctx, cancel := context.WithCancel(context.Background())
	w, err := s.Create(ctx, "canceled")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(w, newStream(2, 1<<30), 40<<20); err != nil {
		t.Fatal(err)
	}
	cancel() // and never Abort: as if the caller vanished
	if _, err := io.CopyN(w, newStream(3, 1<<30), 40<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("write after cancel: %v", err)
	}
	assertInvisible(t, s, "canceled")
	waitGC(t, s, 1)
}

func assertInvisible(t *testing.T, s *Store, id string) {
	t.Helper()
	ctx := context.Background()
	if _, err := s.Stat(ctx, id); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Stat(%s): %v, want ErrNotFound", id, err)
	}
	if _, err := s.Open(ctx, id); !errors.Is(err, teleport.ErrNotFound) {
		t.Fatalf("Open(%s): %v, want ErrNotFound", id, err)
	}
	l, err := s.List(ctx)
	if err != nil || len(l) != 0 {
		t.Fatalf("List: %d packages (%v), want none", len(l), err)
	}
}

// waitGC checks that GC spares a fresh lease, then removes at least want
// orphans once it expires, leaving no upload and no unpublished blob.
func waitGC(t *testing.T, s *Store, want int) {
	t.Helper()
	ctx := context.Background()
	if n, err := s.GC(ctx); err != nil || n != 0 {
		// The lease may be fresh or just expired; only a failure matters.
		if err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(s.o.LeaseTTL + 1500*time.Millisecond)
	n, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n < want {
		t.Fatalf("GC removed %d, want at least %d", n, want)
	}
	var left []string
	s.listObjects(ctx, s.prefix, func(o types.Object) error { left = append(left, aws.ToString(o.Key)); return nil })
	if len(left) != 0 {
		t.Fatalf("objects left after GC: %v", left)
	}
	out, err := s.client.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: &s.bucket, Prefix: aws.String(s.prefix)})
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Uploads) != 0 {
		t.Fatalf("%d multipart uploads left after GC", len(out.Uploads))
	}
	t.Logf("GC removed %d orphans", n)
}

// The uploading process is killed with SIGKILL halfway: no package appears,
// GC leaves the upload alone while its lease is fresh, and removes it after.
func TestIntegrationKilledUploaderThenGC(t *testing.T) {
	if os.Getenv("KELPIE_S3_HELPER") != "" {
		t.Skip("in helper")
	}
	s := realStore(t, "", func(o *Options) { o.LeaseTTL = 3 * time.Second })
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperUploader$", "-test.v")
	cmd.Env = append(os.Environ(), "KELPIE_S3_HELPER=upload", "KELPIE_S3_HELPER_PREFIX="+s.prefix)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	ready := false
	for sc.Scan() {
		if strings.Contains(sc.Text(), "HELPER-UPLOADING") {
			ready = true
			break
		}
	}
	if !ready {
		cmd.Wait()
		t.Fatal("helper never started uploading")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, out)
	cmd.Wait()
	assertInvisible(t, s, "killed")
	mp, err := s.client.ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: &s.bucket, Prefix: aws.String(s.prefix)})
	if err != nil || len(mp.Uploads) == 0 {
		t.Fatalf("the killed upload left no multipart upload to collect (%v): the test proves nothing", err)
	}
	waitGC(t, s, 1)
}

// TestHelperUploader is the process TestIntegrationKilledUploaderThenGC
// kills: it uploads forever, announcing when parts are on the server.
func TestHelperUploader(t *testing.T) {
	if os.Getenv("KELPIE_S3_HELPER") != "upload" {
		t.Skip("helper for TestIntegrationKilledUploaderThenGC")
	}
	s := realStore(t, os.Getenv("KELPIE_S3_HELPER_PREFIX"), func(o *Options) { o.LeaseTTL = 3 * time.Second })
	ctx := context.Background()
	w, err := s.Create(ctx, "killed")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(w, newStream(4, 1<<40), 64<<20); err != nil {
		t.Fatal(err)
	}
	w.(*writer).up.wait(ctx) // the parts so far are on the server
	fmt.Println("HELPER-UPLOADING")
	io.Copy(w, newStream(5, 1<<40)) // until killed
}

func TestIntegrationWrongCredentials(t *testing.T) {
	for _, tc := range []struct{ name, key, secret string }{
		{"bad-secret", os.Getenv("AWS_ACCESS_KEY_ID"), "not-the-secret"},
		{"unknown-key", "NOSUCHKEY", "whatever"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := realStore(t, "", func(o *Options) {
				o.Credentials = credentials.NewStaticCredentialsProvider(tc.key, tc.secret, "")
			})
			s.o.MaxAttempts = 2
			_, err := s.Stat(context.Background(), "anything")
			if !errors.Is(err, ErrCredentials) || !errors.Is(err, teleport.ErrStore) || errors.Is(err, teleport.ErrNotFound) {
				t.Fatalf("error %v: want ErrCredentials and ErrStore", err)
			}
			if !strings.Contains(err.Error(), "refused the credentials") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("unclear error: %q", err)
			}
			t.Logf("%v", err)
			if _, err := s.Create(context.Background(), "x"); !errors.Is(err, ErrCredentials) {
				t.Fatalf("Create: %v", err)
			}
		})
	}
}

// A private server is stopped while a package is being read: the reader
// retries, then fails with a clear error within the backoff budget.
func TestIntegrationServerStoppedMidDownload(t *testing.T) {
	realEndpoint(t)
	if testing.Short() {
		t.Skip("starts a private server")
	}
	script, err := filepath.Abs("../../scripts/seaweedfs.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := exec.CommandContext(sctx, script, "start", dir)
	start.Stderr = os.Stderr
	start.WaitDelay = 5 * time.Second
	envOut, err := start.Output()
	if err != nil {
		t.Fatalf("start private server: %v", err)
	}
	stop := func() {
		c := exec.CommandContext(sctx, script, "stop", dir)
		c.Stderr = os.Stderr
		c.WaitDelay = 5 * time.Second
		c.Run()
	}
	defer stop()
	endpoint := regexp.MustCompile(`KELPIE_S3_ENDPOINT=(\S+)`).FindStringSubmatch(string(envOut))
	if endpoint == nil {
		t.Fatalf("no endpoint in %q", envOut)
	}
	loopbackOnly(t, endpoint[1])
	s, err := New(context.Background(), Options{Bucket: "kelpie-test", Prefix: "stop", Endpoint: endpoint[1], PathStyle: true,
		ReadChunkBytes: 1 << 20, ReadAheadChunks: 2, MaxAttempts: 5, BackoffBase: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	putStream(ctx, t, s, "stopped", 6, 32<<20)
	r, err := s.Open(ctx, "stopped")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	sr := io.NewSectionReader(r, 0, r.Size())
	if _, err := io.CopyN(io.Discard, sr, 4<<20); err != nil {
		t.Fatal(err)
	}
	stop()
	retriesBefore := s.retries.Load()
	t0 := time.Now()
	_, err = io.Copy(io.Discard, sr)
	took := time.Since(t0)
	if err == nil {
		t.Fatal("read the whole package from a stopped server")
	}
	if !errors.Is(err, teleport.ErrStore) || !strings.Contains(err.Error(), "cannot reach "+endpoint[1]) || !strings.Contains(err.Error(), "attempts") {
		t.Fatalf("unclear error: %q", err)
	}
	if s.retries.Load() == retriesBefore {
		t.Fatal("no retry before giving up")
	}
	if took > 30*time.Second {
		t.Fatalf("gave up after %v", took)
	}
	t.Logf("after %v and %d retries: %v", took.Round(time.Millisecond), s.retries.Load()-retriesBefore, err)
}
