package vm

import (
	"fmt"
	"runtime"
)

// Architecture is a CPU architecture as Kelpie names it.
type Architecture string

// The architectures Kelpie runs on.
const (
	ArchX86_64 Architecture = "x86_64"
	ArchArm64  Architecture = "arm64"
)

// HostArchitecture is the architecture this binary runs on.
func HostArchitecture() Architecture {
	a, err := ArchitectureFromGOARCH(runtime.GOARCH)
	if err != nil {
		return Architecture(runtime.GOARCH)
	}
	return a
}

// ArchitectureFromGOARCH maps Go's names to Kelpie's.
func ArchitectureFromGOARCH(goarch string) (Architecture, error) {
	switch goarch {
	case "amd64":
		return ArchX86_64, nil
	case "arm64":
		return ArchArm64, nil
	}
	return "", fmt.Errorf("architecture %q: %w", goarch, ErrUnsupported)
}

// ParseArchitecture accepts Kelpie's names and the common aliases.
func ParseArchitecture(s string) (Architecture, error) {
	switch s {
	case "x86_64", "amd64", "x86-64":
		return ArchX86_64, nil
	case "arm64", "aarch64":
		return ArchArm64, nil
	}
	return "", fmt.Errorf("unknown architecture %q (want x86_64 or arm64): %w", s, ErrInvalidConfig)
}
