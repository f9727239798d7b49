package blob

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type expect struct {
	Valid          bool   `json:"valid"`
	ErrorKind      string `json:"error_kind"`
	BlobLen        int64  `json:"blob_len"`
	BlobSHA256     string `json:"blob_sha256"`
	MetadataLen    uint64 `json:"metadata_len"`
	MetadataSHA256 string `json:"metadata_sha256"`
	SnapshotLen    uint64 `json:"snapshot_len"`
	SnapshotSHA256 string `json:"snapshot_sha256"`
	MemoryLen      uint64 `json:"memory_len"`
	MemorySHA256   string `json:"memory_sha256"`
}

func sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func vectors(t testing.TB) []string {
	dirs, err := filepath.Glob("../testdata/klp1/*")
	if err != nil || len(dirs) == 0 {
		t.Fatalf("no KLP1 vectors found: %v", err)
	}
	return dirs
}

func loadVector(t testing.TB, dir string) (expect, []byte) {
	var e expect
	raw, err := os.ReadFile(filepath.Join(dir, "expect.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &e); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "blob"))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != e.BlobLen || sum(b) != e.BlobSHA256 {
		t.Fatalf("%s: vector blob does not match its expect.json", dir)
	}
	return e, b
}

func TestVectorsEncode(t *testing.T) {
	for _, dir := range vectors(t) {
		e, want := loadVector(t, dir)
		if !e.Valid {
			continue
		}
		t.Run(filepath.Base(dir), func(t *testing.T) {
			var secs [3]Section
			for i, name := range SectionNames {
				b, err := os.ReadFile(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				secs[i] = Section{R: bytes.NewReader(b), N: int64(len(b))}
			}
			var out bytes.Buffer
			n, err := Encode(&out, secs[0], secs[1], secs[2])
			if err != nil {
				t.Fatal(err)
			}
			if n != int64(out.Len()) || !bytes.Equal(out.Bytes(), want) {
				t.Fatalf("encoded %d bytes (sha %s), want %d bytes (sha %s)", out.Len(), sum(out.Bytes()), len(want), e.BlobSHA256)
			}
		})
	}
}

func TestVectorsDecode(t *testing.T) {
	for _, dir := range vectors(t) {
		e, b := loadVector(t, dir)
		t.Run(filepath.Base(dir), func(t *testing.T) {
			// Random access.
			bl, err := Open(bytes.NewReader(b), int64(len(b)))
			if !e.Valid {
				if err == nil {
					t.Fatalf("Open accepted an invalid blob (want %s error)", e.ErrorKind)
				}
				if got := ErrorKind(err); got != e.ErrorKind || !strings.Contains(err.Error(), e.ErrorKind) {
					t.Fatalf("Open error %q kind %q, want kind %q", err, got, e.ErrorKind)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				check := func(name string, r io.Reader, n uint64, wantN uint64, wantSum string) {
					got, err := io.ReadAll(r)
					if err != nil {
						t.Fatal(err)
					}
					if n != wantN || uint64(len(got)) != wantN || sum(got) != wantSum {
						t.Errorf("%s: %d bytes sha %s, want %d sha %s", name, len(got), sum(got), wantN, wantSum)
					}
				}
				check("metadata", bl.Metadata(), bl.Header.MetadataLen, e.MetadataLen, e.MetadataSHA256)
				check("snapshot", bl.Snapshot(), bl.Header.SnapshotLen, e.SnapshotLen, e.SnapshotSHA256)
				check("memory", bl.Memory(), bl.Header.MemoryLen, e.MemoryLen, e.MemorySHA256)
			}
			// Streaming, one byte at a time to exercise partial reads.
			got := map[string]string{}
			_, err = Decode(&oneByteReader{bytes.NewReader(b)}, func(name string, r io.Reader, n int64) error {
				data, err := io.ReadAll(r)
				got[name] = sum(data)
				return err
			})
			if !e.Valid {
				if ErrorKind(err) != e.ErrorKind {
					t.Fatalf("Decode error %v, want kind %s", err, e.ErrorKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got["metadata"] != e.MetadataSHA256 || got["snapshot"] != e.SnapshotSHA256 || got["memory"] != e.MemorySHA256 {
				t.Fatalf("streamed sections differ: %v", got)
			}
		})
	}
}

type oneByteReader struct{ r io.Reader }

func (o *oneByteReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return o.r.Read(p[:1])
}

func TestDecodeRejects(t *testing.T) {
	h := func(m, s, mem uint64) []byte {
		b := Header{Version: 1, MetadataLen: m, SnapshotLen: s, MemoryLen: mem}.Marshal()
		return b[:]
	}
	cases := []struct {
		name string
		blob []byte
		kind string
	}{
		{"empty", nil, "truncated"},
		{"wrap around 64 bits", h(^uint64(0), 2, 0), "length"},
		{"sum over int64", h(1<<62, 1<<62, 0), "length"},
		{"claims 1 TiB", h(0, 1<<40, 0), "truncated"},
		{"trailing byte", append(h(0, 0, 0), 'x'), "length"},
		{"section short", append(h(0, 4, 0), 'a', 'b'), "truncated"},
		{"bad magic short", []byte("KLP2\x01"), "magic"},
		{"version 2", func() []byte { b := h(0, 0, 0); b[4] = 2; return b }(), "version"},
		{"version 0", func() []byte { b := h(0, 0, 0); b[4] = 0; return b }(), "version"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(bytes.NewReader(c.blob), int64(len(c.blob)))
			if ErrorKind(err) != c.kind {
				t.Errorf("Open: %v, want kind %s", err, c.kind)
			}
			_, err = Decode(bytes.NewReader(c.blob), func(string, io.Reader, int64) error { return nil })
			if ErrorKind(err) != c.kind {
				t.Errorf("Decode: %v, want kind %s", err, c.kind)
			}
		})
	}
}

func TestEncodeRejectsWrongSectionSize(t *testing.T) {
	for _, c := range []struct {
		name string
		data string
		n    int64
	}{{"short", "abc", 4}, {"long", "abcde", 4}, {"negative", "", -1}, {"nil reader", "", 3}} {
		t.Run(c.name, func(t *testing.T) {
			var r io.Reader = strings.NewReader(c.data)
			if c.name == "nil reader" {
				r = nil
			}
			_, err := Encode(io.Discard, Section{}, Section{R: r, N: c.n}, Section{})
			if !errors.Is(err, ErrLengthMismatch) {
				t.Fatalf("got %v, want ErrLengthMismatch", err)
			}
		})
	}
}

func TestRoundTripLargeSparse(t *testing.T) {
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	f, err := os.Create(mem)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("end"), size-3); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out := filepath.Join(dir, "blob")
	if err := PackFiles(out, "", "", mem); err != nil {
		t.Fatal(err)
	}
	if err := UnpackFile(out, filepath.Join(dir, "un")); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "un", "memory"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != size || string(got[size-3:]) != "end" {
		t.Fatalf("memory section round trip lost data (%d bytes)", len(got))
	}
}

func FuzzDecode(f *testing.F) {
	for _, dir := range vectors(f) {
		b, err := os.ReadFile(filepath.Join(dir, "blob"))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		bl, errOpen := Open(bytes.NewReader(b), int64(len(b)))
		var streamed int64
		_, errDec := Decode(bytes.NewReader(b), func(_ string, r io.Reader, n int64) error {
			m, err := io.Copy(io.Discard, r)
			streamed += m
			return err
		})
		if (errOpen == nil) != (errDec == nil) {
			t.Fatalf("Open and Decode disagree: %v vs %v", errOpen, errDec)
		}
		if errOpen != nil {
			if ErrorKind(errOpen) == "" {
				t.Fatalf("untyped error %v", errOpen)
			}
			return
		}
		total := int64(HeaderSize) + int64(bl.Header.MetadataLen+bl.Header.SnapshotLen+bl.Header.MemoryLen)
		if total != int64(len(b)) || streamed != total-HeaderSize {
			t.Fatalf("accepted blob with inconsistent lengths: %+v len %d", bl.Header, len(b))
		}
		// Re-encoding the sections must give the same bytes.
		var out bytes.Buffer
		if _, err := Encode(&out, Section{bl.Metadata(), int64(bl.Header.MetadataLen)}, Section{bl.Snapshot(), int64(bl.Header.SnapshotLen)}, Section{bl.Memory(), int64(bl.Header.MemoryLen)}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), b) {
			t.Fatal("re-encode differs")
		}
	})
}
