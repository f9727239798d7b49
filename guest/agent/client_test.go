package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// pipeServer starts a Server on one end of a net.Pipe and returns a Client
// on the other.
func pipeServer(t *testing.T) (*Client, string) {
	t.Helper()
	dir := t.TempDir()
	hostEnd, guestEnd := net.Pipe()
	srv := NewServer(ServerConfig{DefaultWorkdir: dir, Logf: t.Logf})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(ctx, guestEnd)
	}()
	c := NewClient(hostEnd)
	t.Cleanup(func() {
		c.Close()
		guestEnd.Close()
		cancel()
		<-done
	})
	return c, dir
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestClientServer(t *testing.T) {
	c, dir := pipeServer(t)
	ctx := testCtx(t)

	p, err := c.Ping(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p.Version != Version || p.Protocol != ProtocolVersion || p.AgentUptime <= 0 {
		t.Errorf("ping = %+v", p)
	}

	tests := []struct {
		name string
		req  ExecRequest
		want ExecResult // compared: ExitCode, Stdout, Stderr, flags
	}{
		{"echo", ExecRequest{Cmd: "echo", Args: []string{"hi"}}, ExecResult{Stdout: []byte("hi\n")}},
		{"exit code", ExecRequest{Shell: "echo oops >&2; exit 7"}, ExecResult{ExitCode: 7, Stderr: []byte("oops\n")}},
		{"stdin", ExecRequest{Cmd: "cat", Stdin: []byte("abc\x00def")}, ExecResult{Stdout: []byte("abc\x00def")}},
		{"env", ExecRequest{Shell: `echo "$A-$B"`, Env: []string{"A=1", "B=2", "A=3"}}, ExecResult{Stdout: []byte("3-2\n")}},
		{"default workdir", ExecRequest{Cmd: "pwd"}, ExecResult{Stdout: []byte(dir + "\n")}},
		{"workdir", ExecRequest{Cmd: "pwd", Workdir: "/"}, ExecResult{Stdout: []byte("/\n")}},
		{"truncated", ExecRequest{Shell: "head -c 5000 /dev/zero", OutputLimit: 100},
			ExecResult{Stdout: make([]byte, 100), StdoutTruncated: true}},
		{"timeout", ExecRequest{Shell: "echo a; sleep 10; echo b", Timeout: 200 * time.Millisecond},
			ExecResult{ExitCode: -1, Stdout: []byte("a\n"), TimedOut: true}},
		{"signal", ExecRequest{Shell: "kill -TERM $$"}, ExecResult{ExitCode: -1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := c.Exec(ctx, tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if r.ExitCode != tt.want.ExitCode || !bytes.Equal(r.Stdout, tt.want.Stdout) ||
				!bytes.Equal(r.Stderr, tt.want.Stderr) || r.StdoutTruncated != tt.want.StdoutTruncated ||
				r.TimedOut != tt.want.TimedOut {
				t.Errorf("got %+v\nwant %+v", r, tt.want)
			}
		})
	}

	if r, err := c.Exec(ctx, ExecRequest{Shell: "sleep 5 &", Timeout: 3 * time.Second}); err != nil || r.Duration > 2*time.Second {
		t.Errorf("backgrounded child holding stdout: %+v %v", r, err)
	}
	if r, err := c.Exec(ctx, ExecRequest{Cmd: "sleep", Args: []string{"1"}, Background: true}); err != nil || r.Pid == 0 {
		t.Errorf("background: %+v %v", r, err)
	}

	// Errors.
	if _, err := c.Exec(ctx, ExecRequest{Cmd: "definitely-not-a-command"}); !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, ErrRemote) {
		t.Errorf("missing command: %v", err)
	}
	if _, err := c.Exec(ctx, ExecRequest{}); !isCode(err, CodeInvalid) {
		t.Errorf("empty exec: %v", err)
	}
	if _, err := c.Exec(ctx, ExecRequest{Cmd: "true", Workdir: "/nonexistent"}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("bad workdir: %v", err)
	}
	if err := c.Call(ctx, "bogus", struct{}{}, nil); !isCode(err, CodeUnsupported) {
		t.Errorf("unknown op: %v", err)
	}

	// Files.
	path := filepath.Join(dir, "a/b/file")
	data := bytes.Repeat([]byte{0, 1, 2, 0xff}, 1000)
	if err := c.WriteFile(ctx, path, data, 0o640); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("stat: %v %v", st, err)
	}
	got, err := c.ReadFile(ctx, path)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %d bytes, %v", len(got), err)
	}
	var rr ReadFileResult
	if err := c.Call(ctx, OpReadFile, ReadFileRequest{Path: path, Offset: 3996, Limit: 10}, &rr); err != nil ||
		!bytes.Equal(rr.Data, []byte{0, 1, 2, 0xff}) || !rr.EOF || rr.Size != 4000 {
		t.Errorf("ranged read: %+v %v", rr, err)
	}
	var wr WriteFileResult
	if err := c.Call(ctx, OpWriteFile, WriteFileRequest{Path: path, Data: []byte("x"), Append: true}, &wr); err != nil || wr.Size != 4001 {
		t.Errorf("append: %+v %v", wr, err)
	}
	if _, err := c.ReadFile(ctx, filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := c.ReadFile(ctx, dir); !isCode(err, CodeIsDirectory) {
		t.Errorf("read dir: %v", err)
	}
	if err := c.WriteFile(ctx, path, nil, 0); err != nil {
		t.Fatal(err)
	}
	if got, err := c.ReadFile(ctx, path); err != nil || len(got) != 0 {
		t.Errorf("truncate: %q %v", got, err)
	}
	if err := c.Sync(ctx); err != nil {
		t.Error(err)
	}
}

func isCode(err error, code string) bool {
	var re *RemoteError
	return errors.As(err, &re) && re.Code == code
}

// A slow exec must not block other calls on the same connection.
func TestClientConcurrent(t *testing.T) {
	c, _ := pipeServer(t)
	ctx := testCtx(t)
	slow := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, ExecRequest{Cmd: "sleep", Args: []string{"2"}})
		slow <- err
	}()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := strings.Repeat("x", i)
			r, err := c.Exec(ctx, ExecRequest{Cmd: "printf", Args: []string{"%s", want}})
			if err != nil || string(r.Stdout) != want {
				t.Errorf("exec %d: %+v %v", i, r, err)
			}
		}(i)
	}
	wg.Wait()
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("concurrent calls took %v: blocked behind the slow one?", d)
	}
	if err := <-slow; err != nil {
		t.Error(err)
	}
}

// fakeAgent answers requests with a custom function on a net.Pipe.
func fakeAgent(t *testing.T, answer func(w io.Writer, req Request)) *Client {
	t.Helper()
	hostEnd, guestEnd := net.Pipe()
	go func() {
		fr := NewFrameReader(guestEnd, 0)
		for {
			p, err := fr.ReadFrame()
			if err != nil {
				return
			}
			var req Request
			if json.Unmarshal(p, &req) == nil {
				answer(guestEnd, req)
			}
		}
	}()
	c := NewClient(hostEnd)
	t.Cleanup(func() { c.Close(); guestEnd.Close() })
	return c
}

func writeResp(t *testing.T, w io.Writer, resp Response) {
	b, _ := json.Marshal(resp)
	if err := WriteFrame(w, b); err != nil {
		t.Log(err)
	}
}

func TestClientTimeoutAndStale(t *testing.T) {
	var mu sync.Mutex
	var ignored []uint64
	c := fakeAgent(t, func(w io.Writer, req Request) {
		mu.Lock()
		defer mu.Unlock()
		if len(ignored) == 0 {
			ignored = append(ignored, req.ID) // never answer the first request
			return
		}
		// Garbage, a stale response to the ignored request, a response
		// to an unknown ID, a bad message, then the real answer.
		w.Write([]byte("garbage\x00KAGT"))
		writeResp(t, w, Response{ID: ignored[0], Result: json.RawMessage(`{"version":"stale"}`)})
		writeResp(t, w, Response{ID: 12345, Result: json.RawMessage(`{"version":"unknown"}`)})
		WriteFrame(w, []byte(`not json`))
		writeResp(t, w, Response{ID: req.ID, Result: json.RawMessage(`{"version":"real"}`)})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := c.Ping(ctx)
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	p, err := c.Ping(testCtx(t))
	if err != nil || p.Version != "real" {
		t.Fatalf("ping = %+v, %v", p, err)
	}
	st := c.Stats()
	if st.StaleResponses != 2 || st.BadMessages != 1 || st.Frames.SkippedBytes == 0 {
		t.Errorf("stats = %+v", st)
	}
}

func TestClientWaitReady(t *testing.T) {
	var mu sync.Mutex
	n := 0
	c := fakeAgent(t, func(w io.Writer, req Request) {
		mu.Lock()
		n++
		k := n
		mu.Unlock()
		if k < 3 { // lose the first two pings (guest not listening yet)
			return
		}
		writeResp(t, w, Response{ID: req.ID, Result: json.RawMessage(`{"version":"ok"}`)})
	})
	p, err := c.WaitReady(testCtx(t))
	if err != nil || p.Version != "ok" {
		t.Fatalf("WaitReady = %+v, %v", p, err)
	}
}

func TestClientErrors(t *testing.T) {
	c := fakeAgent(t, func(w io.Writer, req Request) {
		switch req.Op {
		case "bad-result":
			writeResp(t, w, Response{ID: req.ID, Result: json.RawMessage(`"a string"`)})
		case "no-result":
			writeResp(t, w, Response{ID: req.ID})
		}
	})
	ctx := testCtx(t)
	if err := c.Call(ctx, "bad-result", nil, &PingResult{}); !errors.Is(err, ErrProtocol) {
		t.Errorf("bad result: %v", err)
	}
	if err := c.Call(ctx, "no-result", nil, &PingResult{}); !errors.Is(err, ErrProtocol) {
		t.Errorf("no result: %v", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.Ping(canceled); !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
		t.Errorf("canceled: %v", err)
	}
	// A call waiting when the connection drops fails with ErrClosed.
	errc := make(chan error, 1)
	go func() { _, err := c.Ping(ctx); errc <- err }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("after close: %v", err)
	}
	if _, err := c.Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("closed client: %v", err)
	}
	<-c.Done()
}

// A host that vanished mid-frame leaves a partial request in the agent's
// input. A new Client on the same stream (as after a snapshot restore, where
// the guest did not see a disconnect) must still get answers.
func TestReconnectAfterPartialFrame(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	srv := NewServer(ServerConfig{DefaultWorkdir: t.TempDir()})
	go srv.ServeConn(context.Background(), guestEnd)
	t.Cleanup(func() { hostEnd.Close(); guestEnd.Close() })

	frame, _ := AppendFrame(nil, []byte(`{"id":99,"op":"exec","args":{"shell":"echo should-not-run"}}`))
	if _, err := hostEnd.Write(frame[:20]); err != nil {
		t.Fatal(err)
	}
	c := NewClient(hostEnd)
	r, err := c.Exec(testCtx(t), ExecRequest{Cmd: "echo", Args: []string{"ok"}})
	if err != nil || string(r.Stdout) != "ok\n" {
		t.Fatalf("exec after partial frame: %+v %v", r, err)
	}
}

// The Client must deliver results to the right caller even when the server
// answers out of order.
func TestClientOutOfOrder(t *testing.T) {
	var mu sync.Mutex
	var held []Request
	c := fakeAgent(t, func(w io.Writer, req Request) {
		mu.Lock()
		defer mu.Unlock()
		held = append(held, req)
		if len(held) < 3 {
			return
		}
		for i := len(held) - 1; i >= 0; i-- {
			var a ExecRequest
			json.Unmarshal(held[i].Args, &a)
			res, _ := json.Marshal(ExecResult{Stdout: []byte(a.Cmd)})
			writeResp(t, w, Response{ID: held[i].ID, Result: res})
		}
	})
	ctx := testCtx(t)
	var wg sync.WaitGroup
	for _, name := range []string{"a", "b", "c"} {
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			r, err := c.Exec(ctx, ExecRequest{Cmd: name})
			if err != nil || string(r.Stdout) != name {
				t.Errorf("%s: %+v %v", name, r, err)
			}
		}(name)
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
}
