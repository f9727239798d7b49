package main

import (
	"context"
	"flag"
	"path/filepath"
	"strings"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/fs"
)

// openS3Store is set by the S3 store's file when it is built in.
var openS3Store func(ctx context.Context, e *env, url string) (teleport.Store, error)

// openStore opens the package store a --store flag names: "" for this
// host's default ($KELPIE_HOME/packages), a directory, or s3://bucket/prefix.
func openStore(ctx context.Context, e *env, spec string) (teleport.Store, error) {
	if spec == "" {
		spec = filepath.Join(home(e), "packages")
	}
	if strings.HasPrefix(spec, "s3://") {
		if openS3Store == nil {
			return nil, usagef("--store %s: this build has no S3 support", spec)
		}
		return openS3Store(ctx, e, spec)
	}
	if strings.Contains(spec, "://") {
		return nil, usagef("--store %q: want a directory or s3://bucket/prefix", spec)
	}
	return fs.Open(spec)
}

const storeFlagHelp = "package store: a directory or s3://bucket/prefix (default $KELPIE_HOME/packages)"

// storeFlags are the flags of every command that takes --store: the store
// itself and the S3 settings that may go with it.
type storeFlags struct {
	spec *string
	s3   *s3Flags
}

func addStoreFlags(fs *flag.FlagSet) *storeFlags {
	return &storeFlags{spec: fs.String("store", "", storeFlagHelp), s3: addS3Flags(fs)}
}

// open opens the store; with progress, big uploads and downloads report
// progress on stderr (a bar on a terminal, JSON lines when progressJSON).
func (f *storeFlags) open(ctx context.Context, e *env, progressJSON bool) (teleport.Store, error) {
	spec, err := f.s3.storeSpec(*f.spec)
	if err != nil {
		return nil, err
	}
	st, err := openStore(ctx, e, spec)
	if err != nil {
		return nil, err
	}
	return withProgress(e, st, progressJSON), nil
}
