//go:build linux

package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// defaultPath is used when the agent's own environment has no PATH.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// waitDelay bounds how long exec waits for stdout/stderr to close after the
// process exited (a backgrounded grandchild may keep them open).
const waitDelay = 500 * time.Millisecond

func (s *Server) exec(ctx context.Context, a *ExecRequest) (*ExecResult, error) {
	name, args := a.Cmd, a.Args
	if a.Shell != "" {
		name, args = "/bin/sh", []string{"-c", a.Shell}
	}
	if name == "" {
		return nil, invalidf("cmd or shell is required")
	}
	if a.Timeout < 0 {
		return nil, invalidf("negative timeout")
	}
	limit := a.OutputLimit
	if limit <= 0 {
		limit = DefaultOutputLimit
	}
	if limit > MaxOutputLimit {
		limit = MaxOutputLimit
	}
	env := mergeEnv(os.Environ(), a.Env)
	dir := a.Workdir
	if dir == "" {
		dir = s.cfg.DefaultWorkdir
	}
	if dir == "" {
		dir = "/"
		if st, err := os.Stat("/workspace"); err == nil && st.IsDir() {
			dir = "/workspace"
		}
	}
	if st, err := os.Stat(dir); err != nil {
		return nil, err
	} else if !st.IsDir() {
		return nil, invalidf("workdir %s is not a directory", dir)
	}

	path := name
	if !strings.Contains(name, "/") {
		// Look up in the command's PATH, not the agent's.
		p, err := lookPath(name, env)
		if err != nil {
			return nil, err
		}
		path = p
	}

	if a.Background {
		cmd := exec.Command(path, args...)
		cmd.Args[0] = name
		cmd.Env, cmd.Dir = env, dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		pid := cmd.Process.Pid
		go cmd.Wait() // reap
		return &ExecResult{Pid: pid}, nil
	}

	tctx, cancel := ctx, context.CancelFunc(func() {})
	if a.Timeout > 0 {
		tctx, cancel = context.WithTimeout(ctx, a.Timeout)
	}
	defer cancel()
	cmd := exec.CommandContext(tctx, path, args...)
	cmd.Args[0] = name
	cmd.Env, cmd.Dir = env, dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// Kill the whole process group.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = waitDelay
	if len(a.Stdin) > 0 {
		cmd.Stdin = bytes.NewReader(a.Stdin)
	}
	stdout := &capWriter{limit: limit}
	stderr := &capWriter{limit: limit}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	werr := cmd.Wait()
	res := &ExecResult{
		Stdout:          stdout.buf.Bytes(),
		Stderr:          stderr.buf.Bytes(),
		StdoutTruncated: stdout.truncated,
		StderrTruncated: stderr.truncated,
		Duration:        time.Since(start),
		Pid:             cmd.Process.Pid,
		TimedOut:        a.Timeout > 0 && errors.Is(tctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil,
	}
	ps := cmd.ProcessState
	if ps == nil {
		return nil, werr
	}
	res.ExitCode = ps.ExitCode()
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		res.Signal = ws.Signal().String()
	}
	return res, nil
}

// mergeEnv overlays "K=V" entries of extra onto base and makes sure PATH is
// set.
func mergeEnv(base, extra []string) []string {
	idx := map[string]int{}
	var out []string
	add := func(kv string) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			return
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	for _, kv := range base {
		add(kv)
	}
	if _, ok := idx["PATH"]; !ok {
		add("PATH=" + defaultPath)
	}
	if _, ok := idx["HOME"]; !ok {
		add("HOME=/root")
	}
	for _, kv := range extra {
		add(kv)
	}
	return out
}

func lookPath(name string, env []string) (string, error) {
	pathEnv := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, dir := range strings.Split(pathEnv, ":") {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + name
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", &exec.Error{Name: name, Err: exec.ErrNotFound}
}

// capWriter keeps the first limit bytes written and discards the rest.
type capWriter struct {
	buf       bytes.Buffer
	limit     int
	truncated bool
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.limit - w.buf.Len(); room < len(p) {
		w.truncated = true
		if room > 0 {
			w.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return w.buf.Write(p)
}

func doSync() error {
	syscall.Sync()
	return nil
}

// ioctls of random(4).
const (
	rndAddEntropy = 0x40085203 // _IOW('R', 0x03, int[2])
	rndReseedCRNG = 0x5207     // _IO('R', 0x07)
)

func reseedRNG(data []byte) error {
	f, err := os.OpenFile("/dev/random", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(data))
	binary.NativeEndian.PutUint32(buf[0:], uint32(8*len(data)))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(data)))
	copy(buf[8:], data)
	err = ioctl(f, rndAddEntropy, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if err != nil {
		return fmt.Errorf("RNDADDENTROPY: %w", err)
	}
	if err := ioctl(f, rndReseedCRNG, 0); err != nil {
		return fmt.Errorf("RNDRESEEDCRNG: %w", err)
	}
	return nil
}

func ioctl(f *os.File, req, arg uintptr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// Clock ids of clock_gettime(2).
const (
	clockRealtime  = 0
	clockMonotonic = 1
	clockBoottime  = 7
)

func clockGet(id uintptr) (int64, error) {
	var ts syscall.Timespec
	if _, _, errno := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, id, uintptr(unsafe.Pointer(&ts)), 0); errno != 0 {
		return 0, errno
	}
	return ts.Nano(), nil
}

// setTime sets CLOCK_REALTIME to the nanosecond (settimeofday would
// round to microseconds). CLOCK_MONOTONIC is not affected.
func setTime(unixNano int64) error {
	ts := syscall.NsecToTimespec(unixNano)
	if _, _, errno := syscall.Syscall(syscall.SYS_CLOCK_SETTIME, clockRealtime, uintptr(unsafe.Pointer(&ts)), 0); errno != 0 {
		return fmt.Errorf("clock_settime: %w", errno)
	}
	return nil
}

func readClocks() (*TimeResult, error) {
	var r TimeResult
	var err error
	if r.RealtimeNs, err = clockGet(clockRealtime); err != nil {
		return nil, err
	}
	if r.MonotonicNs, err = clockGet(clockMonotonic); err != nil {
		return nil, err
	}
	if r.BoottimeNs, err = clockGet(clockBoottime); err != nil {
		return nil, err
	}
	return &r, nil
}

func sethostname(h string) error { return syscall.Sethostname([]byte(h)) }
