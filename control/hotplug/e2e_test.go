package hotplug_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/hotplug"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/qmp"
)

const (
	mac0 = "02:42:20:6f:a3:69" // the user guide's example NIC, 5 queues
	mac1 = "02:42:20:6f:a3:6a" // a single-queue NIC
)

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// testNetNS creates a named netns kdptq-<pid>, removed at the end of the test.
func testNetNS(t *testing.T) (name, path string) {
	name = fmt.Sprintf("kdptq-%d", os.Getpid())
	exec.Command("ip", "netns", "del", name).Run()
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name, "/var/run/netns/" + name
}

// hostTap creates a tap in the netns with the host-side address addr.
func hostTap(t *testing.T, ns, nsPath, name string, queues int, addr string) {
	t.Helper()
	if err := netdev.CreateTap(nsPath, name, netdev.TapOptions{Queues: queues, VnetHdr: true, MTU: 1500}); err != nil {
		t.Fatalf("create tap: %v", err)
	}
	run(t, "ip", "-n", ns, "addr", "add", addr, "dev", name)
}

func openTap(t *testing.T, nsPath, name string, queues int) []*os.File {
	t.Helper()
	fds, err := netdev.OpenTap(nsPath, name, queues, true, true)
	if err != nil {
		t.Fatalf("open tap: %v", err)
	}
	return fds
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

func ping(t *testing.T, ns, ip string) {
	t.Helper()
	var out []byte
	var err error
	for range 5 {
		out, err = exec.Command("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", ip).CombinedOutput()
		if err == nil {
			return
		}
	}
	t.Fatalf("ping %s from %s: %v\n%s", ip, ns, err, out)
}

func dialIn(t *testing.T, nsPath, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	err := netdev.InNetNS(nsPath, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	return c
}

// tcpExchange checks echo, a transfer from the guest and a transfer to the guest.
func tcpExchange(t *testing.T, nsPath, ip string, n int) {
	t.Helper()
	c := dialIn(t, nsPath, net.JoinHostPort(ip, fmt.Sprint(guesttest.EchoPort)))
	msg := []byte("hello through the hot-plugged nic\n")
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("echo write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: got %q %v", got, err)
	}
	c.Close()

	c = dialIn(t, nsPath, net.JoinHostPort(ip, fmt.Sprint(guesttest.SendPort)))
	fmt.Fprintf(c, "%d\n", n)
	m, err := io.Copy(io.Discard, c)
	c.Close()
	if err != nil || m != int64(n) {
		t.Fatalf("transfer from guest: %d bytes (%v), want %d", m, err, n)
	}

	c = dialIn(t, nsPath, net.JoinHostPort(ip, fmt.Sprint(guesttest.SinkPort)))
	if _, err := c.Write(make([]byte, n)); err != nil {
		t.Fatalf("transfer to guest: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	ans, err := io.ReadAll(c)
	c.Close()
	if err != nil || strings.TrimSpace(string(ans)) != fmt.Sprint(n) {
		t.Fatalf("transfer to guest: guest read %q (%v), want %d", ans, err, n)
	}
}

// netdevs returns QEMU's "info network".
func infoNetwork(t *testing.T, c *qmp.Client) string {
	t.Helper()
	ret, err := c.Execute(context.Background(), "human-monitor-command", map[string]string{"command-line": "info network"})
	if err != nil {
		t.Fatalf("info network: %v", err)
	}
	return string(ret)
}

func TestE2EHotplugRealGuest(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: netns, tap, qemu")
	}
	start := time.Now()
	ns, nsPath := testNetNS(t)
	hostTap(t, ns, nsPath, "kdptq-tap0", 5, "172.16.0.1/16")
	hostTap(t, ns, nsPath, "kdptq-tap1", 1, "172.17.0.1/16")
	g := guesttest.Boot(t, guesttest.GuestConfig{
		NetNS:    nsPath,
		NetTable: map[string]string{mac0: "172.16.0.3/16", mac1: "172.17.0.3/16"},
		// The guest pings the host too: traffic the guest starts (kdp.ping, used by the
		// guest-to-guest vhost-user test) works.
		KernelArgs: []string{"kdp.ping=172.16.0.1"},
	})
	t.Logf("guest ready after %v", time.Since(start).Round(time.Millisecond))
	c := g.QMP()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()

	// The user guide's NIC: 5 queues.
	from := g.Lines()
	fds := openTap(t, nsPath, "kdptq-tap0", 5)
	t0 := time.Now()
	addr, err := hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth-test", MAC: mac0, Queues: 5, Fds: fds})
	plugTook := time.Since(t0)
	closeAll(fds)
	if err != nil {
		t.Fatalf("plug eth-test: %v", err)
	}
	if addr != "01.0/00" {
		t.Errorf("pciAddr = %q, want 01.0/00 (first root port, slot 1)", addr)
	}
	ifn, err := g.WaitNICUp(ctx, from, mac0)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	t.Logf("eth-test plugged in %v, up in the guest as %s after %v", plugTook.Round(time.Microsecond), ifn, time.Since(t0).Round(time.Millisecond))
	ping(t, ns, "172.16.0.3")
	tcpExchange(t, nsPath, "172.16.0.3", 1<<20)
	if _, err := g.WaitFor(ctx, 0, "KDP-PING-OK 172.16.0.1"); err != nil {
		t.Errorf("guest pinging the host: %v (a guest built before kdp.ping existed: make guest)", err)
	}

	// A single-queue NIC next to it.
	from = g.Lines()
	fds = openTap(t, nsPath, "kdptq-tap1", 1)
	addr, err = hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth1", MAC: mac1, Fds: fds})
	closeAll(fds)
	if err != nil {
		t.Fatalf("plug eth1: %v", err)
	}
	if addr != "02.0/00" {
		t.Errorf("pciAddr = %q, want 02.0/00", addr)
	}
	if _, err := g.WaitNICUp(ctx, from, mac1); err != nil {
		t.Fatalf("guest: %v", err)
	}
	ping(t, ns, "172.17.0.3")
	tcpExchange(t, nsPath, "172.17.0.3", 64<<10)
	if info := infoNetwork(t, c); !strings.Contains(info, "eth-test-netdev") || !strings.Contains(info, "eth1-netdev") {
		t.Errorf("info network lacks the netdevs:\n%s", info)
	}

	// Unplug the first.
	from = g.Lines()
	t0 = time.Now()
	if err := hotplug.Unplug(ctx, c, "eth-test", 5*time.Second); err != nil {
		t.Fatalf("unplug eth-test: %v", err)
	}
	t.Logf("eth-test unplugged in %v", time.Since(t0).Round(time.Millisecond))
	if err := g.WaitNICGone(ctx, from, mac0); err != nil {
		t.Fatalf("guest: %v", err)
	}
	if info := infoNetwork(t, c); strings.Contains(info, "eth-test") {
		t.Errorf("QEMU still has eth-test:\n%s", info)
	}
	ping(t, ns, "172.17.0.3") // the other NIC is unaffected

	// An unplug the guest does not answer (vCPU stopped) times out, leaves the NIC in place,
	// and a retry completes it.
	if _, err := c.Execute(ctx, "stop", nil); err != nil {
		t.Fatal(err)
	}
	err = hotplug.Unplug(ctx, c, "eth1", 300*time.Millisecond)
	if !errors.Is(err, hotplug.ErrUnplugTimeout) {
		t.Fatalf("unplug with the guest stopped: %v, want ErrUnplugTimeout", err)
	}
	if info := infoNetwork(t, c); !strings.Contains(info, "eth1-netdev") {
		t.Errorf("netdev gone after a timed-out unplug:\n%s", info)
	}
	from = g.Lines()
	if _, err := c.Execute(ctx, "cont", nil); err != nil {
		t.Fatal(err)
	}
	if err := hotplug.Unplug(ctx, c, "eth1", 5*time.Second); err != nil {
		t.Fatalf("retried unplug: %v", err)
	}
	if err := g.WaitNICGone(ctx, from, mac1); err != nil {
		t.Fatalf("guest: %v", err)
	}
	if info := infoNetwork(t, c); strings.Contains(info, "eth1") {
		t.Errorf("QEMU still has eth1:\n%s", info)
	}

	// Plug again, then QEMU dies while an unplug waits for the guest: a clear error, quickly.
	from = g.Lines()
	fds = openTap(t, nsPath, "kdptq-tap1", 1)
	addr, err = hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth1", MAC: mac1, Fds: fds})
	closeAll(fds)
	if err != nil {
		t.Fatalf("replug eth1: %v", err)
	}
	if addr != "01.0/00" {
		t.Errorf("replug pciAddr = %q, want the freed 01.0/00", addr)
	}
	if _, err := g.WaitNICUp(ctx, from, mac1); err != nil {
		t.Fatalf("guest: %v", err)
	}
	if _, err := c.Execute(ctx, "stop", nil); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- hotplug.Unplug(ctx, c, "eth1", 20*time.Second) }()
	time.Sleep(300 * time.Millisecond)
	g.Kill()
	select {
	case err := <-done:
		if !errors.Is(err, qmp.ErrDisconnected) {
			t.Errorf("unplug when qemu died: %v, want ErrDisconnected", err)
		} else {
			t.Logf("unplug when qemu died: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("unplug did not notice qemu dying")
	}
	fds = openTap(t, nsPath, "kdptq-tap0", 5)
	_, err = hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth-test", MAC: mac0, Queues: 5, Fds: fds})
	closeAll(fds)
	if !errors.Is(err, qmp.ErrUnavailable) {
		t.Errorf("plug with qemu gone: %v, want ErrUnavailable", err)
	} else {
		t.Logf("plug with qemu gone: %v", err)
	}
	t.Logf("whole e2e took %v", time.Since(start).Round(time.Millisecond))
}

// TestE2EPCIBridge plugs behind a pci-bridge instead of a root port.
func TestE2EPCIBridge(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: netns, tap, qemu")
	}
	ns, nsPath := testNetNS(t)
	hostTap(t, ns, nsPath, "kdptq-tap0", 2, "172.16.0.1/16")
	g := guesttest.Boot(t, guesttest.GuestConfig{
		NetNS:     nsPath,
		NetTable:  map[string]string{mac0: "172.16.0.3/16@1400"},
		RootPorts: -1,
		QEMUArgs:  []string{"-device", "pci-bridge,id=br1,bus=pcie.0,chassis_nr=9,addr=0x5"},
	})
	c := g.QMP()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	from := g.Lines()
	fds := openTap(t, nsPath, "kdptq-tap0", 2)
	addr, err := hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth0", MAC: mac0, Queues: 2, Fds: fds})
	closeAll(fds)
	if err != nil {
		t.Fatalf("plug: %v", err)
	}
	if addr != "05.0/01" {
		t.Errorf("pciAddr = %q, want 05.0/01 (bridge at slot 5, first free slot 1)", addr)
	}
	if _, err := g.WaitNICUp(ctx, from, mac0); err != nil {
		t.Fatalf("guest: %v", err)
	}
	ping(t, ns, "172.16.0.3")
	tcpExchange(t, nsPath, "172.16.0.3", 256<<10)
	from = g.Lines()
	if err := hotplug.Unplug(ctx, c, "eth0", 10*time.Second); err != nil {
		t.Fatalf("unplug: %v", err)
	}
	if err := g.WaitNICGone(ctx, from, mac0); err != nil {
		t.Fatalf("guest: %v", err)
	}
}

// BenchmarkE2EPlugUnplug measures Plug (call to return), the guest's NIC up (call to
// KDP-NIC-UP) and Unplug (call to return, DEVICE_DELETED and netdev_del included) against the
// real guest, reporting medians: go test -run - -bench E2E -benchtime 10x ./control/hotplug/
func BenchmarkE2EPlugUnplug(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: netns, tap, qemu")
	}
	name := fmt.Sprintf("kdptq-b%d", os.Getpid())
	exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("netns: %v %s", err, out)
	}
	b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	nsPath := "/var/run/netns/" + name
	if err := netdev.CreateTap(nsPath, "kdptq-tap0", netdev.TapOptions{Queues: 5, VnetHdr: true}); err != nil {
		b.Fatal(err)
	}
	g := guesttest.Boot(b, guesttest.GuestConfig{NetNS: nsPath, NetTable: map[string]string{mac0: "172.16.0.3/16"}})
	c := g.QMP()
	ctx := context.Background()
	var plug, up, unplug []time.Duration
	b.ResetTimer()
	for range b.N {
		fds, err := netdev.OpenTap(nsPath, "kdptq-tap0", 5, true, true)
		if err != nil {
			b.Fatal(err)
		}
		from := g.Lines()
		t0 := time.Now()
		_, err = hotplug.Plug(ctx, c, hotplug.NIC{ID: "eth-test", MAC: mac0, Queues: 5, Fds: fds})
		plug = append(plug, time.Since(t0))
		closeAll(fds)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := g.WaitNICUp(ctx, from, mac0); err != nil {
			b.Fatal(err)
		}
		up = append(up, time.Since(t0))
		from = g.Lines()
		t0 = time.Now()
		if err := hotplug.Unplug(ctx, c, "eth-test", 5*time.Second); err != nil {
			b.Fatal(err)
		}
		unplug = append(unplug, time.Since(t0))
		if err := g.WaitNICGone(ctx, from, mac0); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"plug", plug}, {"nic-up", up}, {"unplug", unplug}} {
		slices.Sort(m.d)
		b.ReportMetric(float64(m.d[len(m.d)/2].Microseconds())/1000, m.name+"-median-ms")
		b.Logf("%s: min %v median %v max %v (n=%d)", m.name, m.d[0], m.d[len(m.d)/2], m.d[len(m.d)-1], len(m.d))
	}
}
