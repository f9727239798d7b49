package hostvm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"

	"github.com/kelpie/teleport/vm"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checkSnapshot refuses, before any file is touched, a snapshot this
// backend and host cannot restore into a VM configured as cfg. The reasons
// are the ones a user needs: which fact differs, and both values.
func (f *Factory) checkSnapshot(snap *vm.Snapshot, cfg vm.Config) error {
	md, s := snap.Metadata, f.spec
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: "+format+": %w", append(append([]any{md.SnapshotID}, args...), vm.ErrIncompatible)...)
	}
	switch {
	case md.Backend != s.Backend:
		return refuse("written by backend %q, this is %s", md.Backend, s.Backend)
	case md.Architecture != s.Arch:
		return refuse("taken on %s, this host is %s", md.Architecture, s.Arch)
	case (md.HostBound || s.HostBound) && md.HostID != s.HostID:
		// s.HostBound covers metadata that forgot the flag: a VZ save file
		// is host-bound whatever its metadata says.
		return refuse("%s snapshots restore only on the host that wrote them (%q), this is host %q", s.Backend, md.HostID, s.HostID)
	case !md.IsFullSnapshot:
		return refuse("not a full VM snapshot")
	case md.Layout != s.Layout:
		return refuse("layout %q, %s writes and reads %q", md.Layout, s.Backend, s.Layout)
	}
	if err := compareCompat(md.Compat, s.Compat); err != nil {
		return refuse("%s", err.Error())
	}
	if md.VCPUCount != cfg.VCPUs || md.MemoryMiB != cfg.MemoryMiB {
		return refuse("the snapshot's machine has %d vCPUs and %d MiB, the config asks for %d vCPUs and %d MiB",
			md.VCPUCount, md.MemoryMiB, cfg.VCPUs, cfg.MemoryMiB)
	}
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: "+format+": %w", append(append([]any{md.SnapshotID}, args...), vm.ErrCorrupt)...)
	}
	if vm.PayloadSize(snap.DeviceState) == 0 {
		return corrupt("the snapshot section is empty")
	}
	switch s.Layout {
	case vm.LayoutSplit:
		if vm.PayloadSize(snap.Memory) == 0 {
			return corrupt("a split snapshot needs a memory section")
		}
	case vm.LayoutSingle:
		if vm.PayloadSize(snap.Memory) != 0 {
			return corrupt("a single-file snapshot has a %d-byte memory section", snap.Memory.Size())
		}
	}
	return nil
}

// compareCompat requires the snapshot's facts and the host's to be the same
// set with the same values. A fact the snapshot does not record is a
// mismatch too: the backend cannot vouch for what was not written down.
func compareCompat(snap, host map[string]string) error {
	keys := make([]string, 0, len(snap)+len(host))
	for k := range snap {
		keys = append(keys, k)
	}
	for k := range host {
		if _, ok := snap[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		want, okW := snap[k]
		have, okH := host[k]
		switch {
		case !okW:
			return fmt.Errorf("the snapshot does not record %s (this host has %q)", k, have)
		case !okH:
			return fmt.Errorf("%s is %q in the snapshot and unknown on this host", k, want)
		case want != have:
			return fmt.Errorf("%s is %q in the snapshot and %q on this host", k, want, have)
		}
	}
	return nil
}

// fileSum is what the core records about one snapshot file.
type fileSum struct {
	size   int64
	sha256 string
	crc32c uint32
}

// hashFile streams a file once, computing its SHA-256 and CRC-32C.
func hashFile(path string) (fileSum, error) {
	fh, err := os.Open(path)
	if err != nil {
		return fileSum{}, err
	}
	defer fh.Close()
	return sumReader(fh)
}

func sumReader(r io.Reader) (fileSum, error) {
	sh, cr := sha256.New(), crc32.New(castagnoli)
	n, err := io.Copy(io.MultiWriter(sh, cr), r)
	if err != nil {
		return fileSum{}, err
	}
	return fileSum{size: n, sha256: hex.EncodeToString(sh.Sum(nil)), crc32c: cr.Sum32()}, nil
}

// stagePayload copies p to a new file at path and checks, in the same single
// pass, that it has the size and SHA-256 the metadata records. On any error
// the file is removed. This is the only read of the payload a restore
// makes (rather than VerifyPayloads followed by a copy).
func stagePayload(p vm.Payload, path, section, wantSHA string, wantSize int64, snapID string) (err error) {
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("snapshot %s: %s section: "+format+": %w", append(append([]any{snapID, section}, args...), vm.ErrCorrupt)...)
	}
	if got := p.Size(); got != wantSize {
		return corrupt("has %d bytes, metadata says %d", got, wantSize)
	}
	if wantSHA == "" {
		return corrupt("no recorded checksum")
	}
	rc, err := p.Open()
	if err != nil {
		return fmt.Errorf("snapshot %s: open %s section: %w", snapID, section, err)
	}
	defer rc.Close()
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("snapshot %s: stage %s section: %w", snapID, section, err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("snapshot %s: stage %s section: %w", snapID, section, cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	n, sum, err := copyHashed(out, rc, wantSize)
	if err != nil {
		return fmt.Errorf("snapshot %s: stage %s section: %w", snapID, section, err)
	}
	if n != wantSize {
		return corrupt("has %d bytes, metadata says %d", n, wantSize)
	}
	if got := hex.EncodeToString(sum); got != wantSHA {
		return corrupt("checksum mismatch (sha256 %.12s, metadata says %.12s)", got, wantSHA)
	}
	return nil
}

// Pipelined copy: SHA-256 (about 1.8 GB/s with SHA-NI) is the slowest
// stage of a restore's copy, so it runs on its own goroutine, overlapping
// the reads and writes. Memory stays bounded: copyChunks buffers of
// copyChunkBytes each, whatever the payload's size.
const (
	copyChunkBytes = 1 << 20
	copyChunks     = 4
)

// copyHashed copies at most limit bytes from src to dst and returns their
// SHA-256. A src with more than limit bytes is an error, so a payload
// lying about its size can neither fill the disk nor pass.
func copyHashed(dst io.Writer, src io.Reader, limit int64) (n int64, sum []byte, err error) {
	free := make(chan []byte, copyChunks)
	for i := 0; i < copyChunks; i++ {
		free <- make([]byte, copyChunkBytes)
	}
	full := make(chan []byte, copyChunks)
	hashed := make(chan []byte, 1)
	go func() {
		h := sha256.New()
		for b := range full {
			h.Write(b)
			free <- b[:cap(b)]
		}
		hashed <- h.Sum(nil)
	}()
	lr := io.LimitReader(src, limit)
	for {
		b := <-free
		m, rerr := io.ReadFull(lr, b)
		if m > 0 {
			if _, werr := dst.Write(b[:m]); werr != nil {
				err = werr
				break
			}
			n += int64(m)
			full <- b[:m]
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
	}
	close(full)
	sum = <-hashed
	if err != nil {
		return n, nil, err
	}
	var one [1]byte
	if m, _ := io.ReadFull(src, one[:]); m > 0 {
		return n, nil, fmt.Errorf("%w (%d bytes): %w", errTooLong, limit, vm.ErrCorrupt)
	}
	return n, sum, nil
}

// errTooLong: a payload yields more bytes than its declared size.
var errTooLong = errors.New("payload longer than its declared size")
