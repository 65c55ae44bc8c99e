package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/internal/headstart"
)

// TestHeadStartAgrees: internal/headstart keeps copies of what this package owns (it is
// initialised before it).
func TestHeadStartAgrees(t *testing.T) {
	if headstart.DefaultSocket != DefaultSocket || headstart.SocketEnv != SocketEnv || headstart.MaxSize != MaxRestoreSize {
		t.Errorf("headstart's socket %q, env %q, size %d; api's %q, %q, %d", headstart.DefaultSocket, headstart.SocketEnv, headstart.MaxSize,
			DefaultSocket, SocketEnv, MaxRestoreSize)
	}
}

// TestFinishRestore: a restore whose rules internal/headstart sent (as the CLI does at its
// start) ends as KataIPVSRestore's would, the same errors included: from a pipe (chunked) and
// from a regular file (with its length, from where it stands), into a full table, into no
// sandbox, rules that cannot be read or are too many, no agent, an older agent.
func TestFinishRestore(t *testing.T) {
	_, c, sock := newAgent(t)
	ctx := context.Background()
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "ipvs3", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	rules := "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m\n"
	pipe := func(s string) *os.File {
		t.Helper()
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		go func() { w.WriteString(s); w.Close() }()
		t.Cleanup(func() { r.Close() })
		return r
	}
	file := func(skip, s string) *os.File {
		t.Helper()
		f, err := os.Create(filepath.Join(t.TempDir(), "rules"))
		if err == nil {
			_, err = f.WriteString(skip + s)
		}
		if err == nil {
			_, err = f.Seek(int64(len(skip)), 0)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	restore := func(c *Client, sock, id string, in *os.File) error {
		return c.FinishRestore(ctx, headstart.Start(sock, id, int(in.Fd())), in)
	}
	clear := func() {
		t.Helper()
		if _, err := c.KataIPVS(ctx, "ipvs3", IPVSOpIpvsadm, IPVSRequest{Parameters: "--clear"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, from := range []string{"pipe", "file"} {
		in := pipe(rules)
		if from == "file" {
			in = file("# skipped\n", rules)
		}
		if err := restore(c, sock, "ipvs3", in); err != nil {
			t.Errorf("restore from a %s: %v", from, err)
		}
		if out, err := c.KataIPVS(ctx, "ipvs3", IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"}); err != nil || out != "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m -w 1\n" {
			t.Errorf("after the restore from a %s, -S = %q, %v", from, out, err)
		}
		if err := restore(c, sock, "ipvs3", pipe(rules)); err == nil || err.Error() != ipvsctl.ErrRestoreNotEmpty.Error() {
			t.Errorf("second restore = %v, want %q", err, ipvsctl.ErrRestoreNotEmpty)
		}
		clear()
	}
	if err := restore(c, sock, "nope", pipe(rules)); !errors.Is(err, control.ErrNoSuchSandbox) {
		t.Errorf("restore into no sandbox = %v, want ErrNoSuchSandbox", err)
	}
	if err := restore(c, sock, "ipvs3", file("", "")); err == nil || !strings.Contains(err.Error(), "holds no rule") {
		t.Errorf("restore of an empty file = %v", err)
	}
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	if err := restore(c, sock, "ipvs3", dir); err == nil || err.Error() != "kata-ipvs: read rules: is a directory" {
		t.Errorf("restore of unreadable rules = %v", err)
	}
	big := rules + strings.Repeat("#\n", MaxRestoreSize/2+1)
	if err := restore(c, sock, "ipvs3", pipe(big)); err == nil || err.Error() != fmt.Sprintf("kata-ipvs: rules file too big (more than %d bytes)", MaxRestoreSize) {
		t.Errorf("restore of too many bytes from a pipe = %v", err)
	}
	if err := restore(c, sock, "ipvs3", file("", big)); err == nil || err.Error() != fmt.Sprintf("kata-ipvs: rules file too big (more than %d bytes)", MaxRestoreSize) {
		t.Errorf("restore of too big a file = %v", err)
	}
	if out, err := c.KataIPVS(ctx, "ipvs3", IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"}); err != nil || out != "" {
		t.Errorf("after the failed restores, -S = %q, %v; want no rules", out, err)
	}
	// No agent: nothing read, the restore is left to KataIPVSRestore, which says so.
	gone := filepath.Join(t.TempDir(), "none.sock")
	if err := restore(NewClient(gone), gone, "ipvs3", pipe(rules)); !errors.Is(err, ErrUnreachable) {
		t.Errorf("restore without an agent = %v, want ErrUnreachable", err)
	}

	// An older agent: 404 before any rule is read, then the JSON call.
	old, got := fakeOlderAgent(t)
	for _, from := range []string{"pipe", "file"} {
		*got = IPVSRequest{}
		in := pipe(rules)
		if from == "file" {
			in = file("", rules)
		}
		if err := restore(NewClient(old), old, "x", in); err != nil {
			t.Fatalf("older agent, from a %s: %v", from, err)
		}
		if got.Rules != rules {
			t.Errorf("older agent got rules %q from a %s, want %q", got.Rules, from, rules)
		}
	}
}

// TestFinishRestoreGivesUp: an agent that never answers; the call ends with the client's
// timeout, and with its context.
func TestFinishRestoreGivesUp(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	c := NewClient(sock)
	c.Timeout = 50 * 1e6 // 50 ms
	if err := c.FinishRestore(context.Background(), headstart.Start(sock, "x", int(r.Fd())), r); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer from the agent") {
		t.Errorf("restore from a mute agent = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.FinishRestore(ctx, headstart.Start(sock, "x", int(r.Fd())), r); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled restore = %v", err)
	}
}
