package blob

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/kelpie/teleport/vm"
)

// PackFiles writes a version 1 blob to out from up to three section files
// ("" for an empty section). The blob appears at out only when complete: it
// is written to a temporary file beside it and renamed.
func PackFiles(out, metadata, snapshot, memory string) (err error) {
	var secs [3]Section
	for i, p := range []string{metadata, snapshot, memory} {
		if p == "" {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("%s section: %w", SectionNames[i], err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s section %s: not a regular file", SectionNames[i], p)
		}
		secs[i] = Section{R: f, N: fi.Size()}
	}
	return writeAtomic(out, func(w *os.File) error {
		_, err := Encode(w, secs[0], secs[1], secs[2])
		return err
	})
}

// UnpackFile decodes the blob at path into dir/metadata, dir/snapshot and
// dir/memory. On error, files already written are removed.
func UnpackFile(path, dir string) (err error) {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	b, err := Open(f, fi.Size())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	offs := [3]int64{b.MetadataOffset(), b.SnapshotOffset(), b.MemoryOffset()}
	lens := [3]uint64{b.Header.MetadataLen, b.Header.SnapshotLen, b.Header.MemoryLen}
	var written []string
	defer func() {
		if err != nil {
			for _, p := range written {
				os.Remove(p)
			}
		}
	}()
	for i, name := range SectionNames {
		// Seek + CopyN lets the kernel copy file to file (copy_file_range).
		if _, err := f.Seek(offs[i], io.SeekStart); err != nil {
			return err
		}
		if err := writeAtomic(filepath.Join(dir, name), func(w *os.File) error {
			n, err := io.CopyN(w, f, int64(lens[i]))
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("%w: %s section ended after %d of %d bytes", ErrTruncated, name, n, lens[i])
			}
			return err
		}); err != nil {
			return fmt.Errorf("unpack %s section: %w", name, err)
		}
		written = append(written, filepath.Join(dir, name))
	}
	return nil
}

// writeAtomic creates path by writing a temporary sibling and renaming it
// into place, so a reader never sees a partial file. Like cp it does not
// fsync: these are working files, and the package stores (which must
// survive a power cut) sync their own writes.
func writeAtomic(path string, write func(*os.File) error) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = write(tmp); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// WriteSnapshotFile packs snap into the blob file out (EncodeSnapshot),
// which appears only when complete, and returns its size.
func WriteSnapshotFile(out string, snap *vm.Snapshot) (n int64, err error) {
	err = writeAtomic(out, func(w *os.File) error {
		n, err = EncodeSnapshot(w, snap)
		return err
	})
	return n, err
}
