package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func mustFrame(t testing.TB, payload string) []byte {
	t.Helper()
	b, err := AppendFrame(nil, []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawFrame builds a frame without validation (for corrupt inputs).
func rawFrame(length, crc uint32, payload string) []byte {
	b := []byte(Magic)
	b = binary.BigEndian.AppendUint32(b, length)
	b = binary.BigEndian.AppendUint32(b, crc)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func readAll(t *testing.T, r io.Reader, max int) ([]string, FrameStats, error) {
	t.Helper()
	fr := NewFrameReader(r, max)
	var got []string
	for {
		p, err := fr.ReadFrame()
		if err != nil {
			return got, fr.Stats(), err
		}
		got = append(got, string(p))
	}
}

func TestFrameReader(t *testing.T) {
	a, b := `{"id":1}`, `{"id":2,"op":"ping"}`
	fa, fb := mustFrame(t, a), mustFrame(t, b)
	badCRC := mustFrame(t, `{"id":3}`)
	badCRC[len(badCRC)-1] ^= 0x20
	big := strings.Repeat("x", 1000)

	tests := []struct {
		name    string
		in      []byte
		max     int
		want    []string
		bad     int64 // expected BadFrames (-1 = don't care)
		skipped int64 // expected SkippedBytes (-1 = don't care)
	}{
		{name: "empty", in: nil, want: nil},
		{name: "one", in: fa, want: []string{a}},
		{name: "two", in: cat(fa, fb), want: []string{a, b}},
		{name: "empty payload", in: cat(rawFrame(0, 0, ""), fa), want: []string{a}, bad: 1, skipped: 12},
		{name: "magic inside payload", in: mustFrame(t, `{"s":"KAGTKAGT"}`), want: []string{`{"s":"KAGTKAGT"}`}},
		{name: "leading garbage", in: cat([]byte("hello world\n\x00\xff"), fa), want: []string{a}, skipped: 14},
		{name: "garbage between", in: cat(fa, []byte("KAG junk KA"), fb), want: []string{a, b}, skipped: 11},
		{name: "trailing partial magic", in: cat(fa, []byte("KAG")), want: []string{a}},
		{name: "crc mismatch", in: cat(badCRC, fb), want: []string{b}, bad: 1, skipped: int64(len(badCRC))},
		{name: "oversize", in: cat(rawFrame(2000, 0, big), fa), max: 1000, want: []string{a}, bad: 1, skipped: -1},
		{name: "max size ok", in: mustFrame(t, big), max: 1000, want: []string{big}},
		{name: "length beyond max frame size", in: cat(rawFrame(0xffffffff, 0, ""), fa), want: []string{a}, bad: 1, skipped: 12},
		{
			// A sender died mid-frame; the next connection's preamble
			// makes the reader drop the stale partial frame.
			name: "stale partial frame then preamble",
			in:   cat(fa[:len(fa)-3], SyncPreamble, fb),
			want: []string{b}, bad: 1, skipped: -1,
		},
		{
			name: "stale partial frame then frame",
			in:   cat(mustFrame(t, big)[:100], fb),
			want: []string{b}, bad: 1, skipped: -1,
		},
		{name: "stale partial header then preamble", in: cat(fa[:6], SyncPreamble, fb), want: []string{b}, bad: 1, skipped: -1},
		{name: "NUL in payload", in: cat(rawFrame(3, 0, "a\x00b"), fa), want: []string{a}, bad: 1, skipped: 15},
	}
	readers := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one-byte": iotest.OneByteReader,
		"half":     iotest.HalfReader,
		"data-err": iotest.DataErrReader,
	}
	for _, tt := range tests {
		for rname, wrap := range readers {
			t.Run(tt.name+"/"+rname, func(t *testing.T) {
				got, st, err := readAll(t, wrap(bytes.NewReader(tt.in)), tt.max)
				if !errors.Is(err, io.EOF) {
					t.Fatalf("err = %v, want EOF", err)
				}
				if strings.Join(got, "|") != strings.Join(tt.want, "|") || len(got) != len(tt.want) {
					t.Errorf("frames = %q, want %q", got, tt.want)
				}
				if tt.bad >= 0 && st.BadFrames != tt.bad {
					t.Errorf("BadFrames = %d, want %d", st.BadFrames, tt.bad)
				}
				if tt.skipped >= 0 && st.SkippedBytes != tt.skipped {
					t.Errorf("SkippedBytes = %d, want %d", st.SkippedBytes, tt.skipped)
				}
			})
		}
	}
}

func TestAppendFrameErrors(t *testing.T) {
	if _, err := AppendFrame(nil, []byte("a\x00b")); !errors.Is(err, ErrInvalidPayload) {
		t.Errorf("NUL payload: err = %v", err)
	}
	if _, err := AppendFrame(nil, nil); !errors.Is(err, ErrInvalidPayload) {
		t.Errorf("empty payload: err = %v", err)
	}
	if _, err := AppendFrame(nil, make([]byte, MaxFrameSize+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("oversize payload: err = %v", err)
	}
	big := bytes.Repeat([]byte("y"), MaxFrameSize)
	var buf bytes.Buffer
	if err := WriteFrame(&buf, big); err != nil {
		t.Fatal(err)
	}
	p, err := NewFrameReader(iotest.HalfReader(&buf), 0).ReadFrame()
	if err != nil || !bytes.Equal(p, big) {
		t.Fatalf("max size frame: len %d, err %v", len(p), err)
	}
}

// An error from the underlying reader is returned as is, and reading can
// continue afterwards (the agent reads on after EOF from a disconnected
// virtio-serial port).
func TestFrameReaderResumesAfterError(t *testing.T) {
	fa, fb := mustFrame(t, `{"a":1}`), mustFrame(t, `{"b":2}`)
	r := &scriptReader{chunks: [][]byte{fa[:5], nil, fa[5:], nil, fb}}
	fr := NewFrameReader(r, 0)
	if _, err := fr.ReadFrame(); !errors.Is(err, io.EOF) {
		t.Fatalf("want EOF, got %v", err)
	}
	p, err := fr.ReadFrame()
	if err != nil || string(p) != `{"a":1}` {
		t.Fatalf("got %q, %v", p, err)
	}
	if _, err := fr.ReadFrame(); !errors.Is(err, io.EOF) {
		t.Fatalf("want EOF, got %v", err)
	}
	if p, err := fr.ReadFrame(); err != nil || string(p) != `{"b":2}` {
		t.Fatalf("got %q, %v", p, err)
	}
}

// scriptReader returns chunks in order; a nil chunk reads as io.EOF.
type scriptReader struct{ chunks [][]byte }

func (s *scriptReader) Read(p []byte) (int, error) {
	if len(s.chunks) == 0 {
		return 0, io.EOF
	}
	c := s.chunks[0]
	if c == nil {
		s.chunks = s.chunks[1:]
		return 0, io.EOF
	}
	n := copy(p, c)
	if n == len(c) {
		s.chunks = s.chunks[1:]
	} else {
		s.chunks[0] = c[n:]
	}
	return n, nil
}

// FuzzFrameReader checks that arbitrary input never panics or yields an
// invalid frame, and that a valid frame sent after SyncPreamble is always
// recovered whatever garbage (including partial frames) came before.
func FuzzFrameReader(f *testing.F) {
	f.Add([]byte{}, []byte(`{"id":1}`))
	f.Add([]byte("KAGT\x00\x00"), []byte(`{"id":1}`))
	f.Add([]byte("KAGT"), []byte(`{}`))
	f.Add(rawFrame(5, 0, "abc"), []byte(`x`))
	f.Add(rawFrame(0, 0, ""), []byte(``))
	f.Add(mustFrame(f, `{"id":7,"op":"ping"}`)[:15], []byte(`{"id":8}`))
	f.Add(append([]byte("KAGT\x00\x00\x00\x02"), 0, 0, 0, 0), []byte(`ok`))
	f.Fuzz(func(t *testing.T, garbage, payload []byte) {
		const max = 4096
		fr := NewFrameReader(iotest.HalfReader(bytes.NewReader(garbage)), max)
		for {
			p, err := fr.ReadFrame()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("unexpected error %v", err)
				}
				break
			}
			if len(p) > max || bytes.IndexByte(p, 0) >= 0 {
				t.Fatalf("invalid frame %q", p)
			}
		}
		if len(payload) == 0 || len(payload) > max || bytes.IndexByte(payload, 0) >= 0 {
			return
		}
		frame, err := AppendFrame(nil, payload)
		if err != nil {
			t.Fatal(err)
		}
		in := cat(garbage, SyncPreamble, frame)
		fr = NewFrameReader(iotest.OneByteReader(bytes.NewReader(in)), max)
		var last []byte
		found := false
		for {
			p, err := fr.ReadFrame()
			if err != nil {
				break
			}
			last, found = p, true
		}
		if !found || !bytes.Equal(last, payload) {
			t.Fatalf("frame after garbage %q not recovered: last %q (found %v)", garbage, last, found)
		}
	})
}
