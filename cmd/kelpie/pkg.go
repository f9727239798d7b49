package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/blob"
	"github.com/kelpie/teleport/vm"
)

func init() {
	register(command{"package", "list, show, verify, remove and garbage-collect teleport packages", cmdPackage})
}

const packageUsage = `kelpie package ls|show ID|rm ID|verify ID|gc [--store STORE] [--json]`

func cmdPackage(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", packageUsage)
	}
	sub := args[0]
	fs := newFlags(e, "package "+sub)
	storeF := addStoreFlags(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	var here *bool
	if sub == "show" {
		here = fs.Bool("can-restore-here", false, "explain, rule by rule, whether this host can restore the package")
	}
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	st, err := storeF.open(ctx, e, *asJSON && sub == "verify")
	if err != nil {
		return err
	}
	out := func(v any) error { return json.NewEncoder(e.stdout).Encode(v) }
	switch sub {
	case "ls", "list":
		if err := wantArgs(pos, 0, "kelpie package ls [--store STORE] [--json]"); err != nil {
			return err
		}
		l, err := st.List(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return out(l)
		}
		tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tAGENT\tKIND\tARCH\tBACKEND\tIMAGE\tSIZE\tCREATED")
		for _, p := range l {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.AgentID, p.Kind, p.SourceArch, p.Backend, p.BaseImageVersion, humanBytes(p.SizeBytes), p.CreatedAt.Format("2006-01-02 15:04:05"))
		}
		return tw.Flush()
	case "show":
		if err := wantArgs(pos, 1, "kelpie package show ID [--can-restore-here] [--store STORE] [--json]"); err != nil {
			return err
		}
		p, err := st.Stat(ctx, pos[0])
		if err != nil {
			return err
		}
		if *here {
			return explainHere(ctx, e, p, *asJSON)
		}
		if *asJSON {
			return out(p)
		}
		b, _ := json.MarshalIndent(p, "", "  ")
		fmt.Fprintln(e.stdout, string(b))
		return nil
	case "rm":
		if err := wantArgs(pos, 1, "kelpie package rm ID [--store STORE]"); err != nil {
			return err
		}
		p, err := st.Stat(ctx, pos[0])
		if err != nil {
			return err
		}
		if err := st.Delete(ctx, pos[0]); err != nil {
			return err
		}
		if p.WorkspaceRef != "" {
			if err := st.DeleteWorkspace(ctx, p.WorkspaceRef); err != nil && !errors.Is(err, teleport.ErrNotFound) {
				return fmt.Errorf("package %s removed, its workspace %s not: %w", p.ID, p.WorkspaceRef, err)
			}
		}
		fmt.Fprintf(e.stdout, "removed %s\n", pos[0])
		return nil
	case "verify":
		if err := wantArgs(pos, 1, "kelpie package verify ID [--store STORE] [--json]"); err != nil {
			return err
		}
		res, err := verifyPackage(ctx, st, pos[0])
		if *asJSON {
			if res == nil {
				return err
			}
			if oerr := out(res); oerr != nil {
				return oerr
			}
			return err
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "%s: ok (%s, blob sha256 %s, %d sections verified)\n", res.ID, humanBytes(res.SizeBytes), res.BlobSHA256[:16], res.Sections)
		return nil
	case "gc":
		gc, ok := st.(teleport.GarbageCollector)
		if !ok {
			return fmt.Errorf("this store keeps no orphans to collect: %w", vm.ErrUnsupported)
		}
		n, err := gc.GC(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "removed %d orphaned uploads\n", n)
		return nil
	}
	return usagef("unknown package command %q; usage: %s", sub, packageUsage)
}

type verifyResult struct {
	ID         string `json:"id"`
	OK         bool   `json:"ok"`
	SizeBytes  int64  `json:"size_bytes"`
	BlobSHA256 string `json:"blob_sha256"`
	Sections   int    `json:"sections_verified"`
	Error      string `json:"error,omitempty"`
}

// verifyPackage re-reads a package and checks the blob against the manifest
// and each section against its recorded checksum, streaming.
func verifyPackage(ctx context.Context, st teleport.Store, id string) (*verifyResult, error) {
	p, err := st.Stat(ctx, id)
	if err != nil {
		return nil, err
	}
	res := &verifyResult{ID: id, SizeBytes: p.SizeBytes, BlobSHA256: p.BlobSHA256}
	fail := func(err error) (*verifyResult, error) {
		res.Error = err.Error()
		return res, err
	}
	r, err := st.Open(ctx, id)
	if err != nil {
		return fail(err)
	}
	defer r.Close()
	if r.Size() != p.SizeBytes {
		return fail(fmt.Errorf("package %s: blob has %d bytes, manifest says %d: %w", id, r.Size(), p.SizeBytes, teleport.ErrChecksumMismatch))
	}
	whole := vm.SectionPayload{R: r, N: r.Size()}
	sum, err := vm.HashPayload(&whole)
	if err != nil {
		return fail(err)
	}
	if sum != p.BlobSHA256 {
		return fail(fmt.Errorf("package %s: blob sha256 %s, manifest says %s: %w", id, sum[:16], short(p.BlobSHA256), teleport.ErrChecksumMismatch))
	}
	b, err := blob.Open(r, r.Size())
	if err != nil {
		return fail(fmt.Errorf("package %s: %w", id, err))
	}
	md, err := vm.ParseMetadata(b.Metadata())
	if err != nil {
		return fail(fmt.Errorf("package %s: %w", id, err))
	}
	snap := vm.NewSnapshot(md, &vm.SectionPayload{R: r, Offset: b.SnapshotOffset(), N: int64(b.Header.SnapshotLen)},
		&vm.SectionPayload{R: r, Offset: b.MemoryOffset(), N: int64(b.Header.MemoryLen)}, nil)
	if err := vm.VerifyPayloads(snap); err != nil {
		return fail(fmt.Errorf("package %s: %v: %w", id, err, teleport.ErrChecksumMismatch))
	}
	res.OK = true
	res.Sections = 3
	return res, nil
}

func short(s string) string {
	if len(s) > 16 {
		return s[:16]
	}
	return s
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// explainHere prints every restore rule's verdict for this host.
func explainHere(ctx context.Context, e *env, p *teleport.Package, asJSON bool) error {
	target, err := hostTarget(ctx, e)
	if err != nil {
		return err
	}
	rules := teleport.Explain(p, target)
	ok := true
	for _, r := range rules {
		ok = ok && r.OK
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(struct {
			ID         string                `json:"id"`
			CanRestore bool                  `json:"can_restore"`
			Host       vm.HostInfo           `json:"host"`
			Rules      []teleport.RuleResult `json:"rules"`
		}{p.ID, ok, target, rules})
	}
	for _, r := range rules {
		mark := "ok  "
		if !r.OK {
			mark = "FAIL"
		}
		line := fmt.Sprintf("%s %-13s %s", mark, r.Rule, r.Reason)
		if r.Warning != "" {
			line += " (warning: " + r.Warning + ")"
		}
		fmt.Fprintln(e.stdout, strings.TrimSpace(line))
	}
	if ok {
		fmt.Fprintf(e.stdout, "package %s can be restored on this host (%s %s, host %s)\n", p.ID, target.Backend, target.Arch, target.HostID)
		return nil
	}
	return fmt.Errorf("package %s cannot be restored on this host", p.ID)
}
