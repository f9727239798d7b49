package vm

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// NetworkMode selects the guest's network.
type NetworkMode string

// Network modes. A VM without a mode has no network device at all.
const (
	// NetworkNone: no network device.
	NetworkNone NetworkMode = "none"
	// NetworkRestricted: a network device that reaches nothing but the
	// forwards the VM was given (Config.Forwards), and is reached only
	// through its published ports (Config.Publish).
	NetworkRestricted NetworkMode = "restricted"
	// NetworkFull: full egress (NAT through the host), for production
	// use; the guest reaches whatever the host reaches, the host's own
	// loopback services included.
	NetworkFull NetworkMode = "full"
)

// ParseNetworkMode parses none, restricted or full.
func ParseNetworkMode(s string) (NetworkMode, error) {
	switch m := NetworkMode(s); m {
	case NetworkNone, NetworkRestricted, NetworkFull:
		return m, nil
	}
	return "", fmt.Errorf("network mode %q (want none, restricted or full): %w", s, ErrInvalidConfig)
}

// HasDevice says whether a VM of this mode has a network device.
func (m NetworkMode) HasDevice() bool { return m == NetworkRestricted || m == NetworkFull }

// Publish makes a guest TCP port reachable at a host loopback address
// (host -> guest).
type Publish struct {
	HostIP string `json:"host_ip"`
	// HostPort 0 asks for a free port, picked when the VM starts; the
	// port it got is in the VM's listing (Info.Ports).
	HostPort  int `json:"host_port"`
	GuestPort int `json:"guest_port"`
}

// String is the --publish form, HOSTIP:HOSTPORT:GUESTPORT.
func (p Publish) String() string { return fmt.Sprintf("%s:%d:%d", p.HostIP, p.HostPort, p.GuestPort) }

// Forward lets the guest reach a TCP port on the host's loopback: the
// guest connects to its gateway address on GuestPort (guest -> host).
type Forward struct {
	GuestPort int    `json:"guest_port"`
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
}

// String is the --forward form, GUESTPORT:HOSTIP:HOSTPORT.
func (f Forward) String() string { return fmt.Sprintf("%d:%s:%d", f.GuestPort, f.HostIP, f.HostPort) }

// PortBinding is a published port as the running VM has it bound.
type PortBinding struct {
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// String is HOSTIP:HOSTPORT->GUESTPORT.
func (b PortBinding) String() string {
	return fmt.Sprintf("%s:%d->%d", b.HostIP, b.HostPort, b.GuestPort)
}

// Network is a VM's network as snapshots and packages record it, so that
// a restore recreates the same device (mode and MAC address) and, unless
// told otherwise, the same ports.
type Network struct {
	Mode     NetworkMode `json:"mode"`
	MAC      string      `json:"mac,omitempty"`
	Publish  []Publish   `json:"publish,omitempty"`
	Forwards []Forward   `json:"forwards,omitempty"`
}

// ParsePublish parses HOSTIP:HOSTPORT:GUESTPORT (HOSTPORT 0: pick a free
// port). The host address must be a loopback address.
func ParsePublish(s string) (Publish, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return Publish{}, fmt.Errorf("--publish %q: want 127.0.0.1:HOSTPORT:GUESTPORT: %w", s, ErrInvalidConfig)
	}
	hp, err1 := strconv.Atoi(parts[1])
	gp, err2 := strconv.Atoi(parts[2])
	if err1 != nil || err2 != nil {
		return Publish{}, fmt.Errorf("--publish %q: ports must be numbers: %w", s, ErrInvalidConfig)
	}
	p := Publish{HostIP: parts[0], HostPort: hp, GuestPort: gp}
	return p, p.validate()
}

// ParseForward parses GUESTPORT:HOSTIP:HOSTPORT. The host address must be
// a loopback address.
func ParseForward(s string) (Forward, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return Forward{}, fmt.Errorf("--forward %q: want GUESTPORT:127.0.0.1:HOSTPORT: %w", s, ErrInvalidConfig)
	}
	gp, err1 := strconv.Atoi(parts[0])
	hp, err2 := strconv.Atoi(parts[2])
	if err1 != nil || err2 != nil {
		return Forward{}, fmt.Errorf("--forward %q: ports must be numbers: %w", s, ErrInvalidConfig)
	}
	f := Forward{GuestPort: gp, HostIP: parts[1], HostPort: hp}
	return f, f.validate()
}

const portMax = 65535

func loopback(what, ip string) error {
	a, err := netip.ParseAddr(ip)
	if err != nil || !a.Is4() || !a.IsLoopback() {
		return fmt.Errorf("%s: host address %q is not an IPv4 loopback address (127.0.0.0/8); ports are published and forwarded on this host's loopback only: %w", what, ip, ErrInvalidConfig)
	}
	return nil
}

func (p Publish) validate() error {
	what := "published port " + p.String()
	if err := loopback(what, p.HostIP); err != nil {
		return err
	}
	if p.HostPort < 0 || p.HostPort > portMax || p.GuestPort < 1 || p.GuestPort > portMax {
		return fmt.Errorf("%s: host port must be 0..%d (0: pick a free one), guest port 1..%d: %w", what, portMax, portMax, ErrInvalidConfig)
	}
	return nil
}

func (f Forward) validate() error {
	what := "forward " + f.String()
	if err := loopback(what, f.HostIP); err != nil {
		return err
	}
	if f.HostPort < 1 || f.HostPort > portMax || f.GuestPort < 1 || f.GuestPort > portMax {
		return fmt.Errorf("%s: ports must be 1..%d: %w", what, portMax, ErrInvalidConfig)
	}
	return nil
}

// validateNetwork checks a network configuration: ports only with a
// network device, each guest port published once, each fixed host port
// used once, each forwarded guest port once.
func validateNetwork(mode NetworkMode, mac string, pub []Publish, fwd []Forward) error {
	switch mode {
	case "", NetworkNone:
		if len(pub) > 0 || len(fwd) > 0 {
			return fmt.Errorf("published ports and forwards need a network (restricted or full), and the network is %q: %w", orNone(mode), ErrInvalidConfig)
		}
		if mac != "" {
			return fmt.Errorf("a MAC address needs a network device, and the network is %q: %w", orNone(mode), ErrInvalidConfig)
		}
		return nil
	case NetworkRestricted, NetworkFull:
	default:
		_, err := ParseNetworkMode(string(mode))
		return err
	}
	if mac != "" {
		if err := validateMAC(mac); err != nil {
			return err
		}
	}
	var guest, host []int
	for _, p := range pub {
		if err := p.validate(); err != nil {
			return err
		}
		if slices.Contains(guest, p.GuestPort) {
			return fmt.Errorf("guest port %d is published twice: %w", p.GuestPort, ErrInvalidConfig)
		}
		guest = append(guest, p.GuestPort)
		if p.HostPort != 0 {
			if slices.Contains(host, p.HostPort) {
				return fmt.Errorf("host port %d is published twice: %w", p.HostPort, ErrInvalidConfig)
			}
			host = append(host, p.HostPort)
		}
	}
	var fg []int
	for _, f := range fwd {
		if err := f.validate(); err != nil {
			return err
		}
		if slices.Contains(fg, f.GuestPort) {
			return fmt.Errorf("guest port %d is forwarded twice: %w", f.GuestPort, ErrInvalidConfig)
		}
		fg = append(fg, f.GuestPort)
	}
	return nil
}

func orNone(m NetworkMode) NetworkMode {
	if m == "" {
		return NetworkNone
	}
	return m
}

// validateMAC accepts a unicast MAC address as six colon-separated hex
// bytes.
func validateMAC(mac string) error {
	bad := fmt.Errorf("MAC address %q: want six hex bytes like 52:54:00:12:34:56, unicast: %w", mac, ErrInvalidConfig)
	parts := strings.Split(mac, ":")
	if len(parts) != 6 {
		return bad
	}
	for i, p := range parts {
		b, err := strconv.ParseUint(p, 16, 8)
		if err != nil || len(p) != 2 || (i == 0 && b&1 != 0) {
			return bad
		}
	}
	return nil
}
