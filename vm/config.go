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

// NetworkMode selects the guest's network.
type NetworkMode string

// Network modes. None is the safe default: a sandbox has no network unless
// asked for.
const (
	NetworkNone NetworkMode = "none"
	NetworkUser NetworkMode = "user"
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
	Network    NetworkMode
	// BaseImageVersion is the guest image's MAJOR.MINOR.PATCH.
	BaseImageVersion string
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
	switch c.Network {
	case "", NetworkNone, NetworkUser:
	default:
		return fmt.Errorf("network mode %q (want none or user): %w", c.Network, ErrInvalidConfig)
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
