package main

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
)

// notifySocket is a real unixgram socket standing in for systemd's notify socket.
func notifySocket(t *testing.T, name string) (*net.UnixConn, func(string) string) {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	env := name
	if name[0] == 0 {
		env = "@" + name[1:]
	}
	return c, func(k string) string {
		if k == "NOTIFY_SOCKET" {
			return env
		}
		return ""
	}
}

func readNotify(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a guard against a hang, not a timing
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestSdNotify(t *testing.T) {
	for _, name := range []string{filepath.Join(t.TempDir(), "notify"), "\x00kdpt-notify-" + t.Name()} {
		c, getenv := notifySocket(t, name)
		if err := sdNotify(getenv, "READY=1"); err != nil {
			t.Fatal(err)
		}
		if got := readNotify(t, c); got != "READY=1" {
			t.Errorf("%q: got %q", getenv("NOTIFY_SOCKET"), got)
		}
	}
	if err := sdNotify(func(string) string { return "" }, "READY=1"); err != nil {
		t.Errorf("without NOTIFY_SOCKET: %v", err)
	}
	if err := sdNotify(func(string) string { return "relative/sock" }, "READY=1"); err == nil {
		t.Error("a relative NOTIFY_SOCKET was accepted")
	}
}

// TestAgentNotifiesSystemd: the agent says READY=1 once its socket serves (a client call
// right after the datagram succeeds) and STOPPING=1 when it stops, as Type=notify expects.
func TestAgentNotifiesSystemd(t *testing.T) {
	dir := t.TempDir()
	c, getenv := notifySocket(t, filepath.Join(dir, "notify"))
	sock := filepath.Join(dir, "kata-dp.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := &env{ctx: ctx, stdin: strings.NewReader(""), stdout: io.Discard, stderr: io.Discard, getenv: getenv,
		args: []string{"agent", "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--log-format", "json"},
		newDeps: func(context.Context, agentOptions) (agentDeps, error) {
			return agentDeps{Dataplane: controltest.NewMemDataplane(), Taps: control.NetdevTaps{}}, nil
		}}
	done := make(chan error, 1)
	go func() { done <- run(e) }()
	got := readNotify(t, c)
	if !strings.HasPrefix(got, "READY=1\n") || !strings.Contains(got, "STATUS=serving "+sock) {
		t.Errorf("ready notification: %q", got)
	}
	if v, err := (&env{getenv: func(string) string { return "" }}).client(sock).Version(ctx); err != nil || v != version {
		t.Errorf("agent not serving after READY=1: %q %v", v, err)
	}
	cancel()
	if got := readNotify(t, c); got != "STOPPING=1" {
		t.Errorf("stop notification: %q", got)
	}
	if err := <-done; err != nil {
		t.Errorf("agent: %v", err)
	}
}
