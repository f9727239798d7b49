package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Tests here need no QEMU.

// sparseRAM writes a sparse RAM file: data pages at the given page
// indexes (one of them all zeros, allocated), holes elsewhere.
func sparseRAM(t *testing.T, size int64, pages map[int64]byte) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "ram"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for pg, b := range pages {
		if _, err := f.WriteAt(bytes.Repeat([]byte{b}, pageBytes), pg*pageBytes); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func TestMemoryRoundTrip(t *testing.T) {
	const size = 64 << 20
	pages := map[int64]byte{0: 1, 1: 2, 2: 0 /* allocated zeros */, 3: 3, 4000: 9, 16383: 7}
	ram := sparseRAM(t, size, pages)
	var sec bytes.Buffer
	n, err := encodeMemory(&sec, ram, size)
	if err != nil || n != int64(sec.Len()) {
		t.Fatalf("encode: %d, %v", n, err)
	}
	// 5 non-zero pages: runs [0,1], [3], [4000], [16383] -> 4 records.
	if want := int64(memHeaderBytes + 4*memRecordBytes + 5*pageBytes + memRecordBytes); n != want {
		t.Errorf("section is %d bytes, want %d (zero pages and holes must not travel)", n, want)
	}
	out, err := os.Create(filepath.Join(t.TempDir(), "restored"))
	if err != nil {
		t.Fatal(err)
	}
	if err := decodeMemory(out, bytes.NewReader(sec.Bytes()), size); err != nil {
		t.Fatal(err)
	}
	if fileHash(t, out.Name()) != fileHash(t, ram.Name()) {
		t.Fatal("restored RAM differs")
	}
	var st syscall.Stat_t
	syscall.Stat(out.Name(), &st)
	if st.Size != size || st.Blocks*512 > 64*pageBytes {
		t.Errorf("restored file: size %d, %d bytes allocated; want sparse", st.Size, st.Blocks*512)
	}
}

func TestMemoryDecodeRefuses(t *testing.T) {
	const size = 1 << 20
	ram := sparseRAM(t, size, map[int64]byte{1: 1, 5: 5})
	var good bytes.Buffer
	if _, err := encodeMemory(&good, ram, size); err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good.Bytes())) }
	rec := func(off, n uint64) []byte {
		var r [memRecordBytes]byte
		binary.LittleEndian.PutUint64(r[:], off)
		binary.LittleEndian.PutUint64(r[8:], n)
		return r[:]
	}
	hdr := good.Bytes()[:memHeaderBytes]
	for _, tc := range []struct {
		name string
		sec  []byte
		ram  int64
		want error
	}{
		{"bad magic", mut(func(b []byte) []byte { b[0] = 'X'; return b }), size, vm.ErrCorrupt},
		{"other RAM size", good.Bytes(), 2 * size, vm.ErrIncompatible},
		{"truncated", good.Bytes()[:good.Len()-20], size, vm.ErrCorrupt},
		{"trailing bytes", append(bytes.Clone(good.Bytes()), 0), size, vm.ErrCorrupt},
		{"record past RAM", append(append(bytes.Clone(hdr), rec(size-10, 20)...), make([]byte, 20)...), size, vm.ErrCorrupt},
		{"records out of order", append(append(append(append(bytes.Clone(hdr), rec(8192, 1)...), 1), rec(0, 1)...), 1), size, vm.ErrCorrupt},
		{"empty record", append(bytes.Clone(hdr), rec(0, 0)...), size, vm.ErrCorrupt},
		{"empty", nil, size, vm.ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _ := os.Create(filepath.Join(t.TempDir(), "m"))
			defer out.Close()
			if err := decodeMemory(out, bytes.NewReader(tc.sec), tc.ram); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestCopySparse(t *testing.T) {
	const size = 8 << 20
	src := sparseRAM(t, size, map[int64]byte{0: 1, 100: 2, 2047: 3})
	dst, _ := os.Create(filepath.Join(t.TempDir(), "dst"))
	dst.Truncate(size)
	n, err := copySparse(dst, src, size)
	if err != nil || n != 3*pageBytes {
		t.Fatalf("copied %d bytes, %v; want the 3 data pages only", n, err)
	}
	if fileHash(t, dst.Name()) != fileHash(t, src.Name()) {
		t.Fatal("copy differs")
	}
}

func fileHash(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestCheckSnapshot(t *testing.T) {
	f := &Factory{qemuVersion: "7.2.22", accel: AccelTCG, cpu: "qemu64"}
	good := vm.SnapshotMetadata{SnapshotID: "s", Backend: BackendName, Architecture: vm.HostArchitecture(), Layout: vm.LayoutSplit,
		IsFullSnapshot: true, MemoryMiB: 256, VCPUCount: 1, Compat: compat("7.2.22", AccelTCG, "qemu64")}
	cfg := vm.Config{MemoryMiB: 256, VCPUs: 1}
	if err := f.checkSnapshot(good, cfg); err != nil {
		t.Fatalf("good snapshot refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		mut  func(*vm.SnapshotMetadata, *vm.Config)
		why  string
	}{
		{"backend", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Backend = "firecracker" }, "written by firecracker"},
		{"arch", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Architecture = "riscv64" }, "taken on riscv64"},
		{"layout none", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Layout = vm.LayoutNone }, "no VM state"},
		{"memory", func(m *vm.SnapshotMetadata, c *vm.Config) { c.MemoryMiB = 1024 }, "its machine has 1 vCPUs and 256 MiB"},
		{"vcpus", func(m *vm.SnapshotMetadata, c *vm.Config) { c.VCPUs = 2 }, "1 vCPUs"},
		{"qemu version", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Compat = compat("8.2.0", AccelTCG, "qemu64") }, `qemu_version: the snapshot has "8.2.0"`},
		{"cpu", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Compat = compat("7.2.22", AccelTCG, "host:EPYC") }, `cpu: the snapshot has "host:EPYC"`},
		{"missing fact", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Compat = map[string]string{} }, "the snapshot does not record it"},
		{"extra fact", func(m *vm.SnapshotMetadata, c *vm.Config) { m.Compat = cloneMap(m.Compat); m.Compat["iommu"] = "on" }, `iommu: the snapshot has "on", this host does not know it`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			md, c := good, cfg
			tc.mut(&md, &c)
			err := f.checkSnapshot(md, c)
			if !errors.Is(err, vm.ErrIncompatible) || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("got %v, want ErrIncompatible mentioning %q", err, tc.why)
			}
		})
	}
}

// fakeQMP serves one QMP client on a unix socket.
func fakeQMP(t *testing.T, path string, handle func(cmd string, id json.RawMessage, w *bufio.Writer)) {
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		w := bufio.NewWriter(c)
		w.WriteString(`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}` + "\n")
		w.Flush()
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			json.Unmarshal(sc.Bytes(), &req)
			handle(req.Execute, req.ID, w)
			w.Flush()
		}
	}()
}

func TestQMPClient(t *testing.T) {
	// A path longer than sun_path: reached through /proc/self/fd.
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	os.MkdirAll(dir, 0o755)
	sock := "qmp.sock"
	wd, _ := os.Getwd()
	os.Chdir(dir) // listen with a short relative path, as QEMU does
	fakeQMP(t, sock, func(cmd string, id json.RawMessage, w *bufio.Writer) {
		switch cmd {
		case "qmp_capabilities":
			w.WriteString(`{"return": {}, "id": ` + string(id) + "}\n")
		case "query-status":
			// An event first; the reply must still find its caller.
			w.WriteString(`{"event": "STOP", "data": {}}` + "\n")
			w.WriteString(`{"return": {"status": "paused", "running": false}, "id": ` + string(id) + "}\n")
		case "bad":
			w.WriteString(`{"error": {"class": "GenericError", "desc": "no way"}, "id": ` + string(id) + "}\n")
		case "hang":
			// never answers
		}
	})
	os.Chdir(wd)
	full := filepath.Join(dir, sock)
	if len(full) <= sunPathMaxBytes {
		t.Fatalf("test path too short (%d)", len(full))
	}
	ctx := testCtx(t, 30*time.Second)
	q, err := dialQMP(ctx, full)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if q.Version != "7.2.22" {
		t.Errorf("version %q", q.Version)
	}
	events, cancel := q.subscribe()
	defer cancel()
	if st, err := q.status(ctx); err != nil || st != "paused" {
		t.Fatalf("status = %q, %v", st, err)
	}
	if ev := <-events; ev.Name != "STOP" {
		t.Errorf("event %+v", ev)
	}
	var qe *QMPError
	if err := q.Call(ctx, "bad", nil, nil); !errors.As(err, &qe) || qe.Desc != "no way" {
		t.Fatalf("error reply: %v", err)
	}
	hctx, hcancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer hcancel()
	if err := q.Call(hctx, "hang", nil, nil); !errors.Is(err, vm.ErrTimeout) {
		t.Fatalf("unanswered call: %v, want ErrTimeout", err)
	}
}

func TestReadProcStat(t *testing.T) {
	st, err := readProcStat(os.Getpid())
	if err != nil || st.startTicks == 0 || st.state == 'Z' {
		t.Fatalf("%+v %v", st, err)
	}
	p := adopt(os.Getpid(), st.startTicks)
	if !p.alive() {
		t.Fatal("this process is not alive")
	}
	if adopt(os.Getpid(), st.startTicks+1).alive() {
		t.Fatal("a recycled pid (other start time) counts as alive")
	}
}
