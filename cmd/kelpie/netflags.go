package main

import (
	"flag"
	"fmt"
	"strconv"
	"strings"

	"github.com/kelpie/teleport/vm"
)

// netFlags are the network flags of vm create, vm fork and teleport in.
type netFlags struct {
	publish  listFlag
	forwards listFlag
}

// listFlag is a repeatable string flag.
type listFlag struct {
	vals []string
	set  bool
}

func (l *listFlag) String() string { return strings.Join(l.vals, ",") }

func (l *listFlag) Set(s string) error {
	l.vals, l.set = append(l.vals, s), true
	return nil
}

func addPublishFlag(fs *flag.FlagSet, nf *netFlags, what string) {
	fs.Var(&nf.publish, "publish", "publish a guest TCP port on this host's loopback: 127.0.0.1:HOSTPORT:GUESTPORT (repeatable; HOSTPORT 0 picks a free port, shown by vm ls)"+what)
}

func addForwardFlag(fs *flag.FlagSet, nf *netFlags) {
	fs.Var(&nf.forwards, "forward", "let the guest reach a port on this host's loopback: GUESTPORT:127.0.0.1:HOSTPORT; the guest connects to its gateway address (10.0.2.2) on GUESTPORT (repeatable)")
}

// published parses --publish; "none" (alone) means no ports.
func (nf *netFlags) published() ([]vm.Publish, error) {
	if len(nf.publish.vals) == 1 && nf.publish.vals[0] == "none" {
		return []vm.Publish{}, nil
	}
	var out []vm.Publish
	for _, s := range nf.publish.vals {
		p, err := vm.ParsePublish(s)
		if err != nil {
			return nil, usagef("%v", err)
		}
		out = append(out, p)
	}
	return out, nil
}

func (nf *netFlags) forwarded() ([]vm.Forward, error) {
	var out []vm.Forward
	for _, s := range nf.forwards.vals {
		f, err := vm.ParseForward(s)
		if err != nil {
			return nil, usagef("%v", err)
		}
		out = append(out, f)
	}
	return out, nil
}

// parseSize parses a disk size: bytes, or a number with K, M, G or T
// (powers of 1024; an optional "iB" or "B" after the letter).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	up := strings.ToUpper(t)
	for _, suf := range []string{"IB", "B"} {
		if strings.HasSuffix(up, suf) && len(up) > len(suf) && strings.ContainsAny(up[len(up)-len(suf)-1:len(up)-len(suf)], "KMGT") {
			up = up[:len(up)-len(suf)]
			break
		}
	}
	mult := int64(1)
	if n := len(up); n > 0 {
		switch up[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			up = up[:n-1]
		}
	}
	n, err := strconv.ParseInt(up, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, usagef("size %q: want a positive number of bytes, or with K, M, G or T (1024-based), like 1G or 512M", s)
	}
	return n * mult, nil
}

func humanPorts(ps []vm.PortBinding) string {
	if len(ps) == 0 {
		return "-"
	}
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	return strings.Join(out, ",")
}

func humanDisk(n int64) string {
	if n == 0 {
		return "-"
	}
	return humanBytes(n)
}

func checkNetworkFlag(s string) (vm.NetworkMode, error) {
	if s == "" {
		return "", nil
	}
	m, err := vm.ParseNetworkMode(s)
	if err != nil {
		return "", usagef("--network %q: want none, restricted or full", s)
	}
	return m, nil
}

var _ flag.Value = (*listFlag)(nil)

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func fmtOffset(d float64) string { return fmt.Sprintf("%+.3f ms", d) }
