package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Client talks to a guest agent over one byte stream. It is safe for
// concurrent use; calls are multiplexed by request ID. A Client does not
// reconnect: after the VM moved (snapshot restore into a new QEMU process)
// or the stream failed, Close it and Dial/NewClient again. Responses that
// belong to requests this Client is no longer waiting for are ignored.
type Client struct {
	rw     io.ReadWriter
	nextID atomic.Uint64

	wmu          sync.Mutex // serialises frame writes
	preambleSent bool

	mu      sync.Mutex
	pending map[uint64]chan *Response
	err     error // set once the connection failed or was closed
	done    chan struct{}

	stale    atomic.Int64
	badMsgs  atomic.Int64
	frameSts atomic.Pointer[FrameStats]
}

// ClientStats counts input the Client discarded.
type ClientStats struct {
	StaleResponses int64 // responses to requests nobody waits for
	BadMessages    int64 // frames that were not valid Response JSON
	Frames         FrameStats
}

// NewClient starts a client on rw. If rw is an io.Closer, Close closes it.
func NewClient(rw io.ReadWriter) *Client {
	c := &Client{
		rw:      rw,
		pending: make(map[uint64]chan *Response),
		done:    make(chan struct{}),
	}
	// Random start so IDs of a new Client never collide with stale
	// responses addressed to a previous one.
	var b [8]byte
	if _, err := rand.Read(b[:]); err == nil {
		c.nextID.Store(binary.LittleEndian.Uint64(b[:]) >> 12)
	} else {
		c.nextID.Store(uint64(time.Now().UnixNano()) >> 12)
	}
	c.frameSts.Store(&FrameStats{})
	go c.readLoop()
	return c
}

// Dial connects to the Unix socket of the QEMU chardev that backs the agent
// port. It retries while the socket does not exist yet or refuses
// connections (QEMU still starting) until ctx is done.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	backoff := 10 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return NewClient(conn), nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("agent: dial %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctxErr("dial", ctx, err)
		case <-time.After(backoff):
		}
		if backoff < 200*time.Millisecond {
			backoff *= 2
		}
	}
}

// Close closes the underlying stream (if it is an io.Closer) and fails all
// pending calls with ErrClosed.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	if cl, ok := c.rw.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// Done is closed when the client stops working (closed or stream failed).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the client stopped, or nil while it works.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Stats returns counters of discarded input.
func (c *Client) Stats() ClientStats {
	return ClientStats{
		StaleResponses: c.stale.Load(),
		BadMessages:    c.badMsgs.Load(),
		Frames:         *c.frameSts.Load(),
	}
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	close(c.done)
	for id, ch := range c.pending {
		delete(c.pending, id)
		close(ch)
	}
}

func (c *Client) readLoop() {
	fr := NewFrameReader(c.rw, 0)
	for {
		payload, err := fr.ReadFrame()
		st := fr.Stats()
		c.frameSts.Store(&st)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			c.fail(fmt.Errorf("%w: %w", ErrClosed, err))
			return
		}
		var resp Response
		if err := json.Unmarshal(payload, &resp); err != nil || resp.ID == 0 {
			c.badMsgs.Add(1)
			continue
		}
		c.mu.Lock()
		ch, ok := c.pending[resp.ID]
		delete(c.pending, resp.ID)
		c.mu.Unlock()
		if !ok {
			c.stale.Add(1)
			continue
		}
		ch <- &resp // buffered, never blocks
	}
}

func ctxErr(op string, ctx context.Context, cause error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		if cause != nil {
			return fmt.Errorf("agent %s: %w: %w (last error: %v)", op, ErrTimeout, ctx.Err(), cause)
		}
		return fmt.Errorf("agent %s: %w: %w", op, ErrTimeout, ctx.Err())
	}
	return fmt.Errorf("agent %s: %w", op, ctx.Err())
}

// Call performs one raw operation: args is marshalled as the request's Args
// and the response's Result is unmarshalled into result (may be nil). The
// typed methods below are preferred.
func (c *Client) Call(ctx context.Context, op string, args, result any) error {
	if err := ctx.Err(); err != nil {
		return ctxErr(op, ctx, nil)
	}
	rawArgs, err := json.Marshal(args)
	if err != nil {
		return fmt.Errorf("agent %s: marshal args: %w", op, err)
	}
	id := c.nextID.Add(1)
	if id == 0 {
		id = c.nextID.Add(1)
	}
	payload, err := json.Marshal(Request{ID: id, Op: op, Args: rawArgs})
	if err != nil {
		return fmt.Errorf("agent %s: %w", op, err)
	}
	frame, err := AppendFrame(nil, payload)
	if err != nil {
		return fmt.Errorf("agent %s: %w", op, err)
	}

	ch := make(chan *Response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("agent %s: %w", op, err)
	}
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	// Write in a goroutine so a stuck stream cannot outlive ctx. A frame
	// is always written whole (or the stream fails).
	werr := make(chan error, 1)
	go func() {
		c.wmu.Lock()
		defer c.wmu.Unlock()
		if !c.preambleSent {
			if _, err := c.rw.Write(SyncPreamble); err != nil {
				werr <- err
				return
			}
			c.preambleSent = true
		}
		_, err := c.rw.Write(frame)
		werr <- err
	}()
	select {
	case err := <-werr:
		if err != nil {
			forget()
			c.fail(fmt.Errorf("%w: write: %w", ErrClosed, err))
			return fmt.Errorf("agent %s: %w", op, c.Err())
		}
	case <-ctx.Done():
		forget()
		return ctxErr(op, ctx, nil)
	}

	select {
	case resp, ok := <-ch:
		if !ok {
			return fmt.Errorf("agent %s: %w", op, c.Err())
		}
		if resp.Error != nil {
			e := *resp.Error
			if e.Op == "" {
				e.Op = op
			}
			return &e
		}
		if result != nil {
			if len(resp.Result) == 0 {
				return fmt.Errorf("agent %s: %w: empty result", op, ErrProtocol)
			}
			if err := json.Unmarshal(resp.Result, result); err != nil {
				return fmt.Errorf("agent %s: %w: %v", op, ErrProtocol, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return ctxErr(op, ctx, nil)
	}
}

// Ping checks the agent is alive and describes it.
func (c *Client) Ping(ctx context.Context) (*PingResult, error) {
	var r PingResult
	if err := c.Call(ctx, OpPing, PingRequest{}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// WaitReady pings until the agent answers or ctx is done. Each attempt
// waits a short, growing time, so a request lost while the guest was not
// listening (e.g. on a UART, or while it boots) is simply retried.
func (c *Client) WaitReady(ctx context.Context) (*PingResult, error) {
	attempt := 250 * time.Millisecond
	var last error
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		r, err := c.Ping(actx)
		cancel()
		if err == nil {
			return r, nil
		}
		last = err
		if ctx.Err() != nil {
			return nil, ctxErr("wait ready", ctx, last)
		}
		if !errors.Is(err, ErrTimeout) {
			return nil, err
		}
		if attempt < 2*time.Second {
			attempt *= 2
		}
	}
}

// Exec runs a command in the guest and waits for it. If req.Timeout is 0
// and ctx has a deadline, the guest-side timeout is set a little before
// that deadline so the process is killed and partial output returned
// (TimedOut set) rather than the call failing with ErrTimeout.
func (c *Client) Exec(ctx context.Context, req ExecRequest) (*ExecResult, error) {
	if dl, ok := ctx.Deadline(); ok && req.Timeout == 0 && !req.Background {
		rem := time.Until(dl)
		margin := rem / 5
		if margin > time.Second {
			margin = time.Second
		}
		if rem-margin > 0 {
			req.Timeout = rem - margin
		}
	}
	var r ExecResult
	if err := c.Call(ctx, OpExec, req, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// ReadFile reads a whole guest file (in MaxChunk pieces).
func (c *Client) ReadFile(ctx context.Context, path string) ([]byte, error) {
	var out []byte
	var off int64
	for {
		var r ReadFileResult
		if err := c.Call(ctx, OpReadFile, ReadFileRequest{Path: path, Offset: off}, &r); err != nil {
			return nil, err
		}
		out = append(out, r.Data...)
		off += int64(len(r.Data))
		if r.EOF || len(r.Data) == 0 {
			return out, nil
		}
	}
}

// WriteFile creates or truncates a guest file and writes data (in MaxChunk
// pieces). mode 0 means 0644 for new files. Missing parent directories are
// created.
func (c *Client) WriteFile(ctx context.Context, path string, data []byte, mode fs.FileMode) error {
	first := true
	for first || len(data) > 0 {
		n := len(data)
		if n > MaxChunk {
			n = MaxChunk
		}
		req := WriteFileRequest{Path: path, Data: data[:n], Mode: mode, Append: !first, MkdirAll: first}
		if err := c.Call(ctx, OpWriteFile, req, &WriteFileResult{}); err != nil {
			return err
		}
		data = data[n:]
		first = false
	}
	return nil
}

// Sync flushes guest filesystem buffers.
func (c *Client) Sync(ctx context.Context) error {
	return c.Call(ctx, OpSync, SyncRequest{}, nil)
}

// SetTime sets the guest wall clock to t.
func (c *Client) SetTime(ctx context.Context, t time.Time) error {
	return c.Call(ctx, OpSetTime, SetTimeRequest{UnixNano: t.UnixNano()}, nil)
}

// Time reads the guest's clocks.
func (c *Client) Time(ctx context.Context) (*TimeResult, error) {
	var r TimeResult
	if err := c.Call(ctx, OpTime, TimeRequest{}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// SetHostname sets the guest's hostname.
func (c *Client) SetHostname(ctx context.Context, hostname string) error {
	return c.Call(ctx, OpSetHostname, SetHostnameRequest{Hostname: hostname}, nil)
}

// ReseedRNG feeds 64 fresh random bytes from the host into the guest
// kernel's entropy pool and forces a CRNG reseed. Call it (and SetTime)
// after every restore, so VMs restored from the same snapshot do not share
// random number generator state.
func (c *Client) ReseedRNG(ctx context.Context) error {
	b := make([]byte, 64)
	if _, err := rand.Read(b); err != nil {
		return fmt.Errorf("agent %s: %w", OpReseedRNG, err)
	}
	return c.Call(ctx, OpReseedRNG, ReseedRNGRequest{Data: b}, nil)
}
