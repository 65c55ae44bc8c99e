package proctest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain runs the helper parent when the test binary is started as one: it starts a child
// with Start, retires threads the way netns code does (goroutines that exit locked), says the
// child's pid and waits to be killed.
func TestMain(m *testing.M) {
	if os.Getenv("KDP_PROCTEST_PARENT") == "1" {
		cmd := exec.Command("sleep", "600")
		if err := Start(cmd); err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		for i := 0; i < 64; i++ {
			done := make(chan struct{})
			go func() { runtime.LockOSThread(); close(done) }() // exits locked: its thread is retired
			<-done
		}
		fmt.Println(cmd.Process.Pid)
		select {}
	}
	os.Exit(m.Run())
}

// TestChildDiesWithParent: a child of Start outlives the parent's retired threads and dies
// when the parent is killed without running any cleanup (what go test's timeout does).
func TestChildDiesWithParent(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skip("no sleep(1)")
	}
	parent := exec.Command(os.Args[0], "-test.run=^$")
	parent.Env = append(os.Environ(), "KDP_PROCTEST_PARENT=1")
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { parent.Process.Kill(); parent.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper parent: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("helper parent said %q", line)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	defer unix.Close(fd)
	t.Cleanup(func() { unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0) })
	if exited(t, fd, 200*time.Millisecond) {
		t.Fatal("the child died while its parent lives (killed by a retired thread's death signal?)")
	}
	if err := parent.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if !exited(t, fd, 10*time.Second) {
		t.Fatal("the child outlived its killed parent")
	}
}

// TestWaitUnchanged: the caller's Wait reaps the child and reports its exit status.
func TestWaitUnchanged(t *testing.T) {
	cmd := exec.Command("sh", "-c", "exit 3")
	if err := Start(cmd); err != nil {
		t.Fatal(err)
	}
	var ee *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("Wait: %v, want exit status 3", err)
	}
	if err := Start(exec.Command("/nonexistent/binary")); err == nil || !strings.Contains(err.Error(), "/nonexistent/binary") {
		t.Fatalf("Start of a missing binary: %v, want an error naming it", err)
	}
}

// exited reports whether the process of pidfd fd exits within d.
func exited(t *testing.T, fd int, d time.Duration) bool {
	t.Helper()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(d)
	for {
		n, err := unix.Poll(fds, max(0, int(time.Until(deadline).Milliseconds()))) // never -1: that waits for ever
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("poll: %v", err)
		}
		return n > 0
	}
}
