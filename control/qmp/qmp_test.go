package qmp_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
	"golang.org/x/sys/unix"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newClient(t *testing.T, srv *qmptest.Server) *qmp.Client {
	c := qmp.New(srv.Path())
	t.Cleanup(func() { c.Close() })
	return c
}

func TestExecute(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		switch cmd {
		case "query-status":
			return map[string]any{"status": "running", "running": true}, nil
		case "echo":
			return args, nil
		}
		return nil, &qmp.Error{Class: "CommandNotFound", Desc: "The command " + cmd + " has not been found"}
	})
	c := newClient(t, srv)
	ctx := ctxT(t)

	ret, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		t.Fatalf("query-status: %v", err)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := json.Unmarshal(ret, &st); err != nil {
		t.Fatal(err)
	}
	if st.Status != "running" || !st.Running {
		t.Errorf("query-status = %s", ret)
	}

	ret, err = c.Execute(ctx, "echo", map[string]any{"id": "net0", "n": 5})
	if err != nil {
		t.Fatalf("echo: %v", err)
	}
	if diff := cmp.Diff(`{"id":"net0","n":5}`, string(ret)); diff != "" {
		t.Errorf("echo (-want +got):\n%s", diff)
	}

	_, err = c.Execute(ctx, "nope", nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Fatalf("nope: got %v, want a *qmp.Error", err)
	}
	if diff := cmp.Diff(&qmp.Error{Class: "CommandNotFound", Desc: "The command nope has not been found"}, qe); diff != "" {
		t.Errorf("error (-want +got):\n%s", diff)
	}
	if want := "qmp nope: CommandNotFound: The command nope has not been found"; err.Error() != want {
		t.Errorf("error text = %q, want %q", err, want)
	}
	if diff := cmp.Diff([]string{"query-status", "echo", "nope"}, srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	if got := srv.Accepted(); got != 1 {
		t.Errorf("connections = %d, want 1", got)
	}
}

func TestConcurrentIDs(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		return args, nil
	})
	c := newClient(t, srv)
	ctx := ctxT(t)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ret, err := c.Execute(ctx, "echo", map[string]int{"i": i})
			if err != nil {
				errs <- err
				return
			}
			if want := fmt.Sprintf(`{"i":%d}`, i); string(ret) != want {
				errs <- fmt.Errorf("call %d got %s", i, ret)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestTimeoutThenLateReply(t *testing.T) {
	release := make(chan struct{})
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "slow" {
			<-release
			return "slow", nil
		}
		return "fast", nil
	})
	c := newClient(t, srv)
	ctx, cancel := context.WithTimeout(ctxT(t), 50*time.Millisecond)
	defer cancel()
	_, err := c.Execute(ctx, "slow", nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow: got %v, want deadline exceeded", err)
	}
	if !strings.HasPrefix(err.Error(), "qmp slow: ") {
		t.Errorf("error %q lacks the command", err)
	}
	close(release)
	// The late reply to "slow" must not be taken for the reply to "fast".
	ret, err := c.Execute(ctxT(t), "fast", nil)
	if err != nil {
		t.Fatalf("fast: %v", err)
	}
	if string(ret) != `"fast"` {
		t.Errorf("fast = %s", ret)
	}
}

func TestGetFD(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	var want unix.Stat_t
	if err := unix.Fstat(int(w.Fd()), &want); err != nil {
		t.Fatal(err)
	}
	// w.Fd() made w blocking; make it non-blocking to see that GetFD leaves the mode alone.
	if err := unix.SetNonblock(int(w.Fd()), true); err != nil {
		t.Fatal(err)
	}
	var got unix.Stat_t
	var gotName string
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		var a struct {
			Fdname string `json:"fdname"`
		}
		json.Unmarshal(args, &a)
		gotName = a.Fdname
		if cmd != "getfd" || len(fds) != 1 {
			return nil, &qmp.Error{Class: "GenericError", Desc: fmt.Sprintf("%s with %d fds", cmd, len(fds))}
		}
		unix.Fstat(fds[0], &got)
		unix.Write(fds[0], []byte("x"))
		return nil, nil
	})
	c := newClient(t, srv)
	if err := c.GetFD(ctxT(t), "fd-net0-0", w); err != nil {
		t.Fatalf("getfd: %v", err)
	}
	if gotName != "fd-net0-0" || got.Ino != want.Ino || got.Dev != want.Dev {
		t.Errorf("server got fd %q ino %d, want %q ino %d", gotName, got.Ino, "fd-net0-0", want.Ino)
	}
	b := make([]byte, 1)
	if _, err := r.Read(b); err != nil || b[0] != 'x' {
		t.Errorf("read through the passed fd: %q %v", b, err)
	}
	rc, err := w.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fl int
	rc.Control(func(fd uintptr) { fl, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Errorf("GetFD changed the file's blocking mode")
	}
	if diff := cmp.Diff([]qmptest.Call{{Cmd: "getfd", Args: json.RawMessage(`{"fdname":"fd-net0-0"}`), NumFDs: 1}}, srv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
}

func TestEventsWhileCommandRuns(t *testing.T) {
	srv := qmptest.Serve(t, nil)
	srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "device_del" {
			// Before the reply, as QEMU may do when the guest is quick.
			srv.Emit("NIC_RX_FILTER_CHANGED", map[string]string{"name": "net0", "path": "/machine/peripheral/net0/virtio-backend"})
			srv.Emit("DEVICE_DELETED", map[string]string{"device": "net0", "path": "/machine/peripheral/net0"})
		}
		return nil, nil
	})
	c := newClient(t, srv)
	ctx := ctxT(t)
	all := c.Subscribe()
	defer all.Close()
	del := c.Subscribe("DEVICE_DELETED")
	defer del.Close()
	if _, err := c.Execute(ctx, "device_del", map[string]string{"id": "net0"}); err != nil {
		t.Fatal(err)
	}
	ev, err := del.Next(ctx)
	if err != nil {
		t.Fatalf("next: %v", err)
	}
	if ev.Name != "DEVICE_DELETED" || string(ev.Data) != `{"device":"net0","path":"/machine/peripheral/net0"}` {
		t.Errorf("event = %s %s", ev.Name, ev.Data)
	}
	if want := time.Unix(1, 2000); !ev.Time.Equal(want) {
		t.Errorf("event time = %v, want %v", ev.Time, want)
	}
	var names []string
	for range 2 {
		ev, err := all.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, ev.Name)
	}
	if diff := cmp.Diff([]string{"NIC_RX_FILTER_CHANGED", "DEVICE_DELETED"}, names); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := del.Next(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("next with nothing queued: %v, want deadline exceeded", err)
	}
}

func TestReconnect(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		return nil, nil
	})
	c := newClient(t, srv)
	ctx := ctxT(t)
	sub := c.Subscribe()
	defer sub.Close()
	if _, err := c.Execute(ctx, "a", nil); err != nil {
		t.Fatal(err)
	}
	srv.Disconnect()
	if _, err := sub.Next(ctx); !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("subscription after disconnect: %v, want ErrDisconnected", err)
	}
	if _, err := c.Execute(ctx, "b", nil); err != nil {
		t.Fatalf("after reconnect: %v", err)
	}
	if got := srv.Accepted(); got != 2 {
		t.Errorf("connections = %d, want 2", got)
	}
}

func TestMonitorGone(t *testing.T) {
	srv := qmptest.Serve(t, nil)
	srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "die" {
			srv.Disconnect() // QEMU dies while running the command
		}
		return nil, nil
	})
	c := newClient(t, srv)
	ctx := ctxT(t)
	_, err := c.Execute(ctx, "die", nil)
	if !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("in flight: %v, want ErrDisconnected", err)
	}
	srv.Close()
	_, err = c.Execute(ctx, "after", nil)
	if !errors.Is(err, qmp.ErrUnavailable) {
		t.Fatalf("after exit: %v, want ErrUnavailable", err)
	}
	if !strings.Contains(err.Error(), srv.Path()) {
		t.Errorf("error %q does not name the socket", err)
	}
}

func TestNotQMP(t *testing.T) {
	dir, err := os.MkdirTemp("", "kdpqmp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			cn, err := ln.Accept()
			if err != nil {
				return
			}
			cn.Write([]byte(`{"hello":"world"}` + "\n"))
			cn.Close()
		}
	}()
	_, err = qmp.Dial(ctxT(t), path)
	if !errors.Is(err, qmp.ErrUnavailable) {
		t.Fatalf("dial: %v, want ErrUnavailable", err)
	}

	// A monitor that never greets: the caller's deadline bounds the dial.
	silentMonitor(t, path+"2")
	ctx, cancel := context.WithTimeout(ctxT(t), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = qmp.Dial(ctx, path+"2")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial silent monitor: %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("dial took %v", d)
	}
}

func TestClose(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		return nil, nil
	})
	c, err := qmp.Dial(ctxT(t), srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	sub := c.Subscribe("DEVICE_DELETED")
	c.Close()
	if _, err := c.Execute(ctxT(t), "x", nil); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("execute after close: %v, want ErrClosed", err)
	}
	if _, err := sub.Next(ctxT(t)); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("next after close: %v, want ErrClosed", err)
	}
}

func TestCanceledBeforeDial(t *testing.T) {
	srv := qmptest.Serve(t, nil)
	c := newClient(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Execute(ctx, "x", nil)
	if !errors.Is(err, context.Canceled) || errors.Is(err, qmp.ErrUnavailable) {
		t.Errorf("execute with a canceled context: %v, want canceled (and not unavailable)", err)
	}
}

func TestStaleConnectionRedials(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		return nil, nil
	})
	c := newClient(t, srv)
	ctx := ctxT(t)
	for i := range 20 {
		if _, err := c.Execute(ctx, "a", nil); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		// The monitor goes away between calls; the next call must not fail for it.
		srv.Disconnect()
	}
	if got := srv.Accepted(); got != 20 {
		t.Errorf("connections = %d, want 20", got)
	}
}

func TestMonitorStalledAfterGreeting(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) { return nil, nil })
	srv.Stall()
	c := newClient(t, srv)
	c.Timeout = 200 * time.Millisecond
	var err error
	qmptest.Within(t, func() { _, err = c.Execute(context.Background(), "query-status", nil) })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no reply within 200ms") {
		t.Fatalf("execute on a stalled monitor: %v, want a deadline error naming the bound", err)
	}
	if cmds := srv.Commands(); len(cmds) != 0 {
		t.Errorf("commands sent before capabilities were negotiated: %v", cmds)
	}
}

func TestCommandWithoutReplyTimesOut(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "hang" {
			return qmptest.NoReply, nil
		}
		return map[string]string{"status": "running"}, nil
	})
	c := newClient(t, srv)
	c.Timeout = 200 * time.Millisecond
	var err error
	qmptest.Within(t, func() { _, err = c.Execute(context.Background(), "hang", nil) })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "qmp hang: monitor") {
		t.Fatalf("hang: %v, want a deadline error naming the command", err)
	}
	// The caller's own deadline is reported as the caller's.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	c2 := newClient(t, srv)
	qmptest.Within(t, func() { _, err = c2.Execute(ctx, "hang", nil) })
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "no reply within") {
		t.Fatalf("hang with the caller's deadline: %v, want the context's error", err)
	}
	// The monitor answers again: the next command on the same client works.
	if _, err := c.Execute(ctxT(t), "query-status", nil); err != nil {
		t.Fatalf("query-status after a timeout: %v", err)
	}
	if diff := cmp.Diff([]string{"hang", "hang", "query-status"}, srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestEndlessReplyIsBounded(t *testing.T) {
	srv := qmptest.Serve(t, func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "flood" {
			return qmptest.Endless, nil
		}
		return map[string]string{"status": "running"}, nil
	})
	c := newClient(t, srv)
	c.MaxMessage = 1 << 20
	var err error
	qmptest.Within(t, func() { _, err = c.Execute(context.Background(), "flood", nil) })
	if !errors.Is(err, qmp.ErrTooLarge) || !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("flood: %v, want ErrTooLarge (connection dropped)", err)
	}
	if !strings.Contains(err.Error(), "more than 1048576 bytes") {
		t.Errorf("flood error %q does not name the bound", err)
	}
	// The next command redials and works.
	if _, err := c.Execute(ctxT(t), "query-status", nil); err != nil {
		t.Fatalf("query-status after the flood: %v", err)
	}
	if got := srv.Accepted(); got != 2 {
		t.Errorf("accepted %d connections, want 2 (the flooded one dropped)", got)
	}
}

// TestBusyMonitor: a monitor that accepts but never greets is what QEMU does when another
// client (Kata's shim, on qmp.sock) holds it. The caller learns that within 2 s, and what to do.
func TestBusyMonitor(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "qmp.sock")
	silentMonitor(t, path)
	c := qmp.New(path)
	defer c.Close()
	start := time.Now()
	var err2 error
	qmptest.Within(t, func() { _, err2 = c.Execute(ctxT(t), "query-status", nil) })
	elapsed := time.Since(start)
	if !errors.Is(err2, qmp.ErrBusy) || !errors.Is(err2, qmp.ErrUnavailable) {
		t.Fatalf("execute on a held monitor: %v, want ErrBusy and ErrUnavailable", err2)
	}
	want := "QMP monitor " + path + " is busy: enable Kata's extra_monitor_socket"
	if !strings.Contains(err2.Error(), want) {
		t.Errorf("error %q does not say %q", err2, want)
	}
	if elapsed > 2*time.Second {
		t.Errorf("busy monitor reported after %v, want within 2s", elapsed)
	}
}

// silentMonitor listens on path like a QEMU monitor another client holds: it accepts
// connections and never greets. The listener and the connections are closed when the test ends.
func silentMonitor(t *testing.T, path string) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu   sync.Mutex
		held []net.Conn
	)
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	go func() {
		for {
			cn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, cn)
			mu.Unlock()
		}
	}()
}
