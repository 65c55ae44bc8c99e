package qmptest

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// RunCheckingFDs runs the tests of m and fails the run when file descriptors leak (a leaked
// monitor connection, or an fd passed with getfd and never closed, shows here). Call it from
// TestMain: os.Exit(qmptest.RunCheckingFDs(m)).
func RunCheckingFDs(m *testing.M) int {
	// Start the runtime's poller (an epoll fd and an eventfd) before counting.
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	before := openFDs()
	code := m.Run()
	if code == 0 {
		deadline := time.Now().Add(2 * time.Second)
		for openFDs() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if after := openFDs(); after > before {
			fmt.Fprintf(os.Stderr, "leaked %d file descriptors (%d before, %d after)\n", after-before, before, after)
			code = 1
		}
	}
	return code
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}
