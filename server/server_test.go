package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/fleet"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
	"github.com/kelpie/teleport/server"
)

// The API tests run real daemons in-process over a real embedded etcd
// member and a shared filesystem store, with the simulated VM backend (a
// move between two daemons goes through HTTP, the registry and the store
// exactly as with QEMU; the QEMU end-to-end tests are in cmd/kelpie).

var member struct {
	once sync.Once
	url  string
	m    *registry.Member
	err  error
}

var prefixN atomic.Int64

func registryURL(t testing.TB) string {
	member.once.Do(func() {
		dir, err := os.MkdirTemp("", "kelpie-server-test-")
		if err != nil {
			member.err = err
			return
		}
		addrs := registrytest.FreeAddrs(t, 2)
		member.m, member.err = registry.StartMember(context.Background(), registry.MemberConfig{Dir: dir, Listen: addrs[0], Peer: addrs[1]})
		if member.err == nil {
			member.url = member.m.URL()
		}
	})
	if member.err != nil {
		t.Fatal(member.err)
	}
	return member.url
}

type daemon struct {
	t     testing.TB
	id    string
	url   string
	srv   *server.Server
	hs    *httptest.Server
	fleet *fleet.Fleet
	c     *server.Client
}

type testFleet struct {
	t      testing.TB
	dir    string
	prefix string
	token  string
	store  string
}

func newTestFleet(t testing.TB, token string) *testFleet {
	dir := t.TempDir()
	return &testFleet{t: t, dir: dir, prefix: fmt.Sprintf("/srv%d/", prefixN.Add(1)), token: token, store: filepath.Join(dir, "store")}
}

func (f *testFleet) daemon(id string) *daemon { return f.daemonWith(id, nil) }

func (f *testFleet) daemonWith(id string, opt func(*host.Options)) *daemon {
	t := f.t
	ctx := context.Background()
	reg, err := registry.Open(registryURL(t), registry.Options{Prefix: f.prefix})
	if err != nil {
		t.Fatal(err)
	}
	// The metrics, wired as RunDaemon wires them.
	m := server.NewMetrics(server.AgentsOf(reg, id))
	o := host.Options{Home: filepath.Join(f.dir, id), HostID: id, Backends: []host.Backend{host.SimBackend()}, OnStep: m.Step}
	if opt != nil {
		opt(&o)
	}
	h, err := host.Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, id: id}
	d.hs = httptest.NewUnstartedServer(nil)
	d.url = "http://" + d.hs.Listener.Addr().String()
	fl, err := fleet.Join(ctx, h, reg, fleet.Options{Address: d.url, OnStep: server.ProtocolObserver(m, nil, nil), OnPackage: m.Package})
	if err != nil {
		t.Fatal(err)
	}
	d.fleet = fl
	d.srv = server.New(server.Config{Fleet: fl, Stores: []string{f.store, ""}, Token: f.token, Metrics: m})
	d.srv.SetReady(true)
	d.hs.Config.Handler = d.srv
	d.hs.Start()
	d.c = server.NewClient(d.url, server.ClientOptions{Token: f.token})
	t.Cleanup(func() {
		d.hs.Close()
		fl.Leave(context.Background())
		reg.Close()
		h.Close()
	})
	return d
}

// call does one raw request and returns status and body.
func (d *daemon) call(method, path, token, body string, hdr ...string) (int, string) {
	d.t.Helper()
	req, _ := http.NewRequest(method, d.url+path, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// wantError checks a one-line JSON error of the given status.
func wantError(t *testing.T, what string, status int, body string, wantStatus int, contains string) {
	t.Helper()
	var e server.Error
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	if status != wantStatus || dec.Decode(&e) != nil || e.Error == "" || e.Code == "" || strings.Count(strings.TrimSpace(body), "\n") != 0 ||
		!strings.Contains(e.Error, contains) {
		t.Errorf("%s: %d %q; want %d with a one-line JSON error containing %q", what, status, body, wantStatus, contains)
	}
}

func TestMoveThroughDaemons(t *testing.T) {
	ctx := context.Background()
	f := newTestFleet(t, "s3cret")
	a, b := f.daemon("host-a"), f.daemon("host-b")
	if _, err := a.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.Exec(ctx, "ag", server.ExecRequest{Cmd: "set", Args: []string{"task", "logs"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"}); !errors.Is(err, registry.ErrExists) {
		t.Fatalf("second create of ag (names are global): %v", err)
	}
	if _, err := b.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"}); !errors.Is(err, registry.ErrExists) || !strings.Contains(err.Error(), "host-a") {
		t.Fatalf("create of ag on another host: %v, want refused naming host-a", err)
	}
	var steps []string
	got, err := a.c.Move(ctx, "ag", server.MoveRequest{To: "host-b"}, func(ev server.Event) { steps = append(steps, ev.Op+":"+ev.Step) })
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != "host-b" || got.State != registry.StateRunning || got.Epoch != 3 {
		t.Fatalf("after the move: %+v", got)
	}
	joined := strings.Join(steps, " ")
	for _, s := range []string{"protocol:moving", "out:pause", "out:snapshot", "out:upload", "protocol:committed", "protocol:in-flight", "protocol:destroyed"} {
		if !strings.Contains(joined, s) {
			t.Errorf("streamed steps %q lack %s", joined, s)
		}
	}
	res, err := b.c.Exec(ctx, "ag", server.ExecRequest{Cmd: "get", Args: []string{"task"}})
	if err != nil || string(res.Stdout) != "logs\n" {
		t.Fatalf("exec on host-b: %+v %v", res, err)
	}
	// A's daemon answers registry-wide, and refuses to exec what runs on B.
	show, err := a.c.Agent(ctx, "ag")
	if err != nil || show.Owner != "host-b" {
		t.Fatalf("show through host-a: %+v %v", show, err)
	}
	if _, err := a.c.Exec(ctx, "ag", server.ExecRequest{Cmd: "get", Args: []string{"task"}}); !errors.Is(err, registry.ErrRunsElsewhere) || !strings.Contains(err.Error(), b.url) {
		t.Fatalf("exec through host-a: %v, want refused naming host-b's daemon", err)
	}
	hosts, err := a.c.Hosts(ctx)
	if err != nil || len(hosts) != 2 || !hosts[0].Alive || hosts[1].Address != b.url {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}
	// The package stays in the store; teleporting it in again is refused
	// with the host where it runs and since when.
	pkgs, err := a.c.Packages(ctx, "")
	if err != nil || len(pkgs) != 1 {
		t.Fatalf("packages: %+v %v", pkgs, err)
	}
	c := f.daemon("host-c")
	_, err = c.c.TeleportIn(ctx, server.InRequest{Package: pkgs[0].ID}, nil)
	if !errors.Is(err, registry.ErrRunsElsewhere) || !strings.Contains(err.Error(), "host-b") || !strings.Contains(err.Error(), "since") {
		t.Fatalf("second teleport in: %v", err)
	}
	// Metrics.
	_, metrics := a.call("GET", "/metrics", "s3cret", "")
	for _, want := range []string{`kelpie_teleport_step_seconds_count{op="out",step="snapshot"} 1`, "kelpie_move_seconds_count 1",
		`kelpie_protocol_steps_total{step="in-flight"} 1`, `kelpie_teleport_bytes_total{direction="out"}`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("host-a metrics lack %s", want)
		}
	}
	_, metrics = b.call("GET", "/metrics", "s3cret", "")
	if !strings.Contains(metrics, `kelpie_agents{state="running"} 1`) {
		t.Errorf("host-b metrics lack its running agent:\n%s", grep(metrics, "kelpie_agents"))
	}
	// Remove through the owner.
	if err := b.c.RemoveAgent(ctx, "ag"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.Agent(ctx, "ag"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("after rm: %v", err)
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A move to a host whose restore fails leaves the agent running on the
// source again, restored from its package.
func TestMoveFailureClaimsBack(t *testing.T) {
	ctx := context.Background()
	f := newTestFleet(t, "")
	a := f.daemon("host-a")
	// host-b cannot reach the store: its claim fails.
	f.daemonWith("host-b", func(o *host.Options) {
		o.OpenStore = func(context.Context, string) (teleport.Store, error) {
			return nil, errors.New("store unreachable from host-b")
		}
	})
	a.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"})
	a.c.Exec(ctx, "ag", server.ExecRequest{Cmd: "set", Args: []string{"k", "v"}})
	_, err := a.c.Move(ctx, "ag", server.MoveRequest{To: "host-b"}, nil)
	if err == nil || !strings.Contains(err.Error(), "unreachable") || !strings.Contains(err.Error(), "runs here again") {
		t.Fatalf("a move to a host that cannot restore it: %v", err)
	}
	rec, err := a.c.Agent(ctx, "ag")
	if err != nil || rec.Owner != "host-a" || rec.State != registry.StateRunning {
		t.Fatalf("after the failed move: %+v %v", rec, err)
	}
	res, err := a.c.Exec(ctx, "ag", server.ExecRequest{Cmd: "get", Args: []string{"k"}})
	if err != nil || string(res.Stdout) != "v\n" {
		t.Fatalf("the agent back on host-a: %+v %v", res, err)
	}
}

func TestAuth(t *testing.T) {
	f := newTestFleet(t, "the-token-0123456789")
	d := f.daemon("host-a")
	for _, c := range []struct {
		what, token string
		want        int
	}{{"no token", "", 401}, {"wrong token", "the-token-0123456780", 401}, {"prefix of the token", "the-token", 401}, {"right token", "the-token-0123456789", 200}} {
		status, body := d.call("GET", "/v1/agents", c.token, "")
		if c.want == 401 {
			wantError(t, c.what, status, body, 401, "bearer token")
		} else if status != 200 {
			t.Errorf("%s: %d %s", c.what, status, body)
		}
	}
	// Probes need no token; metrics do.
	if status, _ := d.call("GET", "/healthz", "", ""); status != 200 {
		t.Errorf("healthz without a token: %d", status)
	}
	if status, _ := d.call("GET", "/metrics", "", ""); status != 401 {
		t.Errorf("metrics without a token: %d", status)
	}
}

// BenchmarkAuthRefusal: refusing a wrong token that shares all but its
// last byte with the right one (near) against one that shares none (far),
// in the same run. The server hashes both sides before a constant-time
// compare, so the two take the same time by construction; this reports
// both (ns per refusal, near and far) rather than asserting on a timing
// that this noisy machine cannot measure to the precision a leak needs.
func BenchmarkAuthRefusal(b *testing.B) {
	token := strings.Repeat("k", 4096)
	f := newTestFleet(b, token)
	d := f.daemon("host-a")
	refuse := func(b *testing.B, tok string) {
		req := httptest.NewRequest("GET", "/v1/agents", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		for b.Loop() {
			w := httptest.NewRecorder()
			d.srv.ServeHTTP(w, req)
			if w.Code != 401 {
				b.Fatalf("wrong token answered %d", w.Code)
			}
		}
	}
	b.Run("near", func(b *testing.B) { refuse(b, strings.Repeat("k", 4095)+"x") })
	b.Run("far", func(b *testing.B) { refuse(b, "x"+strings.Repeat("k", 4095)) })
}

func TestRequestValidation(t *testing.T) {
	f := newTestFleet(t, "")
	d := f.daemon("host-a")
	huge := `{"name":"` + strings.Repeat("a", 2<<20) + `"}`
	for _, c := range []struct {
		what, method, path, body string
		want                     int
		contains                 string
	}{
		{"malformed JSON", "POST", "/v1/agents", `{"name":`, 400, "malformed JSON"},
		{"not an object", "POST", "/v1/agents", `[1,2]`, 400, "malformed JSON"},
		{"unknown field", "POST", "/v1/agents", `{"name":"x","colour":"red"}`, 400, "unknown field"},
		{"trailing data", "POST", "/v1/agents", `{"name":"x"} {"name":"y"}`, 400, "data after"},
		{"empty body", "POST", "/v1/agents", ``, 400, "empty request body"},
		{"huge body", "POST", "/v1/agents", huge, 413, "over"},
		{"bad name", "POST", "/v1/agents", `{"name":"../etc"}`, 400, "name"},
		{"negative memory", "POST", "/v1/agents", `{"name":"x","memory_mib":-1}`, 400, "memory_mib"},
		{"bad network", "POST", "/v1/agents", `{"name":"x","network":"open"}`, 400, "network"},
		{"bad publish", "POST", "/v1/agents", `{"name":"x","publish":["0.0.0.0:80:80"]}`, 400, "publish"},
		{"bad forward", "POST", "/v1/agents", `{"name":"x","forwards":["5000:10.0.0.1:80"]}`, 400, "forwards"},
		{"bad disk", "POST", "/v1/agents", `{"name":"x","disk_bytes":1000}`, 400, "disk_bytes"},
		{"wrong type", "POST", "/v1/agents", `{"name":5}`, 400, "malformed JSON"},
		{"bad agent id in path", "GET", "/v1/agents/bad%20name", ``, 400, "agent name"},
		{"bad package id", "GET", "/v1/packages/-x", ``, 400, "package id"},
		{"unknown store", "GET", "/v1/packages?store=/etc", ``, 400, "not one this daemon serves"},
		{"unknown query", "GET", "/v1/agents?all=1", ``, 400, "unknown query parameter"},
		{"exec without cmd", "POST", "/v1/agents/x/exec", `{"args":["a"]}`, 400, "cmd"},
		{"move without target", "POST", "/v1/agents/x/move", `{}`, 400, "to"},
		{"move to a bad host id", "POST", "/v1/agents/x/move", `{"to":"a b"}`, 400, "host id"},
		{"move to an unknown host", "POST", "/v1/agents/x/move", `{"to":"nowhere"}`, 404, "no host nowhere"},
		{"teleport in bad package", "POST", "/v1/teleport/in", `{"package":"../x"}`, 400, "package"},
		{"unknown agent", "GET", "/v1/agents/nobody", ``, 404, "nobody"},
		{"unknown route", "GET", "/v2/agents", ``, 404, "no such endpoint"},
		{"wrong method", "PUT", "/v1/agents", `{}`, 405, "not allowed"},
		{"wrong content type", "POST", "/v1/agents", `name=x`, 415, "content type"},
	} {
		hdr := []string{"Content-Type", "application/json"}
		if c.what == "wrong content type" {
			hdr = []string{"Content-Type", "application/x-www-form-urlencoded"}
		}
		status, body := d.call(c.method, c.path, "", c.body, hdr...)
		wantError(t, c.what, status, body, c.want, c.contains)
	}
}

func TestListenRefusal(t *testing.T) {
	for _, c := range []struct {
		addr  string
		token bool
		ok    bool
	}{
		{"127.0.0.1:7070", false, true}, {"localhost:7070", false, true}, {"[::1]:7070", false, true},
		{"0.0.0.0:7070", false, false}, {":7070", false, false}, {"192.0.2.1:7070", false, false}, {"example.org:7070", false, false},
		{"0.0.0.0:7070", true, true}, {"nonsense", true, false},
	} {
		err := server.CheckListen(c.addr, c.token)
		if (err == nil) != c.ok {
			t.Errorf("CheckListen(%q, token=%v) = %v; want ok=%v", c.addr, c.token, err, c.ok)
		}
	}
}

// A stale daemon whose lease ran out cannot resume its paused agent.
func TestStaleDaemonRefusedResume(t *testing.T) {
	ctx := context.Background()
	f := newTestFleet(t, "")
	a := f.daemon("host-a")
	a.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"})
	if _, err := a.c.Act(ctx, "ag", "pause"); err != nil {
		t.Fatal(err)
	}
	// Another daemon with the same host id takes the host over (the old
	// one is stale): the old one's resume is fenced off.
	newer := f.daemon("host-a")
	_ = newer
	_, err := a.c.Act(ctx, "ag", "resume")
	if !errors.Is(err, registry.ErrLeaseLost) {
		t.Fatalf("resume on the stale daemon: %v, want lease_lost", err)
	}
	info, err := a.fleet.Host.VM(ctx, "ag")
	if err != nil || info.State != "paused" {
		t.Fatalf("the stale daemon's VM: %+v %v, want paused", info, err)
	}
}

func TestShowJSONFields(t *testing.T) {
	ctx := context.Background()
	f := newTestFleet(t, "")
	d := f.daemon("host-a")
	d.c.CreateAgent(ctx, server.CreateRequest{Name: "ag", Backend: "sim"})
	_, body := d.call("GET", "/v1/agents/ag", "", "")
	var m map[string]any
	json.Unmarshal([]byte(body), &m)
	for _, k := range []string{"name", "owner", "state", "epoch"} {
		if _, ok := m[k]; !ok {
			t.Errorf("agent show lacks %q: %s", k, body)
		}
	}
	_, body = d.call("GET", "/v1/hosts", "", "")
	var hs []map[string]any
	json.Unmarshal([]byte(body), &hs)
	for _, k := range []string{"id", "address", "alive"} {
		if len(hs) == 0 || hs[0][k] == nil {
			t.Errorf("host ls lacks %q: %s", k, body)
		}
	}
	var buf bytes.Buffer
	buf.WriteString(body)
}

// A fork with a registry makes each copy a new agent of the forking host,
// recorded before it is made; a copy whose name is taken stops the fork
// before anything is made, and only the owner of the source may fork it.
func TestForkRegistersCopies(t *testing.T) {
	ctx := context.Background()
	f := newTestFleet(t, "")
	a, b := f.daemon("host-a"), f.daemon("host-b")
	if _, err := a.c.CreateAgent(ctx, server.CreateRequest{Name: "src", Backend: "sim"}); err != nil {
		t.Fatal(err)
	}
	res, agents, err := a.fleet.Fork(ctx, "src", host.ForkRequest{Count: 2, Prefix: "cp"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.VMs) != 2 || len(agents) != 2 {
		t.Fatalf("fork: %+v, agents %+v", res.VMs, agents)
	}
	for _, name := range []string{"cp1", "cp2"} {
		rec, err := b.c.Agent(ctx, name)
		if err != nil || rec.Owner != "host-a" || rec.State != registry.StateRunning || rec.Epoch != 1 {
			t.Fatalf("record of %s: %+v, %v", name, rec, err)
		}
	}
	// cp2 is taken: a fork that would make it again makes nothing.
	if _, _, err := a.fleet.Fork(ctx, "src", host.ForkRequest{Count: 2, Prefix: "cp"}); !errors.Is(err, registry.ErrExists) {
		t.Fatalf("fork onto taken names: %v, want ErrExists", err)
	}
	if vms, _ := a.fleet.Host.VMs(ctx); len(vms) != 3 {
		t.Fatalf("after the refused fork host-a has %d VMs, want 3", len(vms))
	}
	// Another host cannot fork an agent it does not own.
	if _, _, err := b.fleet.Fork(ctx, "src", host.ForkRequest{Count: 1, Prefix: "theirs"}); !errors.Is(err, registry.ErrRunsElsewhere) {
		t.Fatalf("fork from a host that does not own the source: %v, want ErrRunsElsewhere", err)
	}
	if _, err := b.c.Agent(ctx, "theirs1"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("the refused fork left a record: %v", err)
	}
}
