package main

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/guest/image"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func init() {
	register(command{"version", "print the version", func(ctx context.Context, e *env, args []string) error {
		rev := ""
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" && len(s.Value) >= 12 {
					rev = " " + s.Value[:12]
				}
			}
		}
		fmt.Fprintf(e.stdout, "kelpie %s%s (%s/%s, %s, blob format KLP1 v%d, base image %s)\n", version, rev, runtime.GOOS, runtime.GOARCH, runtime.Version(), blob.Version1, image.Version())
		return nil
	}})
}
