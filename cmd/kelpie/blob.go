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

const blobUsage = `kelpie blob pack [--format v1|v2] --metadata FILE --snapshot FILE [--memory FILE] [--disk FILE] --out FILE
       kelpie blob unpack FILE --out-dir DIR
       kelpie blob inspect FILE [--json]`

func cmdBlob(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", blobUsage)
	}
	switch args[0] {
	case "pack":
		fs := newFlags(e, "blob pack")
		format := fs.String("format", "v2", "blob format: v1 or v2 (page-aligned, chunked, compressed)")
		md := fs.String("metadata", "", "metadata section file")
		snap := fs.String("snapshot", "", "snapshot (device state) section file")
		mem := fs.String("memory", "", "memory section file (optional; v2: a raw memory image, holes and zero pages cost nothing)")
		disk := fs.String("disk", "", "v2 only: a raw workspace disk image, as blob unpack writes it (optional)")
		out := fs.String("out", "", "output blob file")
		pos, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 || *out == "" || *md == "" || *snap == "" {
			return usagef("usage: %s", blobUsage)
		}
		v, err := blob.ParseFormat(*format)
		if err != nil {
			return usagef("--format: %v", err)
		}
		if v == blob.Version1 {
			if *disk != "" {
				return usagef("--disk: a KLP1 v1 blob has no disk section (use --format v2)")
			}
			return blob.PackFiles(*out, *md, *snap, *mem)
		}
		_, err = blob.PackFilesV2(ctx, *out, *md, *snap, *mem, *disk, blob.V2Options{})
		return err
	case "unpack":
		fs := newFlags(e, "blob unpack")
		dir := fs.String("out-dir", "", "directory for metadata, snapshot and memory (and a v2 blob's disk)")
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
		return blobInspect(e, pos[0], *asJSON)
	}
	return usagef("unknown blob command %q; usage: %s", args[0], blobUsage)
}

// v2Inspection is what `blob inspect --json` prints of a version 2 blob.
type v2Inspection struct {
	Version     uint32 `json:"version"`
	Form        string `json:"form"` // "file": chunks inline; "store": chunks in a package store
	PageBytes   int    `json:"page_bytes"`
	ChunkBytes  uint32 `json:"chunk_bytes"`
	Hash        string `json:"hash"`
	BlobBytes   int64  `json:"blob_bytes"`
	MetadataLen uint64 `json:"metadata_len"`
	SnapshotLen int64  `json:"snapshot_len"`       // the device state, uncompressed
	MemoryLen   int64  `json:"memory_len"`         // the memory image
	DiskLen     int64  `json:"disk_len,omitempty"` // the workspace disk image, when the blob has one
	// LogicalBytes: device state + memory image + disk image; StoredBytes:
	// the distinct chunks' stored bytes.
	LogicalBytes   int64          `json:"logical_bytes"`
	StoredBytes    int64          `json:"stored_bytes"`
	Chunks         int            `json:"chunks"`
	StateChunks    int            `json:"device_state_chunks"`
	MemoryEntries  int            `json:"memory_entries"`
	ZstdChunks     int            `json:"zstd_chunks"`
	RawChunks      int            `json:"raw_chunks"`
	DataPages      int64          `json:"data_pages"`
	ZeroPages      int64          `json:"zero_pages"`
	DiskDataPages  int64          `json:"disk_data_pages,omitempty"`
	Sections       []sectionEntry `json:"sections"`
	CompressionPct float64        `json:"stored_pct_of_logical"`
}

type sectionEntry struct {
	Kind         string `json:"kind"`
	Offset       uint64 `json:"offset"`
	Length       uint64 `json:"length"`
	LogicalBytes uint64 `json:"logical_bytes"`
	Count        uint64 `json:"count,omitempty"`
}

func blobInspect(e *env, path string, asJSON bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	ver, err := blob.Version(f, fi.Size())
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if ver == blob.Version1 {
		b, err := blob.Open(f, fi.Size())
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		h := b.Header
		if asJSON {
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
	b, err := blob.OpenV2(f, fi.Size(), blob.OpenOptions{Name: path})
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	h, st := b.Header(), b.Stats()
	in := v2Inspection{Version: blob.Version2, Form: "file", PageBytes: blob.PageBytes, ChunkBytes: h.ChunkBytes, Hash: h.Hash.String(),
		BlobBytes: fi.Size(), SnapshotLen: b.DeviceStateBytes(), MemoryLen: b.MemoryBytes(), StoredBytes: st.StoredBytes, Chunks: st.Chunks,
		StateChunks: len(b.DeviceStateRefs()), MemoryEntries: len(b.PageMap()), ZstdChunks: st.ZstdChunks, RawChunks: st.RawChunks,
		DataPages: st.DataPages, DiskLen: b.DiskBytes(), DiskDataPages: st.DiskDataPages}
	if !b.Inline() {
		in.Form = "store"
	}
	in.LogicalBytes = in.SnapshotLen + in.MemoryLen + in.DiskLen
	in.ZeroPages = (in.MemoryLen+blob.PageBytes-1)/blob.PageBytes - st.DataPages
	if in.LogicalBytes > 0 {
		in.CompressionPct = float64(in.StoredBytes) * 100 / float64(in.LogicalBytes)
	}
	for _, s := range h.Sections {
		if s.Kind == blob.KindMetadata {
			in.MetadataLen = s.Length
		}
		in.Sections = append(in.Sections, sectionEntry{Kind: blob.KindName(s.Kind), Offset: s.Offset, Length: s.Length, LogicalBytes: s.LogicalBytes, Count: s.Count})
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(in)
	}
	fmt.Fprintf(e.stdout, "KLP1 version 2 (%s form): %s, %d-byte pages, %s chunks addressed by %s\n", in.Form, humanBytes(in.BlobBytes), in.PageBytes,
		humanBytes(int64(in.ChunkBytes)), in.Hash)
	for _, s := range in.Sections {
		fmt.Fprintf(e.stdout, "  %-12s at %9d: %12d bytes", s.Kind, s.Offset, s.Length)
		if s.Count > 0 {
			fmt.Fprintf(e.stdout, ", %d entries for %d logical bytes", s.Count, s.LogicalBytes)
		}
		fmt.Fprintln(e.stdout)
	}
	fmt.Fprintf(e.stdout, "  device state %s in %d chunks; memory image %s: %d pages hold data, %d are zero (cost nothing)\n",
		humanBytes(in.SnapshotLen), in.StateChunks, humanBytes(in.MemoryLen), in.DataPages, in.ZeroPages)
	if in.DiskLen > 0 {
		fmt.Fprintf(e.stdout, "  workspace disk image %s: %d pages hold data\n", humanBytes(in.DiskLen), in.DiskDataPages)
	}
	fmt.Fprintf(e.stdout, "  %d distinct chunks (%d zstd, %d raw): logical %s, stored %s (%.1f%%)\n", in.Chunks, in.ZstdChunks, in.RawChunks,
		humanBytes(in.LogicalBytes), humanBytes(in.StoredBytes), in.CompressionPct)
	return nil
}
