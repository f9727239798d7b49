package vm

import (
	"fmt"
	"strings"
)

// Limits on configuration values. They catch typos (a memory size in bytes
// given as MiB) rather than encode any backend's real maximum.
const (
	VCPUsMax        = 64
	MemoryMiBMin    = 16
	MemoryMiBMax    = 256 * 1024
	nameLenMaxBytes = 64
)

// Config describes a VM to create.
type Config struct {
	Name       string
	VCPUs      int
	MemoryMiB  int
	Kernel     string // path to the guest kernel
	Initrd     string // path to the initramfs
	KernelArgs string
	RootDisk   string // optional path to a root disk image
	Workdir    string // default working directory for Exec in the guest
	Env        map[string]string
	// Network is the guest's network ("" is none: no network device).
	Network NetworkMode
	// Publish lists guest ports reachable on host loopback addresses;
	// Forwards the host loopback ports the guest may reach at its gateway
	// address. Both need a network.
	Publish  []Publish `json:",omitempty"`
	Forwards []Forward `json:",omitempty"`
	// MAC is the network device's address ("" : the backend picks one).
	// A teleport keeps it.
	MAC string `json:",omitempty"`
	// Disk is the workspace disk (zero: none; /workspace is then in guest
	// RAM).
	Disk Disk
	// Hostname is the guest's hostname ("" : Name). A move keeps it; a
	// copy gets its new name.
	Hostname string `json:",omitempty"`
	// AgentID is the agent this VM runs, carried by teleports; backends
	// only keep it ("" : Name).
	AgentID string `json:",omitempty"`
	// BaseImageVersion is the guest image's MAJOR.MINOR.PATCH.
	BaseImageVersion string
}

// NetworkSpec is the network as snapshots record it, nil without one.
func (c Config) NetworkSpec() *Network {
	if !c.Network.HasDevice() {
		return nil
	}
	return &Network{Mode: c.Network, MAC: c.MAC, Publish: c.Publish, Forwards: c.Forwards}
}

// SetNetwork makes n (nil: none) the configuration's network.
func (c *Config) SetNetwork(n *Network) {
	if n == nil {
		c.Network, c.MAC, c.Publish, c.Forwards = "", "", nil, nil
		return
	}
	c.Network, c.MAC, c.Publish, c.Forwards = n.Mode, n.MAC, n.Publish, n.Forwards
}

// GuestHostname is the hostname the guest gets.
func (c Config) GuestHostname() string {
	if c.Hostname != "" {
		return c.Hostname
	}
	return c.Name
}

// Validate checks values every backend needs. Backends that boot a kernel
// additionally call RequireBoot.
func (c Config) Validate() error {
	if c.Name != "" {
		if err := ValidateName(c.Name); err != nil {
			return err
		}
	}
	if c.VCPUs < 1 || c.VCPUs > VCPUsMax {
		return fmt.Errorf("vcpus %d out of range 1..%d: %w", c.VCPUs, VCPUsMax, ErrInvalidConfig)
	}
	if c.MemoryMiB < MemoryMiBMin || c.MemoryMiB > MemoryMiBMax {
		return fmt.Errorf("memory %d MiB out of range %d..%d MiB: %w", c.MemoryMiB, MemoryMiBMin, MemoryMiBMax, ErrInvalidConfig)
	}
	for _, p := range []struct{ name, v string }{{"kernel", c.Kernel}, {"initrd", c.Initrd}, {"root disk", c.RootDisk}} {
		if p.v != "" && (strings.TrimSpace(p.v) == "" || strings.ContainsRune(p.v, 0)) {
			return fmt.Errorf("%s path %q is not a usable path: %w", p.name, p.v, ErrInvalidConfig)
		}
	}
	if err := validateNetwork(c.Network, c.MAC, c.Publish, c.Forwards); err != nil {
		return err
	}
	if err := c.Disk.Validate(); err != nil {
		return err
	}
	if c.Hostname != "" {
		if err := ValidateName(c.Hostname); err != nil {
			return fmt.Errorf("hostname: %w", err)
		}
	}
	for k := range c.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return fmt.Errorf("env var name %q: %w", k, ErrInvalidConfig)
		}
	}
	return nil
}

// RequireBoot checks that the paths a kernel boot needs are set.
func (c Config) RequireBoot() error {
	if c.Kernel == "" {
		return fmt.Errorf("kernel path is empty: %w", ErrInvalidConfig)
	}
	if c.Initrd == "" {
		return fmt.Errorf("initrd path is empty: %w", ErrInvalidConfig)
	}
	return nil
}

// ValidateName checks a VM name: it becomes a directory name, so it is never
// a path.
func ValidateName(name string) error {
	if name == "" || len(name) > nameLenMaxBytes {
		return fmt.Errorf("VM name %q must be 1..%d bytes: %w", name, nameLenMaxBytes, ErrInvalidConfig)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || (r == '.' && i > 0)
		if !ok {
			return fmt.Errorf("VM name %q: use letters, digits, '-', '_' and '.' (not first): %w", name, ErrInvalidConfig)
		}
	}
	return nil
}
