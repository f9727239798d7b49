package blob

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/vm"
)

// memFile is an in-memory file: Write appends, WriteAt grows it.
type memFile struct {
	mu sync.Mutex
	b  []byte
}

func (f *memFile) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.b = append(f.b, p...)
	return len(p), nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if end := int(off) + len(p); end > len(f.b) {
		f.b = append(f.b, make([]byte, end-len(f.b))...)
	}
	copy(f.b[off:], p)
	return len(p), nil
}

// testImage is a memory image with holes, pages of zeros, windows that
// repeat, a compressible run, random pages and a short last page.
func testImage(seed uint64, size int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	img := make([]byte, size)
	for off := 0; off < size; off += PageBytes {
		p := img[off:min(off+PageBytes, size)]
		switch k := r.IntN(6); k {
		case 0, 1: // zero
		case 2: // compressible text
			for i := range p {
				p[i] = "kelpie teleport "[i%16]
			}
		default:
			for i := range p {
				p[i] = byte(r.Uint32())
			}
		}
	}
	// Window 3 repeats window 1 (one chunk, two uses).
	if size > 4*ChunkBytesDefault {
		copy(img[3*ChunkBytesDefault:4*ChunkBytesDefault], img[ChunkBytesDefault:2*ChunkBytesDefault])
	}
	return img
}

func encodeTest(t testing.TB, meta, state, img []byte, o V2Options) (*Encoded, []byte) {
	t.Helper()
	f := &memFile{}
	var st, mem Input
	if state != nil {
		st = Input{Payload: vm.BytesPayload(state), SHA256: shaHex(state)}
	}
	if img != nil {
		mem = Input{Payload: vm.BytesPayload(img)}
	}
	res, err := EncodeV2(context.Background(), f, meta, st, mem, Input{}, o)
	if err != nil {
		t.Fatal(err)
	}
	if res.Bytes != int64(len(f.b)) {
		t.Fatalf("EncodeV2 says %d bytes, wrote %d", res.Bytes, len(f.b))
	}
	return res, f.b
}

func shaHex(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }

func readAllPayload(t testing.TB, p vm.Payload) []byte {
	t.Helper()
	rc, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A version 2 blob gives back every byte of its sections, by stream and
// by page map, whatever the workers; its bytes depend only on its input.
func TestV2RoundTrip(t *testing.T) {
	meta := []byte(`{"snapshot_id":"s"}`)
	state := testImage(1, 3*ChunkBytesDefault+123) // a stream of odd length
	img := testImage(2, 40*ChunkBytesDefault+PageBytes/2)
	var first []byte
	for _, workers := range []int{1, 2, 7} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			res, b := encodeTest(t, meta, state, img, V2Options{Workers: workers})
			if first == nil {
				first = b
			} else if !bytes.Equal(first, b) {
				t.Fatal("the same input encodes differently with other workers")
			}
			if res.LogicalBytes != int64(len(state)+len(img)) || res.Chunks == 0 || res.NewChunks != res.Chunks {
				t.Fatalf("stats %+v", res)
			}
			v, err := OpenV2(bytes.NewReader(b), int64(len(b)), OpenOptions{Workers: workers})
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := io.ReadAll(v.Metadata()); !bytes.Equal(got, meta) {
				t.Fatalf("metadata %q", got)
			}
			sp, _ := v.DeviceState()
			if got := readAllPayload(t, sp); !bytes.Equal(got, state) {
				t.Fatal("device state differs")
			}
			mp, _ := v.Memory()
			if got := readAllPayload(t, mp); !bytes.Equal(got, img) {
				t.Fatal("memory stream differs")
			}
			out := &memFile{b: make([]byte, len(img))}
			if err := mp.WriteImage(context.Background(), out); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.b, img) {
				t.Fatal("memory image differs")
			}
			st := v.Stats()
			if st.ZstdChunks == 0 || st.RawChunks == 0 {
				t.Fatalf("want both codecs in use: %+v", st)
			}
			if int64(len(b)) >= int64(len(img)+len(state)) {
				t.Fatalf("blob of %d bytes for %d bytes of sections", len(b), len(img)+len(state))
			}
		})
	}
}

// A raw image file's holes are skipped without being read, and come back
// as holes.
func TestV2FileHoles(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "ram")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	size := int64(64 << 20)
	f.Truncate(size)
	data := testImage(3, 4*ChunkBytesDefault)
	f.WriteAt(data, 16<<20)
	f.Close()
	out := filepath.Join(dir, "blob")
	res, err := PackFilesV2(context.Background(), out, "", "", img, "", V2Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.LogicalBytes != size {
		t.Fatalf("logical %d", res.LogicalBytes)
	}
	if err := UnpackFile(out, filepath.Join(dir, "un")); err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(dir, "un", "memory")
	got, _ := os.ReadFile(back)
	want, _ := os.ReadFile(img)
	if !bytes.Equal(got, want) {
		t.Fatal("unpacked memory differs")
	}
	if alloc := allocatedBytes(t, back); alloc > 2<<20 {
		t.Fatalf("unpacked image allocates %d bytes: holes were filled", alloc)
	}
}

// fakeChunks is a chunk space in memory, for the store form.
type fakeChunks struct {
	mu     sync.Mutex
	chunks map[teleport.ChunkID][]byte
	infos  map[teleport.ChunkID]teleport.ChunkInfo
	puts   int
}

func newFakeChunks() *fakeChunks {
	return &fakeChunks{chunks: map[teleport.ChunkID][]byte{}, infos: map[teleport.ChunkID]teleport.ChunkInfo{}}
}

func (f *fakeChunks) Write(p []byte) (int, error)                     { return len(p), nil }
func (f *fakeChunks) Commit(context.Context, *teleport.Package) error { return nil }
func (f *fakeChunks) Abort(context.Context) error                     { return nil }
func (f *fakeChunks) RefChunk(_ context.Context, id teleport.ChunkID) (teleport.ChunkInfo, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	info, ok := f.infos[id]
	return info, ok, nil
}
func (f *fakeChunks) PutChunk(_ context.Context, id teleport.ChunkID, info teleport.ChunkInfo, stored []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.chunks[id], f.infos[id] = bytes.Clone(stored), info
	f.puts++
	return nil
}
func (f *fakeChunks) FetchChunks(_ context.Context, ids []teleport.ChunkID, fn func(teleport.ChunkID, []byte) error) error {
	for _, id := range ids {
		f.mu.Lock()
		b, ok := f.chunks[id]
		f.mu.Unlock()
		if !ok {
			return fmt.Errorf("chunk %s: %w", id.Short(), teleport.ErrChunkMissing)
		}
		if err := fn(id, b); err != nil {
			return err
		}
	}
	return nil
}
func (f *fakeChunks) Close() error { return nil }

// In the store form a blob carries no chunks, and a second encoding of
// the same, or of a slightly changed, image stores only what is new.
func TestV2StoreForm(t *testing.T) {
	fc := newFakeChunks()
	img := testImage(4, 32*ChunkBytesDefault)
	state := []byte("devices")
	enc := func(img []byte) (*Encoded, []byte) {
		var w bytes.Buffer
		res, err := EncodeV2(context.Background(), &w, nil, Input{Payload: vm.BytesPayload(state)}, Input{Payload: vm.BytesPayload(img)}, Input{},
			V2Options{Chunks: fc, Workers: 2})
		if err != nil {
			t.Fatal(err)
		}
		return res, w.Bytes()
	}
	first, b := enc(img)
	if first.NewChunks != first.Chunks || first.Chunks == 0 {
		t.Fatalf("first encoding: %+v", first)
	}
	if len(b) > 8*PageBytes {
		t.Fatalf("a store-form blob of %d bytes: it should carry no chunk data", len(b))
	}
	again, _ := enc(img)
	if again.NewChunks != 0 || again.Chunks != first.Chunks {
		t.Fatalf("second encoding of the same image: %+v", again)
	}
	changed := bytes.Clone(img)
	changed[5*ChunkBytesDefault+77] ^= 0xff
	third, b3 := enc(changed)
	if third.NewChunks != 1 {
		t.Fatalf("one byte changed: %d new chunks", third.NewChunks)
	}
	v, err := OpenV2(bytes.NewReader(b3), int64(len(b3)), OpenOptions{Chunks: fc})
	if err != nil {
		t.Fatal(err)
	}
	mp, _ := v.Memory()
	if got := readAllPayload(t, mp); !bytes.Equal(got, changed) {
		t.Fatal("memory differs")
	}
	// Without a chunk source the payloads cannot be read.
	if v, err := OpenV2(bytes.NewReader(b3), int64(len(b3)), OpenOptions{}); err != nil {
		t.Fatal(err)
	} else if _, err := v.Memory(); err == nil {
		t.Fatal("a store-form blob read without its store")
	}
}

// rewrite edits a valid blob and fixes its digests, so the edit is what
// the decoder must catch.
func rewrite(t testing.TB, b []byte, edit func(b []byte, h *HeaderV2)) []byte {
	t.Helper()
	b = bytes.Clone(b)
	h, err := parseHeaderV2(b, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	edit(b, h)
	for i := range h.Sections {
		s := &h.Sections[i]
		if s.Kind != KindChunkData && s.Offset+s.Length <= uint64(len(b)) {
			s.SHA256 = sha256.Sum256(b[s.Offset : s.Offset+s.Length])
		}
	}
	copy(b, h.marshal())
	return b
}

func section(h *HeaderV2, k uint32) *SectionV2 {
	for i := range h.Sections {
		if h.Sections[i].Kind == k {
			return &h.Sections[i]
		}
	}
	return nil
}

// Every malformed blob is refused by OpenV2 or, for chunk bytes, by the
// read that meets them: one line, a category, never a panic.
func TestV2Refuses(t *testing.T) {
	img := testImage(5, 8*ChunkBytesDefault)
	_, good := encodeTest(t, []byte("{}"), []byte("state!"), img, V2Options{Workers: 1})
	le := binary.LittleEndian
	entry := func(b []byte, h *HeaderV2, i int) []byte {
		s := section(h, KindMemory)
		return b[s.Offset+uint64(i)*v2PageBytes:]
	}
	firstZstd := func(b []byte, h *HeaderV2) []byte {
		s := section(h, KindMemory)
		for i := uint64(0); i < s.Count; i++ {
			e := b[s.Offset+i*v2PageBytes:]
			if Codec(e[16+48]) == CodecZstd {
				return e
			}
		}
		t.Fatal("no compressed chunk")
		return nil
	}
	cases := []struct {
		name string
		mut  func(b []byte, h *HeaderV2)
		kind string
		want string
	}{
		{"overlapping pages", func(b []byte, h *HeaderV2) { le.PutUint64(entry(b, h, 1), le.Uint64(entry(b, h, 0))) }, "malformed", "overlapping"},
		{"out of range window", func(b []byte, h *HeaderV2) {
			s := section(h, KindMemory)
			le.PutUint64(entry(b, h, int(s.Count)-1), 1<<40)
		}, "malformed", "past the"},
		{"page past the image", func(b []byte, h *HeaderV2) { section(h, KindMemory).LogicalBytes -= 2 * PageBytes }, "malformed", "past the"},
		{"chunk count overflows", func(b []byte, h *HeaderV2) { section(h, KindMemory).Count = 1 << 61 }, "malformed", "entries"},
		{"table length overflows", func(b []byte, h *HeaderV2) {
			s := section(h, KindDeviceState)
			s.Count, s.LogicalBytes = 1<<59, (1<<59)*uint64(h.ChunkBytes)
		}, "malformed", "bytes"},
		{"unknown compression id", func(b []byte, h *HeaderV2) { entry(b, h, 0)[16+48] = 9 }, "malformed", "compression id"},
		{"raw chunk length lies", func(b []byte, h *HeaderV2) {
			e := entry(b, h, 0)
			le.PutUint32(e[16+44:], le.Uint32(e[16+40:])+1)
		}, "malformed", ""},
		{"chunk data out of bounds", func(b []byte, h *HeaderV2) { le.PutUint64(entry(b, h, 0)[16+32:], 1<<50) }, "malformed", "outside"},
		{"no pages marked", func(b []byte, h *HeaderV2) { le.PutUint64(entry(b, h, 0)[8:], 0) }, "malformed", "no pages"},
		{"unknown flags", func(b []byte, h *HeaderV2) { h.Flags = 6 }, "malformed", "flags"},
		{"bad chunk size", func(b []byte, h *HeaderV2) { h.ChunkBytes = 3000 }, "malformed", "chunk size"},
		{"unknown hash", func(b []byte, h *HeaderV2) { h.Hash = 7 }, "malformed", "hash id"},
		{"section misaligned", func(b []byte, h *HeaderV2) { section(h, KindMetadata).Offset++ }, "malformed", "aligned"},
		{"section past the end", func(b []byte, h *HeaderV2) { section(h, KindMetadata).Length = 1 << 40 }, "truncated", "ends past"},
		{"sections overlap", func(b []byte, h *HeaderV2) {
			section(h, KindDeviceState).Offset = section(h, KindMetadata).Offset
		}, "malformed", "overlap"},
		{"file size lies", func(b []byte, h *HeaderV2) { h.FileBytes += 4096 }, "truncated", "declares"},
		{"no metadata", func(b []byte, h *HeaderV2) { h.Sections = h.Sections[1:] }, "malformed", "metadata"},
		{"chunk elsewhere in a file", func(b []byte, h *HeaderV2) { h.Flags = FlagChunksElsewhere }, "malformed", "chunk data section"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := rewrite(t, good, tc.mut)
			_, err := OpenV2(bytes.NewReader(b), int64(len(b)), OpenOptions{})
			checkRefusal(t, err, tc.kind, tc.want)
		})
	}
	// Damage the header or a table without fixing its digest.
	for name, off := range map[string]func(h *HeaderV2) uint64{
		"header digest": func(h *HeaderV2) uint64 { return 100 },
		"table digest":  func(h *HeaderV2) uint64 { return section(h, KindMemory).Offset + 3 },
	} {
		t.Run(name, func(t *testing.T) {
			b := bytes.Clone(good)
			h, _ := parseHeaderV2(b, int64(len(b)))
			b[off(h)] ^= 1
			_, err := OpenV2(bytes.NewReader(b), int64(len(b)), OpenOptions{})
			checkRefusal(t, err, "malformed", "digest")
		})
	}
	// Chunk bytes are verified as they are read.
	for _, tc := range []struct {
		name string
		mut  func(b []byte, h *HeaderV2)
		want string
	}{
		{"hash mismatch", func(b []byte, h *HeaderV2) {
			e := entry(b, h, 0)
			d := section(h, KindChunkData)
			b[d.Offset+le.Uint64(e[16+32:])] ^= 0x40
		}, "chunk"},
		{"decompresses to the wrong size", func(b []byte, h *HeaderV2) {
			// Swap a compressed chunk's frame for one of another size.
			e := firstZstd(b, h)
			d := section(h, KindChunkData)
			off, n := le.Uint64(e[16+32:]), le.Uint32(e[16+44:])
			other := encoder().EncodeAll(bytes.Repeat([]byte("x"), int(le.Uint32(e[16+40:]))-PageBytes), nil)
			if uint32(len(other)) > n {
				t.Skip("replacement frame too large")
			}
			copy(b[d.Offset+off:], other)
			le.PutUint32(e[16+44:], uint32(len(other)))
		}, "decompresses to"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := rewrite(t, good, tc.mut)
			v, err := OpenV2(bytes.NewReader(b), int64(len(b)), OpenOptions{Name: "blob X"})
			if err != nil {
				t.Fatal(err)
			}
			mp, _ := v.Memory()
			err = mp.WriteImage(context.Background(), &memFile{})
			checkRefusal(t, err, "chunk", tc.want)
			if !strings.Contains(err.Error(), "blob X: chunk ") {
				t.Fatalf("%q does not name the blob and the chunk", err)
			}
			rc, _ := mp.Open()
			_, err = io.Copy(io.Discard, rc)
			checkRefusal(t, err, "chunk", tc.want)
		})
	}
}

func checkRefusal(t *testing.T, err error, kind, want string) {
	t.Helper()
	switch {
	case err == nil:
		t.Fatal("accepted")
	case ErrorKind(err) != kind:
		t.Fatalf("error %q is of kind %q, want %q", err, ErrorKind(err), kind)
	case !strings.Contains(err.Error(), want):
		t.Fatalf("error %q does not say %q", err, want)
	case strings.Contains(err.Error(), "\n"):
		t.Fatalf("error %q is not one line", err)
	case kind == "malformed" || kind == "chunk":
		if !errors.Is(err, vm.ErrCorrupt) {
			t.Fatalf("error %q does not match vm.ErrCorrupt", err)
		}
	}
}

// discardAt counts what is written, whatever the offset.
type discardAt struct{ n int64 }

func (d *discardAt) WriteAt(p []byte, off int64) (int, error) {
	d.n += int64(len(p))
	return len(p), nil
}

// reseal gives a (mutated) blob correct digests: the header's and those
// of its table sections, as far as its section table can be read, so that
// the fuzzer reaches the rules behind them.
func reseal(b []byte) []byte {
	if len(b) < HeaderPageBytes || string(b[:4]) != Magic {
		return b
	}
	b = bytes.Clone(b)
	le := binary.LittleEndian
	n := min(le.Uint32(b[24:]), v2SectionsMax)
	for i := uint32(0); i < n; i++ {
		e := b[v2FixedBytes+i*v2SectionBytes:]
		off, length := le.Uint64(e[8:]), le.Uint64(e[16:])
		if le.Uint32(e[0:]) != KindChunkData && off <= uint64(len(b)) && length <= uint64(len(b))-off {
			sum := sha256.Sum256(b[off : off+length])
			copy(e[40:72], sum[:])
		}
	}
	clear(b[40:72])
	sum := sha256.Sum256(b[:HeaderPageBytes])
	copy(b[40:72], sum[:])
	return b
}

// FuzzDecodeV2: any input, as it is and with its digests made right, is
// refused with a category or decodes into sections whose chunks all
// verify; nothing panics, and nothing allocates beyond the input's own
// size or a chunk, whatever sizes it claims.
func FuzzDecodeV2(f *testing.F) {
	small := V2Options{Workers: 1, ChunkBytes: PageBytes}
	_, b := encodeTest(f, []byte("{}"), []byte("state stream"), testImage(9, 6*PageBytes+100), small)
	f.Add(b)
	small.Hash, small.ChunkBytes = HashSHA256, 2*PageBytes
	_, b = encodeTest(f, []byte(`{"a":1}`), nil, testImage(10, 5*PageBytes+5), small)
	f.Add(b)
	fc := newFakeChunks()
	var w bytes.Buffer
	if _, err := EncodeV2(context.Background(), &w, nil, Input{Payload: vm.BytesPayload([]byte("st"))},
		Input{Payload: vm.BytesPayload(testImage(11, 8*PageBytes))}, Input{}, V2Options{Chunks: fc, Workers: 1, ChunkBytes: 2 * PageBytes}); err != nil {
		f.Fatal(err)
	}
	f.Add(w.Bytes())
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, b := range [][]byte{in, reseal(in)} {
			v, err := OpenV2(bytes.NewReader(b), int64(len(b)), OpenOptions{Workers: 1, Chunks: fc})
			if err != nil {
				if ErrorKind(err) == "" {
					t.Fatalf("untyped error %v", err)
				}
				continue
			}
			if sp, err := v.DeviceState(); err == nil && sp != nil {
				rc, _ := sp.Open()
				if _, err := io.Copy(io.Discard, rc); err != nil && ErrorKind(err) == "" {
					t.Fatalf("device state: untyped error %v", err)
				}
			}
			if mp, err := v.Memory(); err == nil && mp != nil {
				d := &discardAt{}
				err := mp.WriteImage(context.Background(), d)
				if err != nil && ErrorKind(err) == "" {
					t.Fatalf("memory: untyped error %v", err)
				}
				if err == nil && d.n > mp.Size() {
					t.Fatalf("wrote %d bytes of a %d-byte image", d.n, mp.Size())
				}
				if mp.Size() <= 1<<20 {
					rc, _ := mp.Open()
					if n, err := io.Copy(io.Discard, rc); err == nil && n != mp.Size() {
						t.Fatalf("streamed %d bytes of a %d-byte image", n, mp.Size())
					} else if err != nil && ErrorKind(err) == "" {
						t.Fatalf("memory stream: untyped error %v", err)
					}
				}
			}
		}
	})
}

// allocatedBytes is how much of a file's data is allocated on disk.
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Skip("no block counts on this platform")
	}
	return st.Blocks * 512
}
