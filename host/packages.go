package host

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

// Packages lists the packages of the store at url, sorted by id.
func (h *Host) Packages(ctx context.Context, url string) ([]*teleport.Package, error) {
	st, err := h.Store(ctx, url)
	if err != nil {
		return nil, err
	}
	return st.List(ctx)
}

// Package returns one package's manifest.
func (h *Host) Package(ctx context.Context, url, id string) (*teleport.Package, error) {
	st, err := h.Store(ctx, url)
	if err != nil {
		return nil, err
	}
	return st.Stat(ctx, id)
}

// RemovePackage deletes a package, every section of it.
func (h *Host) RemovePackage(ctx context.Context, url, id string) error {
	st, err := h.Store(ctx, url)
	if err != nil {
		return err
	}
	return st.Delete(ctx, id)
}

// CollectGarbage removes what interrupted uploads left in the store at url
// and reports how many it removed.
func (h *Host) CollectGarbage(ctx context.Context, url string) (int, error) {
	st, err := h.Store(ctx, url)
	if err != nil {
		return 0, err
	}
	gc, ok := st.(teleport.GarbageCollector)
	if !ok {
		return 0, fmt.Errorf("this store keeps no orphans to collect: %w", vm.ErrUnsupported)
	}
	return gc.GC(ctx)
}

// Explanation is every restore rule's verdict on a package for this host.
type Explanation struct {
	ID         string                `json:"id"`
	CanRestore bool                  `json:"can_restore"`
	Host       vm.HostInfo           `json:"host"`
	Rules      []teleport.RuleResult `json:"rules"`
}

// ExplainPackage evaluates every restore rule for package id on this
// host, with the backend that would restore it.
func (h *Host) ExplainPackage(ctx context.Context, url, id string) (*Explanation, error) {
	pkg, err := h.Package(ctx, url, id)
	if err != nil {
		return nil, err
	}
	backend := ""
	if pkg.Snapshot != nil {
		backend = h.backendFor(ctx, pkg.Snapshot.Backend)
	}
	target, err := h.Info(ctx, backend)
	if err != nil {
		return nil, err
	}
	e := &Explanation{ID: pkg.ID, CanRestore: true, Host: target, Rules: teleport.Explain(pkg, target)}
	for _, r := range e.Rules {
		e.CanRestore = e.CanRestore && r.OK
	}
	return e, nil
}

// Verification is what VerifyPackage checked.
type Verification struct {
	ID         string `json:"id"`
	OK         bool   `json:"ok"`
	SizeBytes  int64  `json:"size_bytes"`
	BlobSHA256 string `json:"blob_sha256"`
	// Sections names each part whose SHA-256 was verified: the package's
	// sections, or for a package from before sections, the blob's
	// payloads.
	Sections         []string `json:"sections"`
	SectionsVerified int      `json:"sections_verified"`
	Error            string   `json:"error,omitempty"`
}

// VerifyPackage re-reads package id, streaming, and checks its body
// against the manifest's size and SHA-256, each section against its own,
// and the blob's structure and metadata against the manifest. A failure
// is an error matching teleport.ErrChecksumMismatch (or the store's
// error), with the Verification so far.
func (h *Host) VerifyPackage(ctx context.Context, url, id string) (*Verification, error) {
	st, err := h.Store(ctx, url)
	if err != nil {
		return nil, err
	}
	p, err := st.Stat(ctx, id)
	if err != nil {
		return nil, err
	}
	res := &Verification{ID: id, SizeBytes: p.SizeBytes, BlobSHA256: p.BlobSHA256, Sections: []string{}}
	fail := func(err error) (*Verification, error) {
		res.Error = err.Error()
		return res, err
	}
	mismatch := func(format string, args ...any) (*Verification, error) {
		return fail(fmt.Errorf("package %s: "+format+": %w", append(append([]any{id}, args...), teleport.ErrChecksumMismatch)...))
	}
	r, err := st.Open(ctx, id)
	if err != nil {
		return fail(err)
	}
	defer r.Close()
	if r.Size() != p.SizeBytes {
		return mismatch("body has %d bytes, manifest says %d", r.Size(), p.SizeBytes)
	}
	// One pass over the body: its whole hash and each section's.
	whole := sha256.New()
	sums := make([]hash.Hash, len(p.Sections))
	var last int64
	for i, s := range p.Sections {
		sums[i] = sha256.New()
		if _, err := io.Copy(io.MultiWriter(whole, sums[i]), io.NewSectionReader(r, s.Offset, s.Size)); err != nil {
			return fail(err)
		}
		last = s.Offset + s.Size
	}
	if _, err := io.Copy(whole, io.NewSectionReader(r, last, r.Size()-last)); err != nil {
		return fail(err)
	}
	if got := hex.EncodeToString(whole.Sum(nil)); got != p.BlobSHA256 {
		return mismatch("body sha256 %.16s, manifest says %.16s", got, p.BlobSHA256)
	}
	for i, s := range p.Sections {
		if got := hex.EncodeToString(sums[i].Sum(nil)); got != s.SHA256 {
			return mismatch("%s section sha256 %.16s, manifest says %.16s", s.Name, got, s.SHA256)
		}
		res.Sections = append(res.Sections, s.Name)
	}
	if err := p.CheckAgentState(); err != nil {
		return fail(err)
	}
	var o blob.OpenOptions
	if p.Format == blob.Version2 {
		cs, ok := st.(teleport.ChunkStore)
		if !ok {
			return fail(fmt.Errorf("package %s is version 2 and this store has no chunk space: %w", id, teleport.ErrStore))
		}
		cr, err := cs.OpenChunks(ctx, p)
		if err != nil {
			return mismatch("%v", err)
		}
		defer cr.Close()
		o.Chunks = cr
	}
	snap, err := blob.OpenPackage(p, r, r.Size(), o)
	switch {
	case err != nil && (errors.Is(err, blob.ErrNotItsManifest) || errors.Is(err, vm.ErrCorrupt) || blob.ErrorKind(err) != ""):
		return mismatch("%v", err)
	case err != nil:
		return fail(err)
	}
	if p.Format == blob.Version2 {
		// Every chunk, against its hash (and the payloads against the
		// checksums the metadata records, where it does).
		if err := verifyChunks(ctx, snap); err != nil {
			return mismatch("%v", err)
		}
		res.Sections = append(res.Sections, "chunks")
	} else if len(p.Sections) == 0 {
		// No section checksums: verify the payloads the metadata records.
		if err := vm.VerifyPayloads(snap); err != nil {
			return mismatch("%v", err)
		}
		for _, s := range []struct {
			name string
			p    vm.Payload
		}{{vm.SectionDeviceState, snap.DeviceState}, {vm.SectionMemory, snap.Memory}} {
			if s.p != nil {
				res.Sections = append(res.Sections, s.name)
			}
		}
	}
	res.OK, res.SectionsVerified = true, len(res.Sections)
	return res, nil
}

// verifyChunks reads every chunk of a version 2 snapshot, verifying it:
// the memory image through its page map (holes are not streamed) unless
// the metadata records a checksum of the whole, which a stream checks.
func verifyChunks(ctx context.Context, snap *vm.Snapshot) error {
	md := snap.Metadata
	img, isImage := snap.Memory.(vm.ImagePayload)
	if !isImage || md.MemorySHA256 != "" {
		return vm.VerifyPayloads(snap)
	}
	if snap.DeviceState != nil {
		sum, err := vm.HashPayload(snap.DeviceState)
		if err != nil {
			return err
		}
		if sum != md.DeviceStateSHA256 {
			return fmt.Errorf("the device state has sha256 %.12s, its metadata says %.12s", sum, md.DeviceStateSHA256)
		}
	}
	if err := img.WriteImage(ctx, discardAt{}); err != nil {
		return err
	}
	if d, ok := snap.Disk.(vm.ImagePayload); ok {
		// The workspace disk the blob carries, chunk by chunk.
		if err := d.WriteImage(ctx, discardAt{}); err != nil {
			return fmt.Errorf("the workspace disk: %w", err)
		}
	}
	return nil
}

type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
