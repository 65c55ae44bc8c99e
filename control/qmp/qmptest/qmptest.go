// Package qmptest is a fake QMP monitor for unit tests of code built on package qmp.
//
// The fake speaks the protocol on a real unix socket (greeting, capabilities negotiation, ids,
// file descriptors passed with SCM_RIGHTS), and a function decides what every command returns,
// so logic such as the hot-plug sequence can be tested step by step, failures included,
// without QEMU. Tests can emit events, drop the connection (monitor restart) or stop the
// server (QEMU gone).
package qmptest

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/qmp"
	"golang.org/x/sys/unix"
)

// Handler answers one command. args is the command's "arguments" object (nil when absent);
// fds are the descriptors that came with the command, closed by the server after the handler
// returns (dup them to keep them). A nil result is the empty object.
type Handler func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error)

// NoReply, returned by a Handler as its result, records the command and sends nothing back,
// like a monitor whose reply never comes; the server goes on reading and answering the
// commands that follow.
var NoReply any = noReply{}

// Endless, returned by a Handler as its result, answers with a reply that never ends: one
// line of bytes without a newline, written until the client goes away.
var Endless any = endless{}

type (
	noReply struct{}
	endless struct{}
)

// Call is a command the server received.
type Call struct {
	Cmd    string
	Args   json.RawMessage
	NumFDs int
}

// Server is a fake QMP monitor.
type Server struct {
	t    testing.TB
	path string
	ln   *net.UnixListener
	fn   Handler

	mu       sync.Mutex
	conns    map[*sconn]struct{}
	calls    []Call
	accepted int
	closed   bool
	stalled  bool
	wg       sync.WaitGroup
}

type sconn struct {
	uc  *net.UnixConn
	wmu sync.Mutex
}

func (c *sconn) write(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.uc.Write(append(b, '\r', '\n'))
	return err
}

// Serve starts a fake monitor whose commands are answered by fn; it is stopped at the end of
// the test. fn may be nil (every command is then CommandNotFound). A handler that needs the
// server itself (to Emit events) is installed with Handle once Serve returned.
func Serve(t testing.TB, fn Handler) *Server {
	t.Helper()
	// A short directory: unix socket paths are limited to 107 bytes.
	dir, err := os.MkdirTemp("", "kdpqmp")
	if err != nil {
		t.Fatalf("qmptest: %v", err)
	}
	path := filepath.Join(dir, "qmp.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		os.RemoveAll(dir)
		t.Fatalf("qmptest: listen: %v", err)
	}
	s := &Server{t: t, path: path, ln: ln, fn: fn, conns: map[*sconn]struct{}{}}
	t.Cleanup(func() {
		s.Close()
		os.RemoveAll(dir)
	})
	s.wg.Add(1)
	go s.accept()
	return s
}

// Handle replaces the handler. Handlers must return: Close waits for them.
func (s *Server) Handle(fn Handler) {
	s.mu.Lock()
	s.fn = fn
	s.mu.Unlock()
}

// Path is the monitor socket path to give to qmp.New.
func (s *Server) Path() string { return s.path }

// Calls returns the commands received so far (qmp_capabilities excluded).
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// Commands returns the names of the commands received so far (qmp_capabilities excluded).
func (s *Server) Commands() []string {
	var names []string
	for _, c := range s.Calls() {
		names = append(names, c.Cmd)
	}
	return names
}

// Stall makes the monitor hang: from now on it greets new connections, then reads and
// records what it is sent but answers nothing, not even qmp_capabilities.
func (s *Server) Stall() {
	s.mu.Lock()
	s.stalled = true
	s.mu.Unlock()
}

// Accepted returns how many connections the server accepted.
func (s *Server) Accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Emit sends an event to every negotiated connection. It may be called from a Handler, in
// which case the event reaches the client before the command's reply.
func (s *Server) Emit(name string, data any) {
	ev := map[string]any{
		"event":     name,
		"timestamp": map[string]int64{"seconds": 1, "microseconds": 2},
	}
	if data != nil {
		ev["data"] = data
	}
	s.mu.Lock()
	conns := make([]*sconn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.write(ev)
	}
}

// Disconnect closes the current connections but keeps listening, like a monitor that went
// away and came back.
func (s *Server) Disconnect() {
	s.mu.Lock()
	for c := range s.conns {
		c.uc.Close()
	}
	s.mu.Unlock()
}

// Close stops the server and closes every connection, like QEMU exiting. It waits for
// running handlers to return.
func (s *Server) Close() {
	s.Exit()
	s.wg.Wait()
}

// Exit stops listening, then closes every connection, like QEMU exiting in the middle of a
// command: a client sees the connection lost and then nothing to dial, never a monitor that
// comes back. Unlike Close it does not wait for handlers, so a Handler may call it.
func (s *Server) Exit() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		s.ln.Close()
		os.Remove(s.path)
	}
	s.mu.Unlock()
	s.Disconnect()
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			uc.Close()
			return
		}
		s.accepted++
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(&sconn{uc: uc})
	}
}

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func (s *Server) serve(c *sconn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.uc.Close()
	}()
	greeting := map[string]any{"QMP": map[string]any{
		"version":      map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 0}, "package": "qmptest"},
		"capabilities": []string{"oob"},
	}}
	if c.write(greeting) != nil {
		return
	}
	var (
		buf     []byte
		fds     []int
		rbuf    = make([]byte, 64<<10)
		oob     = make([]byte, unix.CmsgSpace(64*4))
		negoted bool
	)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for {
		n, oobn, _, _, err := c.uc.ReadMsgUnix(rbuf, oob)
		if err == nil && oobn > 0 {
			fds = append(fds, parseRights(oob[:oobn])...)
		}
		if n > 0 {
			buf = append(buf, rbuf[:n]...)
		}
		for {
			dec := json.NewDecoder(bytes.NewReader(buf))
			var req request
			if derr := dec.Decode(&req); derr != nil {
				if errors.Is(derr, io.EOF) || errors.Is(derr, io.ErrUnexpectedEOF) {
					break
				}
				c.write(map[string]any{"error": qmp.Error{Class: "GenericError", Desc: "JSON parse error, " + derr.Error()}})
				buf = nil
				break
			}
			buf = buf[dec.InputOffset():]
			mine := fds
			fds = nil
			resp := map[string]any{}
			if req.ID != nil {
				resp["id"] = req.ID
			}
			s.mu.Lock()
			stalled := s.stalled
			if stalled && req.Execute != "qmp_capabilities" {
				s.calls = append(s.calls, Call{Cmd: req.Execute, Args: req.Arguments, NumFDs: len(mine)})
			}
			s.mu.Unlock()
			switch {
			case stalled:
				resp = nil
			case req.Execute == "qmp_capabilities":
				negoted = true
				resp["return"] = struct{}{}
				s.mu.Lock()
				s.conns[c] = struct{}{}
				s.mu.Unlock()
			case !negoted:
				resp["error"] = qmp.Error{Class: "CommandNotFound", Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}
			default:
				s.mu.Lock()
				s.calls = append(s.calls, Call{Cmd: req.Execute, Args: req.Arguments, NumFDs: len(mine)})
				fn := s.fn
				s.mu.Unlock()
				var (
					ret  any
					qerr *qmp.Error
				)
				if fn != nil {
					ret, qerr = fn(req.Execute, req.Arguments, mine)
				} else {
					qerr = &qmp.Error{Class: "CommandNotFound", Desc: "The command " + req.Execute + " has not been found"}
				}
				switch {
				case ret == NoReply:
					resp = nil
				case ret == Endless:
					// The client's bound on a message ends this: it closes the connection.
					if c.writeEndless() != nil {
						return
					}
				case qerr != nil:
					resp["error"] = qerr
				case ret == nil:
					resp["return"] = struct{}{}
				default:
					resp["return"] = ret
				}
			}
			for _, fd := range mine {
				unix.Close(fd)
			}
			if resp != nil && c.write(resp) != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// writeEndless writes the start of a reply and then bytes without end, until a write fails.
func (c *sconn) writeEndless() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.uc.Write([]byte(`{"return": "`)); err != nil {
		return err
	}
	chunk := bytes.Repeat([]byte("a"), 64<<10)
	for {
		if _, err := c.uc.Write(chunk); err != nil {
			return err
		}
	}
}

func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if r, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, r...)
		}
	}
	return fds
}

// Within runs f and fails the test when it has not returned after a generous bound (a
// minute): the code under test has far shorter deadlines, so this catches a hang, never a
// slow machine.
func Within(tb testing.TB, f func()) {
	tb.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		tb.Fatal("call hung past its deadlines")
	}
}
