package hotplug

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// TestMain fails the run when descriptors leak: a tap fd QEMU or the fake kept, or a leaked connection, shows here.
func TestMain(m *testing.M) {
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
	os.Exit(code)
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}
