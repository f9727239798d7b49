//go:build tools

// Package seaweedfs is a wrapper module that pins the SeaweedFS server
// (the `weed` binary) used by Kelpie's S3 integration tests. It is kept
// apart from the project's main go.mod because SeaweedFS's own go.mod
// carries a replace directive, which `go install pkg@version` refuses and
// which must therefore be repeated here.
//
// Build with scripts/seaweedfs.sh build (it runs `go build` from this
// directory).
package seaweedfs

import (
	_ "github.com/seaweedfs/seaweedfs/weed"
)
