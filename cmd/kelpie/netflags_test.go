package main

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"1G", 1 << 30}, {"1GiB", 1 << 30}, {"1gb", 1 << 30}, {"512M", 512 << 20}, {"512MiB", 512 << 20},
		{"64m", 64 << 20}, {"2T", 2 << 40}, {"4096K", 4 << 20}, {"1048576", 1 << 20},
		{"", 0}, {"G", 0}, {"-1G", 0}, {"1.5G", 0}, {"1X", 0}, {"0", 0}, {"99999999999T", 0},
	} {
		got, err := parseSize(tc.in)
		if tc.want == 0 {
			if err == nil {
				t.Errorf("parseSize(%q) = %d, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

// Bad sandbox flags are usage mistakes: one line, exit 2, before anything
// starts.
func TestSandboxUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"vm", "create", "x", "--network", "bridge"},
		{"vm", "create", "x", "--publish", "0.0.0.0:8080:80"},
		{"vm", "create", "x", "--publish", "127.0.0.1:8080"},
		{"vm", "create", "x", "--forward", "5000:10.0.0.1:5432"},
		{"vm", "create", "x", "--disk", "lots"},
		{"vm", "fork", "x"},
		{"vm", "fork", "x", "--count", "0"},
		{"vm", "fork", "x", "--count", "2", "--publish", "127.0.0.1:bad:80"},
		{"vm", "time"},
		{"teleport", "in", "id", "--name", "x", "--publish", "1.2.3.4:1:2"},
	} {
		t.Run(strings.Join(args, "_"), func(t *testing.T) {
			_, stderr, code := kelpie(t, map[string]string{"KELPIE_HOME": t.TempDir()}, args...)
			if code != 2 || strings.Count(stderr, "\n") != 1 {
				t.Fatalf("kelpie %v: exit %d, stderr %q; want a one-line usage error (exit 2)", args, code, stderr)
			}
		})
	}
}
