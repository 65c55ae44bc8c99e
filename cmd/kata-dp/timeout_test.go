package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestClientTimeoutFlag: a client command gives up on an agent that never answers after
// --timeout, with an error that says so.
func TestClientTimeoutFlag(t *testing.T) {
	dir, err := os.MkdirTemp("", "kdpcli")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "hung.sock")
	// A listener nobody accepts on: connecting and writing the request succeed, no answer
	// ever comes.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan result, 1)
	go func() { done <- runCLI("status", "--socket", sock, "--timeout", "200ms") }()
	var r result
	select {
	case r = <-done:
	case <-time.After(time.Minute):
		t.Fatal("status hung past --timeout")
	}
	if r.code != 1 || !strings.Contains(r.stderr, "no answer from the agent") || !strings.Contains(r.stderr, "within 200ms") {
		t.Errorf("status against a hung agent: exit %d, stderr %q; want exit 1 and the timeout named", r.code, r.stderr)
	}
}
