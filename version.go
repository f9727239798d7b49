package teleport

import (
	"fmt"
	"strconv"
	"strings"
)

// Version is a base image version MAJOR.MINOR.PATCH.
type Version struct{ Major, Minor, Patch int }

// ParseVersion parses MAJOR.MINOR.PATCH.
func ParseVersion(s string) (Version, error) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return Version{}, fmt.Errorf("base image version %q is not MAJOR.MINOR.PATCH: %w", s, ErrInvalidPackage)
	}
	var n [3]int
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 || (len(p) > 1 && p[0] == '0') {
			return Version{}, fmt.Errorf("base image version %q is not MAJOR.MINOR.PATCH: %w", s, ErrInvalidPackage)
		}
		n[i] = v
	}
	return Version{n[0], n[1], n[2]}, nil
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }
