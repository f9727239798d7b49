package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/store/mem"
	"github.com/kelpie/teleport/store/storetest"
)

type stepClock struct{ t time.Time }

func (c *stepClock) now() time.Time { return c.t }

func jsonLines(t *testing.T, s string) []progressLine {
	t.Helper()
	var out []progressLine
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		var pl progressLine
		if err := json.Unmarshal([]byte(l), &pl); err != nil {
			t.Fatalf("not a JSON line: %q", l)
		}
		out = append(out, pl)
	}
	return out
}

func TestProgressJSONLines(t *testing.T) {
	var buf bytes.Buffer
	clk := &stepClock{time.Unix(1000, 0)}
	p := newProgressTo(&buf, "download", "pkg-1", 100<<20, true, clk.now)
	for i := 0; i < 10; i++ {
		clk.t = clk.t.Add(500 * time.Millisecond)
		p.add(10 << 20) // 20 MiB/s
	}
	p.finish(nil)
	lines := jsonLines(t, buf.String())
	if len(lines) != 6 { // one per second of the five, and done
		t.Fatalf("%d lines:\n%s", len(lines), buf.String())
	}
	mid := lines[2]
	if mid.Event != "progress" || mid.Op != "download" || mid.ID != "pkg-1" || mid.Bytes != 60<<20 || mid.Total != 100<<20 {
		t.Fatalf("progress line %+v", mid)
	}
	if want := float64(20 << 20); mid.Rate < want*0.99 || mid.Rate > want*1.01 || mid.ETASec < 1.9 || mid.ETASec > 2.1 {
		t.Fatalf("rate %.0f eta %.1f, want %.0f and 2 s", mid.Rate, mid.ETASec, want)
	}
	done := lines[len(lines)-1]
	if done.Event != "done" || done.OK == nil || !*done.OK || done.Bytes != 100<<20 || done.ElapsedS != 5 {
		t.Fatalf("done line %+v", done)
	}
}

func TestProgressTerminalBar(t *testing.T) {
	var buf bytes.Buffer
	clk := &stepClock{time.Unix(1000, 0)}
	p := newProgressTo(&buf, "upload", "pkg-2", 1<<30, false, clk.now)
	clk.t = clk.t.Add(time.Second)
	p.add(256 << 20)
	out := buf.String()
	for _, want := range []string{"\rupload pkg-2", "256.0 MiB / 1.0 GiB", "[######..................]", " 25%", "256.0 MiB/s", "ETA 3s", "\x1b[K"} {
		if !strings.Contains(out, want) {
			t.Fatalf("bar %q lacks %q", out, want)
		}
	}
	clk.t = clk.t.Add(time.Second)
	p.finish(errors.New("boom"))
	if !strings.HasSuffix(buf.String(), "failed\x1b[K\n") {
		t.Fatalf("final bar %q", buf.String())
	}
}

// A transfer under the bar threshold stays silent on a terminal.
func TestProgressSmallIsQuiet(t *testing.T) {
	var buf bytes.Buffer
	clk := &stepClock{time.Unix(1000, 0)}
	p := newProgressTo(&buf, "upload", "tiny", 4096, false, clk.now)
	clk.t = clk.t.Add(time.Second)
	p.add(4096)
	p.finish(nil)
	if buf.Len() != 0 {
		t.Fatalf("printed %q", buf.String())
	}
	var nilP *progress
	nilP.add(1)
	nilP.reach(5)
	nilP.finish(nil)
}

// The store wrapper counts uploads and downloads (furthest byte read,
// re-reads not double counted) and keeps the bytes intact.
func TestProgressStoreWrapper(t *testing.T) {
	ctx := context.Background()
	var errBuf bytes.Buffer
	e := &env{stdout: io.Discard, stderr: &errBuf, getenv: func(string) string { return "" }}
	st := withProgress(e, mem.New(), true)
	blob := storetest.Payload(1, 3<<20)
	w, err := st.Create(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(w, bytes.NewReader(blob)); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(ctx, storetest.Manifest("p")); err != nil {
		t.Fatal(err)
	}
	r, err := st.Open(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	io.ReadAll(io.NewSectionReader(r, 0, r.Size())) // a second pass
	r.Close()
	if !bytes.Equal(got, blob) {
		t.Fatal("bytes changed through the wrapper")
	}
	lines := jsonLines(t, errBuf.String())
	up, down := lines[0], lines[len(lines)-1]
	if up.Event != "done" || up.Op != "upload" || up.Bytes != 3<<20 || up.Total != 3<<20 || !*up.OK {
		t.Fatalf("upload line %+v", up)
	}
	if down.Event != "done" || down.Op != "download" || down.Bytes != 3<<20 || down.Total != 3<<20 || !*down.OK {
		t.Fatalf("download line %+v", down)
	}
	// Without a terminal or --json the store is not wrapped at all.
	plain := mem.New()
	if withProgress(e, plain, false) != plain {
		t.Fatal("wrapped with nowhere to report")
	}
}
