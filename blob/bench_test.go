package blob

import (
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
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
