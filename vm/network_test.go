package vm

import (
	"errors"
	"testing"
)

func TestParsePublishAndForward(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Publish
		ok   bool
	}{
		{"127.0.0.1:8080:80", Publish{"127.0.0.1", 8080, 80}, true},
		{"127.0.0.1:0:80", Publish{"127.0.0.1", 0, 80}, true},
		{"127.1.2.3:1:65535", Publish{"127.1.2.3", 1, 65535}, true},
		{"0.0.0.0:8080:80", Publish{}, false}, // loopback only
		{"10.0.0.1:8080:80", Publish{}, false},
		{"localhost:8080:80", Publish{}, false},
		{"::1:8080:80", Publish{}, false},
		{"127.0.0.1:8080", Publish{}, false},
		{"127.0.0.1:x:80", Publish{}, false},
		{"127.0.0.1:70000:80", Publish{}, false},
		{"127.0.0.1:80:0", Publish{}, false},
	} {
		got, err := ParsePublish(tc.in)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) || (tc.ok && got != tc.want) {
			t.Errorf("ParsePublish(%q) = %+v, %v", tc.in, got, err)
		}
		if tc.ok && got.String() != tc.in {
			t.Errorf("Publish %q prints as %q", tc.in, got.String())
		}
	}
	for _, tc := range []struct {
		in   string
		want Forward
		ok   bool
	}{
		{"5000:127.0.0.1:5432", Forward{5000, "127.0.0.1", 5432}, true},
		{"5000:192.168.1.1:5432", Forward{}, false},
		{"5000:127.0.0.1:0", Forward{}, false},
		{"0:127.0.0.1:5432", Forward{}, false},
		{"5000:127.0.0.1", Forward{}, false},
	} {
		got, err := ParseForward(tc.in)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) || (tc.ok && got != tc.want) {
			t.Errorf("ParseForward(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

func TestConfigNetworkAndDisk(t *testing.T) {
	base := Config{VCPUs: 1, MemoryMiB: 256, Name: "n"}
	pub := func(hp, gp int) Publish { return Publish{"127.0.0.1", hp, gp} }
	fwd := func(gp, hp int) Forward { return Forward{gp, "127.0.0.1", hp} }
	for _, tc := range []struct {
		name string
		mut  func(*Config)
		ok   bool
	}{
		{"no network", func(c *Config) {}, true},
		{"restricted with ports", func(c *Config) {
			c.Network, c.Publish, c.Forwards = NetworkRestricted, []Publish{pub(0, 80), pub(0, 81), pub(8080, 82)}, []Forward{fwd(5000, 5432)}
		}, true},
		{"full", func(c *Config) { c.Network = NetworkFull }, true},
		{"ports without a network", func(c *Config) { c.Publish = []Publish{pub(0, 80)} }, false},
		{"forwards with network none", func(c *Config) { c.Network, c.Forwards = NetworkNone, []Forward{fwd(1, 2)} }, false},
		{"guest port published twice", func(c *Config) { c.Network, c.Publish = NetworkRestricted, []Publish{pub(0, 80), pub(0, 80)} }, false},
		{"host port published twice", func(c *Config) { c.Network, c.Publish = NetworkRestricted, []Publish{pub(8080, 80), pub(8080, 81)} }, false},
		{"guest port forwarded twice", func(c *Config) { c.Network, c.Forwards = NetworkRestricted, []Forward{fwd(1, 2), fwd(1, 3)} }, false},
		{"unknown mode", func(c *Config) { c.Network = "user" }, false},
		{"good MAC", func(c *Config) { c.Network, c.MAC = NetworkRestricted, "52:54:00:ab:cd:ef" }, true},
		{"multicast MAC", func(c *Config) { c.Network, c.MAC = NetworkRestricted, "01:54:00:ab:cd:ef" }, false},
		{"short MAC", func(c *Config) { c.Network, c.MAC = NetworkRestricted, "52:54:00:ab:cd" }, false},
		{"MAC without network", func(c *Config) { c.MAC = "52:54:00:ab:cd:ef" }, false},
		{"1 GiB disk", func(c *Config) { c.Disk = Disk{SizeBytes: 1 << 30} }, true},
		{"ext4 disk", func(c *Config) { c.Disk = Disk{SizeBytes: 64 << 20, Filesystem: "ext4"} }, true},
		{"tiny disk", func(c *Config) { c.Disk = Disk{SizeBytes: 1 << 20} }, false},
		{"odd disk", func(c *Config) { c.Disk = Disk{SizeBytes: 64<<20 + 1} }, false},
		{"xfs disk", func(c *Config) { c.Disk = Disk{SizeBytes: 64 << 20, Filesystem: "xfs"} }, false},
		{"filesystem without disk", func(c *Config) { c.Disk = Disk{Filesystem: "ext4"} }, false},
		{"bad hostname", func(c *Config) { c.Hostname = "a/b" }, false},
	} {
		c := base
		tc.mut(&c)
		err := c.Validate()
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	c := base
	c.SetNetwork(&Network{Mode: NetworkRestricted, MAC: "52:54:00:00:00:01", Publish: []Publish{pub(0, 80)}})
	if n := c.NetworkSpec(); n == nil || n.Mode != NetworkRestricted || n.MAC != "52:54:00:00:00:01" || len(n.Publish) != 1 {
		t.Fatalf("network round trip: %+v", n)
	}
	c.SetNetwork(nil)
	if c.NetworkSpec() != nil || c.Network != "" || c.MAC != "" {
		t.Fatalf("no network: %+v", c)
	}
	if c.GuestHostname() != "n" {
		t.Fatalf("hostname defaults to the name, got %q", c.GuestHostname())
	}
}
