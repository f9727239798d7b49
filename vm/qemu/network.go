package qemu

// The guest network: a virtio-net device on QEMU's user-mode network
// (slirp), which lives inside the QEMU process and needs no privileges.
// Restricted mode is restrict=on: the guest reaches nothing but the
// forwards (guestfwd), each carried to the host's loopback by
// kelpie-forward, one process per connection; published ports are
// hostfwd rules, which restrict=on lets in. The addresses are fixed, so a
// restored guest keeps its configuration; the MAC is the VM's own and
// travels with it.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/vm"
)

// The guest's network. The gateway is where forwards answer; slirp's own
// address (its DNS relay's too, in full mode) is another, because slirp
// refuses forwards on its own address.
const (
	netDevID    = "net0"
	netCIDR     = "10.0.2.0/24"
	guestIP     = "10.0.2.15"
	guestPrefix = 24
	gatewayIP   = "10.0.2.2"
	slirpHostIP = "10.0.2.1"
	dnsIP       = "10.0.2.3"
	// gatewayMAC is the address slirp answers ARP with for the gateway
	// (its prefix 52:55 and the IPv4 address); the guest keeps it as a
	// fixed neighbour, since slirp answers only while a forward exists.
	gatewayMAC = "52:55:0a:00:02:02"
	// forwardProbeTimeout bounds the check that a forward's host port
	// accepts connections.
	forwardProbeTimeout = 2 * time.Second
)

// newMAC is a random locally administered unicast address in QEMU's
// 52:54:00 range.
func newMAC() string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

// guestNetCmdline is what the guest's rcS reads to configure eth0.
func guestNetCmdline() string {
	return fmt.Sprintf("kelpie.ip=%s/%d kelpie.gw=%s kelpie.gwmac=%s", guestIP, guestPrefix, gatewayIP, gatewayMAC)
}

// forwardBinary is the relay QEMU runs for each guest connection to a
// forward (built with the image by scripts/build-image.sh).
func (f *Factory) forwardBinary() string { return filepath.Join(f.opts.ImageDir, image.ForwardFile) }

// netdevArg is the -netdev option for the VM's network.
func netdevArg(n *vm.Network, forwardBin string) string {
	restrict := "on"
	if n.Mode == vm.NetworkFull {
		restrict = "off"
	}
	opts := []string{"user", "id=" + netDevID, "restrict=" + restrict, "net=" + netCIDR, "host=" + slirpHostIP,
		"dns=" + dnsIP, "dhcpstart=" + guestIP}
	for _, p := range n.Publish {
		opts = append(opts, fmt.Sprintf("hostfwd=tcp:%s:%d-%s:%d", p.HostIP, p.HostPort, guestIP, p.GuestPort))
	}
	for _, fw := range n.Forwards {
		opts = append(opts, fmt.Sprintf("guestfwd=tcp:%s:%d-cmd:%s %s:%d", gatewayIP, fw.GuestPort, shellQuote(forwardBin), fw.HostIP, fw.HostPort))
	}
	for i, o := range opts {
		opts[i] = strings.ReplaceAll(o, ",", ",,") // QEMU's option escaping
	}
	return strings.Join(opts, ",")
}

// shellQuote quotes s for the shell-like parsing slirp applies to a cmd:
// forward.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// checkNetwork refuses, before anything starts, a network this host
// cannot provide now: a published host port that is taken, a forward
// without its relay program, and (restoring: the guest relies on it) a
// forward whose host port accepts no connection.
func (f *Factory) checkNetwork(ctx context.Context, cfg vm.Config, restoring bool) error {
	for _, p := range cfg.Publish {
		if p.HostPort == 0 {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(p.HostIP, strconv.Itoa(p.HostPort)))
		if err != nil {
			return fmt.Errorf("vm %s: published port %s: host port %s:%d is taken on this host (%v): %w", cfg.Name, p, p.HostIP, p.HostPort, errors.Unwrap(err), vm.ErrUnavailable)
		}
		ln.Close()
	}
	if len(cfg.Forwards) == 0 {
		return nil
	}
	if _, err := os.Stat(f.forwardBinary()); err != nil {
		return fmt.Errorf("vm %s: forwards need %s, which the guest image %s lacks (rebuild it: kelpie image build): %w", cfg.Name, image.ForwardFile, f.opts.ImageDir, vm.ErrUnavailable)
	}
	if !restoring {
		return nil
	}
	for _, fw := range cfg.Forwards {
		d := net.Dialer{Timeout: forwardProbeTimeout}
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(fw.HostIP, strconv.Itoa(fw.HostPort)))
		if err != nil {
			return fmt.Errorf("vm %s: forward %s: nothing accepts connections at %s:%d on this host, so the guest could not reach what it reached before; start it there first: %w", cfg.Name, fw, fw.HostIP, fw.HostPort, vm.ErrUnavailable)
		}
		c.Close()
	}
	return nil
}

// usernetForwardRE matches a hostfwd line of `info usernet`:
//
//	TCP[HOST_FORWARD]  11       127.0.0.1 34415       10.0.2.15  8080     0     0
var usernetForwardRE = regexp.MustCompile(`TCP\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+\S+\s+(\d+)`)

// boundPorts asks QEMU which host ports its published ports got (a host
// port of 0 is picked when QEMU starts).
func boundPorts(ctx context.Context, q *qmpClient, want []vm.Publish) ([]vm.PortBinding, error) {
	if len(want) == 0 {
		return nil, nil
	}
	var out string
	if err := q.Call(ctx, "human-monitor-command", map[string]any{"command-line": "info usernet"}, &out); err != nil {
		return nil, fmt.Errorf("read the published ports: %w", err)
	}
	var got []vm.PortBinding
	for _, m := range usernetForwardRE.FindAllStringSubmatch(out, -1) {
		hp, _ := strconv.Atoi(m[2])
		gp, _ := strconv.Atoi(m[3])
		got = append(got, vm.PortBinding{HostIP: m[1], HostPort: hp, GuestPort: gp})
	}
	// In the order asked for, each matched once.
	var res []vm.PortBinding
	used := make([]bool, len(got))
	for _, p := range want {
		found := false
		for i, b := range got {
			if !used[i] && b.GuestPort == p.GuestPort && b.HostIP == p.HostIP && (p.HostPort == 0 || p.HostPort == b.HostPort) {
				used[i], found = true, true
				res = append(res, b)
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("QEMU does not list published port %s (info usernet: %q)", p, strings.TrimSpace(out))
		}
	}
	return res, nil
}
