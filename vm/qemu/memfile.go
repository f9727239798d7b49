package qemu

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"

	"github.com/kelpie/teleport/vm"
)

// The memory section of a split snapshot is the guest RAM file, sparse:
// only pages that hold data travel. Format (little endian):
//
//	"KLPQMEM1" | u64 RAM bytes | u32 page bytes | u32 0
//	{ u64 offset | u64 length | length bytes of RAM }*   offsets increasing
//	u64 0xFFFFFFFFFFFFFFFF | u64 0                       end
//
// It streams both ways: the encoder walks the RAM file's data extents
// (SEEK_DATA/SEEK_HOLE) and drops all-zero pages; the decoder writes each
// record at its offset into a fresh file, so holes stay holes. A booted
// 256 MiB guest encodes to ~70 MiB; a 1 GiB guest to about the same.
const (
	memMagic       = "KLPQMEM1"
	memHeaderBytes = 24
	memRecordBytes = 16
	pageBytes      = 4096
	memEndOffset   = ^uint64(0)
	// memFormat names the format in snapshot compat facts.
	memFormat = "klpqmem1"
	// copyChunkBytes is the read size while scanning RAM for zero pages.
	copyChunkBytes = 1 << 20
	// memRecordMaxBytes bounds one record, and so the decoder's buffer.
	memRecordMaxBytes = 8 << 20
)

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// dataExtents calls fn for each allocated range of f (size bytes), in
// order. Filesystems without SEEK_DATA report the whole file as data.
func dataExtents(f *os.File, size int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	var off int64
	for off < size {
		d, err := syscall.Seek(fd, off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			return nil // only a hole remains
		}
		if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP) {
			return fn(off, size-off)
		}
		if err != nil {
			return fmt.Errorf("seek data in %s: %w", f.Name(), err)
		}
		h, err := syscall.Seek(fd, d, seekHole)
		if err != nil {
			return fmt.Errorf("seek hole in %s: %w", f.Name(), err)
		}
		if h > size {
			h = size
		}
		if h > d {
			if err := fn(d, h-d); err != nil {
				return err
			}
		}
		off = h
	}
	return nil
}

// dataWindows calls fn for each chunk-aligned window of f (size bytes)
// that holds data, in order, skipping holes with SEEK_DATA. Reading whole
// windows (holes inside read as zeros) costs far fewer system calls than
// following a fragmented guest RAM file extent by extent.
func dataWindows(f *os.File, size, chunk int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	for pos := int64(0); pos < size; {
		d, err := syscall.Seek(fd, pos, seekData)
		switch {
		case errors.Is(err, syscall.ENXIO):
			return nil // only a hole remains
		case errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP):
			d = pos // no hole support: everything is data
		case err != nil:
			return fmt.Errorf("seek data in %s: %w", f.Name(), err)
		}
		if d >= size {
			return nil
		}
		w := d &^ (chunk - 1)
		n := min(chunk, size-w)
		if err := fn(w, n); err != nil {
			return err
		}
		pos = w + n
	}
	return nil
}

// copySparse copies the data of src into dst (already sized), leaving
// holes as holes. It copies extent by extent on copyWorkers goroutines, each with its own descriptors so that the kernel
// copies file to file (copy_file_range) without the data passing through
// this process: the guest is stopped while this runs, and on two cores two
// copies finish sooner than one.
func copySparse(dst, src *os.File, size int64) (copied int64, err error) {
	var windows [][2]int64
	if err := dataExtents(src, size, func(off, n int64) error {
		// Pieces of at most copyPieceBytes keep the workers evenly busy.
		for ; n > 0; off, n = off+copyPieceBytes, n-copyPieceBytes {
			windows = append(windows, [2]int64{off, min(n, copyPieceBytes)})
		}
		return nil
	}); err != nil {
		return 0, err
	}
	workers := min(copyWorkers, len(windows))
	var wg sync.WaitGroup
	errs := make([]error, workers)
	counts := make([]int64, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in, err := os.Open(src.Name())
			if err != nil {
				errs[w] = err
				return
			}
			defer in.Close()
			out, err := os.OpenFile(dst.Name(), os.O_WRONLY, 0)
			if err != nil {
				errs[w] = err
				return
			}
			defer out.Close()
			for i := w; i < len(windows); i += workers {
				off, n := windows[i][0], windows[i][1]
				if _, err := in.Seek(off, io.SeekStart); err != nil {
					errs[w] = err
					return
				}
				if _, err := out.Seek(off, io.SeekStart); err != nil {
					errs[w] = err
					return
				}
				m, err := io.CopyN(out, in, n)
				counts[w] += m
				if err != nil && !errors.Is(err, io.EOF) {
					errs[w] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	for w := range workers {
		copied += counts[w]
		if errs[w] != nil && err == nil {
			err = errs[w]
		}
	}
	return copied, err
}

// copyWorkers is how many copies copySparse runs at once, and
// copyPieceBytes the most each copies in one go.
const (
	copyWorkers    = 2
	copyPieceBytes = 4 << 20
)

// preallocate allocates in dst the ranges that hold data in src (best
// effort: a filesystem without fallocate just allocates on write).
func preallocate(dst, src *os.File, size int64) {
	dataExtents(src, size, func(off, n int64) error {
		return fallocate(dst, off, n)
	})
}

// encodeMemory writes the sparse memory section for RAM file src (size
// bytes) to w and returns the section length.
func encodeMemory(w io.Writer, src *os.File, size int64) (int64, error) {
	bw := bufio.NewWriterSize(w, 1<<20)
	var n int64
	put := func(b []byte) error {
		m, err := bw.Write(b)
		n += int64(m)
		return err
	}
	var hdr [memHeaderBytes]byte
	copy(hdr[:], memMagic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(size))
	binary.LittleEndian.PutUint32(hdr[16:], pageBytes)
	if err := put(hdr[:]); err != nil {
		return n, err
	}
	zero := make([]byte, pageBytes)
	buf := make([]byte, copyChunkBytes)
	// A run of non-zero pages is written as one record; runs may span
	// chunks, so the pending run is flushed only when a zero page, a hole
	// or the end interrupts it.
	var runOff int64 = -1
	var runBuf bytes.Buffer
	flush := func() error {
		if runOff < 0 {
			return nil
		}
		var rec [memRecordBytes]byte
		binary.LittleEndian.PutUint64(rec[0:], uint64(runOff))
		binary.LittleEndian.PutUint64(rec[8:], uint64(runBuf.Len()))
		if err := put(rec[:]); err != nil {
			return err
		}
		if err := put(runBuf.Bytes()); err != nil {
			return err
		}
		runOff = -1
		runBuf.Reset()
		return nil
	}
	err := dataWindows(src, size, copyChunkBytes, func(off, length int64) error {
		if runOff >= 0 && runOff+int64(runBuf.Len()) != off {
			if err := flush(); err != nil {
				return err
			}
		}
		m := int(length)
		if _, err := src.ReadAt(buf[:m], off); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read guest RAM at %d: %w", off, err)
		}
		for p := 0; p < m; p += pageBytes {
			page := buf[p:min(p+pageBytes, m)]
			if bytes.Equal(page, zero[:len(page)]) {
				if err := flush(); err != nil {
					return err
				}
				continue
			}
			if runOff < 0 {
				runOff = off + int64(p)
			}
			runBuf.Write(page)
			// Keep records bounded so the decoder's buffers stay small.
			if runBuf.Len() >= memRecordMaxBytes {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	if err := flush(); err != nil {
		return n, err
	}
	var end [memRecordBytes]byte
	binary.LittleEndian.PutUint64(end[0:], memEndOffset)
	if err := put(end[:]); err != nil {
		return n, err
	}
	return n, bw.Flush()
}

// decodeMemory reads a memory section from r into dst, a new empty file
// that it sizes to ramBytes. It refuses a section for another RAM size,
// records out of order or out of range, and bytes after the end record.
func decodeMemory(dst *os.File, r io.Reader, ramBytes int64) error {
	return decodeSparse(dst, r, ramBytes, vm.SectionMemory)
}

// decodeSparse is decodeMemory for any image in the format; what names
// the section in errors.
func decodeSparse(dst *os.File, r io.Reader, ramBytes int64, what string) error {
	br := bufio.NewReaderSize(r, 1<<20)
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s section: "+format+": %w", append(append([]any{what}, args...), vm.ErrCorrupt)...)
	}
	var hdr [memHeaderBytes]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return bad("short header (%v)", err)
	}
	if string(hdr[:8]) != memMagic {
		return bad("bad magic %q", hdr[:8])
	}
	if got := int64(binary.LittleEndian.Uint64(hdr[8:])); got != ramBytes {
		return fmt.Errorf("%s section holds an image of %d MiB, the VM has %d MiB: %w", what, got>>20, ramBytes>>20, vm.ErrIncompatible)
	}
	if pb := binary.LittleEndian.Uint32(hdr[16:]); pb != pageBytes {
		return bad("page size %d", pb)
	}
	if err := dst.Truncate(ramBytes); err != nil {
		return err
	}
	var next int64
	var buf []byte
	for {
		var rec [memRecordBytes]byte
		if _, err := io.ReadFull(br, rec[:]); err != nil {
			return bad("truncated before the end record (%v)", err)
		}
		off, n := binary.LittleEndian.Uint64(rec[0:]), binary.LittleEndian.Uint64(rec[8:])
		if off == memEndOffset && n == 0 {
			break
		}
		if off > uint64(ramBytes) || n == 0 || n > uint64(ramBytes)-off || int64(off) < next {
			return bad("record at %d of %d bytes does not fit RAM of %d bytes after %d", off, n, ramBytes, next)
		}
		if n > memRecordMaxBytes {
			return bad("record of %d bytes", n)
		}
		if uint64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		if _, err := io.ReadFull(br, buf[:n]); err != nil {
			return bad("record at %d truncated", off)
		}
		if _, err := dst.WriteAt(buf[:n], int64(off)); err != nil {
			return err
		}
		next = int64(off + n)
	}
	if extra, _ := io.Copy(io.Discard, br); extra != 0 {
		return bad("%d bytes after the end record", extra)
	}
	return nil
}
