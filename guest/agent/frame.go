package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Frame layout (all integers big-endian):
//
//	offset 0  magic   "KAGT"
//	offset 4  length  u32, payload length in bytes
//	offset 8  crc     u32, CRC-32C (Castagnoli) of the payload
//	offset 12 payload length bytes of JSON text
//
// The payload must be non-empty and must not contain NUL bytes (JSON text
// never does). Because
// length is always below 1<<24, byte 4 of every valid header is 0x00, so a
// header can never appear inside a valid payload. The reader uses this to
// abandon a partially received frame as soon as a NUL byte shows up in its
// payload, which is what keeps the protocol from wedging when one side
// vanished mid-frame (e.g. a VM restored from a snapshot into a new QEMU
// process). Peers send SyncPreamble on every new connection for the same
// reason.
const (
	// Magic starts every frame.
	Magic = "KAGT"
	// HeaderSize is the size of the fixed frame header.
	HeaderSize = 12
	// MaxFrameSize is the default and largest allowed payload size.
	MaxFrameSize = 8 << 20
)

// SyncPreamble is written by each side when a connection (re)starts. Its NUL
// bytes are skipped as garbage by a reader that is between frames and make a
// reader that is stuck inside a stale partial frame drop it and resync.
var SyncPreamble = make([]byte, 16)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Framing errors.
var (
	// ErrFrameTooLarge is returned by AppendFrame/WriteFrame for payloads
	// above the size limit.
	ErrFrameTooLarge = errors.New("agent: frame too large")
	// ErrInvalidPayload is returned for empty payloads and payloads
	// containing NUL bytes.
	ErrInvalidPayload = errors.New("agent: frame payload empty or contains NUL byte")
)

// AppendFrame appends the framed payload to dst.
func AppendFrame(dst, payload []byte) ([]byte, error) {
	if len(payload) > MaxFrameSize {
		return dst, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, len(payload))
	}
	if len(payload) == 0 || bytes.IndexByte(payload, 0) >= 0 {
		return dst, ErrInvalidPayload
	}
	dst = append(dst, Magic...)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	dst = binary.BigEndian.AppendUint32(dst, crc32.Checksum(payload, castagnoli))
	return append(dst, payload...), nil
}

// WriteFrame writes one frame with a single Write call, so frames written
// concurrently to a writer whose Write is atomic (net.Conn, *os.File) do not
// interleave.
func WriteFrame(w io.Writer, payload []byte) error {
	buf, err := AppendFrame(make([]byte, 0, HeaderSize+len(payload)), payload)
	if err != nil {
		return err
	}
	_, err = w.Write(buf)
	return err
}

// FrameStats counts what a FrameReader discarded.
type FrameStats struct {
	SkippedBytes int64 // bytes discarded while searching for a frame start
	BadFrames    int64 // candidate frames rejected (size, CRC, NUL in payload)
}

// FrameReader reads frames from a byte stream. It tolerates partial reads,
// garbage between frames, and corrupted or truncated frames: on any
// inconsistency it resynchronises by scanning for the next magic. It is not
// safe for concurrent use.
type FrameReader struct {
	r     io.Reader
	max   int
	buf   []byte // buffered bytes are buf[off:]
	off   int
	stats FrameStats
}

// NewFrameReader returns a reader for frames of at most max payload bytes
// (max <= 0 or above MaxFrameSize means MaxFrameSize).
func NewFrameReader(r io.Reader, max int) *FrameReader {
	if max <= 0 || max > MaxFrameSize {
		max = MaxFrameSize
	}
	return &FrameReader{r: r, max: max}
}

// Stats returns counters of discarded input.
func (fr *FrameReader) Stats() FrameStats { return fr.stats }

// Reset discards any buffered partial input.
func (fr *FrameReader) Reset() {
	fr.buf = fr.buf[:0]
	fr.off = 0
}

// Buffered returns the number of bytes read from the stream but not yet
// consumed.
func (fr *FrameReader) Buffered() int { return len(fr.buf) - fr.off }

func (fr *FrameReader) data() []byte { return fr.buf[fr.off:] }

func (fr *FrameReader) discard(n int) {
	fr.off += n
	if fr.off == len(fr.buf) {
		fr.buf = fr.buf[:0]
		fr.off = 0
	}
}

// fill reads more data from the underlying reader, appending to the buffer.
func (fr *FrameReader) fill() error {
	if fr.off > 0 && (fr.off >= len(fr.buf)/2 || len(fr.buf) == cap(fr.buf)) {
		n := copy(fr.buf, fr.buf[fr.off:])
		fr.buf = fr.buf[:n]
		fr.off = 0
	}
	if len(fr.buf) == cap(fr.buf) {
		newCap := 2 * cap(fr.buf)
		if newCap < 4096 {
			newCap = 4096
		}
		nb := make([]byte, len(fr.buf), newCap)
		copy(nb, fr.buf)
		fr.buf = nb
	}
	for i := 0; i < 100; i++ {
		n, err := fr.r.Read(fr.buf[len(fr.buf):cap(fr.buf)])
		fr.buf = fr.buf[:len(fr.buf)+n]
		if n > 0 {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return io.ErrNoProgress
}

// ReadFrame returns the next valid frame's payload. The returned slice is
// owned by the caller. Errors come only from the underlying reader; corrupt
// input is skipped and counted in Stats.
func (fr *FrameReader) ReadFrame() ([]byte, error) {
	// scanned is how many payload bytes of the current candidate were
	// already checked for NUL.
	scanned := 0
	for {
		d := fr.data()
		i := bytes.Index(d, []byte(Magic))
		if i < 0 {
			// Keep a possible partial magic at the end.
			keep := len(Magic) - 1
			if len(d) > keep {
				fr.stats.SkippedBytes += int64(len(d) - keep)
				fr.discard(len(d) - keep)
			}
			if err := fr.fill(); err != nil {
				return nil, err
			}
			continue
		}
		if i > 0 {
			fr.stats.SkippedBytes += int64(i)
			fr.discard(i)
			d = fr.data()
			scanned = 0
		}
		if len(d) < HeaderSize {
			if err := fr.fill(); err != nil {
				return nil, err
			}
			continue
		}
		n := binary.BigEndian.Uint32(d[4:8])
		if n == 0 || n > uint32(fr.max) {
			fr.reject()
			scanned = 0
			continue
		}
		avail := len(d) - HeaderSize
		if avail > int(n) {
			avail = int(n)
		}
		if bytes.IndexByte(d[HeaderSize+scanned:HeaderSize+avail], 0) >= 0 {
			fr.reject()
			scanned = 0
			continue
		}
		scanned = avail
		if avail < int(n) {
			if err := fr.fill(); err != nil {
				return nil, err
			}
			continue
		}
		payload := d[HeaderSize : HeaderSize+int(n)]
		if crc32.Checksum(payload, castagnoli) != binary.BigEndian.Uint32(d[8:12]) {
			fr.reject()
			scanned = 0
			continue
		}
		out := make([]byte, n)
		copy(out, payload)
		fr.discard(HeaderSize + int(n))
		return out, nil
	}
}

// reject drops the first byte of the current candidate frame so scanning
// resumes right after its magic's first byte.
func (fr *FrameReader) reject() {
	fr.stats.BadFrames++
	fr.stats.SkippedBytes++
	fr.discard(1)
}
