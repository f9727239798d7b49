package s3

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/store/storetest"
	"github.com/kelpie/teleport/vm"
)

func objectKeys(t testing.TB, s *Store) []string {
	var keys []string
	if err := s.listObjects(context.Background(), s.prefix, func(o types.Object) error {
		keys = append(keys, strings.TrimPrefix(aws.ToString(o.Key), s.prefix))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

// Object count is request cost on real S3: a package with new chunks
// leaves four objects (manifest, body, one pack, its index), one whose
// chunks the store already holds two, whatever the number of chunks.
func TestIntegrationObjectCounts(t *testing.T) {
	s := realStore(t, "", nil)
	ctx := context.Background()
	var all []*teleport.Package
	put := func(id string, seeds ...uint64) (objects int, requests int64) {
		before, reqs := len(objectKeys(t, s)), s.attempts.Load()
		var cs []storetest.Chunk
		for _, seed := range seeds {
			cs = append(cs, storetest.NewChunk(seed, 60000))
		}
		m, err := storetest.PutChunks(ctx, s, id, storetest.Payload(seed0(seeds), 20000), cs...)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, m)
		return len(objectKeys(t, s)) - before, s.attempts.Load() - reqs
	}
	// The first package: 40 new chunks.
	seeds := make([]uint64, 40)
	for i := range seeds {
		seeds[i] = uint64(100 + i)
	}
	n, reqs := put("first", seeds...)
	t.Logf("first package, 40 new chunks: %d objects, %d requests", n, reqs)
	if n != 4 {
		t.Fatalf("the first package left %d objects (%v), want 4", n, objectKeys(t, s))
	}
	// An incremental one: 2 new chunks among 40.
	seeds[3], seeds[17] = 900, 901
	n, reqs = put("second", seeds...)
	t.Logf("incremental package, 2 new chunks of 40: %d objects, %d requests", n, reqs)
	if n != 4 {
		t.Fatalf("an incremental package left %d objects, want 4", n)
	}
	// One whose chunks are all in the store.
	n, reqs = put("third", seeds...)
	t.Logf("package with no new chunk: %d objects, %d requests", n, reqs)
	if n != 2 {
		t.Fatalf("a package with no new chunk left %d objects, want 2", n)
	}
	if all[2].NewChunks != 0 || all[1].NewChunks != 2 || all[0].NewChunks != 40 {
		t.Fatalf("new chunks %d, %d, %d", all[0].NewChunks, all[1].NewChunks, all[2].NewChunks)
	}
}

func seed0(s []uint64) uint64 { return s[0] }

// BenchmarkChunkDownload moves a version 2 package's chunks (a real
// guest's: KELPIE_BENCH_IMAGE, a raw memory image or its pages that hold
// data) two ways, side by side:
//
//	raw-get:      one plain GetObject of its pack into io.Discard
//	verified-get: the store's parallel ranged reads of the same pack,
//	              every chunk decompressed and its hash verified, the
//	              pages written into a discarding WriterAt
//
// and reports both on the pack's stored bytes, and their ratio.
func BenchmarkChunkDownload(b *testing.B) {
	img := os.Getenv("KELPIE_BENCH_IMAGE")
	if img == "" {
		b.Skip("KELPIE_BENCH_IMAGE is unset")
	}
	s := realStore(b, "", nil)
	ctx := context.Background()
	fp, err := vm.NewFilePayload(img)
	if err != nil {
		b.Fatal(err)
	}
	w, err := s.Create(ctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := blob.EncodeV2(ctx, w, nil, blob.Input{}, blob.Input{Payload: fp}, blob.Input{}, blob.V2Options{Chunks: w.(teleport.ChunkWriter)}); err != nil {
		b.Fatal(err)
	}
	m := storetest.ChunkManifest("bench")
	if err := w.Commit(ctx, m); err != nil {
		b.Fatal(err)
	}
	if len(m.ChunkPacks) != 1 {
		b.Fatalf("packs %v", m.ChunkPacks)
	}
	packKey := s.prefix + "chunks/packs/" + m.ChunkPacks[0] + ".pack"
	h, err := s.head(ctx, "head", packKey)
	if err != nil {
		b.Fatal(err)
	}
	stored := aws.ToInt64(h.ContentLength)
	var raw, verified time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		raw += timed(b, func() error {
			out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &packKey})
			if err != nil {
				return err
			}
			defer out.Body.Close()
			n, err := io.Copy(io.Discard, out.Body)
			if err == nil && n != stored {
				err = fmt.Errorf("got %d of %d bytes", n, stored)
			}
			return err
		})
		verified += timed(b, func() error {
			got, err := s.Stat(ctx, "bench")
			if err != nil {
				return err
			}
			r, err := s.Open(ctx, "bench")
			if err != nil {
				return err
			}
			defer r.Close()
			cr, err := s.OpenChunks(ctx, got)
			if err != nil {
				return err
			}
			v, err := blob.OpenV2(r, r.Size(), blob.OpenOptions{Chunks: cr})
			if err != nil {
				return err
			}
			mp, err := v.Memory()
			if err != nil {
				return err
			}
			return mp.WriteImage(ctx, discardAt{})
		})
	}
	b.StopTimer()
	mbs := func(d time.Duration) float64 { return float64(stored) * float64(b.N) / 1e6 / d.Seconds() }
	b.ReportMetric(mbs(raw), "raw-get-MB/s")
	b.ReportMetric(mbs(verified), "verified-get-MB/s")
	b.ReportMetric(raw.Seconds()/verified.Seconds(), "verified/raw")
	b.ReportMetric(float64(stored)/(1<<20), "stored-MiB")
	b.ReportMetric(0, "ns/op")
}

type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
