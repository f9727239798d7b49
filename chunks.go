package teleport

import (
	"context"
	"encoding/hex"
	"fmt"
)

// The chunk space: content-addressed chunks kept by a store and shared by
// every package in it. A package in the compact format (KLP1 version 2)
// refers to its chunks by id instead of carrying them, so a second teleport
// of the same VM, or a teleport of another VM booted from the same image,
// uploads only the chunks the store does not hold yet. Every package refers
// directly to all of its chunks: there is no parent chain to resolve.
//
// The store treats chunks as opaque: an id, the stored bytes and a
// ChunkInfo it keeps for the blob format. A store with a chunk space is a
// ChunkStore, and the Writers it creates are ChunkWriters.
//
// # The GC rule
//
// Uploads and GC never coordinate through locks; one rule makes it
// impossible to collect a chunk that an in-flight upload found present and
// relies on. With G the store's grace period:
//
//  1. GC first reads the store's clock (now), then every committed
//     manifest. A chunk no committed package refers to is only condemned,
//     visibly to uploads, and only once it is older than G.
//  2. An upload treats a condemned chunk as absent: it uploads its own
//     copy rather than rely on it.
//  3. GC removes a chunk only when it has been condemned for at least G
//     and the manifests read after "now" still do not refer to it; a
//     condemned chunk that a package refers to again is acquitted.
//  4. An upload commits within G/2 of its first look at the chunk space,
//     by its own clock, or its commit fails and nothing becomes visible.
//
// An upload that found chunk c present looked before c was condemned (2),
// so it commits before G/2 after the condemnation; the GC run that could
// remove c starts at least G after it (3) and so reads the committed
// manifest, which refers to c. The chunks an upload adds itself are
// younger than G until after its commit, so they cannot be condemned
// before it (1). Chunks go in packs, and the rule applies to packs: a pack
// is removed when none of its chunks is needed.
type ChunkID [32]byte

// String is the id in hex.
func (id ChunkID) String() string { return hex.EncodeToString(id[:]) }

// Short is the first 12 hex digits, for messages.
func (id ChunkID) Short() string { return hex.EncodeToString(id[:6]) }

// ParseChunkID parses a 64-digit hex id.
func ParseChunkID(s string) (ChunkID, error) {
	var id ChunkID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("chunk id %q: want 64 hex digits: %w", truncate(s, 70), ErrInvalidPackage)
	}
	copy(id[:], b)
	return id, nil
}

// ChunkInfo is what a store keeps beside a chunk's stored bytes so that
// a package that found the chunk present can describe it without having
// encoded it: the stored length, the uncompressed length and the codec
// (the blob format's business; the store only keeps them).
type ChunkInfo struct {
	StoredBytes uint32
	RawBytes    uint32
	Codec       uint8
}

// ChunkStore is a Store with a chunk space. Its Create returns
// ChunkWriters.
type ChunkStore interface {
	Store
	// OpenChunks gives access to the chunks committed package pkg refers
	// to (pkg as Stat returned it).
	OpenChunks(ctx context.Context, pkg *Package) (ChunkReader, error)
}

// ChunkWriter is the Writer of a package in a store with a chunk space.
// Its methods are safe for concurrent use. Commit makes the chunks this
// writer put durable before the package becomes visible, refers the
// package to every chunk it put or found present, and fills the
// package's ChunkPacks, StoredBytes, NewBytes, Chunks and NewChunks.
type ChunkWriter interface {
	Writer
	// RefChunk reports whether the store holds chunk id, and how it is
	// stored. When it does, the package refers to the chunk from now on
	// and need not put it: the GC rule keeps it until the commit.
	RefChunk(ctx context.Context, id ChunkID) (ChunkInfo, bool, error)
	// PutChunk adds chunk id, stored as info says, to the store; the
	// package refers to it. stored is not retained after the call.
	PutChunk(ctx context.Context, id ChunkID, info ChunkInfo, stored []byte) error
}

// ChunkReader fetches chunks of one package.
type ChunkReader interface {
	// FetchChunks fetches the stored bytes of every chunk in ids (each
	// once, in any order) and calls fn with each, possibly from several
	// goroutines at once; stored is valid only during the call. It fails
	// with ErrChunkMissing for a chunk the store does not have, or with
	// fn's first error.
	FetchChunks(ctx context.Context, ids []ChunkID, fn func(id ChunkID, stored []byte) error) error
	Close() error
}

// ErrChunkMissing: a chunk a package refers to is not in the store.
var ErrChunkMissing = fmt.Errorf("chunk missing from the store: %w", ErrStore)

// Pack names are what a manifest's ChunkPacks hold: 1..64 bytes of
// [a-z0-9-], not starting with '-'.
const packNameMaxBytes = 64

// ValidatePackName checks a pack name.
func ValidatePackName(n string) error {
	if n == "" || len(n) > packNameMaxBytes || n[0] == '-' {
		return fmt.Errorf("chunk pack %q: want 1..%d bytes of [a-z0-9-]: %w", truncate(n, 70), packNameMaxBytes, ErrInvalidPackage)
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("chunk pack %q: want 1..%d bytes of [a-z0-9-]: %w", truncate(n, 70), packNameMaxBytes, ErrInvalidPackage)
		}
	}
	return nil
}
