package teleport

import (
	"context"
	"io"
)

// Store keeps teleport packages. It is modelled on a content store: a
// package's blob is streamed into a Writer and becomes visible, together
// with its manifest, only when Commit returns nil. A crash or error before
// that leaves nothing visible (at most orphans that GC removes).
//
// Implementations: store/fs (the default), store/mem (unit tests), store/s3,
// and the simulation's store. All pass store/storetest.
type Store interface {
	// Create starts a package upload. It fails with ErrInvalidID for a bad
	// id and ErrAlreadyExists when a committed package has that id.
	Create(ctx context.Context, id string) (Writer, error)
	// Open returns random access to a committed package's blob.
	Open(ctx context.Context, id string) (Reader, error)
	// Stat returns a committed package's manifest, or ErrNotFound.
	Stat(ctx context.Context, id string) (*Package, error)
	// List returns every committed package's manifest, sorted by id.
	List(ctx context.Context) ([]*Package, error)
	// Delete removes a committed package; ErrNotFound if there is none.
	Delete(ctx context.Context, id string) error

	// PutWorkspace stores a workspace blob of exactly size bytes under ref
	// (an id-like name), atomically.
	PutWorkspace(ctx context.Context, ref string, r io.Reader, size int64) error
	// GetWorkspace streams a workspace blob.
	GetWorkspace(ctx context.Context, ref string) (io.ReadCloser, error)
	// DeleteWorkspace removes a workspace blob; ErrNotFound if none.
	DeleteWorkspace(ctx context.Context, ref string) error
}

// Writer receives one package's blob.
type Writer interface {
	io.Writer
	// Commit publishes the blob with manifest m atomically. The store sets
	// m.SizeBytes and m.BlobSHA256 from the bytes written (when m already
	// carries them, a mismatch fails the commit) and fills m.ID. After
	// Commit, the writer is done whatever the result.
	Commit(ctx context.Context, m *Package) error
	// Abort discards everything written. It is safe after Commit (no-op).
	Abort(ctx context.Context) error
}

// Reader is random access to a committed blob.
type Reader interface {
	io.ReaderAt
	io.Closer
	Size() int64
}

// GarbageCollector is implemented by stores that can leave orphans behind
// (an interrupted upload); GC removes them and reports how many.
type GarbageCollector interface {
	GC(ctx context.Context) (removed int, err error)
}
