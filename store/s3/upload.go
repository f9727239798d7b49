package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

// unsignedPayload sends bodies as UNSIGNED-PAYLOAD: SigV4 would otherwise
// hash every part once more just to sign it (and refuses a stream it cannot
// rewind over plain http). Integrity is the manifest's SHA-256's job.
var unsignedPayload = s3.WithAPIOptions(v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)

func newBody(b []byte) io.ReadSeeker { return bytes.NewReader(b) }

// upload streams one object: parts are buffered one at a time and sent by
// up to UploadConcurrency goroutines; at most UploadConcurrency+1 part
// buffers exist. An object that fits one part is sent with a single PUT on
// complete. While it runs, a lease object tells GC the upload is alive.
//
// With a hash, full parts are hashed in order by a goroutine of their own,
// off the writer's path; a part buffer is reused once it is both sent and
// hashed.
type upload struct {
	s    *Store
	what string // for messages: "package X"
	key  string
	id   string // names the lease (and, for packages, the blob)

	ctx    context.Context // the upload's life: Create's ctx, canceled by abort
	cancel context.CancelFunc

	cur      []byte // the part being filled
	n        int64
	nextPart int32
	mpID     string // S3 multipart upload id, once the first part is sent
	free     chan []byte
	nbuf     int

	wg    sync.WaitGroup
	mu    sync.Mutex
	parts []types.CompletedPart
	err   error // first part failure

	leaseStop chan struct{}
	leaseDone chan struct{}
	released  bool

	h      hash.Hash // nil: no hashing
	hq     chan *part
	hdone  chan struct{}
	hashed bool // digest taken: later parts are not hashed
}

// part is a full part buffer on its way out; refs counts the sender and
// the hasher.
type part struct {
	b    []byte
	refs atomic.Int32
}

func (u *upload) put(p *part) {
	if p.refs.Add(-1) == 0 {
		u.free <- p.b
	}
}

// hashParts feeds full parts to the hash in order.
func (u *upload) hashParts() {
	defer close(u.hdone)
	for p := range u.hq {
		u.h.Write(p.b)
		u.put(p)
	}
}

// digest returns the size and SHA-256 of everything written: it waits for
// the hasher, then hashes the part still being filled in place.
func (u *upload) digest() (int64, string) {
	if !u.hashed {
		u.hashed = true
		close(u.hq)
		<-u.hdone
		u.h.Write(u.cur)
	}
	return u.n, hex.EncodeToString(u.h.Sum(nil))
}

func (u *upload) stopHasher() {
	if u.h != nil && !u.hashed {
		u.hashed = true
		close(u.hq)
		<-u.hdone
	}
}

type leaseObject struct {
	Key string `json:"key"`
}

// startUpload writes the upload's lease and starts refreshing it.
func (s *Store) startUpload(ctx context.Context, what, id string, keyOf func(id string) string, h hash.Hash) (*upload, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	u := &upload{s: s, what: what, key: keyOf(id), id: id, free: make(chan []byte, s.o.UploadConcurrency+1),
		leaseStop: make(chan struct{}), leaseDone: make(chan struct{})}
	lease, _ := json.Marshal(leaseObject{Key: u.key})
	if err := s.putBytes(ctx, "put lease", s.leaseKey(id), lease, false); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	u.ctx, u.cancel = context.WithCancel(ctx)
	go u.keepLease(lease)
	if h != nil {
		u.h, u.hq, u.hdone = h, make(chan *part, s.o.UploadConcurrency+1), make(chan struct{})
		go u.hashParts()
	}
	return u, nil
}

// keepLease rewrites the lease every LeaseTTL/4 so GC sees a live upload.
// A process that dies stops refreshing and its leftovers become fair game.
func (u *upload) keepLease(body []byte) {
	defer close(u.leaseDone)
	t := time.NewTicker(u.s.o.LeaseTTL / 4)
	defer t.Stop()
	for {
		select {
		case <-u.leaseStop:
			return
		case <-u.ctx.Done():
			return
		case <-t.C:
			// A failed refresh is not fatal: the next may succeed, and the
			// TTL leaves room for three misses.
			u.s.putBytes(u.ctx, "refresh lease", u.s.leaseKey(u.id), body, false)
		}
	}
}

// release ends the lease; done once the upload is published or abandoned.
func (u *upload) release(ctx context.Context) error {
	if u.released {
		return nil
	}
	u.released = true
	close(u.leaseStop)
	<-u.leaseDone
	u.cancel() // nothing of the upload runs any more
	return u.s.deleteObject(ctx, "delete lease", u.s.leaseKey(u.id))
}

func (u *upload) failure() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.err != nil {
		return u.err
	}
	if err := u.ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", u.what, err)
	}
	return nil
}

// Write buffers p into parts, sending each part when it is full. It blocks
// while UploadConcurrency parts are in flight.
func (u *upload) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		if err := u.failure(); err != nil {
			return written, err
		}
		if u.cur == nil {
			b, err := u.buffer()
			if err != nil {
				return written, err
			}
			u.cur = b
		}
		k := copy(u.cur[len(u.cur):cap(u.cur)], p)
		u.cur = u.cur[:len(u.cur)+k]
		p = p[k:]
		written += k
		u.n += int64(k)
		if len(u.cur) == cap(u.cur) {
			if err := u.flush(); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

// ReadFrom reads r straight into part buffers (io.Copy uses it), saving
// a copy through a small intermediate buffer.
func (u *upload) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		if err := u.failure(); err != nil {
			return total, err
		}
		if u.cur == nil {
			b, err := u.buffer()
			if err != nil {
				return total, err
			}
			u.cur = b
		}
		k, err := r.Read(u.cur[len(u.cur):cap(u.cur)])
		u.cur = u.cur[:len(u.cur)+k]
		total += int64(k)
		u.n += int64(k)
		if len(u.cur) == cap(u.cur) {
			if ferr := u.flush(); ferr != nil {
				return total, ferr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// buffer returns an empty part buffer, waiting for a part in flight to
// finish once UploadConcurrency+1 exist.
func (u *upload) buffer() ([]byte, error) {
	select {
	case b := <-u.free:
		return b[:0], nil
	default:
	}
	if u.nbuf < u.s.o.UploadConcurrency+1 {
		u.nbuf++
		return make([]byte, 0, u.s.o.PartSizeBytes), nil
	}
	select {
	case b := <-u.free:
		return b[:0], nil
	case <-u.ctx.Done():
		if err := u.failure(); err != nil {
			return nil, err
		}
		return nil, u.ctx.Err()
	}
}

// flush sends the current part in the background (and hands it to the
// hasher).
func (u *upload) flush() error {
	p := &part{b: u.cur}
	u.cur = nil
	p.refs.Store(1)
	if u.mpID == "" {
		err := u.s.do(u.ctx, "start multipart upload", u.key, func(ctx context.Context) error {
			out, err := u.s.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &u.s.bucket, Key: &u.key})
			if err == nil {
				u.mpID = aws.ToString(out.UploadId)
			}
			return err
		})
		if err != nil {
			u.put(p)
			return u.fail(fmt.Errorf("%s: %w", u.what, err))
		}
	}
	if u.nextPart >= partsMax {
		u.put(p)
		return u.fail(fmt.Errorf("%s: larger than %d parts of %d bytes; raise the part size (?part_size_mib=): %w", u.what, partsMax, u.s.o.PartSizeBytes, teleport.ErrStore))
	}
	if u.h != nil && !u.hashed {
		p.refs.Add(1)
		u.hq <- p // never blocks: the channel holds every buffer there is
	}
	u.nextPart++
	num := u.nextPart
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		defer u.put(p)
		var etag *string
		err := u.s.do(u.ctx, "upload part", u.key, func(ctx context.Context) error {
			out, err := u.s.client.UploadPart(ctx, &s3.UploadPartInput{Bucket: &u.s.bucket, Key: &u.key, UploadId: &u.mpID,
				PartNumber: aws.Int32(num), Body: newBody(p.b), ContentLength: aws.Int64(int64(len(p.b)))}, unsignedPayload)
			if err == nil {
				etag = out.ETag
			}
			return err
		})
		if err != nil {
			u.fail(fmt.Errorf("%s: part %d: %w", u.what, num, err))
			return
		}
		u.mu.Lock()
		u.parts = append(u.parts, types.CompletedPart{ETag: etag, PartNumber: aws.Int32(num)})
		u.mu.Unlock()
	}()
	return nil
}

// fail records the first error and stops the other parts.
func (u *upload) fail(err error) error {
	u.mu.Lock()
	if u.err == nil {
		u.err = err
	}
	err = u.err
	u.mu.Unlock()
	u.cancel()
	return err
}

// wait waits for the parts in flight, or for ctx.
func (u *upload) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { u.wg.Wait(); close(done) }()
	select {
	case <-done:
		return u.failure()
	case <-ctx.Done():
		u.fail(fmt.Errorf("%s: %w", u.what, ctx.Err()))
		<-done
		return u.failure()
	}
}

// complete makes the object exist: the last part and CompleteMultipartUpload,
// or one PUT for an object that fits a part. It does not end the lease.
func (u *upload) complete(ctx context.Context) error {
	if err := u.failure(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", u.what, err)
	}
	if u.mpID == "" {
		if err := u.s.putBytes(ctx, "put", u.key, u.cur, false); err != nil {
			return fmt.Errorf("%s: %w", u.what, err)
		}
		return nil
	}
	if len(u.cur) > 0 {
		if err := u.flush(); err != nil {
			return err
		}
	}
	if err := u.wait(ctx); err != nil {
		return err
	}
	sort.Slice(u.parts, func(i, j int) bool { return *u.parts[i].PartNumber < *u.parts[j].PartNumber })
	attempt := 0
	err := u.s.do(ctx, "complete multipart upload", u.key, func(ctx context.Context) error {
		attempt++
		_, err := u.s.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{Bucket: &u.s.bucket, Key: &u.key,
			UploadId: &u.mpID, MultipartUpload: &types.CompletedMultipartUpload{Parts: u.parts}})
		return err
	})
	if err != nil && attempt > 1 {
		// An earlier attempt may have completed with its answer lost; the
		// upload is then gone and the object is there.
		if code, _ := apiCode(err); code == "NoSuchUpload" {
			if h, herr := u.s.head(ctx, "head", u.key); herr == nil && aws.ToInt64(h.ContentLength) == u.n {
				err = nil
			}
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", u.what, err)
	}
	u.mpID = ""
	return nil
}

// abort stops the parts and discards the multipart upload and the lease.
func (u *upload) abort(ctx context.Context) error {
	u.cancel()
	u.wg.Wait()
	u.stopHasher()
	var errs []error
	if u.mpID != "" {
		err := u.s.do(ctx, "abort multipart upload", u.key, func(ctx context.Context) error {
			_, err := u.s.client.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &u.s.bucket, Key: &u.key, UploadId: &u.mpID})
			return err
		})
		if code, _ := apiCode(err); code != "NoSuchUpload" && err != nil {
			errs = append(errs, err)
		}
		u.mpID = ""
	}
	u.cur = nil
	if err := u.release(ctx); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("abort %s (gc will finish): %w", u.what, errors.Join(errs...))
	}
	return nil
}

// Create starts a package upload. ctx governs the whole upload, since parts
// are sent while the caller writes. The first Create of a Store probes the
// server for conditional writes and refuses to upload where they are
// ignored (see Options.UnsafeNoConditionalPut).
func (s *Store) Create(ctx context.Context, id string) (teleport.Writer, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	if err := s.checkConditionalPut(ctx); err != nil {
		return nil, fmt.Errorf("create package %s: %w", id, err)
	}
	if _, err := s.head(ctx, "create", s.manifestKey(id)); err == nil {
		return nil, fmt.Errorf("create package %s: %w", id, teleport.ErrAlreadyExists)
	} else if !errors.Is(err, teleport.ErrNotFound) {
		return nil, fmt.Errorf("create package %s: %w", id, err)
	}
	up, err := s.startUpload(ctx, "package "+id, newUploadID(), func(up string) string { return s.blobKey(blobRel(id, up)) }, sha256.New())
	if err != nil {
		return nil, err
	}
	return &writer{s: s, id: id, up: up, Writer: chunks.Writer{Space: s.chunks}}, nil
}

type writer struct {
	chunks.Writer
	s    *Store
	id   string
	up   *upload
	mu   sync.Mutex
	done bool
}

func (w *writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return 0, fmt.Errorf("write package %s: %w", w.id, teleport.ErrCommitted)
	}
	return w.up.Write(p)
}

// ReadFrom lets io.Copy fill part buffers directly.
func (w *writer) ReadFrom(r io.Reader) (int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return 0, fmt.Errorf("write package %s: %w", w.id, teleport.ErrCommitted)
	}
	return w.up.ReadFrom(r)
}

// Commit completes the blob, then publishes the manifest with
// If-None-Match: *, so exactly one of several racing uploads of an id wins.
func (w *writer) Commit(ctx context.Context, m *teleport.Package) (err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return fmt.Errorf("commit package %s: %w", w.id, teleport.ErrCommitted)
	}
	w.done = true
	cleanup := context.WithoutCancel(ctx)
	blobDone := false
	defer func() {
		if err == nil {
			return
		}
		if blobDone {
			w.s.deleteObject(cleanup, "delete blob", w.up.key)
		}
		w.up.abort(cleanup)
		w.Writer.Abort(cleanup)
	}()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	n, sum := w.up.digest()
	if m.ID == "" {
		m.ID = w.id
	}
	if m.ID != w.id {
		return fmt.Errorf("commit package %s: manifest names %s: %w", w.id, m.ID, teleport.ErrInvalidPackage)
	}
	if (m.SizeBytes != 0 && m.SizeBytes != n) || (m.BlobSHA256 != "" && m.BlobSHA256 != sum) {
		return fmt.Errorf("commit package %s: wrote %d bytes sha256 %s, manifest expects %d bytes %s: %w", w.id, n, sum, m.SizeBytes, m.BlobSHA256, teleport.ErrChecksumMismatch)
	}
	m.SizeBytes, m.BlobSHA256 = n, sum
	// The chunks are durable before the manifest refers to them.
	if err := w.Seal(ctx, m, n); err != nil {
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	// After the store's own fields, so that the sections are checked
	// against the bytes actually uploaded.
	if err := m.Validate(); err != nil {
		return err
	}
	rel := blobRel(w.id, w.up.id)
	body, err := json.Marshal(manifestObject{Format: manifestFormat, Blob: rel, Package: m})
	if err != nil {
		return fmt.Errorf("commit package %s: %v: %w", w.id, err, teleport.ErrInvalidPackage)
	}
	if err := w.up.complete(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	blobDone = true

	// The chunk rule's last check comes just before the package appears.
	if err := w.CheckDeadline(); err != nil {
		return fmt.Errorf("commit package %s: %w", w.id, err)
	}
	perr := w.s.putBytes(ctx, "publish manifest", w.s.manifestKey(w.id), body, true)
	if perr == nil {
		w.up.release(cleanup)
		return nil
	}
	// A 412 may be our own earlier attempt whose answer was lost, and any
	// other failure may have taken effect: the manifest says who won.
	mo, gerr := w.s.getManifest(cleanup, w.id)
	switch {
	case gerr == nil && mo.Blob == rel:
		w.up.release(cleanup)
		return nil
	case gerr == nil || errors.Is(perr, teleport.ErrAlreadyExists):
		return fmt.Errorf("commit package %s: another upload published it first: %w", w.id, teleport.ErrAlreadyExists)
	case errors.Is(gerr, teleport.ErrNotFound):
		return fmt.Errorf("commit package %s: %w", w.id, perr)
	}
	// Unknown outcome: the manifest may yet appear and point at our blob,
	// so keep the blob; GC removes it later if nothing refers to it.
	blobDone = false
	w.up.mpID = ""
	return fmt.Errorf("commit package %s: outcome unknown (%v): %w", w.id, gerr, perr)
}

func (w *writer) Abort(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return nil
	}
	w.done = true
	err := w.up.abort(ctx)
	if cerr := w.Writer.Abort(ctx); err == nil {
		err = cerr
	}
	return err
}
