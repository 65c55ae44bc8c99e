package kata

import (
	"errors"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// pidWatch calls exited when one of the watched processes exits. It holds a pidfd per
// process (pidfd_open, Linux 5.3; non-blocking, 5.10) in Go's poller: an exit is an event,
// not something found by polling.
type pidWatch struct {
	exited func()
	mu     sync.Mutex
	files  map[int]*os.File // by pid
}

func newPidWatch(exited func()) *pidWatch {
	return &pidWatch{exited: exited, files: map[int]*os.File{}}
}

// set watches exactly the pids of byID (sandbox id -> hypervisor pid).
func (w *pidWatch) set(byID map[string]int) {
	want := map[int]bool{}
	for _, pid := range byID {
		want[pid] = true
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for pid, f := range w.files {
		if !want[pid] {
			f.Close() // ends its goroutine
			delete(w.files, pid)
		}
	}
	for pid := range want {
		if w.files[pid] != nil {
			continue
		}
		fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				go w.exited() // gone already
			}
			continue
		}
		f := os.NewFile(uintptr(fd), "pidfd")
		w.files[pid] = f
		go w.wait(f)
	}
}

// wait returns when the process of the pidfd f exits (then calls exited) or f is closed.
func (w *pidWatch) wait(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		return err == nil && n > 0 // not yet: park in the poller until readable
	})
	if err == nil {
		w.exited()
	}
}

func (w *pidWatch) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for pid, f := range w.files {
		f.Close()
		delete(w.files, pid)
	}
}
