package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/server"
)

func init() {
	register(command{"package", "list, show, verify, remove and garbage-collect teleport packages", cmdPackage})
}

const packageUsage = `kelpie package ls|show ID|rm ID|verify ID|gc [--store STORE] [--json]`

// packageHost is what the package commands ask: this home's host, or a
// daemon (--server).
type packageHost interface {
	Packages(ctx context.Context, store string) ([]*teleport.Package, error)
	Package(ctx context.Context, store, id string) (*teleport.Package, error)
	RemovePackage(ctx context.Context, store, id string) error
	VerifyPackage(ctx context.Context, store, id string) (*host.Verification, error)
	ExplainPackage(ctx context.Context, store, id string) (*host.Explanation, error)
	CollectGarbage(ctx context.Context, store string) (int, error)
}

// remotePackages are a daemon's package endpoints.
type remotePackages struct{ *server.Client }

func (remotePackages) ExplainPackage(context.Context, string, string) (*host.Explanation, error) {
	return nil, usagef("package show --can-restore-here does not go through --server")
}

func (remotePackages) CollectGarbage(context.Context, string) (int, error) {
	return 0, usagef("package gc does not go through --server")
}

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
	switch sub {
	case "ls", "list", "show", "rm", "verify", "gc":
	default:
		return usagef("unknown package command %q; usage: %s", sub, packageUsage)
	}
	url, err := storeF.url()
	if err != nil {
		return err
	}
	var h packageHost
	if e.server != "" {
		if sub == "gc" || (here != nil && *here) {
			return usagef("package %s runs on the store's machine, not through --server", sub)
		}
		c, err := e.client()
		if err != nil {
			return err
		}
		h = remotePackages{c}
	} else {
		lh, err := openHost(ctx, e, *asJSON && sub == "verify", false)
		if err != nil {
			return err
		}
		defer lh.Close()
		h = lh
	}
	out := func(v any) error { return json.NewEncoder(e.stdout).Encode(v) }
	switch sub {
	case "ls", "list":
		if err := wantArgs(pos, 0, "kelpie package ls [--store STORE] [--json]"); err != nil {
			return err
		}
		l, err := h.Packages(ctx, url)
		if err != nil {
			return err
		}
		if *asJSON {
			return out(l)
		}
		tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tAGENT\tKIND\tARCH\tBACKEND\tIMAGE\tKLP1\tLOGICAL\tSTORED\tNEW\tCHUNKS\tCREATED")
		for _, p := range l {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\tv%d\t%s\t%s\t%s\t%d/%d\t%s\n", p.ID, p.AgentID, p.Kind, p.SourceArch, p.Backend, p.BaseImageVersion,
				max(p.Format, 1), humanBytes(p.LogicalBytes), humanBytes(p.StoredBytes), humanBytes(p.NewBytes), p.NewChunks, p.Chunks,
				p.CreatedAt.Format("2006-01-02 15:04:05"))
		}
		return tw.Flush()
	case "show":
		if err := wantArgs(pos, 1, "kelpie package show ID [--can-restore-here] [--store STORE] [--json]"); err != nil {
			return err
		}
		if *here {
			ex, err := h.ExplainPackage(ctx, url, pos[0])
			if err != nil {
				return err
			}
			return printExplanation(e, ex, *asJSON)
		}
		p, err := h.Package(ctx, url, pos[0])
		if err != nil {
			return err
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
		if err := h.RemovePackage(ctx, url, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "removed %s\n", pos[0])
		return nil
	case "verify":
		if err := wantArgs(pos, 1, "kelpie package verify ID [--store STORE] [--json]"); err != nil {
			return err
		}
		res, err := h.VerifyPackage(ctx, url, pos[0])
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
		fmt.Fprintf(e.stdout, "%s: ok (%s, sha256 %s, %d sections verified: %s)\n", res.ID, humanBytes(res.SizeBytes), short(res.BlobSHA256),
			res.SectionsVerified, strings.Join(res.Sections, ", "))
		return nil
	}
	// gc
	if err := wantArgs(pos, 0, "kelpie package gc [--store STORE]"); err != nil {
		return err
	}
	n, err := h.CollectGarbage(ctx, url)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "removed %d orphaned uploads and unused chunk packs\n", n)
	return nil
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

// printExplanation prints every restore rule's verdict for this host.
func printExplanation(e *env, ex *host.Explanation, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(ex)
	}
	for _, r := range ex.Rules {
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
	if ex.CanRestore {
		fmt.Fprintf(e.stdout, "package %s can be restored on this host (%s %s, host %s)\n", ex.ID, ex.Host.Backend, ex.Host.Arch, ex.Host.HostID)
		return nil
	}
	return fmt.Errorf("package %s cannot be restored on this host", ex.ID)
}
