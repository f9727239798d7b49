package blob

import (
	"bytes"
	"context"
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

// PackFilesV2 writes a version 2 blob to out from up to four section
// files ("" for an empty section): the metadata as it is, the snapshot
// file as the device state, the memory file as a raw memory image and the
// disk file as a raw workspace disk image (their holes and pages of zeros
// cost nothing). Metadata that is a snapshot's must record a disk in the
// blob exactly when a disk file is given. The blob appears at out only
// when complete.
func PackFilesV2(ctx context.Context, out, metadata, snapshot, memory, disk string, o V2Options) (*Encoded, error) {
	var meta []byte
	if metadata != "" {
		b, err := readSmallFile(metadata, metadataSectionMaxBytes)
		if err != nil {
			return nil, fmt.Errorf("metadata section: %w", err)
		}
		meta = b
		if md, err := vm.ParseMetadata(bytes.NewReader(b)); err == nil && md.Disk.InBlob() != (disk != "") {
			if disk == "" {
				return nil, fmt.Errorf("the metadata records a %d-byte workspace disk image in the blob: give it (blob pack --disk FILE): %w", md.Disk.SizeBytes, ErrMalformed)
			}
			return nil, fmt.Errorf("the metadata records no workspace disk image in the blob, and a disk file was given: %w", ErrMalformed)
		}
	}
	var ins [3]Input
	for i, p := range []string{snapshot, memory, disk} {
		if p == "" {
			continue
		}
		name := vm.SectionDisk
		if i < 2 {
			name = SectionNames[i+1]
		}
		fp, err := vm.NewFilePayload(p)
		if err != nil {
			return nil, fmt.Errorf("%s section: %w", name, err)
		}
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s section %s: not a regular file", name, p)
		}
		ins[i] = Input{Payload: fp}
	}
	var res *Encoded
	err := writeAtomic(out, func(w *os.File) error {
		var err error
		res, err = EncodeV2(ctx, w, meta, ins[0], ins[1], ins[2], o)
		return err
	})
	return res, err
}

// metadataSectionMaxBytes bounds a metadata file packed into a blob.
const metadataSectionMaxBytes = 16 << 20

func readSmallFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return b, nil
}

// UnpackFile decodes the blob at path, of either version, into
// dir/metadata, dir/snapshot (the device state) and dir/memory, and a
// version 2 blob's workspace disk, if it has one, into dir/disk. A
// version 2 blob's memory and disk come out as raw images with holes
// where their pages hold zeros; every chunk is verified on the way. On error, files already
// written are removed.
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
	v, err := Version(f, fi.Size())
	if err != nil {
		return err
	}
	if v == Version2 {
		return unpackV2(f, fi.Size(), path, dir)
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

// unpackV2 writes the sections of a version 2 blob file to dir.
func unpackV2(f *os.File, size int64, path, dir string) (err error) {
	b, err := OpenV2(f, size, OpenOptions{Name: path})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var written []string
	defer func() {
		if err != nil {
			for _, p := range written {
				os.Remove(p)
			}
		}
	}()
	ctx := context.Background()
	state, err := b.DeviceState()
	if err != nil {
		return err
	}
	mem, err := b.Memory()
	if err != nil {
		return err
	}
	disk, err := b.Disk()
	if err != nil {
		return err
	}
	image := func(p vm.ImagePayload) func(*os.File) error {
		return func(w *os.File) error {
			if p == nil {
				return nil
			}
			// Holes for the pages the page map leaves out.
			if err := w.Truncate(p.Size()); err != nil {
				return err
			}
			return p.WriteImage(ctx, w)
		}
	}
	secs := []struct {
		name string
		fill func(*os.File) error
	}{
		{"metadata", func(w *os.File) error { _, err := io.Copy(w, b.Metadata()); return err }},
		{"snapshot", func(w *os.File) error {
			if state == nil {
				return nil
			}
			rc, err := state.Open()
			if err != nil {
				return err
			}
			defer rc.Close()
			_, err = io.Copy(w, rc)
			return err
		}},
		{"memory", image(mem)},
	}
	if disk != nil {
		// The workspace disk image, only in a blob that has one.
		secs = append(secs, struct {
			name string
			fill func(*os.File) error
		}{"disk", image(disk)})
	}
	for _, sec := range secs {
		if err := writeAtomic(filepath.Join(dir, sec.name), sec.fill); err != nil {
			return fmt.Errorf("unpack %s section: %w", sec.name, err)
		}
		written = append(written, filepath.Join(dir, sec.name))
	}
	return nil
}

// WriteSnapshotFile packs snap into the blob file out (EncodeSnapshot),
// which appears only when complete.
func WriteSnapshotFile(ctx context.Context, out string, snap *vm.Snapshot, o EncodeOptions) (res *Encoded, err error) {
	err = writeAtomic(out, func(w *os.File) error {
		res, err = EncodeSnapshot(ctx, w, snap, o)
		return err
	})
	return res, err
}
