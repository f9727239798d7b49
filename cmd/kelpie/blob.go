package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/kelpie/teleport/blob"
)

func init() {
	register(command{"blob", "pack, unpack and inspect KLP1 snapshot blobs", cmdBlob})
}

const blobUsage = `kelpie blob pack --format v1 --metadata FILE --snapshot FILE [--memory FILE] --out FILE
       kelpie blob unpack FILE --out-dir DIR
       kelpie blob inspect FILE [--json]`

func cmdBlob(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", blobUsage)
	}
	switch args[0] {
	case "pack":
		fs := newFlags(e, "blob pack")
		format := fs.String("format", "v1", "blob format (only v1)")
		md := fs.String("metadata", "", "metadata section file")
		snap := fs.String("snapshot", "", "snapshot section file")
		mem := fs.String("memory", "", "memory section file (optional; empty for single-file layouts)")
		out := fs.String("out", "", "output blob file")
		pos, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 || *out == "" || *md == "" || *snap == "" {
			return usagef("usage: %s", blobUsage)
		}
		if *format != "v1" {
			return usagef("unsupported --format %q: this build writes v1", *format)
		}
		return blob.PackFiles(*out, *md, *snap, *mem)
	case "unpack":
		fs := newFlags(e, "blob unpack")
		dir := fs.String("out-dir", "", "directory for metadata, snapshot and memory")
		pos, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 || *dir == "" {
			return usagef("usage: %s", blobUsage)
		}
		return blob.UnpackFile(pos[0], *dir)
	case "inspect":
		fs := newFlags(e, "blob inspect")
		asJSON := fs.Bool("json", false, "print JSON")
		pos, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usagef("usage: %s", blobUsage)
		}
		f, err := os.Open(pos[0])
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		b, err := blob.Open(f, fi.Size())
		if err != nil {
			return fmt.Errorf("%s: %w", pos[0], err)
		}
		h := b.Header
		if *asJSON {
			return json.NewEncoder(e.stdout).Encode(struct {
				Version     uint32 `json:"version"`
				MetadataLen uint64 `json:"metadata_len"`
				SnapshotLen uint64 `json:"snapshot_len"`
				MemoryLen   uint64 `json:"memory_len"`
			}{h.Version, h.MetadataLen, h.SnapshotLen, h.MemoryLen})
		}
		fmt.Fprintf(e.stdout, "KLP1 version %d: metadata %d bytes, snapshot %d bytes, memory %d bytes\n", h.Version, h.MetadataLen, h.SnapshotLen, h.MemoryLen)
		return nil
	}
	return usagef("unknown blob command %q; usage: %s", args[0], blobUsage)
}
