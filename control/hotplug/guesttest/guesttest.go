// Package guesttest boots kata-dp's tiny QEMU test guest (built by hack/guest/build.sh) for
// end-to-end tests: a q35 VM with empty pcie-root-ports to hot-plug NICs into, a QMP socket,
// and a serial console the test reads markers from.
//
// QEMU runs inside the network namespace the test names, as in a Kata sandbox, so the taps
// it is given live there. The guest configures every NIC that appears from a MAC-to-address
// table on its kernel command line and prints markers (see hack/guest/init):
//
//	KDP-GUEST-READY
//	KDP-NIC-UP <mac> <ifname> [<ip>/<len>]
//	KDP-NIC-GONE <mac> <ifname>
//	KDP-PING-OK <ip>             (kernel argument kdp.ping=<ip>: the guest reached ip)
//
// and serves TCP on every address: 7 echo, 9000 sends the byte count asked for on the first
// line, 9001 answers how many bytes it read until EOF.
//
// Boot skips the test when qemu-system-x86_64 or the built guest is missing, or when not
// root. StartTestpmd runs a real vhost-user switch (dpdk-testpmd) for vhost-user NICs.
// QEMU is killed at the end of the test, and the serial log is printed when the test
// failed (or always, with KDP_GUEST_LOG=1). A Guest's methods are safe for concurrent use.
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
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

// Ports the guest serves on each address.
const (
	EchoPort = 7
	SendPort = 9000
	SinkPort = 9001
)

// ErrExited is returned by waits when QEMU exited.
var ErrExited = errors.New("qemu exited")

// GuestConfig configures Boot. The zero value boots a guest in the current netns with no
// address table.
type GuestConfig struct {
	// NetNS is the path of the network namespace QEMU runs in ("" = the test's own).
	NetNS string
	// NetTable maps guest MAC addresses to "<ip>/<len>" or "<ip>/<len>@<mtu>".
	NetTable map[string]string
	// Gateway, when set, becomes the guest's default route once a NIC is up.
	Gateway string
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// QEMUArgs are appended to QEMU's arguments.
	QEMUArgs []string
	// RootPorts is the number of empty pcie-root-ports rp1..rpN at slots 1..N of pcie.0
	// (0: 4; negative: none).
	RootPorts int
	// MemoryMiB is the guest memory (default 256).
	MemoryMiB int
	// SharedMemory backs the guest memory with a shared memfd (memory-backend-memfd,
	// share=on), as Kata does for vhost-user: a vhost-user backend maps it.
	SharedMemory bool
	// Accel is "tcg" (default; also from $KDP_GUEST_ACCEL) or "kvm". This machine's /dev/kvm
	// cannot run an unmodified kernel, so kvm is opt-in.
	Accel string
	// Dir holds vmlinuz and initramfs.cpio.gz (default $KDP_GUEST_DIR, else hack/guest/out
	// of this repository).
	Dir string
	// BootTimeout bounds the wait for KDP-GUEST-READY (default 60s).
	BootTimeout time.Duration
	// ExtraFiles are passed to QEMU as descriptors 3, 4, ... (tap queues given as fds=,
	// the way Kata starts its VMs).
	ExtraFiles []*os.File
}

// Guest is a running test guest.
type Guest struct {
	// QMPPath is the QMP unix socket.
	QMPPath string

	t      testing.TB
	cmd    *exec.Cmd
	exited chan struct{}
	qmp    *qmp.Client

	console *lineLog // the serial console

	mu     sync.Mutex
	stderr strings.Builder
	werr   error
}

// Dir returns the directory the guest image is taken from by default.
func Dir() string {
	if d := os.Getenv("KDP_GUEST_DIR"); d != "" {
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "hack", "guest", "out")
}

// Boot starts the guest and waits until it is ready.
func Boot(t testing.TB, cfg GuestConfig) *Guest {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: qemu in a network namespace")
	}
	qemuBin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed (apt-get install --no-install-recommends qemu-system-x86)")
	}
	dir := cfg.Dir
	if dir == "" {
		dir = Dir()
	}
	kernel, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.cpio.gz")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("test guest not built (%v): run hack/guest/build.sh", err)
		}
	}
	switch {
	case cfg.RootPorts == 0:
		cfg.RootPorts = 4
	case cfg.RootPorts < 0:
		cfg.RootPorts = 0
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 256
	}
	if cfg.Accel == "" {
		cfg.Accel = os.Getenv("KDP_GUEST_ACCEL")
	}
	if cfg.Accel == "" {
		cfg.Accel = "tcg"
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 60 * time.Second
	}

	sockDir, err := os.MkdirTemp("", "kdptq")
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	g := &Guest{
		QMPPath: filepath.Join(sockDir, "qmp.sock"),
		t:       t,
		exited:  make(chan struct{}),
	}
	g.console = newLineLog(g.exited)

	machine := "q35"
	var memArgs []string
	if cfg.SharedMemory {
		machine += ",memory-backend=mem0"
		memArgs = []string{"-object", fmt.Sprintf("memory-backend-memfd,id=mem0,size=%dM,share=on", cfg.MemoryMiB)}
	}
	args := []string{
		"-M", machine, "-accel", cfg.Accel, "-m", fmt.Sprint(cfg.MemoryMiB), "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline(cfg),
		"-qmp", "unix:" + g.QMPPath + ",server=on,wait=off",
	}
	args = append(args, memArgs...)
	if cfg.Accel == "tcg" {
		args = append(args, "-cpu", "max")
	} else {
		args = append(args, "-cpu", "host")
	}
	for i := 1; i <= cfg.RootPorts; i++ {
		args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,bus=pcie.0,chassis=%d,slot=%d", i, i, i))
	}
	args = append(args, cfg.QEMUArgs...)
	bin := qemuBin
	if cfg.NetNS != "" {
		args = append([]string{"--net=" + cfg.NetNS, "--", qemuBin}, args...)
		if bin, err = exec.LookPath("nsenter"); err != nil {
			t.Skip("nsenter not installed (util-linux)")
		}
	}
	g.cmd = exec.Command(bin, args...)
	g.cmd.Stdin = nil
	g.cmd.ExtraFiles = cfg.ExtraFiles
	stdout, err := g.cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	g.cmd.Stderr = &lockedWriter{g: g}
	// QEMU dies with the test binary even when cleanups do not run.
	if err := proctest.Start(g.cmd); err != nil {
		t.Fatalf("guest: start qemu: %v", err)
	}
	readerDone := make(chan struct{})
	go func() {
		<-readerDone
		err := g.cmd.Wait()
		g.mu.Lock()
		g.werr = err
		g.mu.Unlock()
		close(g.exited)
		g.console.wake()
	}()
	t.Cleanup(g.cleanup)
	go func() {
		defer close(readerDone)
		g.readConsole(stdout)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), cfg.BootTimeout)
	defer cancel()
	if _, err := g.WaitFor(ctx, 0, "KDP-GUEST-READY"); err != nil {
		t.Fatalf("guest did not boot: %v\n%s", err, g.Log())
	}
	return g
}

func cmdline(cfg GuestConfig) string {
	parts := []string{"console=ttyS0", "quiet", "panic=-1"}
	if len(cfg.NetTable) > 0 {
		var ents []string
		for mac, addr := range cfg.NetTable {
			ents = append(ents, strings.ToLower(mac)+"="+addr)
		}
		sort.Strings(ents)
		parts = append(parts, "kdp.net="+strings.Join(ents, ","))
	}
	if cfg.Gateway != "" {
		parts = append(parts, "kdp.gw="+cfg.Gateway)
	}
	return strings.Join(append(parts, cfg.KernelArgs...), " ")
}

type lockedWriter struct{ g *Guest }

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.g.mu.Lock()
	defer w.g.mu.Unlock()
	if w.g.stderr.Len() < 64<<10 {
		w.g.stderr.Write(p)
	}
	return len(p), nil
}

func (g *Guest) readConsole(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// The firmware writes terminal escapes; keep lines readable.
		line := strings.TrimRight(stripEscapes(sc.Text()), "\r")
		g.console.add(line)
	}
}

func stripEscapes(s string) string {
	if !strings.Contains(s, "\x1b") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == 0x1b && i+1 < len(s) && s[i+1] == '[' {
			j := i + 2
			for j < len(s) && (s[j] < 0x40 || s[j] > 0x7e) {
				j++
			}
			i = j
			continue
		}
		if s[i] == 0x1b {
			i++ // a two-byte escape such as ESC c
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Lines returns the number of console lines so far: pass it to WaitFor to wait only for
// lines printed from now on.
func (g *Guest) Lines() int {
	return g.console.len()
}

// WaitFor waits for a console line containing substr, looking at lines from index from
// (0: all of them), and returns the line and its index.
func (g *Guest) WaitFor(ctx context.Context, from int, substr string) (string, error) {
	line, _, err := g.waitFor(ctx, from, substr)
	return line, err
}

func (g *Guest) waitFor(ctx context.Context, from int, substr string) (string, int, error) {
	line, i, err := g.console.wait(ctx, from, substr)
	if errors.Is(err, errEnded) {
		g.mu.Lock()
		werr := g.werr
		g.mu.Unlock()
		return "", 0, fmt.Errorf("wait for %q: %w (%v)", substr, ErrExited, werr)
	}
	if err != nil {
		return "", 0, fmt.Errorf("wait for %q: %w", substr, err)
	}
	return line, i, nil
}

// WaitNICUp waits (from console line from on) for the guest to bring up the NIC with the
// given MAC and returns its interface name in the guest.
func (g *Guest) WaitNICUp(ctx context.Context, from int, mac string) (string, error) {
	line, err := g.WaitFor(ctx, from, "KDP-NIC-UP "+strings.ToLower(mac)+" ")
	if err != nil {
		return "", err
	}
	f := strings.Fields(line[strings.Index(line, "KDP-NIC-UP"):])
	if len(f) < 3 {
		return "", fmt.Errorf("malformed marker %q", line)
	}
	return f[2], nil
}

// WaitNICGone waits (from console line from on) for the guest to report the NIC with the
// given MAC gone.
func (g *Guest) WaitNICGone(ctx context.Context, from int, mac string) error {
	_, err := g.WaitFor(ctx, from, "KDP-NIC-GONE "+strings.ToLower(mac)+" ")
	return err
}

// QMP returns a client for the guest's monitor, closed at the end of the test.
func (g *Guest) QMP() *qmp.Client {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.qmp == nil {
		g.qmp = qmp.New(g.QMPPath)
	}
	return g.qmp
}

// Log returns the serial console so far, then QEMU's stderr.
func (g *Guest) Log() string {
	s := "--- guest serial console ---\n" + g.console.text()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stderr.Len() > 0 {
		s += "--- qemu stderr ---\n" + g.stderr.String()
	}
	return s
}

// Pid is QEMU's process id.
func (g *Guest) Pid() int { return g.cmd.Process.Pid }

// Exited is closed when QEMU has exited.
func (g *Guest) Exited() <-chan struct{} { return g.exited }

// Kill kills QEMU now (for tests of a VM dying mid-operation) and waits for it to exit.
func (g *Guest) Kill() {
	g.cmd.Process.Kill()
	<-g.exited
}

func (g *Guest) cleanup() {
	g.mu.Lock()
	c := g.qmp
	g.mu.Unlock()
	if c != nil {
		c.Close()
	}
	g.cmd.Process.Kill()
	select {
	case <-g.exited:
	case <-time.After(10 * time.Second):
		g.t.Errorf("qemu pid %d did not exit after SIGKILL", g.cmd.Process.Pid)
	}
	if g.t.Failed() || os.Getenv("KDP_GUEST_LOG") != "" {
		g.t.Logf("%s", g.Log())
	}
}
