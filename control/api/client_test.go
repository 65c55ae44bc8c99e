package api

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hungAgent serves the API socket with an agent that never answers, until the test ends.
func hungAgent(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kdpapi")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	stop := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-stop:
		case <-r.Context().Done():
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() {
		close(stop)
		srv.Close()
		os.RemoveAll(dir)
	})
	return path
}

// within runs f and fails the test when it has not returned after a generous bound.
func within(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("call hung past its timeout")
	}
}

func TestClientTimeout(t *testing.T) {
	path := hungAgent(t)
	c := NewClient(path)
	if c.Timeout != DefaultTimeout || DefaultTimeout <= 0 {
		t.Fatalf("NewClient timeout = %v, want DefaultTimeout (%v)", c.Timeout, DefaultTimeout)
	}

	c.Timeout = 200 * time.Millisecond
	var err error
	within(t, func() { _, err = c.Status(context.Background()) })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer from the agent") || !strings.Contains(err.Error(), "within 200ms") {
		t.Fatalf("status from a hung agent: %v, want the client's timeout", err)
	}

	// A context deadline takes precedence over the client's timeout (here a shorter one,
	// reported as the caller's).
	c.Timeout = time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	within(t, func() { _, err = c.Status(ctx) })
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "no answer from the agent") {
		t.Fatalf("status with a context deadline: %v, want the context's error", err)
	}
}

// TestChmodSocketDoesNotFollowLinks: the socket's mode is set on the socket itself; a symlink
// put in its place is refused and its target left alone.
func TestChmodSocketDoesNotFollowLinks(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := chmodSocket(sock, 0o600); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := chmodSocket(link, 0o600); err == nil {
		t.Error("chmod through a symlink succeeded")
	}
	if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o644 {
		t.Errorf("symlink target changed to %v", fi.Mode())
	}
	if err := chmodSocket(target, 0o600); err == nil || !strings.Contains(err.Error(), "no longer a socket") {
		t.Errorf("chmod of a regular file: %v, want a not-a-socket error", err)
	}
}
