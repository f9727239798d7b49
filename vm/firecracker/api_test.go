package firecracker

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The checker must reject what Firecracker rejects, or the contract tests
// below could not fail.
func TestAPITableRejectsBadRequests(t *testing.T) {
	const js = "application/json"
	for _, c := range []struct {
		name, method, path, ctype, body string
		want                            string // substring of a problem; "" = valid
	}{
		{"boot source", "PUT", "/boot-source", js, `{"kernel_image_path":"/k","boot_args":"console=ttyS0"}`, ""},
		{"documented pause", "PATCH", "/vm", js, `{"state":"Paused"}`, ""},
		{"documented create", "PUT", "/snapshot/create", js, `{"snapshot_type":"Full","snapshot_path":"./s","mem_file_path":"./m"}`, ""},
		{"documented load (mem_backend)", "PUT", "/snapshot/load", js, `{"snapshot_path":"./s","mem_backend":{"backend_type":"File","backend_path":"./m"},"resume_vm":true}`, ""},
		{"deprecated load (mem_file_path)", "PUT", "/snapshot/load", js, `{"snapshot_path":"./s","mem_file_path":"./m"}`, ""},
		{"drive", "PUT", "/drives/rootfs", js, `{"drive_id":"rootfs","path_on_host":"r","is_root_device":true,"is_read_only":true}`, ""},
		{"describe", "GET", "/", "", "", ""},

		{"unknown path", "PUT", "/snapshots/create", js, `{}`, "no operation"},
		{"wrong method", "POST", "/vm", js, `{"state":"Paused"}`, "no operation"},
		{"missing param", "PUT", "/drives/", js, `{"drive_id":"a","is_root_device":false}`, "no operation"},
		{"missing required", "PUT", "/snapshot/create", js, `{"snapshot_path":"s"}`, "mem_file_path is required"},
		{"unknown property", "PUT", "/vsock", js, `{"guest_cid":3,"uds_path":"v","cid":3}`, `no property "cid"`},
		{"wrong type", "PUT", "/machine-config", js, `{"vcpu_count":"2","mem_size_mib":128}`, "must be an integer"},
		{"not an integer", "PUT", "/machine-config", js, `{"vcpu_count":1.5,"mem_size_mib":128}`, "must be an integer"},
		{"below minimum", "PUT", "/machine-config", js, `{"vcpu_count":0,"mem_size_mib":128}`, "minimum 1"},
		{"above maximum", "PUT", "/machine-config", js, `{"vcpu_count":33,"mem_size_mib":128}`, "maximum 32"},
		{"cid below 3", "PUT", "/vsock", js, `{"guest_cid":2,"uds_path":"v"}`, "minimum 3"},
		{"enum", "PATCH", "/vm", js, `{"state":"Running"}`, "not one of"},
		{"nested enum", "PUT", "/snapshot/load", js, `{"snapshot_path":"s","mem_backend":{"backend_type":"Disk","backend_path":"m"}}`, "not one of"},
		{"nested required", "PUT", "/snapshot/load", js, `{"snapshot_path":"s","mem_backend":{"backend_type":"File"}}`, "backend_path is required"},
		{"null object", "PUT", "/snapshot/load", js, `{"snapshot_path":"s","mem_backend":null}`, "must be an object"},
		{"both mem fields", "PUT", "/snapshot/load", js, `{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}`, "exactly one"},
		{"no mem field", "PUT", "/snapshot/load", js, `{"snapshot_path":"s"}`, "exactly one"},
		{"empty body", "PUT", "/actions", js, ``, "needs a InstanceActionInfo body"},
		{"GET with body", "GET", "/", js, `{}`, "takes no body"},
		{"not JSON", "PUT", "/actions", js, `action_type=InstanceStart`, "not JSON"},
		{"wrong content type", "PUT", "/actions", "text/plain", `{"action_type":"InstanceStart"}`, "Content-Type"},
		{"not an object", "PUT", "/vsock", js, `[]`, "must be an object"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, problems := checkRequest(c.method, c.path, c.ctype, []byte(c.body))
			got := strings.Join(problems, "; ")
			if c.want == "" && got != "" {
				t.Fatalf("valid request rejected: %s", got)
			}
			if c.want != "" && !strings.Contains(got, c.want) {
				t.Fatalf("problems %q, want one mentioning %q", got, c.want)
			}
		})
	}
}

func newFake(t *testing.T, version string) (*fakeFC, *Client, string) {
	t.Helper()
	dir := shortTempDir(t)
	fc, err := startFakeFC(t, dir, version)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fc.exit("test over") })
	c := NewClient(filepath.Join(dir, apiSocketName))
	t.Cleanup(c.Close)
	return fc, c, dir
}

// shortTempDir keeps unix socket paths under the 108-byte limit.
func shortTempDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "fc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func touch(t testing.TB, path string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Every client method, in an order Firecracker accepts, against the strict
// fake: each request is checked against the API table, and the exact
// bodies are pinned so a renamed JSON field cannot slip through.
func TestClientRequestsMatchAPI(t *testing.T) {
	ctx := context.Background()
	fc, c, dir := newFake(t, "1.7.0")
	kernel := touch(t, filepath.Join(dir, "vmlinux"))
	touch(t, filepath.Join(dir, "disk"))
	if v, err := c.Version(ctx); err != nil || v != "1.7.0" {
		t.Fatalf("version %q %v", v, err)
	}
	if info, err := c.DescribeInstance(ctx); err != nil || info.State != InstanceNotStarted || info.VMMVersion != "1.7.0" {
		t.Fatalf("describe %+v %v", info, err)
	}
	for _, call := range []func() error{
		func() error { return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 2, MemSizeMiB: 16}) },
		func() error {
			return c.PutBootSource(ctx, BootSource{KernelImagePath: kernel, BootArgs: "console=ttyS0"})
		},
		func() error {
			return c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: "disk", IsRootDevice: true, IsReadOnly: true})
		},
		func() error { return c.PutVsock(ctx, Vsock{GuestCID: 3, UDSPath: "v.sock"}) },
		func() error { return c.StartInstance(ctx) },
		func() error { return c.PauseVM(ctx) },
		func() error {
			return c.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotType: SnapshotFull, SnapshotPath: "state", MemFilePath: "mem"})
		},
		func() error { return c.ResumeVM(ctx) },
	} {
		if err := call(); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{
		`GET /version`,
		`GET /`,
		`PUT /machine-config {"vcpu_count":2,"mem_size_mib":16,"smt":false,"track_dirty_pages":false}`,
		`PUT /boot-source {"kernel_image_path":"` + kernel + `","boot_args":"console=ttyS0"}`,
		`PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"disk","is_root_device":true,"is_read_only":true}`,
		`PUT /vsock {"guest_cid":3,"uds_path":"v.sock"}`,
		`PUT /actions {"action_type":"InstanceStart"}`,
		`PATCH /vm {"state":"Paused"}`,
		`PUT /snapshot/create {"snapshot_type":"Full","snapshot_path":"state","mem_file_path":"mem"}`,
		`PATCH /vm {"state":"Resumed"}`,
	}
	if got := fc.log(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// Load goes to a fresh process.
	fc2, c2, dir2 := newFake(t, "1.7.0")
	for _, f := range []string{"state", "mem", "disk"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir2, f), b, 0o600)
	}
	err := c2.LoadSnapshot(ctx, SnapshotLoadParams{SnapshotPath: "state", MemBackend: &MemoryBackend{BackendType: MemoryBackendFile, BackendPath: "mem"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := fc2.log(); len(got) != 1 || got[0] != `PUT /snapshot/load {"snapshot_path":"state","mem_backend":{"backend_type":"File","backend_path":"mem"},"resume_vm":false}` {
		t.Fatalf("load request %q", got)
	}
	if info, err := c2.DescribeInstance(ctx); err != nil || info.State != InstancePaused {
		t.Fatalf("after load: %+v %v", info, err)
	}
}

func TestClientErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("fault message", func(t *testing.T) {
		fc, c, _ := newFake(t, "1.7.0")
		fc.injectFault("PUT", "/actions", "Cannot start microvm without kernel configuration.")
		err := c.StartInstance(ctx)
		var ae *APIError
		if !errors.As(err, &ae) || ae.StatusCode != 400 || ae.FaultMessage != "Cannot start microvm without kernel configuration." ||
			ae.Method != "PUT" || ae.Path != "/actions" {
			t.Fatalf("got %#v (%v)", ae, err)
		}
		if !strings.Contains(err.Error(), "firecracker PUT /actions: 400 Bad Request: Cannot start") {
			t.Fatalf("message %q", err)
		}
	})
	t.Run("state rule", func(t *testing.T) {
		_, c, _ := newFake(t, "1.7.0")
		err := c.PauseVM(ctx)
		var ae *APIError
		if !errors.As(err, &ae) || !strings.Contains(ae.FaultMessage, "before starting") {
			t.Fatalf("pause before boot: %v", err)
		}
	})
	t.Run("load into a configured process", func(t *testing.T) {
		_, c, _ := newFake(t, "1.7.0")
		if err := c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 1, MemSizeMiB: 128}); err != nil {
			t.Fatal(err)
		}
		err := c.LoadSnapshot(ctx, SnapshotLoadParams{SnapshotPath: "s", MemBackend: &MemoryBackend{BackendType: MemoryBackendFile, BackendPath: "m"}})
		if !isAPIError(err) || !strings.Contains(err.Error(), "not allowed after configuring") {
			t.Fatalf("got %v", err)
		}
	})
	// Bodies that are not Firecracker's: a proxy's HTML, an empty 500.
	for _, c := range []struct {
		name, body string
		status     int
		want       string
	}{
		{"plain text", "upstream broke", 502, "upstream broke"},
		{"empty", "", 500, "(no fault message)"},
		{"other JSON", `{"error":"x"}`, 400, `{"error":"x"}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			cl := rawServer(t, func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(c.status)
				w.Write([]byte(c.body))
			})
			err := cl.PauseVM(ctx)
			var ae *APIError
			if !errors.As(err, &ae) || ae.StatusCode != c.status || ae.FaultMessage != c.want {
				t.Fatalf("got %v", err)
			}
		})
	}
	t.Run("undocumented success body", func(t *testing.T) {
		cl := rawServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("not json")) })
		if _, err := cl.Version(ctx); err == nil || isAPIError(err) || !strings.Contains(err.Error(), "not the documented JSON") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("context", func(t *testing.T) {
		block := make(chan struct{})
		cl := rawServer(t, func(w http.ResponseWriter, r *http.Request) { <-block })
		defer close(block)
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		if err := cl.PauseVM(cctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("no socket", func(t *testing.T) {
		cl := NewClient(filepath.Join(shortTempDir(t), "missing.sock"))
		if _, err := cl.DescribeInstance(ctx); err == nil || isAPIError(err) {
			t.Fatalf("got %v", err)
		}
	})
}

func rawServer(t *testing.T, h http.HandlerFunc) *Client {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c := NewClient(path)
	t.Cleanup(c.Close)
	return c
}

func TestDialVsock(t *testing.T) {
	ctx := context.Background()
	serve := func(t *testing.T, h func(c net.Conn)) string {
		path := filepath.Join(shortTempDir(t), "v.sock")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go h(c)
			}
		}()
		return path
	}
	readConnect := func(c net.Conn) string {
		var b [32]byte
		n, _ := c.Read(b[:])
		return string(b[:n])
	}
	t.Run("ok, stream intact", func(t *testing.T) {
		got := make(chan string, 1)
		path := serve(t, func(c net.Conn) {
			got <- readConnect(c)
			c.Write([]byte("OK 1073741824\nhello"))
		})
		conn, err := dialVsock(ctx, path, 1024)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if s := <-got; s != "CONNECT 1024\n" {
			t.Fatalf("sent %q", s)
		}
		var b [5]byte
		if _, err := conn.Read(b[:]); err != nil || string(b[:]) != "hello" {
			t.Fatalf("stream after handshake: %q %v", b, err)
		}
	})
	t.Run("no listener", func(t *testing.T) {
		path := serve(t, func(c net.Conn) { readConnect(c); c.Close() })
		if _, err := dialVsock(ctx, path, 1024); !errors.Is(err, errVsockRefused) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		path := serve(t, func(c net.Conn) { readConnect(c); c.Write([]byte("NO\n")) })
		if _, err := dialVsock(ctx, path, 1024); err == nil || !strings.Contains(err.Error(), `"NO"`) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("silent", func(t *testing.T) {
		path := serve(t, func(c net.Conn) { readConnect(c); time.Sleep(time.Second); c.Close() })
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := dialVsock(cctx, path, 1024); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 500*time.Millisecond {
			t.Fatalf("got %v after %s", err, time.Since(start))
		}
	})
}
