package s3

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kelpie/teleport"
)

// GC removes what dead uploads left behind: multipart uploads never
// completed and blobs no manifest refers to; then it runs the chunk
// space's rule (teleport.ChunkID) over the packs the manifests list. An upload is dead when its
// lease is older than LeaseTTL by the server's clock (hosts' clocks are
// never compared). Expired leases and stale probe objects are removed too
// but not counted. GC never probes for conditional writes: it publishes
// nothing.
//
// The order matters: leases are listed before manifests, so an upload that
// publishes while GC runs is seen either as live or as published.
func (s *Store) GC(ctx context.Context) (int, error) {
	now, err := s.serverNow(ctx)
	if err != nil {
		return 0, fmt.Errorf("gc: %w", err)
	}
	cutoff := now.Add(-s.o.LeaseTTL)
	recent := func(t *time.Time) bool { return t == nil || !t.Before(cutoff) }

	live := map[string]bool{} // object keys of live uploads
	var expired []string
	err = s.listObjects(ctx, s.prefix+"uploads/", func(o types.Object) error {
		key := aws.ToString(o.Key)
		if !recent(o.LastModified) {
			expired = append(expired, key)
			return nil
		}
		b, err := s.getSmall(ctx, "get lease", key, 1<<16)
		if errors.Is(err, teleport.ErrNotFound) {
			return nil // released meanwhile
		}
		if err != nil {
			return err
		}
		var l leaseObject
		if json.Unmarshal(b, &l) == nil && l.Key != "" {
			live[l.Key] = true
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("gc: %w", err)
	}

	referenced := map[string]bool{}
	unreadable := map[string]bool{} // ids whose manifest is damaged: keep all their blobs
	mdir := s.prefix + "manifests/"
	err = s.listObjects(ctx, mdir, func(o types.Object) error {
		id, ok := strings.CutSuffix(strings.TrimPrefix(aws.ToString(o.Key), mdir), ".json")
		if !ok || teleport.ValidateID(id) != nil {
			return nil
		}
		mo, err := s.getManifest(ctx, id)
		switch {
		case err == nil:
			referenced[s.blobKey(mo.Blob)] = true
		case errors.Is(err, teleport.ErrNotFound):
		case errors.Is(err, teleport.ErrInvalidPackage):
			unreadable[id] = true
		default:
			return err
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("gc: %w", err)
	}

	removed := 0
	n, err := s.abortStaleUploads(ctx, live, recent)
	removed += n
	if err != nil {
		return removed, fmt.Errorf("gc: %w", err)
	}

	bdir := s.prefix + "blobs/"
	var orphans []string
	err = s.listObjects(ctx, bdir, func(o types.Object) error {
		key := aws.ToString(o.Key)
		id, _, _ := strings.Cut(strings.TrimPrefix(key, bdir), "/")
		if referenced[key] || live[key] || unreadable[id] || recent(o.LastModified) {
			return nil
		}
		orphans = append(orphans, key)
		return nil
	})
	if err != nil {
		return removed, fmt.Errorf("gc: %w", err)
	}
	for _, key := range orphans {
		if err := s.deleteObject(ctx, "gc delete blob", key); err != nil {
			return removed, fmt.Errorf("gc: %w", err)
		}
		removed++
	}
	for _, key := range expired {
		if err := s.deleteObject(ctx, "gc delete lease", key); err != nil {
			return removed, fmt.Errorf("gc: %w", err)
		}
	}
	if err := s.removeStaleScratch(ctx, now); err != nil {
		return removed, fmt.Errorf("gc: %w", err)
	}
	n, err = s.gcChunks(ctx)
	return removed + n, err
}

// removeStaleScratch removes probe objects whose probe died before it could
// delete them. They are not counted: they are not uploads.
func (s *Store) removeStaleScratch(ctx context.Context, now time.Time) error {
	cutoff := now.Add(-max(s.o.LeaseTTL, scratchAgeMin))
	var stale []string
	err := s.listObjects(ctx, s.prefix+scratchDir, func(o types.Object) error {
		if o.LastModified != nil && o.LastModified.Before(cutoff) {
			stale = append(stale, aws.ToString(o.Key))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, key := range stale {
		if err := s.deleteObject(ctx, "gc delete scratch", key); err != nil {
			return err
		}
	}
	return nil
}

// abortStaleUploads aborts multipart uploads under the prefix that no live
// lease covers and that are older than the TTL.
func (s *Store) abortStaleUploads(ctx context.Context, live map[string]bool, recent func(*time.Time) bool) (int, error) {
	type mp struct{ key, id string }
	var stale []mp
	var keyMarker, idMarker *string
	for {
		var page *s3.ListMultipartUploadsOutput
		err := s.do(ctx, "list multipart uploads", s.prefix, func(ctx context.Context) error {
			var err error
			page, err = s.client.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: &s.bucket, Prefix: aws.String(s.prefix),
				KeyMarker: keyMarker, UploadIdMarker: idMarker})
			return err
		})
		if err != nil {
			return 0, err
		}
		for _, u := range page.Uploads {
			key := aws.ToString(u.Key)
			if !strings.HasPrefix(key, s.prefix) || live[key] || recent(u.Initiated) {
				continue
			}
			stale = append(stale, mp{key, aws.ToString(u.UploadId)})
		}
		if !aws.ToBool(page.IsTruncated) || (page.NextKeyMarker == nil && page.NextUploadIdMarker == nil) {
			break
		}
		keyMarker, idMarker = page.NextKeyMarker, page.NextUploadIdMarker
	}
	removed := 0
	for _, u := range stale {
		err := s.do(ctx, "gc abort multipart upload", u.key, func(ctx context.Context) error {
			_, err := s.client.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &s.bucket, Key: aws.String(u.key), UploadId: aws.String(u.id)})
			return err
		})
		if code, _ := apiCode(err); err != nil && code != "NoSuchUpload" {
			return removed, err
		}
		removed++
	}
	return removed, nil
}

// serverNow is the server's idea of the time: the modification time of a
// probe object written now. Leases are judged by the same clock that
// stamped them.
func (s *Store) serverNow(ctx context.Context) (time.Time, error) {
	key := s.scratchKey("clock")
	if err := s.putBytes(ctx, "put clock probe", key, nil, false); err != nil {
		return time.Time{}, err
	}
	h, err := s.head(ctx, "head clock probe", key)
	derr := s.deleteObject(context.WithoutCancel(ctx), "delete clock probe", key)
	if err != nil {
		return time.Time{}, err
	}
	if derr != nil {
		return time.Time{}, derr
	}
	if h.LastModified == nil {
		return time.Time{}, fmt.Errorf("s3 head %s/%s: no Last-Modified: %w", s.bucket, key, teleport.ErrStore)
	}
	// Last-Modified has whole seconds on both sides, so ages are off by
	// under a second; LeaseTTL is minutes.
	return *h.LastModified, nil
}
