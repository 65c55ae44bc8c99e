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
