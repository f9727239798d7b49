package s3

import (
	"context"
	"errors"
	"fmt"

	"github.com/kelpie/teleport"
)

// ErrNoConditionalPut marks a server that ignores If-None-Match on PUT:
// publishing there cannot stop two uploads of one id from both "winning",
// the last silently replacing the first. It always comes wrapped together
// with teleport.ErrStore.
var ErrNoConditionalPut = errors.New("S3 server ignores conditional writes")

// conditional remembers whether the server honours If-None-Match, once a
// probe has found out. Only a verdict is remembered: a probe the server
// failed to answer is tried again at the next Create.
type conditional struct {
	sem     chan struct{} // one probe at a time; guards the fields below
	known   bool
	refusal error // nil: honoured
}

// checkConditionalPut makes sure, before the first upload through this
// Store, that the server refuses to overwrite an object under
// If-None-Match: *, which is all that stands between two hosts and a doubly
// published id. It costs one probe (three requests) per Store.
func (s *Store) checkConditionalPut(ctx context.Context) error {
	if s.o.UnsafeNoConditionalPut {
		return nil
	}
	select {
	case s.cond.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("s3 probe for conditional writes: %w", ctx.Err())
	}
	defer func() { <-s.cond.sem }()
	if s.cond.known {
		return s.cond.refusal
	}
	honoured, err := s.probeConditionalPut(ctx)
	if err != nil {
		return err
	}
	s.cond.known = true
	if !honoured {
		s.cond.refusal = fmt.Errorf("s3 store s3://%s/%s on %s: the server ignores If-None-Match, so two hosts publishing one package id would silently overwrite each other; "+
			"use a server with conditional writes, or accept that risk with ?unsafe_no_conditional_put=true (KELPIE_S3_UNSAFE_NO_CONDITIONAL_PUT=1): %w: %w",
			s.bucket, s.prefix, s.endpointName(), ErrNoConditionalPut, teleport.ErrStore)
	}
	return s.cond.refusal
}

// probeConditionalPut creates a scratch object with If-None-Match: *, then
// tries to create it again the same way: a server that honours the
// condition refuses (412), one that ignores it overwrites. The scratch
// object is deleted after; should that fail, GC removes it later.
func (s *Store) probeConditionalPut(ctx context.Context) (honoured bool, err error) {
	key := s.scratchKey("conditional-put")
	err = s.putBytes(ctx, "probe conditional put", key, []byte("first"), true)
	// The key is new, so a 412 here is our own earlier attempt, landed
	// with its answer lost.
	if err != nil && !errors.Is(err, teleport.ErrAlreadyExists) {
		return false, err
	}
	defer s.deleteObject(context.WithoutCancel(ctx), "delete conditional put probe", key)
	err = s.putBytes(ctx, "probe conditional put", key, []byte("second"), true)
	switch {
	case errors.Is(err, teleport.ErrAlreadyExists):
		return true, nil
	case err == nil:
		return false, nil
	}
	return false, err
}
