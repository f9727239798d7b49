package firecracker

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc64"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm/hostvm"
	"github.com/kelpie/teleport/vm/hostvm/hostvmtest"
)

// fakeFC is a Firecracker process in the test binary. It serves the API on
// <dir>/api.sock, checks every request against the API definition
// (swagger_test.go) and answers as Firecracker documents: 204 or 200 with
// the documented body, 400 with {"fault_message": ...}. It models the
// documented rules Kelpie depends on: pre-boot-only resources, pause before
// snapshot/create, snapshot/load only into a fresh process, a failed load
// ends the process, the state file carries a CRC64 and the memory file
// nothing, device paths resolve relative to the working directory, and a
// snapshot resets every vsock connection. Its guest (hostvmtest.KVGuest) is a
// key-value machine speaking the Kelpie agent protocol over the hybrid vsock
// socket.
type fakeFC struct {
	// errorf reports a request that breaks the API definition: the test's
	// Errorf in process, stderr (the log file) in a helper process.
	errorf  func(format string, args ...any)
	dir     string
	version string
	// strict makes a request that breaks the API definition fail the
	// test; contract tests that send bad requests on purpose turn it off.
	strict bool

	api    net.Listener
	server *http.Server

	mu        sync.Mutex
	cond      *sync.Cond // signals state changes to the guest
	state     string     // InstanceNotStarted, InstanceRunning, InstancePaused
	touched   bool       // a boot-specific resource was configured
	machine   MachineConfig
	boot      *BootSource
	drives    map[string]Drive
	vsock     *Vsock
	guest     *hostvmtest.KVGuest
	vsockLn   net.Listener
	conns     map[net.Conn]bool
	requests  []string // "METHOD /path body", in order
	faults    map[string]string
	exited    chan struct{}
	exitWhy   string
	bootDelay time.Duration
	bootedAt  time.Time
	// dropLoadAnswer: a failed load ends the process without answering.
	dropLoadAnswer bool
}

// fcState is the fake's microVM state file: JSON, then a CRC64 (ECMA) of
// the JSON, as Firecracker's state file ends in a CRC64.
type fcState struct {
	Magic      string        `json:"magic"`
	VMMVersion string        `json:"vmm_version"`
	Machine    MachineConfig `json:"machine"`
	Drives     []Drive       `json:"drives"`
	Vsock      *Vsock        `json:"vsock"`
}

const fcStateMagic = "fake-firecracker-vmstate"

var crcTable = crc64.MakeTable(crc64.ECMA)

func startFakeFC(t testing.TB, dir, version string) (*fakeFC, error) {
	ln, err := net.Listen("unix", filepath.Join(dir, apiSocketName))
	if err != nil {
		return nil, err
	}
	errorf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "ERROR: "+format+"\n", args...) }
	if t != nil {
		errorf = t.Errorf
	}
	fc := &fakeFC{errorf: errorf, dir: dir, version: version, strict: true, api: ln, state: InstanceNotStarted,
		machine: MachineConfig{VCPUCount: 1, MemSizeMiB: 128}, drives: map[string]Drive{},
		conns: map[net.Conn]bool{}, faults: map[string]string{}, exited: make(chan struct{})}
	fc.cond = sync.NewCond(&fc.mu)
	fc.server = &http.Server{Handler: http.HandlerFunc(fc.serve)}
	go fc.server.Serve(ln)
	return fc, nil
}

// process interface.
func (fc *fakeFC) done() <-chan struct{} { return fc.exited }

func (fc *fakeFC) kill(ctx context.Context) error {
	fc.exit("killed")
	return nil
}

func (fc *fakeFC) exitReason() string {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	return fc.exitWhy
}

// exit ends the "process": its sockets close and done is closed.
func (fc *fakeFC) exit(why string) {
	fc.mu.Lock()
	if fc.exitWhy != "" {
		fc.mu.Unlock()
		return
	}
	fc.exitWhy = why
	if fc.vsockLn != nil {
		fc.vsockLn.Close()
	}
	for c := range fc.conns {
		c.Close()
	}
	if fc.guest != nil {
		fc.guest.Stop()
	}
	fc.cond.Broadcast()
	fc.mu.Unlock()
	fc.api.Close()
	// Close (not Shutdown): a dying process answers nothing more. The
	// handler that asked for the exit has already written its response.
	go fc.server.Close()
	close(fc.exited)
}

// injectFault makes the next "METHOD /path" fail with a 400 and message.
func (fc *fakeFC) injectFault(method, path, msg string) {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	fc.faults[method+" "+path] = msg
}

func (fc *fakeFC) log() []string {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	return append([]string(nil), fc.requests...)
}

func (fc *fakeFC) reply(w http.ResponseWriter, status int, body any) {
	if body == nil {
		w.WriteHeader(status)
		return
	}
	b, _ := json.Marshal(body)
	// Firecracker's server sends Content-Length; with it the response is
	// complete once flushed, before a failed load ends the process.
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
	w.(http.Flusher).Flush()
}

func (fc *fakeFC) fault(w http.ResponseWriter, format string, args ...any) {
	fc.reply(w, http.StatusBadRequest, map[string]string{"fault_message": fmt.Sprintf(format, args...)})
}

func (fc *fakeFC) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 51200))
	if err != nil {
		fc.fault(w, "read body: %v", err)
		return
	}
	op, problems := checkRequest(r.Method, r.URL.Path, r.Header.Get("Content-Type"), body)
	fc.mu.Lock()
	fc.requests = append(fc.requests, strings.TrimSpace(r.Method+" "+r.URL.Path+" "+string(body)))
	fault, injected := fc.faults[r.Method+" "+r.URL.Path]
	delete(fc.faults, r.Method+" "+r.URL.Path)
	fc.mu.Unlock()
	if len(problems) > 0 {
		if fc.strict {
			fc.errorf("request %s %s breaks the Firecracker API definition: %s", r.Method, r.URL.Path, strings.Join(problems, "; "))
		}
		// Firecracker rejects malformed requests with 400 and a message.
		fc.fault(w, "%s", strings.Join(problems, "; "))
		return
	}
	if injected {
		fc.fault(w, "%s", fault)
		if op.path == "/snapshot/load" {
			fc.exit("snapshot load failed: " + fault)
		}
		return
	}
	fc.mu.Lock()
	defer fc.mu.Unlock()
	switch op.method + " " + op.path {
	case "GET /":
		fc.reply(w, http.StatusOK, InstanceInfo{AppName: "Firecracker", ID: "anonymous-instance", State: fc.state, VMMVersion: fc.version})
	case "GET /version":
		fc.reply(w, http.StatusOK, map[string]string{"firecracker_version": fc.version})
	case "GET /machine-config":
		fc.reply(w, http.StatusOK, fc.machine)
	case "PUT /machine-config":
		var m MachineConfig
		if !fc.decode(w, body, &m) || !fc.preBoot(w) {
			return
		}
		fc.machine, fc.touched = m, true
		fc.reply(w, http.StatusNoContent, nil)
	case "PUT /boot-source":
		var b BootSource
		if !fc.decode(w, body, &b) || !fc.preBoot(w) {
			return
		}
		fc.boot, fc.touched = &b, true
		fc.reply(w, http.StatusNoContent, nil)
	case "PUT /drives/{drive_id}":
		var d Drive
		if !fc.decode(w, body, &d) || !fc.preBoot(w) {
			return
		}
		_, params := findOperation(r.Method, r.URL.Path)
		if params["drive_id"] != d.DriveID {
			fc.fault(w, "The id from the path [%s] does not match the id from the body [%s]!", params["drive_id"], d.DriveID)
			return
		}
		if _, err := os.Stat(fc.path(d.PathOnHost)); err != nil {
			fc.fault(w, "Unable to create the block device: %v", err)
			return
		}
		fc.drives[d.DriveID], fc.touched = d, true
		fc.reply(w, http.StatusNoContent, nil)
	case "PUT /vsock":
		var v Vsock
		if !fc.decode(w, body, &v) || !fc.preBoot(w) {
			return
		}
		fc.vsock, fc.touched = &v, true
		fc.reply(w, http.StatusNoContent, nil)
	case "PUT /actions":
		var a instanceAction
		if !fc.decode(w, body, &a) {
			return
		}
		if a.ActionType != actionInstanceStart {
			fc.reply(w, http.StatusNoContent, nil)
			return
		}
		fc.startLocked(w)
	case "PATCH /vm":
		var s vmState
		if !fc.decode(w, body, &s) {
			return
		}
		if fc.state == InstanceNotStarted {
			fc.fault(w, "The requested operation is not supported before starting the microVM.")
			return
		}
		if s.State == vmStatePaused {
			fc.state = InstancePaused
		} else {
			fc.state = InstanceRunning
		}
		fc.guest.SetPaused(fc.state == InstancePaused)
		fc.cond.Broadcast()
		fc.reply(w, http.StatusNoContent, nil)
	case "PUT /snapshot/create":
		var p SnapshotCreateParams
		if !fc.decode(w, body, &p) {
			return
		}
		fc.createLocked(w, p)
	case "PUT /snapshot/load":
		var p SnapshotParams
		if !fc.decode(w, body, &p) {
			return
		}
		fc.loadLocked(w, p)
	default:
		fc.fault(w, "the fake does not implement %s %s", op.method, op.path)
	}
}

// SnapshotParams is the part of SnapshotLoadParams the fake reads.
type SnapshotParams struct {
	SnapshotPath string         `json:"snapshot_path"`
	MemBackend   *MemoryBackend `json:"mem_backend"`
	ResumeVM     bool           `json:"resume_vm"`
}

func (fc *fakeFC) decode(w http.ResponseWriter, body []byte, v any) bool {
	if err := json.Unmarshal(body, v); err != nil {
		fc.fault(w, "An error occurred when deserializing the json body of a request: %v", err)
		return false
	}
	return true
}

func (fc *fakeFC) preBoot(w http.ResponseWriter) bool {
	if fc.state != InstanceNotStarted {
		fc.fault(w, "The requested operation is not supported after starting the microVM.")
		return false
	}
	return true
}

// path resolves a device path as Firecracker does: relative to its
// working directory.
func (fc *fakeFC) path(p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(fc.dir, p)
}

func (fc *fakeFC) startLocked(w http.ResponseWriter) {
	if fc.state != InstanceNotStarted {
		fc.fault(w, "The requested operation is not supported after starting the microVM.")
		return
	}
	if fc.boot == nil {
		fc.fault(w, "Cannot start microvm without kernel configuration.")
		return
	}
	for _, p := range []string{fc.boot.KernelImagePath, fc.boot.InitrdPath} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(fc.path(p)); err != nil {
			fc.fault(w, "Failed to start microVM: Cannot open the kernel or initrd image: %v", err)
			return
		}
	}
	if err := fc.listenVsockLocked(); err != nil {
		fc.fault(w, "Failed to start microVM: vsock: %v", err)
		return
	}
	fc.guest = hostvmtest.NewKVGuest()
	fc.state = InstanceRunning
	fc.bootedAt = time.Now()
	fc.cond.Broadcast()
	fc.reply(w, http.StatusNoContent, nil)
}

func (fc *fakeFC) listenVsockLocked() error {
	if fc.vsock == nil {
		return nil
	}
	ln, err := net.Listen("unix", fc.path(fc.vsock.UDSPath))
	if err != nil {
		return fmt.Errorf("Error binding to host-side Unix socket: %w", err)
	}
	fc.vsockLn = ln
	go fc.acceptVsock(ln)
	return nil
}

func (fc *fakeFC) createLocked(w http.ResponseWriter, p SnapshotCreateParams) {
	if fc.state != InstancePaused {
		fc.fault(w, "Create snapshot error: the microVM is not paused (state %s)", fc.state)
		return
	}
	if p.SnapshotType == "Diff" {
		fc.fault(w, "Diff snapshots are not enabled")
		return
	}
	var drives []Drive
	for _, d := range fc.drives {
		drives = append(drives, d)
	}
	sort.Slice(drives, func(i, j int) bool { return drives[i].DriveID < drives[j].DriveID })
	st, _ := json.Marshal(fcState{Magic: fcStateMagic, VMMVersion: fc.version, Machine: fc.machine, Drives: drives,
		Vsock: fc.vsock})
	st = binary.LittleEndian.AppendUint64(st, crc64.Checksum(st, crcTable))
	if err := os.WriteFile(fc.path(p.SnapshotPath), st, 0o600); err != nil {
		fc.fault(w, "Create snapshot error: cannot write the microVM state: %v", err)
		return
	}
	mem, err := fc.guest.Memory(0)
	if err == nil {
		err = writeMemory(fc.path(p.MemFilePath), mem, fc.machine.MemSizeMiB)
	}
	if err != nil {
		fc.fault(w, "Create snapshot error: cannot write the guest memory: %v", err)
		return
	}
	// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every open connection closes.
	for c := range fc.conns {
		c.Close()
		delete(fc.conns, c)
	}
	fc.reply(w, http.StatusNoContent, nil)
}

// writeMemory writes the guest's RAM: the key-value image, then zeros up
// to the machine's memory size (sparse).
func writeMemory(path string, image []byte, memMiB int) error {
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := fh.Write(image); err != nil {
		fh.Close()
		return err
	}
	if err := fh.Truncate(int64(memMiB) << 20); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}

func (fc *fakeFC) loadLocked(w http.ResponseWriter, p SnapshotParams) {
	if fc.state != InstanceNotStarted || fc.touched {
		fc.fault(w, "Loading a microVM snapshot not allowed after configuring boot-specific resources.")
		return
	}
	fail := func(format string, args ...any) {
		msg := "Load snapshot error: " + fmt.Sprintf(format, args...)
		if fc.dropLoadAnswer {
			// The process dies before its answer leaves.
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				conn.Close()
			}
		} else {
			fc.fault(w, "%s", msg)
		}
		// "On failure: a specific error is reported and then the current
		// Firecracker process is ended."
		fc.mu.Unlock()
		fc.exit(msg)
		fc.mu.Lock()
	}
	if p.MemBackend == nil || p.MemBackend.BackendType != MemoryBackendFile {
		fail("the fake loads guest memory from a File backend only")
		return
	}
	raw, err := os.ReadFile(fc.path(p.SnapshotPath))
	if err != nil {
		fail("Failed to open snapshot file: %v", err)
		return
	}
	if len(raw) < 8 || crc64.Checksum(raw[:len(raw)-8], crcTable) != binary.LittleEndian.Uint64(raw[len(raw)-8:]) {
		fail("Failed to load microVM state: CRC64 validation failed")
		return
	}
	var st fcState
	if err := json.Unmarshal(raw[:len(raw)-8], &st); err != nil || st.Magic != fcStateMagic {
		fail("Failed to load microVM state: not a state file")
		return
	}
	if st.VMMVersion != fc.version {
		fail("Snapshot version mismatch: the state was written by %s, this is %s", st.VMMVersion, fc.version)
		return
	}
	memPath := fc.path(p.MemBackend.BackendPath)
	fi, err := os.Stat(memPath)
	if err != nil {
		fail("Failed to open memory backend file: %v", err)
		return
	}
	if fi.Size() != int64(st.Machine.MemSizeMiB)<<20 {
		fail("memory file has %d bytes, the snapshot's guest has %d MiB", fi.Size(), st.Machine.MemSizeMiB)
		return
	}
	for _, d := range st.Drives {
		if _, err := os.Stat(fc.path(d.PathOnHost)); err != nil {
			fail("Failed to restore block device %s: %v", d.DriveID, err)
			return
		}
	}
	mem, err := os.ReadFile(memPath)
	if err != nil {
		fail("read memory: %v", err)
		return
	}
	guest := hostvmtest.NewKVGuest()
	if err := guest.LoadMemory(mem); err != nil {
		fail("guest memory unreadable: %v", err)
		return
	}
	fc.machine, fc.vsock, fc.guest = st.Machine, st.Vsock, guest
	for _, d := range st.Drives {
		fc.drives[d.DriveID] = d
	}
	if err := fc.listenVsockLocked(); err != nil {
		fail("Failed to restore devices: %v", err)
		return
	}
	fc.state = InstancePaused
	if p.ResumeVM {
		fc.state = InstanceRunning
	}
	fc.guest.SetPaused(fc.state == InstancePaused)
	fc.bootedAt = time.Now()
	fc.cond.Broadcast()
	fc.reply(w, http.StatusNoContent, nil)
}

// acceptVsock implements host-initiated connections: "CONNECT <port>\n",
// then "OK <host port>\n" if a guest process listens on the port,
// otherwise the connection is closed.
func (fc *fakeFC) acceptVsock(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go fc.serveVsock(c)
	}
}

func (fc *fakeFC) serveVsock(c net.Conn) {
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		c.Close()
		return
	}
	port, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "CONNECT "), 10, 32)
	fc.mu.Lock()
	// The agent listens once the guest has booted and is not paused.
	for fc.exitWhy == "" && fc.state == InstancePaused {
		fc.cond.Wait()
	}
	listening := err == nil && uint32(port) == hostvm.AgentVsockPort && fc.state == InstanceRunning &&
		fc.exitWhy == "" && time.Since(fc.bootedAt) >= fc.bootDelay
	guest := fc.guest
	if listening {
		fc.conns[c] = true
	}
	fc.mu.Unlock()
	if !listening {
		c.Close()
		return
	}
	fmt.Fprintf(c, "OK %d\n", 1073741824)
	guest.Serve(struct {
		io.Reader
		io.Writer
	}{br, c})
	fc.mu.Lock()
	delete(fc.conns, c)
	fc.mu.Unlock()
	c.Close()
}

// fakeLauncher starts fake Firecracker processes.
type fakeLauncher struct {
	t       testing.TB
	version string

	mu    sync.Mutex
	procs []*fakeFC
	// setup, when set, adjusts each new process (faults, boot delay).
	setup func(*fakeFC)
	// fail makes the next launch fail.
	fail error
}

func (l *fakeLauncher) launch(ctx context.Context, dir, id string) (process, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.fail; err != nil {
		l.fail = nil
		return nil, err
	}
	fc, err := startFakeFC(l.t, dir, l.version)
	if err != nil {
		return nil, err
	}
	if l.setup != nil {
		l.setup(fc)
	}
	l.procs = append(l.procs, fc)
	l.t.Cleanup(func() { fc.exit("test over") })
	return fc, nil
}

func (l *fakeLauncher) last() *fakeFC {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.procs[len(l.procs)-1]
}

func (l *fakeLauncher) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.procs)
}

func (l *fakeLauncher) running() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, p := range l.procs {
		select {
		case <-p.exited:
		default:
			n++
		}
	}
	return n
}
