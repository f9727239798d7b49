package s3

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kelpie/teleport/store/storetest"
)

// benchBytes is the package size the throughput benchmark moves;
// KELPIE_S3_BENCH_MIB overrides it.
func benchBytes(tb testing.TB) int64 {
	if v := os.Getenv("KELPIE_S3_BENCH_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			tb.Fatalf("KELPIE_S3_BENCH_MIB=%q", v)
		}
		return int64(n) << 20
	}
	return 1 << 30
}

// BenchmarkThroughput moves the same bytes (a file of generated data) four
// ways in each iteration, against the same server:
//
//	raw-put:   one plain PutObject of the file (the SDK, no multipart)
//	store-put: the store's Create/Write/Commit (multipart, parallel parts, SHA-256)
//	raw-get:   one plain GetObject into io.Discard
//	store-get: the store's Open + sequential read into io.Discard (ranged,
//	           parallel read-ahead, whole-blob SHA-256 check)
//	store-get-noverify: the same without the SHA-256 check, to separate the
//	           transfer from the hashing
//
// and reports each rate in MB/s and the store/raw ratios. Both raw requests
// use the same client settings as the store (UNSIGNED-PAYLOAD, no checksums).
func BenchmarkThroughput(b *testing.B) {
	s := realStore(b, "", nil)
	size := benchBytes(b)
	path := filepath.Join(b.TempDir(), "payload")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyBuffer(f, newStream(9, size), make([]byte, 1<<20)); err != nil {
		b.Fatal(err)
	}
	f.Close()
	ctx := context.Background()
	rawKey := s.prefix + "raw"
	nv := realStore(b, s.prefix, func(o *Options) { o.NoFullReadVerify = true })
	var rawPut, storePut, rawGet, storeGet, storeGetNV time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id := fmt.Sprintf("bench-%d", i)
		rawPut += timed(b, func() error {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = s.client.PutObject(ctx, &s3.PutObjectInput{Bucket: &s.bucket, Key: &rawKey, Body: f, ContentLength: aws.Int64(size)}, unsignedPayload)
			return err
		})
		storePut += timed(b, func() error {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			w, err := s.Create(ctx, id)
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, f); err != nil {
				w.Abort(ctx)
				return err
			}
			return w.Commit(ctx, storetest.Manifest(id))
		})
		rawGet += timed(b, func() error {
			out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &rawKey})
			if err != nil {
				return err
			}
			defer out.Body.Close()
			n, err := io.Copy(io.Discard, out.Body)
			if err == nil && n != size {
				err = fmt.Errorf("raw get: %d bytes", n)
			}
			return err
		})
		storeGet += timed(b, func() error { return getAll(ctx, s, id, size) })
		storeGetNV += timed(b, func() error { return getAll(ctx, nv, id, size) })
		b.StopTimer()
		s.Delete(ctx, id)
		b.StartTimer()
	}
	mbps := func(d time.Duration) float64 { return float64(size) * float64(b.N) / d.Seconds() / 1e6 }
	b.ReportMetric(mbps(rawPut), "raw-put-MB/s")
	b.ReportMetric(mbps(storePut), "store-put-MB/s")
	b.ReportMetric(mbps(rawGet), "raw-get-MB/s")
	b.ReportMetric(mbps(storeGet), "store-get-MB/s")
	b.ReportMetric(mbps(storeGetNV), "store-get-noverify-MB/s")
	b.ReportMetric(rawPut.Seconds()/storePut.Seconds(), "put-ratio")
	b.ReportMetric(rawGet.Seconds()/storeGet.Seconds(), "get-ratio")
	b.ReportMetric(rawGet.Seconds()/storeGetNV.Seconds(), "get-noverify-ratio")
}

func getAll(ctx context.Context, s *Store, id string, size int64) error {
	r, err := s.Open(ctx, id)
	if err != nil {
		return err
	}
	defer r.Close()
	n, err := io.Copy(io.Discard, io.NewSectionReader(r, 0, r.Size()))
	if err == nil && n != size {
		err = fmt.Errorf("store get: %d bytes", n)
	}
	return err
}

func timed(b *testing.B, f func() error) time.Duration {
	t0 := time.Now()
	if err := f(); err != nil {
		b.Fatal(err)
	}
	return time.Since(t0)
}

// TestIntegrationPeakRSS measures the peak RSS (getrusage ru_maxrss, what
// /usr/bin/time -v reports as "Maximum resident set size") of child
// processes (this test binary running TestHelperRSS) that upload a 1 GiB
// package, download and verify it, and do both in one process, and fails
// above 128 MiB.
func TestIntegrationPeakRSS(t *testing.T) {
	if os.Getenv("KELPIE_S3_HELPER") != "" {
		t.Skip("in helper")
	}
	if testing.Short() {
		t.Skip("moves 4 GiB")
	}
	s := realStore(t, "", nil)
	const limitMiB = 128
	for _, mode := range []string{"up", "down", "both"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperRSS$", "-test.v")
		cmd.Env = append(os.Environ(), "KELPIE_S3_HELPER=rss", "KELPIE_S3_RSS_MODE="+mode, "KELPIE_S3_HELPER_PREFIX="+s.prefix)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper %s: %v\n%s", mode, err, out)
		}
		peakMiB := float64(cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss) / 1024 // KiB on Linux
		t.Logf("%-4s %d MiB: peak RSS %.1f MiB; %s", mode, benchBytes(t)>>20, peakMiB, rates.FindAllString(string(out), -1))
		if peakMiB > limitMiB {
			t.Errorf("%s: peak RSS %.1f MiB exceeds %d MiB", mode, peakMiB, limitMiB)
		}
	}
}

var rates = regexp.MustCompile(`(upload|download\+verify) \d+ MiB: \d+ MB/s`)

// TestHelperRSS is the child TestIntegrationPeakRSS measures. up: generated
// bytes stream up as package "rss"; down: "rss" is read back sequentially
// and checked; both: "rss2" goes up and comes back.
func TestHelperRSS(t *testing.T) {
	if os.Getenv("KELPIE_S3_HELPER") != "rss" {
		t.Skip("helper for TestIntegrationPeakRSS")
	}
	s := realStore(t, os.Getenv("KELPIE_S3_HELPER_PREFIX"), nil)
	ctx := context.Background()
	size := benchBytes(t)
	mode := os.Getenv("KELPIE_S3_RSS_MODE")
	id := "rss"
	if mode == "both" {
		id = "rss2"
	}
	if mode == "up" || mode == "both" {
		t0 := time.Now()
		putStream(ctx, t, s, id, 7, size)
		t.Logf("upload %d MiB: %.0f MB/s", size>>20, float64(size)/time.Since(t0).Seconds()/1e6)
	}
	if mode == "down" || mode == "both" {
		m, err := s.Stat(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		h := sha256.New()
		if n, err := readStream(ctx, s, id, h); err != nil || n != size {
			t.Fatalf("read back %d bytes: %v", n, err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != m.BlobSHA256 {
			t.Fatalf("sha256 %s, manifest %s", got, m.BlobSHA256)
		}
		t.Logf("download+verify %d MiB: %.0f MB/s", size>>20, float64(size)/time.Since(t0).Seconds()/1e6)
	}
}
