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

// A write that cannot land leaves the old contents and no temporary file.
func TestFailedWriteLeavesOldContents(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "record")
	if err := WriteFile(p, []byte("old"), 0o644, Sync); err != nil {
		t.Fatal(err)
	}
	// A directory cannot be renamed over by a file.
	target := filepath.Join(dir, "taken")
	os.MkdirAll(filepath.Join(target, "x"), 0o755)
	if err := WriteFile(target, []byte("new"), 0o644, Sync); err == nil {
		t.Fatal("rename over a directory succeeded")
	}
	if b, _ := os.ReadFile(p); string(b) != "old" {
		t.Fatalf("old record changed: %q", b)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("leftovers: %v", ents)
	}
}
