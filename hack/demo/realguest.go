package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
)

// console collects a VM's serial lines and lets the demo wait for the guest's markers.
type console struct {
	mu    sync.Mutex
	lines []string
	cond  chan struct{}
}

func (c *console) read(r io.Reader) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		c.mu.Lock()
		c.lines = append(c.lines, s.Text())
		close(c.cond)
		c.cond = make(chan struct{})
		c.mu.Unlock()
	}
}

func (c *console) waitFor(ctx context.Context, substr string) (string, error) {
	seen := 0
	for {
		c.mu.Lock()
		for ; seen < len(c.lines); seen++ {
			if strings.Contains(c.lines[seen], substr) {
				l := c.lines[seen]
				c.mu.Unlock()
				return l, nil
			}
		}
		ch := c.cond
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return "", fmt.Errorf("guest never printed %q: %w", substr, ctx.Err())
		}
	}
}

// realGuestDemo boots the test guest (hack/guest) under QEMU inside a second sandbox's netns,
// registers the sandbox with its QMP socket, and hot-plugs the user guide's NIC (its MAC, MTU
// and 5 queues) with kata-network: the guest sees the NIC, and ping and TCP cross the BPF
// datapath between the host side and the VM.
func realGuestDemo(d *demo) error {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return errNoGuest
	}
	guestDir := filepath.Join("hack", "guest", "out")
	kernel, initrd := filepath.Join(guestDir, "vmlinuz"), filepath.Join(guestDir, "initramfs.cpio.gz")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			return errNoGuest
		}
	}
	sb, err := topo.NewSandbox(topo.SandboxConfig{Prefix: "kdpdemo-vm", NoTap: true})
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { sb.Close() })
	const mac = "02:42:20:6f:a3:69"
	qmpSock := filepath.Join(d.dir, "qmp.sock")
	args := []string{"--net=" + sb.NS.Path(), "--", qemu,
		"-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 kdp.net=" + mac + "=" + sb.GuestAddr.String(),
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off"}
	for i := 1; i <= 4; i++ {
		args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,bus=pcie.0,chassis=%d,slot=%d", i, i, i))
	}
	fmt.Printf("$ nsenter --net=%s qemu-system-x86_64 -M q35 -accel tcg ... -qmp unix:%s (a tiny Debian kernel + busybox guest)\n", sb.NS.Path(), qmpSock)
	vm := exec.Command("nsenter", args...)
	vm.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := vm.StdoutPipe()
	if err != nil {
		return err
	}
	if err := vm.Start(); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { vm.Process.Kill(); vm.Wait() })
	con := &console{cond: make(chan struct{})}
	go con.read(out)
	ctx, cancel := context.WithTimeout(d.ctx, 90*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := con.waitFor(ctx, "KDP-GUEST-READY"); err != nil {
		return err
	}
	fmt.Printf("guest booted in %v\n", time.Since(start).Round(time.Millisecond))

	const id = "4f1c2d9e0a7b6c35"
	if _, err := d.cli("", "sandbox", "add", id, "--netns", sb.NS.Path(), "--qmp", qmpSock); err != nil {
		return err
	}
	in := fmt.Sprintf(`{"device":"tap-vm","name":"eth-test","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500,"queues":5}`,
		sb.GuestAddr.Addr(), mac)
	start = time.Now()
	if _, err := d.cli(in, "kata-network", "add-iface", id[:7], "-"); err != nil {
		return err
	}
	returned := time.Since(start)
	line, err := con.waitFor(ctx, "KDP-NIC-UP "+mac)
	if err != nil {
		return err
	}
	fmt.Printf("add-iface returned after %v; the guest reported %q %v after the call\n",
		returned.Round(time.Millisecond), strings.TrimSpace(line[strings.Index(line, "KDP-NIC-UP"):]), time.Since(start).Round(time.Millisecond))

	fmt.Printf("$ ping host -> VM %s\n", sb.GuestAddr.Addr())
	if err := sb.Host.Ping(sb.GuestAddr.Addr().String(), 3, 10*time.Second); err != nil {
		return err
	}
	const size = 4 << 20
	c, err := sb.Host.Dial("tcp", sb.GuestAddr.Addr().String()+":9000", 5*time.Second)
	if err != nil {
		return err
	}
	t0 := time.Now()
	fmt.Fprintf(c, "%d\n", size)
	n, _ := io.Copy(io.Discard, c)
	c.Close()
	fmt.Printf("TCP VM -> host: %d bytes in %v\n", n, time.Since(t0).Round(time.Millisecond))
	c, err = sb.Host.Dial("tcp", sb.GuestAddr.Addr().String()+":9001", 5*time.Second)
	if err != nil {
		return err
	}
	t0 = time.Now()
	io.Copy(c, io.LimitReader(zeroReader{}, size))
	c.(interface{ CloseWrite() error }).CloseWrite()
	reply, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	got, _ := strconv.Atoi(strings.TrimSpace(reply))
	fmt.Printf("TCP host -> VM: the VM counted %d bytes in %v\n", got, time.Since(t0).Round(time.Millisecond))
	if n != size || got != size {
		return fmt.Errorf("TCP with the VM: %d and %d bytes, want %d", n, got, size)
	}
	if _, err := d.cli("", "status"); err != nil {
		return err
	}
	step("Hot-unplug: del-iface")
	if _, err := d.cli(in, "kata-network", "del-iface", id[:7], "-"); err != nil {
		return err
	}
	if _, err := con.waitFor(ctx, "KDP-NIC-GONE "+mac); err != nil {
		return err
	}
	fmt.Println("the guest reported the NIC gone")
	_, err = d.cli("", "sandbox", "del", id)
	return err
}

type zeroReader struct{}

func (zeroReader) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}
