package blob

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/kelpie/teleport/vm"
)

// benchSize is the memory section size: KELPIE_BENCH_MIB (default 256).
func benchSize(b *testing.B) int64 {
	mib := int64(256)
	if s := os.Getenv("KELPIE_BENCH_MIB"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		mib = n
	}
	return mib << 20
}

func benchInput(b *testing.B) (dir, mem string, size int64) {
	size = benchSize(b)
	dir = b.TempDir()
	mem = filepath.Join(dir, "memory")
	f, err := os.Create(mem)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		b.Fatal(err)
	}
	f.Close()
	return dir, mem, size
}

// BenchmarkCp is the baseline: cp of the same bytes on the same disk.
// Compare with: go test -bench 'Cp|PackFiles|UnpackFile' ./blob/
func BenchmarkCp(b *testing.B) {
	dir, mem, size := benchInput(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if out, err := exec.Command("cp", mem, filepath.Join(dir, "copy")).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v %s", err, out)
		}
	}
}

func BenchmarkPackFiles(b *testing.B) {
	dir, mem, size := benchInput(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := PackFiles(filepath.Join(dir, "blob"), "", "", mem); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUnpackFile(b *testing.B) {
	dir, mem, size := benchInput(b)
	blobPath := filepath.Join(dir, "blob")
	if err := PackFiles(blobPath, "", "", mem); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := UnpackFile(blobPath, filepath.Join(dir, "un")); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPackFilesV2 packs the memory file as a version 2 blob (every
// chunk hashed, a compression attempted). Compare with BenchmarkCp.
func BenchmarkPackFilesV2(b *testing.B) {
	dir, mem, size := benchInput(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := PackFilesV2(context.Background(), filepath.Join(dir, "blob"), "", "", mem, "", V2Options{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnpackFileV2 unpacks it again: every chunk verified, the
// memory written as a raw image.
func BenchmarkUnpackFileV2(b *testing.B) {
	dir, mem, size := benchInput(b)
	blobPath := filepath.Join(dir, "blob")
	if _, err := PackFilesV2(context.Background(), blobPath, "", "", mem, "", V2Options{}); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := UnpackFile(blobPath, filepath.Join(dir, "un")); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCompressRandom64K is the compression attempt on a chunk that
// does not compress.
func BenchmarkCompressRandom64K(b *testing.B) {
	raw := make([]byte, 64<<10)
	rand.Read(raw)
	buf := make([]byte, 0, 80<<10)
	b.SetBytes(int64(len(raw)))
	for i := 0; i < b.N; i++ {
		compress(raw, buf)
	}
}

// The codec against the zstd tool, on the same bytes, in one run:
// KELPIE_BENCH_IMAGE names a file of a booted guest's pages that hold
// data (memstudy nonzero; scripts/bench-v2.sh makes it).
//
//	go test -run '^$' -bench 'Guest|ZstdCLI' ./blob/
func benchImage(b *testing.B) (string, int64) {
	p := os.Getenv("KELPIE_BENCH_IMAGE")
	if p == "" {
		b.Skip("KELPIE_BENCH_IMAGE is unset")
	}
	fi, err := os.Stat(p)
	if err != nil {
		b.Fatal(err)
	}
	return p, fi.Size()
}

func zstdTool(b *testing.B) {
	if _, err := exec.LookPath("zstd"); err != nil {
		b.Skip("zstd is not installed (apt-get install zstd)")
	}
}

// BenchmarkEncodeGuest: chunk, hash and compress, on every CPU, into a
// blob file.
func BenchmarkEncodeGuest(b *testing.B) {
	img, size := benchImage(b)
	out := filepath.Join(b.TempDir(), "blob")
	fp, err := vm.NewFilePayload(img)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, err := os.Create(out)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := EncodeV2(context.Background(), f, nil, Input{}, Input{Payload: fp}, Input{}, V2Options{}); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// BenchmarkZstdCLI is the baseline: zstd -1 -T2 of the same bytes.
func BenchmarkZstdCLI(b *testing.B) {
	img, size := benchImage(b)
	zstdTool(b)
	out := filepath.Join(b.TempDir(), "img.zst")
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if o, err := exec.Command("zstd", "-1", "-T2", "-q", "-f", img, "-o", out).CombinedOutput(); err != nil {
			b.Fatalf("zstd: %v %s", err, o)
		}
	}
}

// BenchmarkDecodeGuest: every chunk decompressed, verified and written to
// its place in a fresh file.
func BenchmarkDecodeGuest(b *testing.B) {
	img, size := benchImage(b)
	dir := b.TempDir()
	fp, _ := vm.NewFilePayload(img)
	bf, err := os.Create(filepath.Join(dir, "blob"))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := EncodeV2(context.Background(), bf, nil, Input{}, Input{Payload: fp}, Input{}, V2Options{}); err != nil {
		b.Fatal(err)
	}
	fi, _ := bf.Stat()
	v, err := OpenV2(bf, fi.Size(), OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	mp, _ := v.Memory()
	out := filepath.Join(dir, "out")
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, err := os.Create(out)
		if err != nil {
			b.Fatal(err)
		}
		f.Truncate(size)
		if err := mp.WriteImage(context.Background(), f); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// BenchmarkZstdDecodeCLI is the baseline: zstd -d -T2 of the same bytes.
func BenchmarkZstdDecodeCLI(b *testing.B) {
	img, size := benchImage(b)
	zstdTool(b)
	dir := b.TempDir()
	zst := filepath.Join(dir, "img.zst")
	if o, err := exec.Command("zstd", "-1", "-T2", "-q", "-f", img, "-o", zst).CombinedOutput(); err != nil {
		b.Fatalf("zstd: %v %s", err, o)
	}
	out := filepath.Join(dir, "out")
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if o, err := exec.Command("zstd", "-d", "-T2", "-q", "-f", zst, "-o", out).CombinedOutput(); err != nil {
			b.Fatalf("zstd -d: %v %s", err, o)
		}
	}
}
