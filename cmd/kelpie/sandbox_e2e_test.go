package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/host"
)

// loopbackServer serves body over HTTP on this host's loopback.
func loopbackServer(t *testing.T, body string) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

func get(t *testing.T, port int) string {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	var last error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err != nil {
			last = err
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return strings.TrimSpace(string(b))
	}
	t.Fatalf("GET 127.0.0.1:%d: %v", port, last)
	return ""
}

func (c cli) vm(home, name string) host.VMInfo {
	c.t.Helper()
	for _, v := range c.ls(home) {
		if v.Name == name {
			return v
		}
	}
	c.t.Fatalf("no vm %s in %s", name, home)
	return host.VMInfo{}
}

func (c cli) port(home, name string, guestPort int) int {
	c.t.Helper()
	for _, p := range c.vm(home, name).Ports {
		if p.GuestPort == guestPort && p.HostIP == "127.0.0.1" && p.HostPort > 0 {
			return p.HostPort
		}
	}
	c.t.Fatalf("vm %s publishes no guest port %d: %+v", name, guestPort, c.vm(home, name))
	return 0
}

func (c cli) sh(home, name, script string) string {
	c.t.Helper()
	return c.ok(home, "vm", "exec", name, "--", "sh", "-c", script)
}

// The sandbox through the CLI, as a user drives it: a VM with a restricted
// network, a published port (HOSTPORT 0: vm ls shows the one it got), a
// forward to this host's loopback and a workspace disk; an HTTP round trip
// through the published port before and after a teleport between two
// homes (the moved VM keeps its hostname, its disk and its forward); a
// fork of three copies whose random numbers and hostnames differ from
// each other and from the source; and a restore refused before anything
// starts because its published host port is taken.
func TestQEMUSandbox(t *testing.T) {
	needQEMUCLI(t)
	c, _, homeA, homeB, store := twoHomes(t)
	bin := c.bin
	hostPort := loopbackServer(t, "hello from the host")

	c.ok(homeA, "vm", "create", "agent", "--network", "restricted", "--publish", "127.0.0.1:0:8080",
		"--forward", "5000:127.0.0.1:"+strconv.Itoa(hostPort), "--disk", "64M")
	v := c.vm(homeA, "agent")
	if v.Network != "restricted" || v.DiskBytes != 64<<20 || v.Hostname != "agent" || len(v.Forwards) != 1 {
		t.Fatalf("vm ls: %+v", v)
	}
	c.sh(homeA, "agent", `mkdir -p /workspace/www && echo "page from $(hostname)" > /workspace/www/index.html && httpd -p 8080 -h /workspace/www`)
	if got := get(t, c.port(homeA, "agent", 8080)); got != "page from agent" {
		t.Fatalf("published port: %q", got)
	}
	if got := c.sh(homeA, "agent", "wget -qO- http://10.0.2.2:5000/"); got != "hello from the host" {
		t.Fatalf("forward: %q", got)
	}
	if r := c.run(homeA, "vm", "exec", "agent", "--", "sh", "-c", "echo x | timeout 5 nc 10.0.2.2 "+strconv.Itoa(hostPort)); r.code == 0 {
		t.Fatal("the restricted guest reached an unforwarded host port")
	}
	sum := c.sh(homeA, "agent", "head -c 1048576 /dev/urandom > /workspace/data && sha256sum /workspace/data | cut -c1-64")
	mac := c.sh(homeA, "agent", "cat /sys/class/net/eth0/address")

	var moved string
	t.Run("TeleportKeepsTheNetworkAndTheDisk", func(t *testing.T) {
		c := cli{t, bin}
		id := c.ok(homeA, "teleport", "out", "agent", "--store", store)
		moved = "agent-b"
		c.ok(homeB, "teleport", "in", id, "--store", store, "--name", moved, "--publish", "127.0.0.1:0:8080")
		if got := get(t, c.port(homeB, moved, 8080)); got != "page from agent" {
			t.Fatalf("published port after the teleport: %q", got)
		}
		if got := c.sh(homeB, moved, "hostname"); got != "agent" {
			t.Fatalf("a moved VM's hostname became %q", got)
		}
		if got := c.vm(homeB, moved).AgentID; got != "agent" {
			t.Fatalf("a moved VM's agent id became %q", got)
		}
		if got := c.sh(homeB, moved, "cat /sys/class/net/eth0/address"); got != mac {
			t.Fatalf("MAC %s after the teleport, %s before", got, mac)
		}
		if got := c.sh(homeB, moved, "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /workspace/data | cut -c1-64"); got != sum {
			t.Fatalf("the disk's file changed across the teleport")
		}
		if got := c.sh(homeB, moved, "wget -qO- http://10.0.2.2:5000/"); got != "hello from the host" {
			t.Fatalf("forward after the teleport: %q", got)
		}
		var gt struct {
			Offset int64 `json:"offset_ns"`
			RTT    int64 `json:"round_trip_ns"`
		}
		if err := json.Unmarshal([]byte(c.ok(homeB, "vm", "time", moved, "--json")), &gt); err != nil {
			t.Fatal(err)
		}
		if off := time.Duration(max(gt.Offset, -gt.Offset) + gt.RTT/2); off > 50*time.Millisecond {
			t.Fatalf("guest clock %v off after the teleport and %d commands (read in %v); its clocksource: %s", time.Duration(gt.Offset), 8,
				time.Duration(gt.RTT), c.sh(homeB, moved, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource"))
		}
	})

	t.Run("TeleportInFork", func(t *testing.T) {
		// The moved package restored again, as a copy: its own hostname
		// and agent id, no published ports unless asked, the same disk.
		c := cli{t, bin}
		var id string
		for _, l := range strings.Split(c.ok(homeB, "package", "ls", "--store", store), "\n") {
			if f := strings.Fields(l); len(f) > 1 && f[1] == "agent" {
				id = f[0]
			}
		}
		if id == "" {
			t.Fatal("the moved package is not in the store")
		}
		c.ok(homeA, "teleport", "in", id, "--store", store, "--name", "dup", "--fork")
		v := c.vm(homeA, "dup")
		if v.AgentID != "dup" || len(v.Ports) != 0 || c.sh(homeA, "dup", "hostname") != "dup" {
			t.Fatalf("teleport in --fork: %+v", v)
		}
		if got := c.sh(homeA, "dup", "sha256sum /workspace/data | cut -c1-64"); got != sum {
			t.Fatal("the copy's disk differs")
		}
		c.ok(homeA, "vm", "rm", "dup")
	})

	t.Run("Fork", func(t *testing.T) {
		c := cli{t, bin}
		r := c.run(homeB, "vm", "fork", moved, "--count", "3", "--prefix", "f", "--publish", "127.0.0.1:0:8080")
		if r.code != 0 || strings.Fields(r.stdout)[0] != "f1" || len(strings.Fields(r.stdout)) != 3 {
			t.Fatalf("vm fork: %+v", r)
		}
		// 256 reads of 32 bytes each: copies sharing their kernel's CRNG
		// would read some of the same blocks (vm/qemu's TestForkRandomness
		// shows they do without a new identity).
		random := map[string]string{}
		hostnames := map[string]string{}
		ports := map[int]string{}
		for _, name := range []string{moved, "f1", "f2", "f3"} {
			for _, blk := range strings.Fields(c.sh(homeB, name, "dd if=/dev/urandom bs=32 count=256 2>/dev/null | od -An -tx1 -v -w32 | tr -d ' '")) {
				if other, dup := random[blk]; dup {
					t.Fatalf("%s and %s read the same random block %s", name, other, blk)
				}
				random[blk] = name
			}
			hn := c.sh(homeB, name, "hostname")
			if other, dup := hostnames[hn]; dup {
				t.Fatalf("%s and %s have the same hostname %s", name, other, hn)
			}
			hostnames[hn] = name
			if name == moved {
				continue
			}
			if hn != name {
				t.Fatalf("fork %s has hostname %s", name, hn)
			}
			v := c.vm(homeB, name)
			if v.AgentID != name || v.State != "running" {
				t.Fatalf("fork %s: %+v", name, v)
			}
			p := c.port(homeB, name, 8080)
			if other, dup := ports[p]; dup {
				t.Fatalf("forks %s and %s share host port %d", name, other, p)
			}
			ports[p] = name
			if got := get(t, p); got != "page from agent" {
				t.Fatalf("fork %s's published port: %q", name, got)
			}
			if got := c.sh(homeB, name, "sha256sum /workspace/data | cut -c1-64"); got != sum {
				t.Fatalf("fork %s's disk differs", name)
			}
		}
		// Each copy writes its own disk.
		c.sh(homeB, "f1", "echo mine > /workspace/f1-only && sync")
		if r := c.run(homeB, "vm", "exec", "f2", "--", "test", "-e", "/workspace/f1-only"); r.code == 0 {
			t.Fatal("a fork's write reached another fork's disk")
		}
		if got := c.vm(homeB, moved).State; got != "running" {
			t.Fatalf("the fork's source is %s", got)
		}
	})

	t.Run("CheckpointCarriesTheDisk", func(t *testing.T) {
		c := cli{t, bin}
		r := c.run(homeB, "teleport", "out", "f2", "--store", store, "--kind", "checkpoint", "--keep-source")
		if r.code != 0 || strings.Contains(r.stderr, "carries no workspace") {
			t.Fatalf("checkpoint of a VM with a disk: %+v", r)
		}
		id := strings.TrimSpace(r.stdout)
		c.ok(homeA, "teleport", "in", id, "--store", store, "--name", "fresh", "--publish", "none")
		if got := c.sh(homeA, "fresh", "grep ' /workspace ' /proc/mounts | cut -d' ' -f1,3; sha256sum /workspace/data | cut -c1-64"); got != "/dev/vda ext4\n"+sum {
			t.Fatalf("the checkpoint's fresh VM has %q", got)
		}
		if got := c.sh(homeA, "fresh", "test -e /tmp/counter || echo fresh-boot"); got != "fresh-boot" {
			t.Fatalf("a checkpoint carried memory: %q", got)
		}
		c.ok(homeA, "vm", "rm", "fresh")
	})

	t.Run("TakenPortRefused", func(t *testing.T) {
		c := cli{t, bin}
		taken, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer taken.Close()
		tp := strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)
		id := c.ok(homeB, "teleport", "out", "f3", "--store", store, "--keep-source")
		r := c.run(homeA, "teleport", "in", id, "--store", store, "--name", "x", "--publish", "127.0.0.1:"+tp+":8080")
		// One line says why, naming the port (after the steps done).
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		if last := lines[len(lines)-1]; r.code != 1 || !strings.Contains(last, "127.0.0.1:"+tp+" is taken") || strings.Count(r.stderr, tp) != strings.Count(last, tp) {
			t.Fatalf("restore onto a taken port: %+v", r)
		}
		if l := c.ls(homeA); len(l) != 0 {
			t.Fatalf("the refused restore left %+v", l)
		}
		// The same package restores where the port is free, as a copy
		// (its source ran on): its own hostname.
		c.ok(homeA, "teleport", "in", id, "--store", store, "--name", "x", "--publish", "none")
		if got := c.sh(homeA, "x", "hostname"); got != "x" {
			t.Fatalf("a copy of a kept source has hostname %q", got)
		}
	})
}
