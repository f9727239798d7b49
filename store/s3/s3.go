// Package s3 is the teleport package store on S3-compatible object storage
// (AWS S3, Cloudflare R2, GCS's S3 API, MinIO, SeaweedFS), so that every host
// reaches the same packages.
//
// Layout under s3://BUCKET/PREFIX/:
//
//	manifests/<id>.json    the publish point: written last, with If-None-Match: *
//	blobs/<id>/<upload>    the body, its sections back to back (one object per upload attempt)
//	uploads/<upload>.json  a lease an upload refreshes while it is alive
//	chunks/                the chunk space (store/chunks): packs/<name>.pack and .idx, dead/<name>
//	scratch/<what>-<rand>  short-lived probe objects (the server's clock, conditional writes)
//
// A package is visible only once its manifest exists, and the manifest is
// put conditionally, so two hosts can never both publish one id. Not every
// S3-compatible server honours the condition, so the first Create of a
// Store checks that the server does (see checkConditionalPut). Uploads
// that die leave only blobs nobody references and multipart uploads nobody
// completes; GC removes them once their lease has expired.
//
// The store streams both ways: a Writer buffers at most
// UploadConcurrency+1 parts, a Reader at most ReadAheadChunks+1 chunks. It
// must never hold a whole blob in memory, make a package visible before
// its blob is complete, or overwrite a published manifest.
package s3

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

// Defaults. A part or chunk buffer is the unit of memory: an upload holds
// (UploadConcurrency+1) parts, a reader (ReadAheadChunks+1) chunks.
const (
	partSizeDefaultBytes     = 8 << 20
	partSizeMinBytes         = 5 << 20 // S3's floor for every part but the last
	partsMax                 = 10000   // S3's ceiling per multipart upload
	uploadConcurrencyDefault = 4
	readChunkDefaultBytes    = 8 << 20
	readAheadDefaultChunks   = 4
	attemptsDefault          = 6
	backoffBaseDefault       = 100 * time.Millisecond
	backoffMaxDefault        = 5 * time.Second
	leaseTTLDefault          = 2 * time.Minute
	responseHeaderTimeout    = 2 * time.Minute
	manifestMaxBytes         = 64 << 20
	listConcurrency          = 8
	manifestFormat           = "kelpie-s3-manifest/1"
	// chunkSpanBytes bounds one ranged read of a chunk pack: small enough
	// that fetching one span overlaps decoding another.
	chunkSpanBytes = 2 << 20
	scratchDir     = "scratch/"
	// A probe object lives for a few requests; GC leaves younger ones
	// alone however short LeaseTTL is, so it never pulls one from under a
	// probe still running (or retrying).
	scratchAgeMin = time.Hour
)

// Options configure a Store. Zero values take the defaults above.
type Options struct {
	Bucket string
	// Prefix is the key prefix all objects live under ("" or "team/a").
	Prefix string
	// Endpoint is the S3 API URL for anything but AWS ("http://127.0.0.1:8333").
	Endpoint string
	// Region; empty takes the AWS chain's (AWS_REGION, profile), then
	// us-east-1 when Endpoint is set.
	Region string
	// PathStyle addresses buckets as ENDPOINT/BUCKET/KEY (MinIO, SeaweedFS)
	// instead of BUCKET.ENDPOINT/KEY.
	PathStyle bool

	PartSizeBytes     int64 // multipart part size
	UploadConcurrency int   // parts in flight per upload
	ReadChunkBytes    int64 // read-ahead unit of a sequential reader
	ReadAheadChunks   int   // chunks fetched ahead of a sequential reader

	MaxAttempts int           // per request, the first included
	BackoffBase time.Duration // first retry waits up to this (full jitter)
	BackoffMax  time.Duration

	// LeaseTTL: an upload whose lease is older than this is dead and GC
	// removes what it left. Live uploads refresh their lease every TTL/4.
	LeaseTTL time.Duration

	// NoFullReadVerify turns off the reader's check of the whole blob's
	// SHA-256 when it has been read sequentially from start to end.
	NoFullReadVerify bool

	// ChunkGrace is the chunk space's grace period (chunks.GraceDefault).
	ChunkGrace time.Duration
	// ChunkClock is the uploaders' clock for the chunk rule's deadline
	// (default: the system's; tests move it).
	ChunkClock func() time.Time

	// UnsafeNoConditionalPut lets Create upload to a server that ignores
	// If-None-Match (which the first Create otherwise probes for and
	// refuses). Unsafe: two hosts publishing one id then both succeed, and
	// the last silently replaces the first's package. Only for a store
	// that a single writer uses.
	UnsafeNoConditionalPut bool

	// HTTPClient and Credentials replace the SDK's (tests); Credentials nil
	// means the standard AWS chain: environment, shared config, SSO, ...
	HTTPClient  *http.Client
	Credentials aws.CredentialsProvider
}

// Store is a teleport.Store on an S3 bucket. Safe for concurrent use.
type Store struct {
	client   *s3.Client
	bucket   string
	prefix   string // "" or ends in "/"
	endpoint string
	region   string
	o        Options

	rmu sync.Mutex
	rnd *mrand.Rand // backoff jitter only

	cond conditional // does the server honour If-None-Match?

	chunks *chunks.Space

	attempts atomic.Int64 // requests sent, retries included (tests)
	retries  atomic.Int64
}

var (
	_ teleport.ChunkStore       = (*Store)(nil)
	_ teleport.GarbageCollector = (*Store)(nil)
)

// New returns a store for o. It sends no request; the first Create probes
// the server (see Options.UnsafeNoConditionalPut).
func New(ctx context.Context, o Options) (*Store, error) {
	if err := validBucket(o.Bucket); err != nil {
		return nil, err
	}
	prefix, err := cleanPrefix(o.Prefix)
	if err != nil {
		return nil, err
	}
	if o.Endpoint != "" {
		u, err := url.Parse(o.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("s3 endpoint %q: want http(s)://HOST[:PORT]: %w", o.Endpoint, teleport.ErrInvalidStore)
		}
	}
	setDefaults(&o)
	if o.PartSizeBytes < partSizeMinBytes {
		return nil, fmt.Errorf("s3 part size %d bytes: S3 needs at least %d: %w", o.PartSizeBytes, partSizeMinBytes, teleport.ErrInvalidStore)
	}

	hc := o.HTTPClient
	var httpClient config.HTTPClient = hc
	if hc == nil {
		httpClient = awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
			t.ResponseHeaderTimeout = responseHeaderTimeout
			// Parts and chunks in flight, plus control requests.
			t.MaxIdleConnsPerHost = max(o.UploadConcurrency, o.ReadAheadChunks) + listConcurrency
		})
	}
	loads := []func(*config.LoadOptions) error{
		config.WithHTTPClient(httpClient),
		// Retries are ours (see do): they also cover a body cut mid-read.
		config.WithRetryer(func() aws.Retryer { return aws.NopRetryer{} }),
		// Checksums only where S3 demands them: the whole-blob SHA-256 in
		// the manifest and the per-section ones cover integrity end to end,
		// and trailing checksums need aws-chunked encoding some servers lack.
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	}
	if o.Region != "" {
		loads = append(loads, config.WithRegion(o.Region))
	}
	if o.Credentials != nil {
		loads = append(loads, config.WithCredentialsProvider(o.Credentials))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loads...)
	if err != nil {
		return nil, fmt.Errorf("s3 store: load AWS configuration: %v: %w", err, teleport.ErrStore)
	}
	if cfg.Region == "" {
		if o.Endpoint == "" {
			return nil, fmt.Errorf("s3 store: no region: set AWS_REGION, KELPIE_S3_REGION or ?region= in the store URL: %w", teleport.ErrStore)
		}
		cfg.Region = "us-east-1" // what S3-compatible servers expect by default
	}
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
		}
		so.UsePathStyle = o.PathStyle
	})
	var seed [16]byte
	rand.Read(seed[:])
	s := &Store{
		client: client, bucket: o.Bucket, prefix: prefix, endpoint: o.Endpoint, region: cfg.Region, o: o,
		rnd:  mrand.New(mrand.NewPCG(beUint64(seed[:8]), beUint64(seed[8:]))),
		cond: conditional{sem: make(chan struct{}, 1)},
	}
	s.chunks = chunks.New(bucket{s}, chunks.Options{Grace: o.ChunkGrace, Clock: o.ChunkClock, ReadWorkers: o.ReadAheadChunks, ReadSpanBytes: chunkSpanBytes})
	return s, nil
}

func setDefaults(o *Options) {
	if o.PartSizeBytes == 0 {
		o.PartSizeBytes = partSizeDefaultBytes
	}
	if o.UploadConcurrency <= 0 {
		o.UploadConcurrency = uploadConcurrencyDefault
	}
	if o.ReadChunkBytes <= 0 {
		o.ReadChunkBytes = readChunkDefaultBytes
	}
	if o.ReadAheadChunks <= 0 {
		o.ReadAheadChunks = readAheadDefaultChunks
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = attemptsDefault
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = backoffBaseDefault
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = backoffMaxDefault
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = leaseTTLDefault
	}
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

// validBucket checks the rules every S3 flavour shares, so that a typo
// fails here with a clear message rather than as a signature error.
func validBucket(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("s3 bucket %q: must be 3..63 characters: %w", b, teleport.ErrInvalidStore)
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("s3 bucket %q: use lowercase letters, digits, '-', '.', '_': %w", b, teleport.ErrInvalidStore)
		}
	}
	return nil
}

func cleanPrefix(p string) (string, error) {
	p = strings.Trim(p, "/")
	if p == "" {
		return "", nil
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return "", fmt.Errorf("s3 prefix %q: empty, '.' or '..' segment: %w", p, teleport.ErrInvalidStore)
		}
	}
	return p + "/", nil
}

// ParseURL reads
// s3://BUCKET[/PREFIX][?endpoint=URL&region=R&path_style=BOOL&part_size_mib=N&concurrency=N&unsafe_no_conditional_put=BOOL]
// and fills what the URL leaves out from getenv: KELPIE_S3_ENDPOINT,
// KELPIE_S3_REGION, KELPIE_S3_PATH_STYLE, KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT.
// Path style defaults to on when an endpoint is set (S3-compatible
// servers), off for AWS. unsafe_no_conditional_put sets
// Options.UnsafeNoConditionalPut: read its warning first.
func ParseURL(raw string, getenv func(string) string) (Options, error) {
	var o Options
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "s3" {
		return o, fmt.Errorf("store %q: want s3://BUCKET/PREFIX: %w", raw, teleport.ErrInvalidStore)
	}
	if u.User != nil || u.Fragment != "" {
		return o, fmt.Errorf("store %q: credentials or fragments do not belong in the URL (use the AWS environment or profile): %w", raw, teleport.ErrInvalidStore)
	}
	o.Bucket = u.Host
	o.Prefix = u.Path
	if err := validBucket(o.Bucket); err != nil {
		return o, err
	}
	if _, err := cleanPrefix(o.Prefix); err != nil {
		return o, err
	}
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	q := u.Query()
	for k := range q {
		switch k {
		case "endpoint", "region", "path_style", "part_size_mib", "concurrency", "unsafe_no_conditional_put":
		default:
			return o, fmt.Errorf("store %q: unknown parameter %q (know endpoint, region, path_style, part_size_mib, concurrency, unsafe_no_conditional_put): %w", raw, k, teleport.ErrInvalidStore)
		}
	}
	pick := func(param, env string) string {
		if v := q.Get(param); v != "" {
			return v
		}
		return getenv(env)
	}
	o.Endpoint = pick("endpoint", "KELPIE_S3_ENDPOINT")
	o.Region = pick("region", "KELPIE_S3_REGION")
	o.PathStyle = o.Endpoint != ""
	if v := pick("path_style", "KELPIE_S3_PATH_STYLE"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return o, fmt.Errorf("store %q: path_style %q is not a boolean: %w", raw, v, teleport.ErrInvalidStore)
		}
		o.PathStyle = b
	}
	if v := pick("unsafe_no_conditional_put", "KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return o, fmt.Errorf("store %q: unsafe_no_conditional_put %q is not a boolean: %w", raw, v, teleport.ErrInvalidStore)
		}
		o.UnsafeNoConditionalPut = b
	}
	if v := q.Get("part_size_mib"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < partSizeMinBytes>>20 || n > 5<<10 {
			return o, fmt.Errorf("store %q: part_size_mib %q: want %d..5120: %w", raw, v, partSizeMinBytes>>20, teleport.ErrInvalidStore)
		}
		o.PartSizeBytes = int64(n) << 20
	}
	if v := q.Get("concurrency"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 64 {
			return o, fmt.Errorf("store %q: concurrency %q: want 1..64: %w", raw, v, teleport.ErrInvalidStore)
		}
		o.UploadConcurrency, o.ReadAheadChunks = n, n
	}
	return o, nil
}

// Bucket and Prefix say where the store lives.
func (s *Store) Bucket() string { return s.bucket }

// Prefix is "" or ends in "/".
func (s *Store) Prefix() string { return s.prefix }

func (s *Store) endpointName() string {
	if s.endpoint != "" {
		return s.endpoint
	}
	return "S3 (" + s.region + ")"
}

func (s *Store) manifestKey(id string) string { return s.prefix + "manifests/" + id + ".json" }
func (s *Store) blobKey(rel string) string    { return s.prefix + rel }
func (s *Store) leaseKey(up string) string    { return s.prefix + "uploads/" + up + ".json" }
func blobRel(id, up string) string            { return "blobs/" + id + "/" + up }

// scratchKey names a new probe object; GC removes any left behind.
func (s *Store) scratchKey(what string) string {
	return s.prefix + scratchDir + what + "-" + newUploadID()
}

// newUploadID names one upload attempt; it only has to be unique.
func newUploadID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// do runs one request with retries: throttling, 5xx and broken connections
// back off (full jitter, capped) and try again while ctx allows.
func (s *Store) do(ctx context.Context, op, key string, f func(ctx context.Context) error) error {
	for attempt := 1; ; attempt++ {
		s.attempts.Add(1)
		err := f(ctx)
		if err == nil {
			return nil
		}
		if !retryable(err) || attempt >= s.o.MaxAttempts || ctx.Err() != nil {
			return s.wrap(op, key, attempt, err)
		}
		s.retries.Add(1)
		if werr := s.backoff(ctx, attempt); werr != nil {
			return s.wrap(op, key, attempt, fmt.Errorf("%w while retrying after: %v", werr, firstLine(err)))
		}
	}
}

func (s *Store) backoff(ctx context.Context, attempt int) error {
	ceil := s.o.BackoffBase << min(attempt-1, 20)
	if ceil > s.o.BackoffMax || ceil <= 0 {
		ceil = s.o.BackoffMax
	}
	s.rmu.Lock()
	d := time.Duration(s.rnd.Int64N(int64(ceil))) + ceil/10
	s.rmu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// putBytes writes a whole object from memory (retryable: the body rewinds).
func (s *Store) putBytes(ctx context.Context, op, key string, b []byte, ifNoneMatch bool) error {
	return s.do(ctx, op, key, func(ctx context.Context) error {
		in := &s3.PutObjectInput{Bucket: &s.bucket, Key: &key, Body: newBody(b), ContentLength: aws.Int64(int64(len(b)))}
		if ifNoneMatch {
			in.IfNoneMatch = aws.String("*")
		}
		_, err := s.client.PutObject(ctx, in, unsignedPayload)
		return err
	})
}

// getSmall reads a whole small object (a manifest, a lease).
func (s *Store) getSmall(ctx context.Context, op, key string, limit int64) ([]byte, error) {
	var out []byte
	err := s.do(ctx, op, key, func(ctx context.Context) error {
		res, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &key})
		if err != nil {
			return err
		}
		defer res.Body.Close()
		out, err = io.ReadAll(io.LimitReader(res.Body, limit+1))
		if err != nil {
			return err
		}
		if int64(len(out)) > limit {
			return fmt.Errorf("object larger than %d bytes: %w", limit, teleport.ErrInvalidPackage)
		}
		return nil
	})
	return out, err
}

func (s *Store) deleteObject(ctx context.Context, op, key string) error {
	return s.do(ctx, op, key, func(ctx context.Context) error {
		_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &s.bucket, Key: &key})
		return err
	})
}

func (s *Store) head(ctx context.Context, op, key string) (*s3.HeadObjectOutput, error) {
	var out *s3.HeadObjectOutput
	err := s.do(ctx, op, key, func(ctx context.Context) error {
		var err error
		out, err = s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.bucket, Key: &key})
		return err
	})
	return out, err
}

// listObjects calls fn for every object under prefix, in key order.
func (s *Store) listObjects(ctx context.Context, prefix string, fn func(types.Object) error) error {
	var token *string
	for {
		var page *s3.ListObjectsV2Output
		err := s.do(ctx, "list", prefix, func(ctx context.Context) error {
			var err error
			page, err = s.client.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &s.bucket, Prefix: &prefix, ContinuationToken: token})
			return err
		})
		if err != nil {
			return err
		}
		for _, o := range page.Contents {
			if err := fn(o); err != nil {
				return err
			}
		}
		if !aws.ToBool(page.IsTruncated) || page.NextContinuationToken == nil {
			return nil
		}
		token = page.NextContinuationToken
	}
}

// manifestObject is what manifests/<id>.json holds.
type manifestObject struct {
	Format string `json:"format"`
	// Blob is the blob's key relative to the prefix, so a prefix can be
	// copied elsewhere whole.
	Blob    string            `json:"blob"`
	Package *teleport.Package `json:"package"`
}

func (s *Store) getManifest(ctx context.Context, id string) (*manifestObject, error) {
	b, err := s.getSmall(ctx, "get manifest", s.manifestKey(id), manifestMaxBytes)
	if err != nil {
		if errors.Is(err, teleport.ErrNotFound) {
			return nil, fmt.Errorf("package %s: %w", id, teleport.ErrNotFound)
		}
		return nil, err
	}
	var mo manifestObject
	if err := json.Unmarshal(b, &mo); err != nil {
		return nil, fmt.Errorf("package %s: manifest is not valid JSON (%v): %w", id, err, teleport.ErrInvalidPackage)
	}
	if mo.Format != manifestFormat || mo.Package == nil || mo.Package.ID != id || !strings.HasPrefix(mo.Blob, "blobs/"+id+"/") {
		return nil, fmt.Errorf("package %s: manifest object %s is not a %s manifest of this package: %w", id, s.manifestKey(id), manifestFormat, teleport.ErrInvalidPackage)
	}
	return &mo, nil
}

// Stat returns a committed package's manifest.
func (s *Store) Stat(ctx context.Context, id string) (*teleport.Package, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	mo, err := s.getManifest(ctx, id)
	if err != nil {
		return nil, err
	}
	return mo.Package, nil
}

// List returns every committed package's manifest, sorted by id. Manifests
// are fetched a few at a time in parallel.
func (s *Store) List(ctx context.Context) ([]*teleport.Package, error) {
	dir := s.prefix + "manifests/"
	var ids []string
	err := s.listObjects(ctx, dir, func(o types.Object) error {
		name := strings.TrimPrefix(aws.ToString(o.Key), dir)
		if id, ok := strings.CutSuffix(name, ".json"); ok && teleport.ValidateID(id) == nil {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(ids)
	got := make([]*teleport.Package, len(ids))
	errs := make([]error, len(ids))
	sem := make(chan struct{}, listConcurrency)
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			got[i], errs[i] = s.Stat(ctx, id)
		}()
	}
	wg.Wait()
	out := []*teleport.Package{}
	for i := range ids {
		switch {
		case errors.Is(errs[i], teleport.ErrNotFound): // deleted meanwhile
		case errs[i] != nil:
			return nil, errs[i]
		default:
			out = append(out, got[i])
		}
	}
	return out, nil
}

// Delete unpublishes a package (its manifest goes first, so it vanishes
// from view at once), then removes its blob.
func (s *Store) Delete(ctx context.Context, id string) error {
	if err := teleport.ValidateID(id); err != nil {
		return err
	}
	mo, err := s.getManifest(ctx, id)
	if err != nil {
		return err
	}
	if err := s.deleteObject(ctx, "delete manifest", s.manifestKey(id)); err != nil {
		return err
	}
	if err := s.deleteObject(ctx, "delete blob", s.blobKey(mo.Blob)); err != nil {
		return fmt.Errorf("package %s unpublished, its blob left for gc: %w", id, err)
	}
	return nil
}

// Open returns random access to a committed package's blob.
func (s *Store) Open(ctx context.Context, id string) (teleport.Reader, error) {
	if err := teleport.ValidateID(id); err != nil {
		return nil, err
	}
	mo, err := s.getManifest(ctx, id)
	if err != nil {
		return nil, err
	}
	want := mo.Package.BlobSHA256
	if s.o.NoFullReadVerify {
		want = ""
	}
	return s.newReader(ctx, s.blobKey(mo.Blob), mo.Package.SizeBytes, want), nil
}
