package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

var (
	// ErrClosed is returned by calls on a Client or Subscription that was closed.
	ErrClosed = errors.New("qmp client closed")
	// ErrDisconnected is returned when the monitor connection was lost while a call was in
	// flight or while a subscription was waiting: the command may or may not have run, and
	// events may have been missed.
	ErrDisconnected = errors.New("qmp monitor connection lost")
	// ErrUnavailable is returned when the monitor cannot be reached (QEMU gone, socket
	// missing) or does not speak QMP.
	ErrUnavailable = errors.New("qmp monitor unavailable")
	// ErrTooLarge is returned (wrapped in ErrDisconnected) when the monitor sent more than
	// the client's MaxMessage bytes without completing a message: a monitor that streams
	// without end is dropped instead of growing the agent's memory.
	ErrTooLarge = errors.New("qmp message too large")
	// ErrBusy is returned (wrapped together with ErrUnavailable) when the monitor accepts the
	// connection but sends no greeting within GreetingTimeout. QEMU serves one client per
	// monitor socket and leaves further connections queued in the listen backlog, unanswered:
	// on a Kata node the shim holds qmp.sock for the sandbox's lifetime, and kata-dp must use
	// the extra monitor Kata opens with extra_monitor_socket = "qmp" instead.
	ErrBusy = errors.New("busy: enable Kata's extra_monitor_socket")
)

// Error is a QMP error reply.
type Error struct {
	// Class is QEMU's error class, for example "GenericError" or "DeviceNotFound".
	Class string `json:"class"`
	// Desc is QEMU's human-readable description.
	Desc string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// Event is an asynchronous QMP event.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data,omitempty"`
	// Time is QEMU's timestamp of the event.
	Time time.Time `json:"-"`
}

// DefaultDialTimeout bounds connecting and negotiating capabilities when the caller's context
// has no earlier deadline.
const DefaultDialTimeout = 5 * time.Second

// GreetingTimeout bounds the wait for the monitor's greeting after connecting. QEMU greets
// a client it serves at once (well under a millisecond here, even under TCG); a monitor that
// stays silent this long has another client and will not serve this one (see ErrBusy). It is
// reported within 2 s of the call, as operators are promised, with room for a loaded node.
const GreetingTimeout = time.Second

// DefaultTimeout bounds each command (connecting included) when the Client's Timeout is
// zero. QEMU answers a command in milliseconds (device_add returns before the guest sees the
// device; even under TCG each command takes under 5 ms here), so a monitor silent for this long
// is hung: the caller gets an error, runs its rollback and releases its locks.
const DefaultTimeout = 15 * time.Second

// DefaultMaxMessage bounds one message from the monitor when the Client's MaxMessage is zero.
// The largest replies kata-dp reads (query-pci of a VM with many bridges) are tens of KiB.
const DefaultMaxMessage = 4 << 20

// maxQueued bounds the events queued per subscription; beyond it the oldest are dropped.
const maxQueued = 1024

// Client is a QMP client. The zero value is not usable; use New or Dial.
type Client struct {
	// Timeout bounds each command, from the call to its reply, on top of the caller's
	// context: zero means DefaultTimeout, a negative value no bound but the context's. When
	// it expires the error wraps context.DeadlineExceeded; the command may still run in QEMU.
	// Set it before the first call.
	Timeout time.Duration
	// MaxMessage bounds the bytes of one message from the monitor: zero means
	// DefaultMaxMessage. Set it before the first call.
	MaxMessage int64

	path string
	log  *slog.Logger

	mu     sync.Mutex // serialises dialing; guards conn, closed, nextID
	conn   *conn
	closed bool
	nextID uint64

	subMu sync.Mutex
	subs  map[*Subscription]struct{}

	seq sync.Mutex // see LockSequence
}

// LockSequence takes the client's sequence lock and returns the function that releases it.
// The lock does not hold up commands; it lets a layer above run a multi-command sequence on
// one VM (choosing a free slot, then plugging into it) without another sequence interleaving.
func (c *Client) LockSequence() (unlock func()) {
	c.seq.Lock()
	return c.seq.Unlock
}

// New returns a client for the monitor socket at path. It does not connect: the first call
// does.
func New(path string) *Client {
	return &Client{
		path: path,
		log:  slog.Default().With("qmp", path),
		subs: make(map[*Subscription]struct{}),
	}
}

// Dial returns a client for the monitor socket at path, connected and past capabilities
// negotiation.
func Dial(ctx context.Context, path string) (*Client, error) {
	c := New(path)
	c.mu.Lock()
	_, err := c.connLocked(ctx)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Path returns the monitor socket path.
func (c *Client) Path() string { return c.path }

// Close closes the connection. Calls in flight and later calls fail with ErrClosed, and
// subscriptions end.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	cn := c.conn
	c.conn = nil
	c.mu.Unlock()
	c.subMu.Lock()
	for s := range c.subs {
		s.end(ErrClosed)
	}
	c.subs = map[*Subscription]struct{}{}
	c.subMu.Unlock()
	if cn != nil {
		cn.fail(ErrClosed)
	}
	return nil
}

// Execute runs the QMP command cmd with the given arguments (nil for none; anything that
// marshals to a JSON object) and returns the "return" value. A QMP error reply is a *Error.
// When ctx ends first, Execute returns ctx's error; the command may still run in QEMU.
func (c *Client) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return c.execute(ctx, cmd, args, nil)
}

// GetFD passes f to QEMU under name (the getfd command with the descriptor attached via
// SCM_RIGHTS). QEMU holds its own copy; the caller still owns f. The blocking mode of f is
// left as it is.
func (c *Client) GetFD(ctx context.Context, name string, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("qmp getfd %s: %w", name, err)
	}
	var fd int
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return fmt.Errorf("qmp getfd %s: %w", name, err)
	}
	_, err = c.execute(ctx, "getfd", map[string]string{"fdname": name}, unix.UnixRights(fd))
	// Keep f (and so its descriptor) alive until the message is written.
	runtime.KeepAlive(f)
	return err
}

func (c *Client) execute(ctx context.Context, cmd string, args any, oob []byte) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		// A caller that gave up sends nothing more: without this check a command sent on a
		// live connection races its own reply against ctx.Done and may run anyway.
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	d := c.Timeout
	if d == 0 {
		d = DefaultTimeout
	}
	if d > 0 {
		parent := ctx
		ours := time.Now().Add(d)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, ours)
		defer cancel()
		ret, err := c.executeOnce(ctx, cmd, args, oob)
		// Whose deadline it was is decided by the deadlines, not by parent.Err(): a socket
		// deadline (dial, handshake) set from the caller's can fire before the caller's
		// context timer does.
		pdl, pok := parent.Deadline()
		callers := parent.Err() != nil || (pok && !pdl.After(ours))
		if errors.Is(err, context.DeadlineExceeded) && !callers {
			// Our bound, not the caller's: say so, and which command hung.
			return nil, fmt.Errorf("qmp %s: monitor %s gave no reply within %v: %w", cmd, c.path, d, context.DeadlineExceeded)
		}
		return ret, err
	}
	return c.executeOnce(ctx, cmd, args, oob)
}

func (c *Client) executeOnce(ctx context.Context, cmd string, args any, oob []byte) (json.RawMessage, error) {
	// A connection can die unnoticed between calls (QEMU restarted its monitor): when the
	// command could not be written at all, it is safe to redial and send it once more.
	for attempt := 0; ; attempt++ {
		ret, unsent, err := c.try(ctx, cmd, args, oob)
		if unsent && attempt == 0 && ctx.Err() == nil {
			continue
		}
		return ret, err
	}
}

// try sends cmd once. unsent reports that nothing reached the monitor.
func (c *Client) try(ctx context.Context, cmd string, args any, oob []byte) (ret json.RawMessage, unsent bool, err error) {
	cn, id, err := c.connAndID(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{cmd, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, false, fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
	}
	ch := make(chan reply, 1)
	if unsent, err := cn.send(ctx, id, append(b, '\n'), oob, ch); err != nil {
		if ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			// The caller's deadline, not a lost monitor: report it as such. Nothing
			// written leaves the connection usable; a partial write does not.
			if !unsent {
				c.drop(cn, fmt.Errorf("%w: write timed out midway", ErrDisconnected))
			}
			return nil, false, fmt.Errorf("qmp %s: write: %w", cmd, ctx.Err())
		}
		c.drop(cn, err)
		return nil, unsent, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, false, fmt.Errorf("qmp %s: %w", cmd, r.err)
		}
		return r.ret, false, nil
	case <-ctx.Done():
		cn.forget(id)
		return nil, false, fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) connAndID(ctx context.Context) (*conn, string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cn, err := c.connLocked(ctx)
	if err != nil {
		return nil, "", err
	}
	c.nextID++
	return cn, "kdp-" + strconv.FormatUint(c.nextID, 10), nil
}

// connLocked returns the live connection, dialing when there is none. c.mu is held.
func (c *Client) connLocked(ctx context.Context) (*conn, error) {
	if c.closed {
		return nil, ErrClosed
	}
	if c.conn != nil && !c.conn.isDead() {
		return c.conn, nil
	}
	c.conn = nil
	cn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	c.conn = cn
	go c.readLoop(cn)
	return cn, nil
}

func (c *Client) dial(ctx context.Context) (*conn, error) {
	dctx, cancel := context.WithTimeout(ctx, DefaultDialTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, "unix", c.path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("dial %s: %w", c.path, ctx.Err())
		}
		return nil, fmt.Errorf("dial %s: %w: %w", c.path, ErrUnavailable, err)
	}
	uc := nc.(*net.UnixConn)
	if dl, ok := dctx.Deadline(); ok {
		uc.SetDeadline(dl)
	}
	stop := context.AfterFunc(dctx, func() { uc.SetDeadline(time.Unix(1, 0)) })
	limit := c.MaxMessage
	if limit <= 0 {
		limit = DefaultMaxMessage
	}
	cn := &conn{uc: uc, lr: &limitReader{r: uc, max: limit}, pending: map[string]chan reply{}, dead: make(chan struct{})}
	cn.dec = json.NewDecoder(cn.lr)
	// The greeting gets a shorter bound of its own: a monitor held by another client accepts
	// (the kernel queues the connection) but never greets, and that deserves its own answer
	// long before the dial timeout.
	greetBy := time.Now().Add(GreetingTimeout)
	if dl, ok := dctx.Deadline(); ok && dl.Before(greetBy) {
		greetBy = time.Time{} // the caller's (or the dial's) deadline comes first
	}
	err = cn.handshake(dctx, greetBy)
	stop()
	if err != nil {
		uc.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("negotiate with %s: %w", c.path, ctx.Err())
		}
		if errors.Is(err, errNoGreeting) {
			return nil, fmt.Errorf("QMP monitor %s is %w (no greeting within %v: another client holds it): %w", c.path, ErrBusy, GreetingTimeout, ErrUnavailable)
		}
		if dl, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(dl) {
			return nil, fmt.Errorf("negotiate with %s: %w", c.path, context.DeadlineExceeded)
		}
		return nil, fmt.Errorf("negotiate with %s: %w: %w", c.path, ErrUnavailable, err)
	}
	uc.SetDeadline(time.Time{})
	c.log.Debug("qmp connected")
	return cn, nil
}

// drop forgets a broken connection so that the next call redials. Only the first drop of a
// connection acts, and it marks the subscriptions disconnected before it fails the calls in
// flight: a caller that learns of the loss from its call and then subscribes anew (a rollback
// waiting for DEVICE_DELETED) must not see its new subscription reported lost.
func (c *Client) drop(cn *conn, err error) {
	pending, first := cn.markFailed(err)
	if !first {
		return
	}
	c.mu.Lock()
	if c.conn == cn {
		c.conn = nil
	}
	c.mu.Unlock()
	c.subMu.Lock()
	for s := range c.subs {
		s.disconnected()
	}
	c.subMu.Unlock()
	cn.finish(pending, err)
}

func (c *Client) readLoop(cn *conn) {
	for {
		var m message
		if err := cn.decode(&m); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				err = ErrDisconnected
			} else {
				err = fmt.Errorf("%w: %w", ErrDisconnected, err)
			}
			c.log.Debug("qmp connection ended", "err", err)
			c.drop(cn, err)
			return
		}
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data, Time: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)}
			c.subMu.Lock()
			for s := range c.subs {
				s.deliver(ev)
			}
			c.subMu.Unlock()
		case m.Return != nil || m.Error != nil:
			var id string
			if err := json.Unmarshal(m.ID, &id); err != nil || id == "" {
				c.log.Warn("qmp reply without our id", "id", string(m.ID), "error", m.Error)
				continue
			}
			r := reply{ret: m.Return}
			if m.Error != nil {
				r.err = m.Error
			}
			cn.resolve(id, r)
		}
	}
}

// message is any message from the monitor.
type message struct {
	QMP       json.RawMessage `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *Error          `json:"error"`
	ID        json.RawMessage `json:"id"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type reply struct {
	ret json.RawMessage
	err error
}

// conn is one monitor connection.
type conn struct {
	uc  *net.UnixConn
	lr  *limitReader
	dec *json.Decoder // reads lr; used by one goroutine at a time (dial, then readLoop)

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	pending map[string]chan reply
	err     error
	dead    chan struct{}
}

// errNoGreeting marks a handshake whose greeting did not come by its own deadline.
var errNoGreeting = errors.New("no greeting")

// handshake reads the greeting (by greetBy unless it is zero, then by the connection's
// deadline) and negotiates capabilities. ctx is the dial's context: its end also ends the
// handshake (an AfterFunc moves the connection's deadline into the past).
func (cn *conn) handshake(ctx context.Context, greetBy time.Time) error {
	var m message
	if !greetBy.IsZero() {
		cn.uc.SetReadDeadline(greetBy)
	}
	if err := cn.decode(&m); err != nil {
		if !greetBy.IsZero() && errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			return fmt.Errorf("read greeting: %w", errNoGreeting)
		}
		return fmt.Errorf("read greeting: %w", err)
	}
	if !greetBy.IsZero() {
		// Back to the dial's bound for the rest of the handshake. The AfterFunc may have
		// fired in between and set a past deadline that this overwrites: check ctx after.
		if dl, ok := ctx.Deadline(); ok {
			cn.uc.SetReadDeadline(dl)
		} else {
			cn.uc.SetReadDeadline(time.Time{})
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("read greeting: %w", err)
		}
	}
	if m.QMP == nil {
		return errors.New("no QMP greeting")
	}
	if _, err := cn.uc.Write([]byte(`{"execute":"qmp_capabilities","id":"kdp-caps"}` + "\n")); err != nil {
		return fmt.Errorf("qmp_capabilities: %w", err)
	}
	for {
		m = message{}
		if err := cn.decode(&m); err != nil {
			return fmt.Errorf("qmp_capabilities: %w", err)
		}
		if m.Error != nil {
			return fmt.Errorf("qmp_capabilities: %w", m.Error)
		}
		if m.Return != nil {
			return nil
		}
	}
}

// decode reads the next message, failing with ErrTooLarge when the monitor sends more than
// the bound without completing one.
func (cn *conn) decode(m *message) error {
	if err := cn.dec.Decode(m); err != nil {
		return err
	}
	cn.lr.base = cn.dec.InputOffset()
	return nil
}

// limitReader fails once more than max bytes were read past base, the end of the last
// complete message: the decoder's buffer (what it holds of the message being read) stays
// bounded whatever the monitor sends, with or without newlines.
type limitReader struct {
	r       io.Reader
	n, base int64
	max     int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n-l.base > l.max {
		return 0, fmt.Errorf("%w: more than %d bytes without a complete message", ErrTooLarge, l.max)
	}
	n, err := l.r.Read(p)
	l.n += int64(n)
	return n, err
}

func (cn *conn) isDead() bool {
	select {
	case <-cn.dead:
		return true
	default:
		return false
	}
}

// send registers ch for the reply to id and writes the message. unsent reports that no
// byte of it was written.
func (cn *conn) send(ctx context.Context, id string, b, oob []byte, ch chan reply) (unsent bool, err error) {
	cn.mu.Lock()
	if cn.err != nil {
		err := cn.err
		cn.mu.Unlock()
		return true, err
	}
	cn.pending[id] = ch
	cn.mu.Unlock()

	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		cn.uc.SetWriteDeadline(dl)
	} else {
		cn.uc.SetWriteDeadline(time.Time{})
	}
	var n int
	if oob != nil {
		var oobn int
		n, oobn, err = cn.uc.WriteMsgUnix(b, oob, nil)
		if err == nil && (n != len(b) || oobn != len(oob)) {
			err = io.ErrShortWrite
		}
	} else {
		n, err = cn.uc.Write(b)
	}
	if err != nil {
		cn.forget(id)
		return n <= 0, fmt.Errorf("%w: write: %w", ErrDisconnected, err)
	}
	return false, nil
}

func (cn *conn) forget(id string) {
	cn.mu.Lock()
	delete(cn.pending, id)
	cn.mu.Unlock()
}

func (cn *conn) resolve(id string, r reply) {
	cn.mu.Lock()
	ch := cn.pending[id]
	delete(cn.pending, id)
	cn.mu.Unlock()
	if ch != nil {
		ch <- r
	}
}

// fail closes the connection and fails every call in flight with err.
func (cn *conn) fail(err error) {
	if pending, first := cn.markFailed(err); first {
		cn.finish(pending, err)
	}
}

// markFailed records err as the connection's end and takes the calls in flight; first is
// false when the connection had already failed.
func (cn *conn) markFailed(err error) (pending map[string]chan reply, first bool) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.err != nil {
		return nil, false
	}
	cn.err = err
	pending = cn.pending
	cn.pending = nil
	close(cn.dead)
	return pending, true
}

// finish closes the connection and fails the calls markFailed took.
func (cn *conn) finish(pending map[string]chan reply, err error) {
	cn.uc.Close()
	for _, ch := range pending {
		ch <- reply{err: err}
	}
}
