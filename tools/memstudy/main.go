// Command memstudy measures how guest memory images chunk: the study
// behind KLP1 version 2's chunk size and hash (scripts/bench-v2.sh runs
// it on real QEMU guests). It reads raw memory images (what `kelpie blob
// unpack` writes for a version 2 snapshot) and never writes to them.
//
//	memstudy chunks FIRST SIBLING IDLE WRITTEN   stored and new bytes per chunk size
//	memstudy hash IMAGE                          BLAKE3 and SHA-256 throughput on one core
//	memstudy nonzero IMAGE OUT                   the image's pages that hold data, back to back
//	memstudy versus FILE ROUNDS                  encode and decode against zstd -1 -T2 / zstd -d -T2, side by side
//
// FIRST is a freshly booted guest, SIBLING another guest booted from the
// same image, IDLE the first guest again after a pause with no change,
// WRITTEN the first guest after it wrote 8 MiB of random data.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "memstudy:", err)
		os.Exit(1)
	}
}

func usage() error {
	return fmt.Errorf("usage: memstudy chunks FIRST SIBLING IDLE WRITTEN | hash IMAGE | nonzero IMAGE OUT | versus FILE ROUNDS")
}

func run(args []string) error {
	if len(args) == 0 {
		return usage()
	}
	switch args[0] {
	case "chunks":
		if len(args) != 5 {
			return usage()
		}
		return chunks(args[1:])
	case "hash":
		if len(args) != 2 {
			return usage()
		}
		return hashes(args[1])
	case "nonzero":
		if len(args) != 3 {
			return usage()
		}
		return nonzero(args[1], args[2])
	case "versus":
		if len(args) != 3 {
			return usage()
		}
		n, err := strconv.Atoi(args[2])
		if err != nil || n < 1 {
			return usage()
		}
		return versus(args[1], n)
	}
	return usage()
}

var zero = make([]byte, blob.PageBytes)

// chunkImage cuts an image into windows of size bytes, drops pages of
// zeros, and returns each distinct chunk's stored size by id, as version
// 2 does (the same hash and compression; for windows beyond version 2's
// 256 KiB the same rules).
func chunkImage(img []byte, size int) map[teleport.ChunkID]int64 {
	out := map[teleport.ChunkID]int64{}
	buf := make([]byte, 0, size)
	cbuf := make([]byte, 0, size+size/8+1024)
	for off := 0; off < len(img); off += size {
		buf = buf[:0]
		w := img[off:min(off+size, len(img))]
		for p := 0; p < len(w); p += blob.PageBytes {
			pg := w[p:min(p+blob.PageBytes, len(w))]
			if !bytes.Equal(pg, zero[:len(pg)]) {
				buf = append(buf, pg...)
			}
		}
		if len(buf) == 0 {
			continue
		}
		id := blob.HashDefault.Sum(buf)
		if _, ok := out[id]; ok {
			continue
		}
		stored, _ := blob.Compress(buf, cbuf)
		out[id] = int64(len(stored))
	}
	return out
}

func added(have, add map[teleport.ChunkID]int64) int64 {
	var n int64
	for id, b := range add {
		if _, ok := have[id]; !ok {
			n += b
		}
	}
	return n
}

type row struct {
	ChunkBytes   int     `json:"chunk_bytes"`
	Chunks       int     `json:"chunks"`
	FirstStored  int64   `json:"first_stored_bytes"`
	SiblingNew   int64   `json:"sibling_new_bytes"`
	IdleNew      int64   `json:"idle_new_bytes"`
	WrittenNew   int64   `json:"written_new_bytes"`
	ChunkSeconds float64 `json:"chunk_seconds"`
}

func chunks(paths []string) error {
	imgs := make([][]byte, len(paths))
	for i, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		imgs[i] = b
	}
	for _, size := range []int{4 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 2 << 20} {
		t := time.Now()
		first := chunkImage(imgs[0], size)
		d := time.Since(t)
		sib, idle, written := chunkImage(imgs[1], size), chunkImage(imgs[2], size), chunkImage(imgs[3], size)
		var stored int64
		for _, n := range first {
			stored += n
		}
		r := row{ChunkBytes: size, Chunks: len(first), FirstStored: stored, SiblingNew: added(first, sib), IdleNew: added(first, idle),
			WrittenNew: added(idle, written), ChunkSeconds: d.Seconds()}
		b, _ := json.Marshal(r)
		fmt.Println(string(b))
	}
	return nil
}

func hashes(path string) error {
	img, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var nz []byte
	for p := 0; p+blob.PageBytes <= len(img); p += blob.PageBytes {
		if !bytes.Equal(img[p:p+blob.PageBytes], zero) {
			nz = append(nz, img[p:p+blob.PageBytes]...)
		}
	}
	for _, size := range []int{16 << 10, 64 << 10} {
		for _, h := range []blob.HashID{blob.HashBLAKE3, blob.HashSHA256} {
			best := 0.0
			for rep := 0; rep < 3; rep++ {
				t := time.Now()
				for off := 0; off+size <= len(nz); off += size {
					h.Sum(nz[off : off+size])
				}
				if mbs := float64(len(nz)/size*size) / 1e6 / time.Since(t).Seconds(); mbs > best {
					best = mbs
				}
			}
			b, _ := json.Marshal(map[string]any{"hash": h.String(), "chunk_bytes": size, "bytes": len(nz), "mb_per_s_one_core": int(best)})
			fmt.Println(string(b))
		}
	}
	return nil
}

func nonzero(in, out string) error {
	img, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	for p := 0; p < len(img); p += blob.PageBytes {
		pg := img[p:min(p+blob.PageBytes, len(img))]
		if !bytes.Equal(pg, zero[:len(pg)]) {
			if _, err := f.Write(pg); err != nil {
				f.Close()
				return err
			}
		}
	}
	return f.Close()
}

// versus times, round after round and side by side, version 2's encode
// of file (chunk, hash, compress on every CPU, into a blob file) against
// zstd -1 -T2 of the same bytes, and its decode (decompress, verify,
// write every page in place) against zstd -d -T2; it prints each round's
// throughput ratios and the medians.
func versus(file string, rounds int) error {
	if _, err := exec.LookPath("zstd"); err != nil {
		return fmt.Errorf("zstd is not installed (apt-get install zstd)")
	}
	dir, err := os.MkdirTemp(filepath.Dir(file), ".memstudy-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fp, err := vm.NewFilePayload(file)
	if err != nil {
		return err
	}
	zst, blobPath, out := filepath.Join(dir, "f.zst"), filepath.Join(dir, "f.klp1"), filepath.Join(dir, "out")
	timed := func(f func() error) (float64, error) {
		t := time.Now()
		err := f()
		return time.Since(t).Seconds(), err
	}
	run := func(args ...string) func() error {
		return func() error {
			if o, err := exec.Command("zstd", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("zstd %v: %v %s", args, err, o)
			}
			return nil
		}
	}
	encode := func() error {
		f, err := os.Create(blobPath)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = blob.EncodeV2(context.Background(), f, nil, blob.Input{}, blob.Input{Payload: fp}, blob.Input{}, blob.V2Options{})
		return err
	}
	decode := func() error {
		bf, err := os.Open(blobPath)
		if err != nil {
			return err
		}
		defer bf.Close()
		fi, _ := bf.Stat()
		v, err := blob.OpenV2(bf, fi.Size(), blob.OpenOptions{})
		if err != nil {
			return err
		}
		mp, err := v.Memory()
		if err != nil {
			return err
		}
		o, err := os.Create(out)
		if err != nil {
			return err
		}
		defer o.Close()
		if err := o.Truncate(mp.Size()); err != nil {
			return err
		}
		return mp.WriteImage(context.Background(), o)
	}
	var enc, dec []float64
	for r := 0; r < rounds; r++ {
		zc, err := timed(run("-1", "-T2", "-q", "-f", file, "-o", zst))
		if err != nil {
			return err
		}
		kc, err := timed(encode)
		if err != nil {
			return err
		}
		zd, err := timed(run("-d", "-T2", "-q", "-f", zst, "-o", out))
		if err != nil {
			return err
		}
		kd, err := timed(decode)
		if err != nil {
			return err
		}
		enc, dec = append(enc, zc/kc), append(dec, zd/kd)
		b, _ := json.Marshal(map[string]any{"round": r + 1, "zstd_c_s": zc, "encode_s": kc, "encode_vs_zstd": zc / kc, "zstd_d_s": zd, "decode_s": kd, "decode_vs_zstd": zd / kd})
		fmt.Println(string(b))
	}
	med := func(x []float64) float64 {
		sort.Float64s(x)
		return x[len(x)/2]
	}
	fi, _ := os.Stat(file)
	b, _ := json.Marshal(map[string]any{"bytes": fi.Size(), "rounds": rounds, "median_encode_vs_zstd": med(enc), "median_decode_vs_zstd": med(dec)})
	fmt.Println(string(b))
	return nil
}
