package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

// hostServer is an HTTP server on this host's loopback that counts the
// connections it accepts.
type hostServer struct {
	port  int
	conns atomic.Int64
	srv   *http.Server
}

func (s *hostServer) close() { s.srv.Close() }

func startHostServer(t testing.TB, body string) *hostServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &hostServer{port: ln.Addr().(*net.TCPAddr).Port}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) }),
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateNew {
				s.conns.Add(1)
			}
		}}
	s.srv = srv
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s
}

// httpGet fetches url from this host, retrying for a few seconds while the
// guest's server comes up (a restored guest's network answers at once; a
// freshly started httpd may need a moment).
func httpGet(t *testing.T, url string) string {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	var last error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		resp, err := c.Get(url)
		if err != nil {
			last = err
			continue
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode == 200 {
			return strings.TrimSpace(string(b))
		}
		last = fmt.Errorf("status %d, %v", resp.StatusCode, err)
	}
	t.Fatalf("GET %s: %v", url, last)
	return ""
}

func boundPort(t *testing.T, inst vm.Instance, guestPort int) int {
	t.Helper()
	for _, b := range inst.(*Instance).run.Ports {
		if b.GuestPort == guestPort {
			if b.HostIP != "127.0.0.1" || b.HostPort <= 0 {
				t.Fatalf("guest port %d bound at %s", guestPort, b)
			}
			return b.HostPort
		}
	}
	t.Fatalf("guest port %d not published: %v", guestPort, inst.(*Instance).run.Ports)
	return 0
}

// guestConnects reports whether the guest opens a TCP connection to
// addr:port within a few seconds.
func guestConnects(t *testing.T, ctx context.Context, inst vm.Instance, addr string, port int) bool {
	t.Helper()
	res, err := inst.Exec(ctx, "sh", []string{"-c", fmt.Sprintf("echo x | timeout 5 nc %s %d >/dev/null", addr, port)}, vm.ExecOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return res.ExitCode == 0
}

const guestHTTPD = `mkdir -p /www && echo "page from $(hostname)" > /www/index.html && httpd -p 8080 -h /www`

// The restricted network: a published port reaches the guest's server
// from this host (HOSTPORT 0 picks a free port), the guest reaches a
// server on this host's loopback through its forward, and nothing else:
// not the same server's port directly, not another host server, not the
// DNS relay, not slirp's own address, not an outside address. After a
// teleport to another home the guest keeps its MAC and address, and the
// published port (picked afresh there) and the forward work again
// without a reboot.
func TestNetworkRestricted(t *testing.T) {
	ctx := testCtx(t, 4*time.Minute)
	fa, fb := newTestFactory(t, "host-a"), newTestFactory(t, "host-b")
	allowed := startHostServer(t, "hello from the host")
	other := startHostServer(t, "must not be reached")
	cfg := testConfig("net", 256)
	cfg.Network = vm.NetworkRestricted
	cfg.Publish = []vm.Publish{{HostIP: "127.0.0.1", HostPort: 0, GuestPort: 8080}}
	cfg.Forwards = []vm.Forward{{GuestPort: 5000, HostIP: "127.0.0.1", HostPort: allowed.port}}
	src := bootVM(t, ctx, fa, cfg)
	mustShell(t, ctx, src, guestHTTPD)

	port := boundPort(t, src, 8080)
	if got := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); got != "page from net" {
		t.Fatalf("published port: %q", got)
	}
	if got := mustShell(t, ctx, src, "wget -qO- http://"+gatewayIP+":5000/"); got != "hello from the host" {
		t.Fatalf("forward: %q", got)
	}
	blocked := []struct {
		addr string
		port int
	}{
		{gatewayIP, allowed.port}, // the forward's target port, not forwarded
		{gatewayIP, other.port},
		{slirpHostIP, other.port}, // slirp's own address: the host's loopback in full mode
		{dnsIP, 53},
		{"192.0.2.1", 80}, // TEST-NET-1: dropped by slirp, never sent anywhere
	}
	otherBefore, allowedBefore := other.conns.Load(), allowed.conns.Load()
	for _, b := range blocked {
		if guestConnects(t, ctx, src, b.addr, b.port) {
			t.Errorf("restricted guest connected to %s:%d", b.addr, b.port)
		}
	}
	if n := other.conns.Load() - otherBefore; n != 0 {
		t.Errorf("the unforwarded host server got %d connections", n)
	}
	if n := allowed.conns.Load() - allowedBefore; n != 0 {
		t.Errorf("the forward's server got %d connections on other paths", n)
	}
	mac := mustShell(t, ctx, src, "cat /sys/class/net/eth0/address")
	if mac != src.Config().MAC {
		t.Fatalf("guest MAC %s, configured %s", mac, src.Config().MAC)
	}

	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	pkg, err := newService(st, fa).Out(ctx, src, service.OutRequest{AgentID: "net", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatalf("Out: %v", err)
	}
	if n := pkg.Network; n == nil || n.Mode != vm.NetworkRestricted || n.MAC != mac || len(n.Publish) != 1 || len(n.Forwards) != 1 {
		t.Fatalf("package network %+v", n)
	}
	dst, _, err := newService(st, fb).In(ctx, pkg.ID, vm.Config{Name: "net"}, service.InOptions{})
	if err != nil {
		t.Fatalf("In: %v", err)
	}
	defer dst.Destroy(context.Background())
	if got := mustShell(t, ctx, dst, "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0 | awk '{print $4}'"); got != mac+"\n"+guestIP+"/24" {
		t.Fatalf("after the teleport: %q, want MAC %s and %s/24", got, mac, guestIP)
	}
	port2 := boundPort(t, dst, 8080)
	if got := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/", port2)); got != "page from net" {
		t.Fatalf("published port after the teleport: %q", got)
	}
	if got := mustShell(t, ctx, dst, "wget -qO- http://"+gatewayIP+":5000/"); got != "hello from the host" {
		t.Fatalf("forward after the teleport: %q", got)
	}
	if guestConnects(t, ctx, dst, gatewayIP, other.port) {
		t.Errorf("restored restricted guest connected to an unforwarded port")
	}
	// A target that cannot provide the forward (nothing listens at its
	// host port there) refuses the restore before the guest resumes.
	pkg2, err := newService(st, fb).Out(ctx, dst, service.OutRequest{AgentID: "net", Kind: teleport.KindTeleport, KeepSource: true})
	if err != nil {
		t.Fatal(err)
	}
	allowed.close()
	_, _, err = newService(st, fa).In(ctx, pkg2.ID, vm.Config{Name: "net2"}, service.InOptions{})
	if !errors.Is(err, vm.ErrUnavailable) || !strings.Contains(err.Error(), strconv.Itoa(allowed.port)) {
		t.Fatalf("restore with an unprovidable forward: %v", err)
	}
	if _, err := fa.Attach(ctx, "net2"); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("the refused restore left its VM: %v", err)
	}
}

// Full egress reaches what restricted mode blocks (here: a server on this
// host's loopback through slirp's address), which shows the blocking
// above is the mode's doing.
func TestNetworkFull(t *testing.T) {
	ctx := testCtx(t, 3*time.Minute)
	f := newTestFactory(t, "host-a")
	srv := startHostServer(t, "reached")
	cfg := testConfig("full", 256)
	cfg.Network = vm.NetworkFull
	inst := bootVM(t, ctx, f, cfg)
	if got := mustShell(t, ctx, inst, "wget -qO- http://"+slirpHostIP+":"+strconv.Itoa(srv.port)+"/"); got != "reached" {
		t.Fatalf("full network: %q", got)
	}
}

// Refusals before anything starts: a published host port that is taken,
// and on a restore a forward whose host port nobody serves.
func TestNetworkRefusals(t *testing.T) {
	needQEMU(t)
	ctx := testCtx(t, time.Minute)
	f := newTestFactory(t, "host-a")
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	tp := taken.Addr().(*net.TCPAddr).Port
	cfg := testConfig("busy", 256)
	cfg.Network = vm.NetworkRestricted
	cfg.Publish = []vm.Publish{{HostIP: "127.0.0.1", HostPort: tp, GuestPort: 80}}
	_, err = f.Create(ctx, cfg)
	if !errors.Is(err, vm.ErrUnavailable) || !strings.Contains(err.Error(), strconv.Itoa(tp)) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("taken port: %v, want one line naming port %d", err, tp)
	}
	if infos, _ := f.List(ctx); len(infos) != 0 {
		t.Fatalf("a refused VM left %v", infos)
	}
	free, _ := net.Listen("tcp", "127.0.0.1:0")
	fp := free.Addr().(*net.TCPAddr).Port
	free.Close()
	cfg = testConfig("fwd", 256)
	cfg.Network = vm.NetworkRestricted
	cfg.Forwards = []vm.Forward{{GuestPort: 5000, HostIP: "127.0.0.1", HostPort: fp}}
	if err := f.checkNetwork(ctx, cfg, true); !errors.Is(err, vm.ErrUnavailable) || !strings.Contains(err.Error(), strconv.Itoa(fp)) {
		t.Fatalf("forward to nothing on restore: %v", err)
	}
	if err := f.checkNetwork(ctx, cfg, false); err != nil {
		t.Fatalf("forward to nothing on create: %v", err)
	}
}
