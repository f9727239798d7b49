package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileReplacesWhole(t *testing.T) {
	for _, d := range []Durability{Crash, Sync} {
		dir := filepath.Join(t.TempDir(), "sub") // created on demand
		p := filepath.Join(dir, "record.json")
		for _, body := range []string{"first, the longer one", "second"} {
			if err := WriteFile(p, []byte(body), 0o640, d); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(p)
			if err != nil || string(b) != body {
				t.Fatalf("after writing %q: %q, %v", body, b, err)
			}
		}
		fi, _ := os.Stat(p)
		if fi.Mode().Perm() != 0o640 {
			t.Fatalf("mode %v", fi.Mode())
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 1 {
			t.Fatalf("temporary files left: %v", ents)
		}
	}
}

// A write that cannot land leaves what was there and no temporary file.
func TestFailedWriteLeavesTargetAsItWas(t *testing.T) {
	dir := t.TempDir()
	// A non-empty directory cannot be renamed over by a file.
	target := filepath.Join(dir, "taken")
	os.MkdirAll(filepath.Join(target, "x"), 0o755)
	if err := WriteFile(target, []byte("new"), 0o644, Sync); err == nil {
		t.Fatal("rename over a directory succeeded")
	}
	if fi, err := os.Stat(filepath.Join(target, "x")); err != nil || !fi.IsDir() {
		t.Fatalf("the target changed: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("leftovers: %v", ents)
	}
}

// A reader never sees a torn or empty record, however often it is
// rewritten (os.WriteFile truncates first, and a reader can catch it
// empty).
func TestReadersNeverSeeATornFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "record")
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = 'a' + byte(i%26)
	}
	if err := WriteFile(p, big, 0o644, Crash); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	torn := make(chan int, 1)
	go func() {
		defer close(torn)
		for {
			select {
			case <-done:
				return
			default:
			}
			b, err := os.ReadFile(p)
			if err == nil && len(b) != len(big) {
				torn <- len(b)
				return
			}
		}
	}()
	for i := 0; i < 200; i++ {
		if err := WriteFile(p, big, 0o644, Crash); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	if n, ok := <-torn; ok {
		t.Fatalf("a reader saw %d of %d bytes", n, len(big))
	}
}
