package qemu

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// A split snapshot of a running guest needs its RAM as it was when the
// guest stopped. Copying the RAM file while the guest is stopped costs tens
// of milliseconds per 100 MiB; instead QEMU's own live migration does the
// copying while the guest runs. A precopy migration (RAM in the stream)
// goes through a pipe into ramSplitter, which
//
//   - keeps the last version of every page of the guest RAM block in a
//     private sparse file (the memory section), and
//   - writes everything else to the state file: the same stream with the
//     guest RAM pages taken out (the snapshot section).
//
// QEMU stops the guest only for the last dirty pages and the device state,
// so the guest is stopped for milliseconds. Restoring the state stream with
// the staged RAM file mapped leaves that RAM as staged: precopy loading
// writes only the pages a stream carries.
//
// This relies on QEMU's dirty tracking being exact, which holds for KVM;
// under TCG it is used only on a stopped guest (see liveCapture). The
// splitter also turns a saved full stream into a split one.
//
// The splitter understands the subset of QEMU's stream format (QEMU 7.2,
// migration/savevm.c and migration/ram.c) that a precopy migration with no
// optional capabilities produces: a configuration section, the iterable
// "ram" section (setup, parts, end) with plain and zero pages, and the
// non-iterable device sections that follow, which it copies unread.
// Anything else is errStream.

// Stream constants (QEMU 7.2).
const (
	qemuVMFileMagic    = 0x5145564d // "QEVM"
	qemuVMFileVersion  = 3
	qemuVMSectionStart = 0x01
	qemuVMSectionPart  = 0x02
	qemuVMSectionEnd   = 0x03
	qemuVMSubsection   = 0x05
	qemuVMConfig       = 0x07
	qemuVMFooter       = 0x7e

	ramFlagZero     = 0x02
	ramFlagMemSize  = 0x04
	ramFlagPage     = 0x08
	ramFlagEOS      = 0x10
	ramFlagContinue = 0x20
	ramFlagMask     = pageBytes - 1

	// guestRAMBlock is the RAM block of memory-backend-file id=mem.
	guestRAMBlock = "mem"
	// ignoreSharedCap is how the x-ignore-shared capability appears in a
	// stream's configuration section.
	ignoreSharedCap = "x-ignore-shared"
)

var (
	errStream = errors.New("unexpected migration stream")
	// errStreamLate: the stream went wrong after QEMU had stopped the
	// guest for good (the migration completed); no second save is possible.
	errStreamLate = errors.New("migration stream failed after the guest stopped")
)

// ramSplitter splits a migration stream into guest RAM and the rest.
type ramSplitter struct {
	r        *bufio.Reader
	state    *bufio.Writer // the stream without guest RAM pages
	copying  bool          // bytes read are copied to state as they are
	out      *os.File      // guest RAM, sparse; nil drops it
	ramBytes int64
	written  []uint64 // pages written to out, for zero pages sent later
	block    string   // block of the last record read
	emitted  string   // block of the last record written to state
	sections map[uint32]string

	run    []byte // pending run of consecutive pages for out
	runOff int64
	npages int64 // guest RAM pages received (re-sent ones included)
}

func newRAMSplitter(r io.Reader, out *os.File, ramBytes int64, state io.Writer) *ramSplitter {
	return &ramSplitter{r: bufio.NewReaderSize(r, 1<<20), state: bufio.NewWriterSize(state, 256<<10), out: out, ramBytes: ramBytes,
		written: make([]uint64, (ramBytes/pageBytes+63)/64), sections: map[uint32]string{}, run: make([]byte, 0, 1<<20)}
}

// read returns the next n bytes, copying them to state when copying.
func (rs *ramSplitter) read(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(rs.r, b); err != nil {
		return nil, fmt.Errorf("%w: %v", errStream, err)
	}
	if rs.copying {
		rs.state.Write(b)
	}
	return b, nil
}

func (rs *ramSplitter) u8() (byte, error) {
	b, err := rs.read(1)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}

func (rs *ramSplitter) be32() (uint32, error) {
	b, err := rs.read(4)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b), nil
}

func (rs *ramSplitter) be64() (uint64, error) {
	b, err := rs.read(8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

func (rs *ramSplitter) str() (string, error) {
	n, err := rs.u8()
	if err != nil {
		return "", err
	}
	b, err := rs.read(int(n))
	return string(b), err
}

// Split consumes the whole stream. On error it stops reading: the caller
// cancels the migration rather than let it complete into a bad copy.
func (rs *ramSplitter) Split() error {
	err := rs.split()
	if err == nil {
		// The device sections and the end of the stream, as they are.
		if _, err = io.Copy(rs.state, rs.r); err != nil {
			err = fmt.Errorf("%w: %v", errStream, err)
		}
	}
	if ferr := rs.flush(); err == nil {
		err = ferr
	}
	if ferr := rs.state.Flush(); err == nil {
		err = ferr
	}
	return err
}

func (rs *ramSplitter) split() error {
	rs.copying = true
	magic, err := rs.be32()
	if err != nil {
		return err
	}
	version, err := rs.be32()
	if err != nil || magic != qemuVMFileMagic || version != qemuVMFileVersion {
		return fmt.Errorf("%w: header %#x version %d", errStream, magic, version)
	}
	for {
		rs.copying = true
		t, err := rs.u8()
		if err != nil {
			return err
		}
		switch t {
		case qemuVMConfig:
			n, err := rs.be32()
			if err != nil || n > 256 {
				return fmt.Errorf("%w: configuration section", errStream)
			}
			if _, err := rs.read(int(n)); err != nil {
				return err
			}
			if next, err := rs.r.Peek(1); err == nil && next[0] == qemuVMSubsection {
				return fmt.Errorf("%w: configuration subsections (a migration capability is on)", errStream)
			}
		case qemuVMSectionStart:
			id, err := rs.be32()
			if err != nil {
				return err
			}
			name, err := rs.str()
			if err != nil {
				return err
			}
			if name != "ram" {
				return fmt.Errorf("%w: iterable section %q", errStream, name)
			}
			rs.sections[id] = name
			if _, err := rs.read(8); err != nil { // instance id, version id
				return err
			}
			if err := rs.setup(); err != nil {
				return err
			}
			if err := rs.footer(id); err != nil {
				return err
			}
		case qemuVMSectionPart, qemuVMSectionEnd:
			id, err := rs.be32()
			if err != nil {
				return err
			}
			if rs.sections[id] != "ram" {
				return fmt.Errorf("%w: part of unknown section %d", errStream, id)
			}
			if err := rs.pages(); err != nil {
				return err
			}
			rs.copying = true
			if err := rs.footer(id); err != nil {
				return err
			}
			if t == qemuVMSectionEnd {
				return nil // device state follows; RAM is complete
			}
		default:
			return fmt.Errorf("%w: section type %#x before the end of RAM", errStream, t)
		}
	}
}

func (rs *ramSplitter) footer(id uint32) error {
	t, err := rs.u8()
	if err != nil || t != qemuVMFooter {
		return fmt.Errorf("%w: missing section footer", errStream)
	}
	if got, err := rs.be32(); err != nil || got != id {
		return fmt.Errorf("%w: footer of section %d, want %d", errStream, got, id)
	}
	return nil
}

// setup reads (and copies) the RAM block list and checks the guest block.
func (rs *ramSplitter) setup() error {
	v, err := rs.be64()
	if err != nil || v&ramFlagMask != ramFlagMemSize {
		return fmt.Errorf("%w: RAM setup", errStream)
	}
	total := v &^ ramFlagMask
	found := false
	for seen := uint64(0); seen < total; {
		name, err := rs.str()
		if err != nil {
			return err
		}
		n, err := rs.be64()
		if err != nil {
			return err
		}
		if name == guestRAMBlock {
			if int64(n) != rs.ramBytes {
				return fmt.Errorf("%w: RAM block %s has %d bytes, want %d", errStream, name, n, rs.ramBytes)
			}
			found = true
		}
		seen += n
	}
	if !found {
		return fmt.Errorf("%w: no RAM block %q", errStream, guestRAMBlock)
	}
	if v, err := rs.be64(); err != nil || v != ramFlagEOS {
		return fmt.Errorf("%w: RAM setup not terminated", errStream)
	}
	return nil
}

// pages reads page records up to the end-of-section marker: guest RAM
// pages go to out, other blocks' pages (ROMs) to state.
func (rs *ramSplitter) pages() error {
	rs.copying = false
	rs.emitted = "" // the first record kept in a section names its block
	zero := make([]byte, pageBytes)
	var hdr [8]byte
	for {
		v, err := rs.be64()
		if err != nil {
			return err
		}
		flags, addr := v&ramFlagMask, int64(v&^ramFlagMask)
		if flags&ramFlagEOS != 0 {
			binary.BigEndian.PutUint64(hdr[:], v)
			rs.state.Write(hdr[:])
			return nil
		}
		if flags&ramFlagContinue == 0 {
			if rs.block, err = rs.str(); err != nil {
				return err
			}
		}
		kind := flags &^ ramFlagContinue
		if kind != ramFlagZero && kind != ramFlagPage {
			return fmt.Errorf("%w: RAM page flags %#x (compression or RDMA?)", errStream, flags)
		}
		if rs.block != guestRAMBlock {
			// Keep the record, naming its block unless the previous kept
			// record was of the same block.
			f := kind
			if rs.emitted == rs.block {
				f |= ramFlagContinue
			}
			binary.BigEndian.PutUint64(hdr[:], uint64(addr)|f)
			rs.state.Write(hdr[:])
			if f&ramFlagContinue == 0 {
				rs.state.WriteByte(byte(len(rs.block)))
				rs.state.WriteString(rs.block)
			}
			rs.emitted = rs.block
			n := 1
			if kind == ramFlagPage {
				n = pageBytes
			}
			rs.copying = true
			_, err := rs.read(n)
			rs.copying = false
			if err != nil {
				return err
			}
			continue
		}
		if addr < 0 || addr+pageBytes > rs.ramBytes {
			return fmt.Errorf("%w: page at %d outside RAM", errStream, addr)
		}
		rs.npages++
		if kind == ramFlagZero {
			fill, err := rs.u8()
			if err != nil {
				return err
			}
			pg := addr / pageBytes
			if fill == 0 && rs.written[pg/64]&(1<<(pg%64)) == 0 {
				continue // still a hole
			}
			page := zero
			if fill != 0 {
				page = bytes.Repeat([]byte{fill}, pageBytes)
			}
			if err := rs.put(addr, page); err != nil {
				return err
			}
			continue
		}
		if err := rs.putFrom(addr); err != nil {
			return err
		}
	}
}

// putFrom reads one page from the stream into the pending run.
func (rs *ramSplitter) putFrom(addr int64) error {
	if err := rs.extend(addr); err != nil {
		return err
	}
	n := len(rs.run)
	rs.run = rs.run[:n+pageBytes]
	if _, err := io.ReadFull(rs.r, rs.run[n:]); err != nil {
		return fmt.Errorf("%w: %v", errStream, err)
	}
	rs.mark(addr)
	return nil
}

func (rs *ramSplitter) put(addr int64, page []byte) error {
	if err := rs.extend(addr); err != nil {
		return err
	}
	rs.run = append(rs.run, page...)
	rs.mark(addr)
	return nil
}

func (rs *ramSplitter) mark(addr int64) {
	pg := addr / pageBytes
	rs.written[pg/64] |= 1 << (pg % 64)
}

// extend makes room for a page at addr in the pending run, flushing it
// first unless addr directly follows it.
func (rs *ramSplitter) extend(addr int64) error {
	if len(rs.run) > 0 && (rs.runOff+int64(len(rs.run)) != addr || len(rs.run)+pageBytes > cap(rs.run)) {
		if err := rs.flush(); err != nil {
			return err
		}
	}
	if len(rs.run) == 0 {
		rs.runOff = addr
	}
	return nil
}

func (rs *ramSplitter) flush() error {
	if len(rs.run) == 0 || rs.out == nil {
		rs.run = rs.run[:0]
		return nil
	}
	_, err := rs.out.WriteAt(rs.run, rs.runOff)
	rs.run = rs.run[:0]
	return err
}

// streamIgnoresShared reports whether a saved migration stream was written
// with x-ignore-shared (its configuration section lists the capability),
// which the restoring QEMU must then set too.
func streamIgnoresShared(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	var b [512]byte
	n, _ := io.ReadFull(f, b[:])
	h := b[:n]
	// magic, version, QEMU_VM_CONFIGURATION, name length, name
	if len(h) < 13 || binary.BigEndian.Uint32(h) != qemuVMFileMagic || h[8] != qemuVMConfig {
		return false, fmt.Errorf("device state is not a QEMU migration stream: %w", errStream)
	}
	end := 13 + int(binary.BigEndian.Uint32(h[9:]))
	if end >= len(h) || h[end] != qemuVMSubsection {
		return false, nil
	}
	// Subsection "configuration/capabilities": name, version, count,
	// then each capability name.
	p := end + 1
	if p >= len(h) {
		return false, nil
	}
	name := int(h[p])
	p += 1 + name + 4
	if p+4 > len(h) {
		return false, nil
	}
	count := int(binary.BigEndian.Uint32(h[p:]))
	p += 4
	for i := 0; i < count && p < len(h); i++ {
		l := int(h[p])
		if p+1+l > len(h) {
			break
		}
		if string(h[p+1:p+1+l]) == ignoreSharedCap {
			return true, nil
		}
		p += 1 + l
	}
	return false, nil
}
