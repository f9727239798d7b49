package teleport

import (
	"context"
	"io"
)

// Store keeps teleport packages. It is modelled on a content store: a
// package's body (its sections: the KLP1 blob, a checkpoint's workspace) is
// streamed into a Writer and becomes visible, together with its manifest,
// only when Commit returns nil. A crash or error before that leaves nothing
// visible (at most orphans that GC removes); a package and everything in it
// go with one Delete.
//
// Implementations: store/fs (the default), store/mem (unit tests), store/s3,
// and the simulation's store. All pass store/storetest.
type Store interface {
	// Create starts a package upload. It fails with ErrInvalidID for a bad
	// id and ErrAlreadyExists when a committed package has that id.
	Create(ctx context.Context, id string) (Writer, error)
	// Open returns random access to a committed package's body.
	Open(ctx context.Context, id string) (Reader, error)
	// Stat returns a committed package's manifest, or ErrNotFound.
	Stat(ctx context.Context, id string) (*Package, error)
	// List returns every committed package's manifest, sorted by id.
	List(ctx context.Context) ([]*Package, error)
	// Delete removes a committed package; ErrNotFound if there is none.
	Delete(ctx context.Context, id string) error
}

// Writer receives one package's body.
type Writer interface {
	io.Writer
	// Commit publishes the body with manifest m atomically: it returns nil
	// exactly when the package is visible. The store sets
	// m.SizeBytes and m.BlobSHA256 from the bytes written (when m already
	// carries them, a mismatch fails the commit) and fills m.ID. After
	// Commit, the writer is done whatever the result.
	Commit(ctx context.Context, m *Package) error
	// Abort discards everything written. It is safe after Commit (no-op).
	Abort(ctx context.Context) error
}

// Reader is random access to a committed package's body.
type Reader interface {
	io.ReaderAt
	io.Closer
	Size() int64
}

// GarbageCollector is implemented by stores that can leave orphans behind
// (an upload whose writer died); GC removes them and reports how many. It
// never removes what a live writer holds, a committed package, or anything
// a concurrent Create, Commit or Delete relies on.
type GarbageCollector interface {
	GC(ctx context.Context) (removed int, err error)
}
