package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/kelpie/teleport/vm"
)

// qmpCallTimeoutDefault bounds one QMP call when the caller's context has
// no sooner deadline: QMP answers in milliseconds unless QEMU is wedged.
const qmpCallTimeoutDefault = 15 * time.Second

// qmpGreetingTimeout bounds the wait for QEMU's greeting after connect. A
// socket chardev serves one client at a time, so a second client connects
// but hears nothing until the first leaves.
const qmpGreetingTimeout = 5 * time.Second

// errQMPClosed: the QMP connection is gone (QEMU exited or closed it).
var errQMPClosed = errors.New("QMP connection closed")

// QMPError is an error QEMU returned for a command.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("QMP %s: %s: %s", e.Command, e.Class, e.Desc)
}

// qmpEvent is one asynchronous QMP event.
type qmpEvent struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// qmpClient is a QMP connection. Calls are matched to replies by id, events
// go to subscribers; every call takes a context and has a default timeout.
type qmpClient struct {
	conn *net.UnixConn

	wmu sync.Mutex // one command written at a time

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan qmpReply
	subs    map[int]chan qmpEvent
	nextSub int
	err     error
	done    chan struct{}

	Version string // QEMU version from the greeting, "7.2.22"
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// dialQMP connects to the QMP socket at path (see dialUnix for long paths),
// reads the greeting and leaves capability negotiation done.
func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	conn, err := dialUnix(ctx, path)
	if err != nil {
		return nil, err
	}
	q := &qmpClient{conn: conn, pending: map[string]chan qmpReply{}, subs: map[int]chan qmpEvent{}, done: make(chan struct{})}
	r := bufio.NewReaderSize(conn, 64<<10)
	deadline := time.Now().Add(qmpGreetingTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetReadDeadline(deadline)
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return nil, fmt.Errorf("QMP %s: no greeting (is another kelpie using this VM?): %w", path, errTimeout)
		}
		return nil, fmt.Errorf("QMP %s: read greeting: %w", path, err)
	}
	conn.SetReadDeadline(time.Time{})
	var greet struct {
		QMP struct {
			Version struct {
				QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
			} `json:"version"`
		} `json:"QMP"`
	}
	if err := json.Unmarshal(line, &greet); err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP %s: bad greeting %q", path, line)
	}
	v := greet.QMP.Version.QEMU
	q.Version = fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	go q.readLoop(r)
	if err := q.Call(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// errTimeout is vm.ErrTimeout, so callers can test either.
var errTimeout = vm.ErrTimeout

// dialUnix connects to a unix socket, retrying while it does not exist yet
// or refuses (QEMU still starting), until ctx is done. Paths longer than
// sun_path allows are reached through /proc/self/fd of their directory.
func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	backoff := 2 * time.Millisecond
	for {
		c, err := dialUnixOnce(path)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("connect %s: %w", path, err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("connect %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-t.C:
		}
		if backoff < 100*time.Millisecond {
			backoff *= 2
		}
	}
}

// sunPathMaxBytes is the usable length of a unix socket path on Linux.
const sunPathMaxBytes = 107

func dialUnixOnce(path string) (*net.UnixConn, error) {
	if len(path) <= sunPathMaxBytes {
		return net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	}
	dir, name := splitPath(path)
	fd, err := syscall.Open(dir, oPath|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer syscall.Close(fd)
	short := "/proc/self/fd/" + strconv.Itoa(fd) + "/" + name
	if len(short) > sunPathMaxBytes {
		return nil, fmt.Errorf("socket name %q too long", name)
	}
	return net.DialUnix("unix", nil, &net.UnixAddr{Name: short, Net: "unix"})
}

func splitPath(p string) (dir, name string) {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			if i == 0 {
				return "/", p[1:]
			}
			return p[:i], p[i+1:]
		}
	}
	return ".", p
}

func (q *qmpClient) readLoop(r *bufio.Reader) {
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			q.fail(fmt.Errorf("%w: %v", errQMPClosed, err))
			return
		}
		var m struct {
			ID    string `json:"id"`
			Event string `json:"event"`
			qmpReply
		}
		if err := json.Unmarshal(line, &m); err != nil {
			continue
		}
		if m.Event != "" {
			var ev qmpEvent
			json.Unmarshal(line, &ev)
			q.mu.Lock()
			for _, ch := range q.subs {
				select {
				case ch <- ev:
				default: // a slow subscriber misses events, never blocks the reader
				}
			}
			q.mu.Unlock()
			continue
		}
		q.mu.Lock()
		ch, ok := q.pending[m.ID]
		delete(q.pending, m.ID)
		q.mu.Unlock()
		if ok {
			ch <- m.qmpReply
		}
	}
}

func (q *qmpClient) fail(err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.err != nil {
		return
	}
	q.err = err
	close(q.done)
}

// Done is closed when the connection is gone.
func (q *qmpClient) Done() <-chan struct{} { return q.done }

// Close closes the connection.
func (q *qmpClient) Close() error {
	q.fail(errQMPClosed)
	return q.conn.Close()
}

// subscribe returns a channel receiving events from now on, and a cancel.
func (q *qmpClient) subscribe() (<-chan qmpEvent, func()) {
	ch := make(chan qmpEvent, 64)
	q.mu.Lock()
	id := q.nextSub
	q.nextSub++
	q.subs[id] = ch
	q.mu.Unlock()
	return ch, func() {
		q.mu.Lock()
		delete(q.subs, id)
		q.mu.Unlock()
	}
}

// Call runs one command and decodes its return value into out (may be nil).
func (q *qmpClient) Call(ctx context.Context, cmd string, args any, out any) error {
	return q.call(ctx, cmd, args, out, nil)
}

// CallWithFile runs one command passing f's descriptor along (SCM_RIGHTS),
// as getfd and add-fd expect.
func (q *qmpClient) CallWithFile(ctx context.Context, cmd string, args any, f *os.File) error {
	return q.call(ctx, cmd, args, nil, f)
}

func (q *qmpClient) call(ctx context.Context, cmd string, args any, out any, f *os.File) error {
	ctx, cancel := context.WithTimeout(ctx, qmpCallTimeoutDefault)
	defer cancel()
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	q.nextID++
	id := "k" + strconv.FormatUint(q.nextID, 10)
	ch := make(chan qmpReply, 1)
	q.pending[id] = ch
	q.mu.Unlock()
	forget := func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}
	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	b = append(b, '\n')
	q.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
	}
	if f != nil {
		_, _, err = q.conn.WriteMsgUnix(b, syscall.UnixRights(int(f.Fd())), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	q.conn.SetWriteDeadline(time.Time{})
	q.wmu.Unlock()
	if err != nil {
		forget()
		return fmt.Errorf("QMP %s: write: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.Error != nil {
			return &QMPError{Command: cmd, Class: r.Error.Class, Desc: r.Error.Desc}
		}
		if out != nil {
			if err := json.Unmarshal(r.Return, out); err != nil {
				return fmt.Errorf("QMP %s: decode reply: %w", cmd, err)
			}
		}
		return nil
	case <-q.done:
		forget()
		q.mu.Lock()
		err := q.err
		q.mu.Unlock()
		return fmt.Errorf("QMP %s: %w", cmd, err)
	case <-ctx.Done():
		forget()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("QMP %s: no reply: %w", cmd, errTimeout)
		}
		return fmt.Errorf("QMP %s: %w", cmd, ctx.Err())
	}
}

// status returns QEMU's run state ("running", "paused", "postmigrate",
// "inmigrate", "internal-error", ...).
func (q *qmpClient) status(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := q.Call(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// migrationStatus is query-migrate's answer (the parts we use).
type migrationStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	Downtime  int64  `json:"downtime"`   // ms, source side
	TotalTime int64  `json:"total-time"` // ms
	RAM       *struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
}

// waitMigration waits for the migration in progress to end. It relies on
// the "events" migration capability (MIGRATION events) and asks
// query-migrate once an end state is announced, so it never polls on a
// timer. The subscription must be made before the migration starts.
func (q *qmpClient) waitMigration(ctx context.Context, events <-chan qmpEvent) (migrationStatus, error) {
	// A migration may already have finished before we look.
	var st migrationStatus
	if err := q.Call(ctx, "query-migrate", nil, &st); err != nil {
		return st, err
	}
	for {
		switch st.Status {
		case "completed":
			// The source announces completion a moment before it leaves
			// the finish-migrate run state, in which cont is refused.
			return st, q.waitLeaveState(ctx, "finish-migrate")
		case "failed", "cancelled":
			return st, fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case ev := <-events:
			if ev.Name != "MIGRATION" {
				continue
			}
			var d struct {
				Status string `json:"status"`
			}
			json.Unmarshal(ev.Data, &d)
			switch d.Status {
			case "completed", "failed", "cancelled":
				if err := q.Call(ctx, "query-migrate", nil, &st); err != nil {
					return st, err
				}
				if st.Status == "" {
					st.Status = d.Status
				}
			}
		case <-q.done:
			return st, fmt.Errorf("migration: %w", q.err)
		case <-ctx.Done():
			return st, fmt.Errorf("migration still %q: %w", st.Status, ctx.Err())
		}
	}
}

// oPath is O_PATH (absent from package syscall): a directory handle that
// only anchors /proc/self/fd paths.
const oPath = 0x200000

// waitLeaveState waits until QEMU's run state is not state. It is used
// for transitions QEMU announces no event for; they take microseconds, so
// it polls with a short, growing interval.
func (q *qmpClient) waitLeaveState(ctx context.Context, state string) error {
	backoff := 200 * time.Microsecond
	for {
		st, err := q.status(ctx)
		if err != nil || st != state {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("QEMU still %s: %w", state, ctx.Err())
		case <-t.C:
		}
		if backoff < 20*time.Millisecond {
			backoff *= 2
		}
	}
}
