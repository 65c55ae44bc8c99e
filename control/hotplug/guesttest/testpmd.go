package guesttest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/internal/proctest"
)

// Testpmd is a running dpdk-testpmd serving vhost-user sockets: a real vhost-user switch for
// tests, as OVS-DPDK's dpdkvhostuser ports are in production. Port i serves Sockets[i];
// once forwarding is started, io forwarding pairs ports 0<->1, 2<->3, ...
type Testpmd struct {
	// Sockets are the vhost-user socket paths, in port order.
	Sockets []string

	t      testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	prefix string
	exited chan struct{}
	out    *lineLog
}

// StartTestpmd starts dpdk-testpmd (Debian package dpdk-dev) with one vhost-user port of the
// given queue count per socket, in the directory dir, without hugepages. It runs interactive
// on a pipe and does not forward until Forward is called, so it does not busy-poll a core
// while a test only plugs devices. It is killed at the end of the test. It skips the test
// when testpmd is missing.
func StartTestpmd(t testing.TB, dir string, sockets, queues int) *Testpmd {
	t.Helper()
	bin, err := exec.LookPath("dpdk-testpmd")
	if err != nil {
		t.Skip("dpdk-testpmd not installed (apt-get install --no-install-recommends dpdk-dev)")
	}
	p := &Testpmd{t: t, prefix: fmt.Sprintf("kdpt%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
		exited: make(chan struct{})}
	p.out = newLineLog(p.exited)
	args := []string{"--no-huge", "-m", "256", "--no-pci", "-l", "0,1", "--file-prefix=" + p.prefix, "--log-level=lib.vhost.config:info"}
	for i := range sockets {
		path := filepath.Join(dir, fmt.Sprintf("vhost-user%d", i))
		p.Sockets = append(p.Sockets, path)
		args = append(args, "--vdev", fmt.Sprintf("net_vhost%d,iface=%s,queues=%d", i, path, queues))
	}
	args = append(args, "--", "-i", "--forward-mode=io", fmt.Sprintf("--rxq=%d", queues), fmt.Sprintf("--txq=%d", queues),
		"--total-num-mbufs=8192")
	p.cmd = exec.Command(bin, args...)
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatalf("testpmd: %v", err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("testpmd: %v", err)
	}
	p.cmd.Stderr = p.cmd.Stdout
	// testpmd dies with the test binary even when cleanups do not run.
	if err := proctest.Start(p.cmd); err != nil {
		t.Fatalf("testpmd: start: %v", err)
	}
	readerDone := make(chan struct{})
	go func() {
		<-readerDone
		p.cmd.Wait()
		close(p.exited)
		p.out.wake()
	}()
	t.Cleanup(p.cleanup)
	go func() {
		defer close(readerDone)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.out.add(sc.Text())
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, s := range p.Sockets {
		if _, err := p.WaitFor(ctx, 0, "("+s+") binding succeeded"); err != nil {
			t.Fatalf("testpmd: %v\n%s", err, p.Log())
		}
	}
	return p
}

// Lines returns the number of output lines so far, for WaitFor.
func (p *Testpmd) Lines() int {
	return p.out.len()
}

// WaitFor waits for an output line containing substr from line index from on.
func (p *Testpmd) WaitFor(ctx context.Context, from int, substr string) (string, error) {
	line, _, err := p.out.wait(ctx, from, substr)
	if errors.Is(err, errEnded) {
		return "", fmt.Errorf("wait for %q: testpmd exited", substr)
	}
	if err != nil {
		return "", fmt.Errorf("wait for %q: %w", substr, err)
	}
	return line, nil
}

// Command sends one interactive command ("start", "show port stats all", ...).
func (p *Testpmd) Command(cmd string) error {
	_, err := io.WriteString(p.stdin, cmd+"\n")
	return err
}

// Log returns testpmd's output so far.
func (p *Testpmd) Log() string {
	return "--- testpmd ---\n" + p.out.text()
}

func (p *Testpmd) cleanup() {
	p.stdin.Close()
	p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.t.Errorf("testpmd pid %d did not exit after SIGKILL", p.cmd.Process.Pid)
	}
	// EAL's runtime directory (its multi-process socket and config).
	os.RemoveAll(filepath.Join("/var/run/dpdk", p.prefix))
	if p.t.Failed() || os.Getenv("KDP_GUEST_LOG") != "" {
		p.t.Logf("%s", p.Log())
	}
}
