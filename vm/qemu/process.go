package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is one QEMU process: either started by this kelpie process (exited
// is closed when it ends) or found again from its pid file by a later
// invocation (exited is nil; liveness comes from /proc). The start time
// from /proc/PID/stat guards against a recycled pid.
type proc struct {
	PID        int    `json:"pid"`
	StartTicks uint64 `json:"start_ticks"`

	exited  chan struct{}
	waitErr error
}

// spawn starts QEMU so that it outlives this process: its own session (no
// terminal signals reach it), stdin from /dev/null and output appended to
// logPath. It runs in dir, so socket paths may be relative and short.
func spawn(binary string, args []string, dir, logPath string) (*proc, error) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "--- %s %s\n", binary, strings.Join(args, " "))
	cmd := exec.Command(binary, args...)
	cmd.Dir = dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", binary, err)
	}
	p := &proc{PID: cmd.Process.Pid, exited: make(chan struct{})}
	// Reap it here while we live; once we exit, init adopts it.
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	if st, err := readProcStat(p.PID); err == nil {
		p.StartTicks = st.startTicks
	}
	return p, nil
}

// adopt returns a handle on a QEMU process started by another invocation.
func adopt(pid int, startTicks uint64) *proc {
	return &proc{PID: pid, StartTicks: startTicks}
}

type procStat struct {
	state      byte
	startTicks uint64
	comm       string
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	// comm is in parentheses and may hold spaces: split after the last ')'.
	open, close := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || close < open || close+2 >= len(b) {
		return procStat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	fields := strings.Fields(string(b[close+2:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	st, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("/proc/%d/stat: starttime: %w", pid, err)
	}
	return procStat{state: fields[0][0], startTicks: st, comm: string(b[open+1 : close])}, nil
}

// alive reports whether the process still runs (a zombie does not).
func (p *proc) alive() bool {
	if p == nil || p.PID <= 0 {
		return false
	}
	if p.exited != nil {
		select {
		case <-p.exited:
			return false
		default:
			return true
		}
	}
	st, err := readProcStat(p.PID)
	if err != nil {
		return false
	}
	if st.state == 'Z' || st.state == 'X' {
		return false
	}
	return p.StartTicks == 0 || st.startTicks == p.StartTicks
}

// done returns a channel closed when a process we started exits, or nil
// (never ready) for an adopted one.
func (p *proc) done() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.exited
}

// kill sends SIGKILL (if the process is still ours) and waits until it is
// gone or ctx ends.
func (p *proc) kill(ctx context.Context) error {
	if !p.alive() {
		return nil
	}
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill QEMU pid %d: %w", p.PID, err)
	}
	return p.wait(ctx)
}

// wait waits until the process is gone.
func (p *proc) wait(ctx context.Context) error {
	if p.exited != nil {
		select {
		case <-p.exited:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("QEMU pid %d still running: %w", p.PID, ctx.Err())
		}
	}
	// Not our child: nothing to wait on but /proc. Poll with a short,
	// growing interval; killed processes disappear within milliseconds.
	backoff := time.Millisecond
	for p.alive() {
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("QEMU pid %d still running: %w", p.PID, ctx.Err())
		case <-t.C:
		}
		if backoff < 50*time.Millisecond {
			backoff *= 2
		}
	}
	return nil
}

// tailFile returns up to n bytes from the end of a log file, one line
// joined, for error messages.
func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := fi.Size() - n
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	f.ReadAt(b, off)
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "--- ") {
			lines = append(lines, l)
		}
	}
	if len(lines) > 3 {
		lines = lines[len(lines)-3:]
	}
	return strings.Join(lines, " | ")
}
