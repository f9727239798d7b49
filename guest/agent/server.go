package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ServerConfig configures a Server. The zero value is usable.
type ServerConfig struct {
	// DefaultWorkdir is used for exec without Workdir ("" = /workspace if
	// it exists, else /).
	DefaultWorkdir string
	// ImageVersionFile is read for PingResult.ImageVersion
	// ("" = /etc/kelpie-image-version).
	ImageVersionFile string
	// MaxConcurrent bounds requests handled at once per connection (0 = 64).
	MaxConcurrent int
	// Logf, if set, receives diagnostic messages.
	Logf func(format string, args ...any)
}

// Server executes agent requests. One Server may serve many connections,
// one after another or at once.
type Server struct {
	cfg   ServerConfig
	start time.Time
}

// NewServer returns a Server.
func NewServer(cfg ServerConfig) *Server {
	if cfg.ImageVersionFile == "" {
		cfg.ImageVersionFile = "/etc/kelpie-image-version"
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 64
	}
	return &Server{cfg: cfg, start: time.Now()}
}

func (s *Server) logf(format string, args ...any) {
	if s.cfg.Logf != nil {
		s.cfg.Logf(format, args...)
	}
}

// ServeConn reads requests from rw until reading fails and answers each in
// its own goroutine. It returns the read error (io.EOF when the host side
// is not connected). Handlers still running when it returns write their
// responses to rw later; each response is one Write call, so rw's Write
// must be atomic per call (true for *os.File and net.Conn).
func (s *Server) ServeConn(ctx context.Context, rw io.ReadWriter) error {
	var wmu sync.Mutex
	sem := make(chan struct{}, s.cfg.MaxConcurrent)
	fr := NewFrameReader(rw, 0)
	var lastBad int64
	for {
		payload, err := fr.ReadFrame()
		if err != nil {
			if st := fr.Stats(); st.BadFrames > 0 || st.SkippedBytes > int64(len(SyncPreamble)) || fr.Buffered() > 0 {
				s.logf("connection ended: %v (skipped %d bytes, %d bad frames, dropped %d buffered bytes)",
					err, st.SkippedBytes, st.BadFrames, fr.Buffered())
			}
			return err
		}
		if st := fr.Stats(); st.BadFrames != lastBad {
			lastBad = st.BadFrames
			s.logf("resynced input stream (total: skipped %d bytes, %d bad frames)", st.SkippedBytes, st.BadFrames)
		}
		var req Request
		if err := json.Unmarshal(payload, &req); err != nil || req.ID == 0 || req.Op == "" {
			s.logf("ignoring malformed request (%d bytes)", len(payload))
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		go func() {
			defer func() { <-sem }()
			resp := s.Handle(ctx, &req)
			out, err := json.Marshal(resp)
			if err != nil {
				out, _ = json.Marshal(&Response{ID: req.ID, Error: &RemoteError{Op: req.Op, Code: CodeInternal, Message: err.Error()}})
			}
			buf, err := AppendFrame(nil, out)
			if err != nil {
				// Too large: report instead.
				out, _ = json.Marshal(&Response{ID: req.ID, Error: &RemoteError{Op: req.Op, Code: CodeTooLarge, Message: err.Error()}})
				buf, _ = AppendFrame(nil, out)
			}
			wmu.Lock()
			_, err = rw.Write(buf)
			wmu.Unlock()
			if err != nil {
				s.logf("write response %d (%s): %v", req.ID, req.Op, err)
			}
		}()
	}
}

// Handle executes one request and returns its response.
func (s *Server) Handle(ctx context.Context, req *Request) *Response {
	result, err := s.dispatch(ctx, req)
	resp := &Response{ID: req.ID}
	if err != nil {
		resp.Error = toRemoteError(req.Op, err)
		return resp
	}
	raw, err := json.Marshal(result)
	if err != nil {
		resp.Error = toRemoteError(req.Op, err)
		return resp
	}
	resp.Result = raw
	return resp
}

type invalidError struct{ msg string }

func (e *invalidError) Error() string { return e.msg }

func invalidf(format string, args ...any) error {
	return &invalidError{fmt.Sprintf(format, args...)}
}

func toRemoteError(op string, err error) *RemoteError {
	var re *RemoteError
	if errors.As(err, &re) {
		return re
	}
	code := CodeInternal
	var inv *invalidError
	switch {
	case errors.As(err, &inv):
		code = CodeInvalid
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, exec.ErrNotFound):
		code = CodeNotFound
	case errors.Is(err, fs.ErrPermission):
		code = CodePermission
	case errors.Is(err, syscall.EISDIR):
		code = CodeIsDirectory
	}
	return &RemoteError{Op: op, Code: code, Message: err.Error()}
}

func decodeArgs(raw json.RawMessage, v any) error {
	if len(raw) == 0 {
		return nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return invalidf("bad arguments: %v", err)
	}
	return nil
}

func (s *Server) dispatch(ctx context.Context, req *Request) (any, error) {
	switch req.Op {
	case OpPing:
		return s.ping(), nil
	case OpExec:
		var a ExecRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		return s.exec(ctx, &a)
	case OpReadFile:
		var a ReadFileRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		return readFile(&a)
	case OpWriteFile:
		var a WriteFileRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		return writeFile(&a)
	case OpSync:
		return Empty{}, doSync()
	case OpSetTime:
		var a SetTimeRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		return Empty{}, setTime(a.UnixNano)
	case OpReseedRNG:
		var a ReseedRNGRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		if len(a.Data) == 0 || len(a.Data) > 4096 {
			return nil, invalidf("data must be 1..4096 bytes")
		}
		return Empty{}, reseedRNG(a.Data)
	case OpTime:
		return readClocks()
	case OpSetHostname:
		var a SetHostnameRequest
		if err := decodeArgs(req.Args, &a); err != nil {
			return nil, err
		}
		if err := checkHostname(a.Hostname); err != nil {
			return nil, err
		}
		return Empty{}, setHostname(a.Hostname)
	}
	return nil, &RemoteError{Op: req.Op, Code: CodeUnsupported, Message: "unknown operation " + req.Op}
}

// checkHostname accepts what a DNS label allows: letters, digits, '-',
// '_' and '.', 1..64 bytes, not starting with '-' or '.'.
func checkHostname(h string) error {
	if h == "" || len(h) > HostnameMaxBytes {
		return invalidf("hostname must be 1..%d bytes", HostnameMaxBytes)
	}
	for i, r := range h {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || (i > 0 && (r == '-' || r == '.'))
		if !ok {
			return invalidf("hostname %q: use letters, digits, '_', and '-' or '.' after the first byte", h)
		}
	}
	return nil
}

// setHostname sets the kernel's hostname and the files that name it.
func setHostname(h string) error {
	if err := sethostname(h); err != nil {
		return err
	}
	if err := os.WriteFile("/etc/hostname", []byte(h+"\n"), 0o644); err != nil {
		return err
	}
	b, err := os.ReadFile("/etc/hosts")
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return os.WriteFile("/etc/hosts", []byte(hostsWith(string(b), h)), 0o644)
}

// hostsWith is an /etc/hosts whose 127.0.1.1 line names h.
func hostsWith(hosts, h string) string {
	var out []string
	found := false
	for _, l := range strings.Split(strings.TrimRight(hosts, "\n"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == "127.0.1.1" {
			if found {
				continue
			}
			l, found = "127.0.1.1\t"+h, true
		}
		if l != "" || len(out) > 0 {
			out = append(out, l)
		}
	}
	if !found {
		out = append(out, "127.0.1.1\t"+h)
	}
	return strings.Join(out, "\n") + "\n"
}

func (s *Server) ping() *PingResult {
	r := &PingResult{
		Version:     Version,
		Protocol:    ProtocolVersion,
		AgentUptime: time.Since(s.start),
		Time:        time.Now(),
	}
	if b, err := os.ReadFile(s.cfg.ImageVersionFile); err == nil {
		r.ImageVersion = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		r.BootID = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		var up float64
		if _, err := fmt.Sscanf(string(b), "%f", &up); err == nil {
			r.Uptime = time.Duration(up * float64(time.Second))
		}
	}
	return r
}

func readFile(a *ReadFileRequest) (*ReadFileResult, error) {
	if a.Path == "" {
		return nil, invalidf("path is required")
	}
	if a.Offset < 0 {
		return nil, invalidf("negative offset")
	}
	limit := a.Limit
	if limit <= 0 || limit > MaxChunk {
		limit = MaxChunk
	}
	f, err := os.Open(a.Path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.IsDir() {
		return nil, &RemoteError{Op: OpReadFile, Code: CodeIsDirectory, Message: a.Path + " is a directory"}
	}
	if a.Offset > 0 {
		if _, err := f.Seek(a.Offset, io.SeekStart); err != nil {
			return nil, err
		}
	}
	buf := make([]byte, limit)
	n, err := io.ReadFull(f, buf)
	eof := false
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		eof = true
	case err != nil:
		return nil, err
	}
	if st.Mode().IsRegular() && a.Offset+int64(n) >= st.Size() {
		eof = true
	}
	return &ReadFileResult{Data: buf[:n], Size: st.Size(), Mode: st.Mode(), EOF: eof}, nil
}

func writeFile(a *WriteFileRequest) (*WriteFileResult, error) {
	if a.Path == "" {
		return nil, invalidf("path is required")
	}
	if len(a.Data) > MaxChunk {
		return nil, invalidf("data larger than %d bytes", MaxChunk)
	}
	if a.MkdirAll {
		if err := os.MkdirAll(filepath.Dir(a.Path), 0o755); err != nil {
			return nil, err
		}
	}
	perm := a.Mode.Perm()
	if perm == 0 {
		perm = 0o644
	}
	flags := os.O_WRONLY | os.O_CREATE
	if a.Append {
		flags |= os.O_APPEND
	} else {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(a.Path, flags, perm)
	if err != nil {
		return nil, err
	}
	if _, err := f.Write(a.Data); err != nil {
		f.Close()
		return nil, err
	}
	if a.Mode != 0 {
		if err := f.Chmod(a.Mode.Perm()); err != nil {
			f.Close()
			return nil, err
		}
	}
	st, err := f.Stat()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	return &WriteFileResult{Size: st.Size()}, nil
}
