package s3

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/chunks"
)

// bucket is the chunk space's view of the store: objects under
// PREFIX/chunks/. A pack streams as a multipart upload with a lease of its
// own, like a package's body, so GC of dead uploads covers it too.
type bucket struct{ s *Store }

var _ chunks.Bucket = bucket{}

func (b bucket) key(k string) string { return b.s.prefix + "chunks/" + k }

func (b bucket) Put(ctx context.Context, key string, data []byte) error {
	return b.s.putBytes(ctx, "put", b.key(key), data, false)
}

type packWriter struct{ u *upload }

func (b bucket) Create(ctx context.Context, key string) (chunks.ObjectWriter, error) {
	k := b.key(key)
	u, err := b.s.startUpload(ctx, "chunk object "+key, newUploadID(), func(string) string { return k }, nil)
	if err != nil {
		return nil, err
	}
	return packWriter{u}, nil
}

func (w packWriter) Write(p []byte) (int, error) { return w.u.Write(p) }

func (w packWriter) Close(ctx context.Context) error {
	if err := w.u.complete(ctx); err != nil {
		w.u.abort(context.WithoutCancel(ctx))
		return err
	}
	// The object is complete; a lease left behind only expires.
	w.u.release(context.WithoutCancel(ctx))
	return nil
}

func (w packWriter) Abort(ctx context.Context) error { return w.u.abort(ctx) }

func (b bucket) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	return b.s.getSmall(ctx, "get", b.key(key), limit)
}

func (b bucket) ReadAt(ctx context.Context, key string, p []byte, off int64) error {
	return b.s.getRange(ctx, b.key(key), p, off)
}

func (b bucket) List(ctx context.Context, prefix string) ([]chunks.Object, error) {
	base := b.key("")
	var out []chunks.Object
	err := b.s.listObjects(ctx, b.key(prefix), func(o types.Object) error {
		var mod time.Time
		if o.LastModified != nil {
			mod = *o.LastModified
		}
		out = append(out, chunks.Object{Key: strings.TrimPrefix(aws.ToString(o.Key), base), Size: aws.ToInt64(o.Size), ModTime: mod})
		return nil
	})
	return out, err
}

func (b bucket) Delete(ctx context.Context, key string) error {
	err := b.s.deleteObject(ctx, "delete", b.key(key))
	if errors.Is(err, teleport.ErrNotFound) {
		return nil
	}
	return err
}

// Now is the server's clock, the one that stamps LastModified.
func (b bucket) Now(ctx context.Context) (time.Time, error) { return b.s.serverNow(ctx) }

// OpenChunks gives access to a committed package's chunks.
func (s *Store) OpenChunks(ctx context.Context, pkg *teleport.Package) (teleport.ChunkReader, error) {
	return s.chunks.Open(ctx, pkg.ChunkPacks)
}

// gcChunks runs the chunk space's rule over the packs the manifests list.
func (s *Store) gcChunks(ctx context.Context) (int, error) {
	return s.chunks.GC(ctx, func(ctx context.Context) (map[string]bool, error) {
		pkgs, err := s.List(ctx)
		if err != nil {
			return nil, err
		}
		return chunks.Referenced(pkgs), nil
	})
}
