// Package proctest starts the processes that tests run beside them (agents, QEMU, testpmd,
// Prometheus, the API server, ping floods) so that they die with the test binary.
//
// A test binary that go test kills at its timeout, or that panics, runs none of its cleanups:
// an agent it started kept running and kept its pins and TCX links, a fake hypervisor slept
// for an hour, a ping flood went on. Linux's parent-death signal (PR_SET_PDEATHSIG) kills the
// child when its parent dies, but "parent" means the thread that forked it, not the process:
// Go retires a thread when a goroutine exits while locked to it (netns switching code does
// that on purpose, to throw away a thread left in a foreign namespace), and a child forked
// from such a thread would be killed in the middle of a test. So Start forks from a goroutine
// locked to its thread and keeps it there until the child exits; that thread is never
// retired while the child lives, and the process's death still kills the child.
//
// The caller keeps everything else of exec.Cmd: Wait, Process.Kill and the exit status work as
// without this package (the locked goroutine watches the child through a pidfd, which does not
// reap it).
package proctest

import (
	"fmt"
	"os/exec"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Start is cmd.Start with cmd's SysProcAttr.Pdeathsig set to SIGKILL (other attributes are
// kept), forked from a thread that lives as long as the child.
func Start(cmd *exec.Cmd) error {
	attr := cmd.SysProcAttr
	if attr == nil {
		attr = &syscall.SysProcAttr{}
		cmd.SysProcAttr = attr
	}
	attr.Pdeathsig = syscall.SIGKILL
	pidfd := -1
	attr.PidFD = &pidfd
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		fd := pidfd
		started <- nil
		if fd < 0 {
			// No pidfd (the kernel refused CLONE_PIDFD): stay on the thread for good rather than
			// risk its retirement killing the child. Only on kernels before 5.2.
			select {}
		}
		waitExit(fd)
		unix.Close(fd)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("proctest: start %s: %w", cmd.Path, err)
	}
	return nil
}

// waitExit blocks until the process of pidfd fd has exited (its pidfd turns readable), without
// reaping it: the caller's Wait does that.
func waitExit(fd int) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n > 0 {
			return
		}
	}
}
