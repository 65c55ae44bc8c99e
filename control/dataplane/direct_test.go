package dataplane_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/mirred"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

// directRig is two sandboxes in direct mode on one uplink:
//
//	client netns (cl0 10.203.0.100) <-veth-> host netns: up0 (10.203.0.1, the host's own)
//	                                                     | kdp_direct_in/out
//	                                          tapa (BPF) -+- tapb (BPF)
//	                                             | guestemu     | guestemu
//	                          guest A netns (eth0 10.203.0.2)  guest B netns (eth0 10.203.0.3)
type directRig struct {
	host, client *topo.NetNS
	guests       [2]*topo.NetNS
	dp           *dataplane.Dataplane
	root         string
	eps          [2]control.Endpoint
}

var (
	directMACs  = [2]net.HardwareAddr{{0x02, 0xd1, 0, 0, 0, 0x0a}, {0x02, 0xd1, 0, 0, 0, 0x0b}}
	directAddrs = [2]netip.Prefix{netip.MustParsePrefix("10.203.0.2/24"), netip.MustParsePrefix("10.203.0.3/24")}
)

const (
	directClient = "10.203.0.100"
	directHost   = "10.203.0.1"
)

func newDirectRig(t *testing.T) *directRig {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("kdptd-%08x", rand.Uint32()))
	t.Cleanup(func() { os.RemoveAll(root) })
	r := &directRig{host: topotest.MustNetNS(t, "kdptd-h"), client: topotest.MustNetNS(t, "kdptd-c"), root: root}
	for i := range r.guests {
		r.guests[i] = topotest.MustNetNS(t, fmt.Sprintf("kdptd-g%d", i))
	}
	for _, n := range append([]*topo.NetNS{r.host, r.client}, r.guests[:]...) {
		n.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	}
	mustExec(t, r.host, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "cl0", "netns", r.client.Name())
	mustExec(t, r.host, "ip", "addr", "add", directHost+"/24", "dev", "up0")
	mustExec(t, r.host, "ip", "link", "set", "up0", "up")
	mustExec(t, r.client, "ip", "addr", "add", directClient+"/24", "dev", "cl0")
	mustExec(t, r.client, "ip", "link", "set", "cl0", "up")

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var err error
	if r.dp, err = dataplane.New(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.Close() })
	for i := range r.guests {
		tap := fmt.Sprintf("tap%c", 'a'+i)
		if err := netdev.CreateTap(r.host.Path(), tap, netdev.TapOptions{VnetHdr: true}); err != nil {
			t.Fatal(err)
		}
		fds, err := netdev.OpenTap(r.host.Path(), tap, 1, true, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			for _, f := range fds {
				f.Close()
			}
		})
		b, err := guestemu.NewBridge(fds, r.guests[i].Path(), "eth0", guestemu.BridgeOptions{
			MAC: directMACs[i], Addrs: []netip.Prefix{directAddrs[i]}, Offload: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		if err := b.Start(ctx); err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("direct%c", 'a'+i)
		if err := r.dp.EnsureSandbox(ctx, id, r.guests[i].Path()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.dp.RemoveSandbox(context.Background(), id) })
		r.eps[i] = control.Endpoint{
			Sandbox: id, NetNS: r.host.Path(), NIC: "eth0", Tap: tap, Uplink: "up0",
			MAC: directMACs[i], Addr: directAddrs[i], MTU: 1500, Mode: control.ModeDirect, AntiSpoof: true, StrictEgress: true,
		}
		if err := r.dp.AddEndpoint(ctx, r.eps[i]); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.dp.DelEndpoint(context.Background(), r.eps[i]) })
	}
	return r
}

func mustExec(t *testing.T, n *topo.NetNS, cmd ...string) {
	t.Helper()
	if out, err := n.Exec(cmd...); err != nil {
		t.Fatalf("%v: %v: %s", cmd, err, out)
	}
}

func pingOK(t *testing.T, from *topo.NetNS, to string) {
	t.Helper()
	if tx, rx := ping(t, from, "-c", "3", "-i", "0.05", "-W", "1", to); rx != tx {
		t.Errorf("ping %s -> %s: %d of %d answered", from, to, rx, tx)
	}
}

// tcxCount is the number of TCX programs on dev's ingress and egress.
func tcxCount(t *testing.T, n *topo.NetNS, dev string) (in, out int) {
	t.Helper()
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		for _, x := range []struct {
			at ebpf.AttachType
			n  *int
		}{{ebpf.AttachTCXIngress, &in}, {ebpf.AttachTCXEgress, &out}} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: x.at})
			if err != nil {
				return err
			}
			*x.n = len(r.Programs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return in, out
}

const probeType = 0x88b5 // IEEE local experimental: nothing in the namespaces answers it

// probeSock is a packet socket for probeType frames on eth-like device dev in netns n.
type probeSock struct {
	fd      int
	ifindex int
}

func openProbe(t *testing.T, n *topo.NetNS, dev string) *probeSock {
	t.Helper()
	p := &probeSock{}
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		p.ifindex = l.Attrs().Index
		proto := int(htons(probeType))
		if p.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto); err != nil {
			return err
		}
		return unix.Bind(p.fd, &unix.SockaddrLinklayer{Protocol: htons(probeType), Ifindex: p.ifindex})
	})
	if err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(300 * time.Millisecond))
	unix.SetsockoptTimeval(p.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	t.Cleanup(func() { unix.Close(p.fd) })
	return p
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (p *probeSock) send(t *testing.T, dst, src net.HardwareAddr, tag string) {
	t.Helper()
	f := make([]byte, 60)
	copy(f, dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], probeType)
	copy(f[14:], tag)
	if err := unix.Sendto(p.fd, f, 0, &unix.SockaddrLinklayer{Ifindex: p.ifindex, Halen: 6, Addr: [8]byte(append(append([]byte{}, dst...), 0, 0))}); err != nil {
		t.Fatal(err)
	}
}

// got reports whether a frame with tag arrives within the socket timeout (other frames are
// skipped).
func (p *probeSock) got(tag string) bool {
	buf := make([]byte, 2048)
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(p.fd, buf, 0)
		if err != nil {
			return false
		}
		if n >= 14+len(tag) && bytes.Equal(buf[14:14+len(tag)], []byte(tag)) {
			return true
		}
	}
	return false
}

// TestDirect runs real frames through two direct-mode sandboxes sharing one uplink: each guest
// reaches the client, the host and the other guest, ARP resolves, frames for one guest never
// reach the other, spoofed frames are dropped, the host's own traffic on the uplink works, and
// removing one sandbox leaves the other working until the last one takes the node programs
// with it.
func TestDirect(t *testing.T) {
	r := newDirectRig(t)
	ctx := context.Background()
	clientMAC := func() net.HardwareAddr {
		var m net.HardwareAddr
		r.client.Do(func() error {
			l, err := netlink.LinkByName("cl0")
			if err == nil {
				m = l.Attrs().HardwareAddr
			}
			return err
		})
		return m
	}()

	if in, out := tcxCount(t, r.host, "up0"); in != 1 || out != 1 {
		t.Fatalf("node programs on up0: ingress %d egress %d", in, out)
	}
	t.Run("reachability", func(t *testing.T) {
		pingOK(t, r.guests[0], directClient)
		pingOK(t, r.guests[1], directClient)
		pingOK(t, r.guests[0], directAddrs[1].Addr().String())
		pingOK(t, r.guests[1], directAddrs[0].Addr().String())
		pingOK(t, r.client, directAddrs[0].Addr().String())
		pingOK(t, r.host, directAddrs[1].Addr().String()) // host -> guest and back through the turn-around
		pingOK(t, r.host, directClient)                   // the host's own traffic on the uplink
		pingOK(t, r.client, directHost)
	})
	t.Run("arp", func(t *testing.T) {
		// The client learned each guest's MAC by ARP through the node program.
		out, _ := r.client.Exec("ip", "neigh", "show", "dev", "cl0")
		for i := range r.eps {
			if !bytes.Contains([]byte(out), []byte(directAddrs[i].Addr().String()+" lladdr "+directMACs[i].String())) {
				t.Errorf("client neighbours lack guest %d: %s", i, out)
			}
		}
	})
	t.Run("tcp and udp", func(t *testing.T) {
		// Ordinary sockets with checksum offload: partial checksums cross the taps (the
		// guest emulator keeps virtio headers as they are) and a bad checksum would stall
		// TCP or drop UDP.
		for _, c := range []struct {
			name     string
			from, to *topo.NetNS
			addr     string
		}{
			{"client to guest A", r.client, r.guests[0], directAddrs[0].Addr().String()},
			{"guest B to client", r.guests[1], r.client, directClient},
			{"guest A to guest B", r.guests[0], r.guests[1], directAddrs[1].Addr().String()},
			{"host to guest B", r.host, r.guests[1], directAddrs[1].Addr().String()},
		} {
			t.Run(c.name, func(t *testing.T) {
				transfer(t, c.from, c.to, c.addr)
			})
		}
	})
	t.Run("load balancer", func(t *testing.T) {
		// Guest A reaches a service whose real server is the client: DNAT on the tap's
		// ingress, reverse NAT of the replies on the tap's egress.
		var ln net.Listener
		if err := r.client.Do(func() (err error) {
			ln, err = net.Listen("tcp4", directClient+":8080")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("real server\n"))
				c.Close()
			}
		}()
		table := &ipvs.Table{}
		for _, p := range []string{"-A -t 10.203.9.9:80 -s rr", "-a -t 10.203.9.9:80 -r " + directClient + ":8080 -m"} {
			cmd, err := ipvs.ParseParameters(p)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := table.Apply(cmd); err != nil {
				t.Fatal(err)
			}
		}
		if err := r.dp.SetLB(ctx, r.eps[0].Sandbox, table); err != nil {
			t.Fatal(err)
		}
		defer r.dp.SetLB(ctx, r.eps[0].Sandbox, &ipvs.Table{})
		mustExec(t, r.guests[0], "ip", "route", "add", "10.203.9.9/32", "via", directClient) // no one answers ARP for a VIP
		var c net.Conn
		if err := r.guests[0].Do(func() (err error) {
			c, err = net.DialTimeout("tcp4", "10.203.9.9:80", 3*time.Second)
			return err
		}); err != nil {
			t.Fatalf("connect to the service: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		b, _ := io.ReadAll(c)
		if string(b) != "real server\n" {
			t.Errorf("service answered %q", b)
		}
	})
	t.Run("isolation", func(t *testing.T) {
		cl := openProbe(t, r.client, "cl0")
		ga, gb := openProbe(t, r.guests[0], "eth0"), openProbe(t, r.guests[1], "eth0")
		before := r.stats(t, 0)
		// From the client: a frame for B reaches B and not A; a broadcast reaches neither.
		cl.send(t, directMACs[1], clientMAC, "for-b")
		if !gb.got("for-b") {
			t.Error("frame for B did not reach B")
		}
		if ga.got("for-b") {
			t.Error("frame for B reached A")
		}
		cl.send(t, net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, clientMAC, "bcast")
		if ga.got("bcast") || gb.got("bcast") {
			t.Error("a broadcast from the uplink reached a guest")
		}
		// From A: to B with its own MAC (positive control), then with a spoofed source.
		ga.send(t, directMACs[1], directMACs[0], "a-to-b")
		if !gb.got("a-to-b") {
			t.Error("A's frame did not reach B")
		}
		ga.send(t, directMACs[1], net.HardwareAddr{0x02, 0x66, 0, 0, 0, 1}, "spoofed")
		if gb.got("spoofed") || cl.got("spoofed") {
			t.Error("spoofed frame delivered")
		}
		after := r.stats(t, 0)
		if d := after.FromGuest.Drops["spoof_mac"] - before.FromGuest.Drops["spoof_mac"]; d != 1 {
			t.Errorf("spoof_mac drops of A: +%d, want +1 (%v)", d, after.FromGuest.Drops)
		}
		if after.ToGuest.Packets <= before.ToGuest.Packets && after.FromGuest.Packets <= before.FromGuest.Packets {
			t.Errorf("counters of A did not move: %+v", after)
		}
	})
	t.Run("agent restart", func(t *testing.T) {
		// A second process's Dataplane re-adopts the pins: links updated in place, never
		// doubled, counters kept, traffic flowing.
		before := r.stats(t, 0)
		dp2, err := dataplane.New(r.root)
		if err != nil {
			t.Fatal(err)
		}
		defer dp2.Close()
		for _, ep := range r.eps {
			if err := dp2.EnsureSandbox(ctx, ep.Sandbox, ""); err != nil {
				t.Fatal(err)
			}
			if err := dp2.UpdateEndpoint(ctx, ep); err != nil {
				t.Fatal(err)
			}
		}
		if in, out := tcxCount(t, r.host, "up0"); in != 1 || out != 1 {
			t.Fatalf("node programs on up0 after re-adoption: ingress %d egress %d", in, out)
		}
		if in, _ := tcxCount(t, r.host, "tapa"); in != 1 {
			t.Fatalf("tapa has %d programs after re-adoption", in)
		}
		after, err := dp2.Stats(ctx, r.eps[0])
		if err != nil {
			t.Fatal(err)
		}
		if after.ToGuest.Packets < before.ToGuest.Packets || after.FromGuest.Packets < before.FromGuest.Packets {
			t.Errorf("counters reset: %+v -> %+v", before, after)
		}
		pingOK(t, r.guests[0], directAddrs[1].Addr().String())
	})
	t.Run("remove one", func(t *testing.T) {
		if err := r.dp.DelEndpoint(ctx, r.eps[0]); err != nil {
			t.Fatal(err)
		}
		if err := r.dp.RemoveSandbox(ctx, r.eps[0].Sandbox); err != nil {
			t.Fatal(err)
		}
		if in, out := tcxCount(t, r.host, "up0"); in != 1 || out != 1 {
			t.Fatalf("node programs on up0 after one sandbox left: ingress %d egress %d", in, out)
		}
		if in, _ := tcxCount(t, r.host, "tapb"); in != 1 {
			t.Fatalf("tapb lost its program")
		}
		pingOK(t, r.guests[1], directClient)
		pingOK(t, r.host, directClient)
		// A's MAC is nobody's now: a frame for it goes to the host stack, not to B.
		cl := openProbe(t, r.client, "cl0")
		gb := openProbe(t, r.guests[1], "eth0")
		cl.send(t, directMACs[0], clientMAC, "for-gone-a")
		if gb.got("for-gone-a") {
			t.Error("frame for the removed guest reached B")
		}
	})
	t.Run("remove last", func(t *testing.T) {
		if err := r.dp.DelEndpoint(ctx, r.eps[1]); err != nil {
			t.Fatal(err)
		}
		if in, out := tcxCount(t, r.host, "up0"); in != 0 || out != 0 {
			t.Fatalf("node programs left on up0: ingress %d egress %d", in, out)
		}
		pingOK(t, r.host, directClient)
	})
}

// transfer sends 1 MiB over TCP and 100 UDP datagrams from netns from to addr in netns to,
// and checks both arrive intact.
func transfer(t *testing.T, from, to *topo.NetNS, addr string) {
	t.Helper()
	var ln net.Listener
	var uc net.PacketConn
	if err := to.Do(func() (err error) {
		if ln, err = net.Listen("tcp4", addr+":7000"); err != nil {
			return err
		}
		uc, err = net.ListenPacket("udp4", addr+":7001")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	defer uc.Close()
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b, _ := io.ReadAll(c)
		got <- b
	}()
	var tc, ud net.Conn
	if err := from.Do(func() (err error) {
		if tc, err = net.DialTimeout("tcp4", addr+":7000", 5*time.Second); err != nil {
			return err
		}
		ud, err = net.Dial("udp4", addr+":7001")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ud.Close()
	if _, err := tc.Write(want); err != nil {
		t.Fatal(err)
	}
	tc.Close()
	if b := <-got; !bytes.Equal(b, want) {
		t.Errorf("tcp: received %d bytes, want %d intact", len(b), len(want))
	}
	received := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			uc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			n, _, err := uc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n == 1000 && buf[999] == 0x5a {
				received++
			}
		}
	}()
	msg := bytes.Repeat([]byte{0x5a}, 1000)
	for range 100 {
		ud.Write(msg)
		time.Sleep(time.Millisecond)
	}
	<-done
	if received < 95 {
		t.Errorf("udp: %d of 100 datagrams arrived", received)
	}
}

func (r *directRig) stats(t *testing.T, i int) control.EndpointStats {
	t.Helper()
	s, err := r.dp.Stats(context.Background(), r.eps[i])
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// benchTopo is one fresh topology of the direct-mode comparison: a client veth sending to and
// receiving from a guest whose tap a guestemu.Counter reads.
type benchTopo struct {
	host      *topo.NetNS
	tapNS     string // netns of the tap
	tap       string
	clientMAC net.HardwareAddr
	counter   *guestemu.Counter
	tapFd     *os.File
	fds       []*os.File
}

var (
	benchGuestMAC = net.HardwareAddr{0x02, 0xbe, 0, 0, 0, 1}
	benchGuest    = netip.MustParsePrefix("10.204.0.2/24")
	benchClient   = netip.MustParseAddr("10.204.0.100")
)

// newBenchTopo builds the standard CNI path (cni: client veth on a bridge with a pre-learned
// FDB, host veth on the bridge, its peer in a sandbox netns joined to the tap by Kata's
// u32 + mirred) or direct mode (client veth peered with the uplink, tap beside the uplink,
// kata-dp's direct mode with every feature on).
func newBenchTopo(t *testing.T, mode string, reflect bool) *benchTopo {
	t.Helper()
	b := &benchTopo{host: topotest.MustNetNS(t, "kdptd-bh"), tap: "tapbench"}
	b.host.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	mustExec(t, b.host, "ip", "link", "add", "cl", "type", "veth", "peer", "name", "upl")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	switch mode {
	case "cni":
		sb := topotest.MustNetNS(t, "kdptd-bs")
		sb.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
		b.tapNS = sb.Path()
		for _, c := range [][]string{
			{"ip", "link", "add", "br0", "type", "bridge"},
			{"ip", "link", "set", "upl", "master", "br0"},
			{"ip", "link", "add", "hv", "type", "veth", "peer", "name", "eth0", "netns", sb.Name()},
			{"ip", "link", "set", "hv", "master", "br0"},
			{"ip", "link", "set", "br0", "up"},
			{"ip", "link", "set", "hv", "up"},
			{"bridge", "fdb", "replace", benchGuestMAC.String(), "dev", "hv", "master", "static"},
		} {
			mustExec(t, b.host, c...)
		}
		mustExec(t, sb, "ip", "link", "set", "eth0", "up")
		if err := netdev.CreateTap(b.tapNS, b.tap, netdev.TapOptions{VnetHdr: true}); err != nil {
			t.Fatal(err)
		}
		if err := mirred.Join(b.tapNS, "eth0", b.tap); err != nil {
			t.Fatal(err)
		}
	case "direct":
		b.tapNS = b.host.Path()
		if err := netdev.CreateTap(b.tapNS, b.tap, netdev.TapOptions{VnetHdr: true}); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, b.host, "ip", "link", "set", "upl", "up")
	mustExec(t, b.host, "ip", "link", "set", "cl", "up")
	cl, err := netdev.LookupLink(b.host.Path(), "cl")
	if err != nil {
		t.Fatal(err)
	}
	b.clientMAC = cl.MAC
	if mode == "cni" {
		mustExec(t, b.host, "bridge", "fdb", "replace", b.clientMAC.String(), "dev", "upl", "master", "static")
	}
	fds, err := netdev.OpenTap(b.tapNS, b.tap, 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, f := range fds {
			f.Close()
		}
	})
	b.tapFd, b.fds = fds[0], fds
	o := guestemu.CounterOptions{CPUs: []int{1}}
	if reflect {
		o.Reflect, o.GuestMAC, o.GuestIP = true, benchGuestMAC, benchGuest.Addr()
	}
	if b.counter, err = guestemu.NewCounter(fds, o); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.counter.Close() })
	if err := b.counter.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if mode == "direct" {
		root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("kdptd-b%08x", rand.Uint32()))
		t.Cleanup(func() { os.RemoveAll(root) })
		dp, err := dataplane.New(root)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		if err := dp.EnsureSandbox(ctx, "bench", b.tapNS); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.RemoveSandbox(context.Background(), "bench") })
		ep := control.Endpoint{Sandbox: "bench", NetNS: b.tapNS, NIC: "eth0", Tap: b.tap, Uplink: "upl",
			MAC: benchGuestMAC, Addr: benchGuest, Mode: control.ModeDirect, AntiSpoof: true, StrictEgress: true}
		if err := dp.AddEndpoint(ctx, ep); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.DelEndpoint(context.Background(), ep) })
	}
	return b
}

// onCPU runs fn on a locked thread pinned to cpu (in the netns at nsPath when not "") and
// returns the thread's CPU time while fn ran (schedstat: precise, unlike tick accounting).
func onCPU(t *testing.T, nsPath string, cpu int, fn func() error) time.Duration {
	t.Helper()
	type res struct {
		d   time.Duration
		err error
	}
	done := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			done <- res{err: err}
			return
		}
		if nsPath != "" {
			f, err := os.Open(nsPath)
			if err != nil {
				done <- res{err: err}
				return
			}
			err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
			f.Close()
			if err != nil {
				done <- res{err: err}
				return
			}
		}
		path := fmt.Sprintf("/proc/self/task/%d/schedstat", unix.Gettid())
		ns := func() time.Duration {
			b, _ := os.ReadFile(path)
			var v int64
			fmt.Sscan(string(b), &v)
			return time.Duration(v)
		}
		start := ns()
		err := fn()
		done <- res{ns() - start, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.d
}

// h2g sends 64-byte frames for the guest out of the client veth for d (AF_PACKET, sendmmsg,
// qdisc bypassed) and returns frames per second the guest read and the sender's CPU per frame.
func (b *benchTopo) h2g(t *testing.T, d time.Duration) (pps float64, cpu time.Duration) {
	frame := guestemu.UDPFrame(b.clientMAC, benchGuestMAC, netip.AddrPortFrom(benchClient, 4000),
		netip.AddrPortFrom(benchGuest.Addr(), 5000), make([]byte, 64-42))
	before := b.counter.Stats().RxFrames
	var sent uint64
	busy := onCPU(t, b.host.Path(), 0, func() error {
		l, err := netlink.LinkByName("cl")
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 64<<20)
		unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)
		var sa unix.RawSockaddrLinklayer
		sa.Family, sa.Ifindex, sa.Halen = unix.AF_PACKET, int32(l.Attrs().Index), 6
		copy(sa.Addr[:], benchGuestMAC)
		iov := unix.Iovec{Base: &frame[0]}
		iov.SetLen(len(frame))
		msgs := make([]unix.Mmsghdr, 64)
		for i := range msgs {
			msgs[i].Hdr.Name = (*byte)(unsafe.Pointer(&sa))
			msgs[i].Hdr.Namelen = uint32(unsafe.Sizeof(sa))
			msgs[i].Hdr.Iov = &iov
			msgs[i].Hdr.SetIovlen(1)
		}
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			for range 16 {
				n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), 0, 0, 0)
				if errno == 0 {
					sent += uint64(n)
				}
			}
		}
		runtime.KeepAlive(frame)
		runtime.KeepAlive(&sa)
		return nil
	})
	time.Sleep(100 * time.Millisecond)
	got := b.counter.Stats().RxFrames - before
	return float64(got) / d.Seconds(), busy / time.Duration(max(sent, 1))
}

// g2h writes 64-byte frames for the client into the tap for d, as a guest's virtio queue would,
// and returns frames per second the client veth received and the writer's CPU per frame.
func (b *benchTopo) g2h(t *testing.T, d time.Duration) (pps float64, cpu time.Duration) {
	frame := guestemu.UDPFrame(benchGuestMAC, b.clientMAC, netip.AddrPortFrom(benchGuest.Addr(), 5000),
		netip.AddrPortFrom(benchClient, 4000), make([]byte, 64-42))
	buf := append(make([]byte, 12), frame...) // a zero virtio header (TUNSETVNETHDRSZ 12)
	rx := func() uint64 {
		var n uint64
		b.host.Do(func() error {
			l, err := netlink.LinkByName("cl")
			if err == nil {
				n = l.Attrs().Statistics.RxPackets
			}
			return err
		})
		return n
	}
	before := rx()
	var written uint64
	busy := onCPU(t, "", 0, func() error {
		fd := int(b.tapFd.Fd())
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			for range 64 {
				if _, err := unix.Write(fd, buf); err == nil {
					written++
				}
			}
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond)
	return float64(rx()-before) / d.Seconds(), busy / time.Duration(max(written, 1))
}

// rtt (on a topology whose guest reflects, answering ARP and UDP) gives the client veth an
// address and measures n UDP round trips of 64-byte frames from a socket on the client
// side that busy-polls for each reply. It returns the median and the 99th percentile.
func (b *benchTopo) rtt(t *testing.T, n int) (p50, p99 time.Duration) {
	t.Helper()
	mustExec(t, b.host, "ip", "addr", "add", benchClient.String()+"/24", "dev", "cl")
	var lat []time.Duration
	onCPU(t, b.host.Path(), 0, func() error {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: benchClient.AsSlice(), Port: 4000})
		if err != nil {
			return err
		}
		defer c.Close()
		dst := &net.UDPAddr{IP: benchGuest.Addr().AsSlice(), Port: 5000}
		msg, buf := make([]byte, 64-42), make([]byte, 2048)
		// Warm up: ARP, and the first frames through every hop.
		for range 20 {
			c.WriteToUDP(msg, dst)
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			c.ReadFromUDP(buf)
		}
		raw, err := c.SyscallConn()
		if err != nil {
			return err
		}
		for range n {
			start := time.Now()
			if _, err := c.WriteToUDP(msg, dst); err != nil {
				return err
			}
			got := false
			for !got && time.Since(start) < 20*time.Millisecond {
				raw.Read(func(fd uintptr) bool {
					if _, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT); err == nil {
						got = true
					}
					return true
				})
			}
			if got {
				lat = append(lat, time.Since(start))
			}
		}
		return nil
	})
	if len(lat) < n*9/10 {
		// A shared machine can starve the reflector for milliseconds; the report says so.
		t.Logf("only %d of %d round trips answered within 20 ms", len(lat), n)
	}
	if len(lat) == 0 {
		t.Fatal("no round trip answered")
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100]
}

// TestDirectBench compares direct mode with the standard CNI path (bridge + veth pair +
// tcfilter) at 64 bytes, both directions, fresh topologies, interleaved runs. It is a
// measurement, not a check: run it with KDP_BENCH_DIRECT=1 (and -v for the table).
func TestDirectBench(t *testing.T) {
	if os.Getenv("KDP_BENCH_DIRECT") == "" {
		t.Skip("a benchmark: set KDP_BENCH_DIRECT=1")
	}
	topotest.RequireRoot(t, "builds namespaces and loads BPF programs")
	runs, d := 5, 2*time.Second
	type sample struct{ h2gPPS, g2hPPS, h2gCPU, g2hCPU, rtt50, rtt99 []float64 }
	res := map[string]*sample{"cni": {}, "direct": {}}
	for i := range runs {
		for _, mode := range []string{"cni", "direct"} {
			t.Run(fmt.Sprintf("%s-%d", mode, i), func(t *testing.T) {
				b := newBenchTopo(t, mode, false)
				s := res[mode]
				pps, cpu := b.h2g(t, d)
				s.h2gPPS, s.h2gCPU = append(s.h2gPPS, pps), append(s.h2gCPU, float64(cpu.Nanoseconds()))
				pps, cpu = b.g2h(t, d)
				s.g2hPPS, s.g2hCPU = append(s.g2hPPS, pps), append(s.g2hCPU, float64(cpu.Nanoseconds()))
				p50, p99 := newBenchTopo(t, mode, true).rtt(t, 2000)
				s.rtt50, s.rtt99 = append(s.rtt50, float64(p50.Nanoseconds())), append(s.rtt99, float64(p99.Nanoseconds()))
				t.Logf("%s: h2g %.0f pps %.0f ns/frame, g2h %.0f pps %.0f ns/frame", mode,
					s.h2gPPS[len(s.h2gPPS)-1], s.h2gCPU[len(s.h2gCPU)-1], s.g2hPPS[len(s.g2hPPS)-1], s.g2hCPU[len(s.g2hCPU)-1])
			})
		}
	}
	med := func(v []float64) (m, lo, hi float64) {
		if len(v) == 0 {
			return 0, 0, 0
		}
		s := slices.Clone(v)
		slices.Sort(s)
		return s[len(s)/2], s[0], s[len(s)-1]
	}
	row := func(name string, f func(*sample) []float64, unit string) {
		c, cl, ch := med(f(res["cni"]))
		dm, dl, dh := med(f(res["direct"]))
		t.Logf("| %s | %.0f (%.0f-%.0f) | %.0f (%.0f-%.0f) | %.2fx |", name+" "+unit, c, cl, ch, dm, dl, dh, dm/c)
	}
	t.Logf("| 64 B, median (min-max) of %d | cni-tcfilter | direct | direct/cni |", runs)
	t.Logf("|---|---|---|---|")
	row("host->guest", func(s *sample) []float64 { return s.h2gPPS }, "pps")
	row("host->guest sender CPU", func(s *sample) []float64 { return s.h2gCPU }, "ns/frame")
	row("guest->host", func(s *sample) []float64 { return s.g2hPPS }, "pps")
	row("guest->host writer CPU", func(s *sample) []float64 { return s.g2hCPU }, "ns/frame")
	row("UDP round trip p50, busy poll", func(s *sample) []float64 { return s.rtt50 }, "ns")
	row("UDP round trip p99, busy poll", func(s *sample) []float64 { return s.rtt99 }, "ns")
}

// TestDirectController takes a direct-mode sandbox through the control plane and the
// Dataplane's mode dispatch: sandbox add with the uplink, add-iface creating the tap beside the
// uplink and joining it, a guest behind it reaching the client, its counters, del-iface deleting the tap and taking the node programs off
// the uplink, the host's own traffic untouched throughout.
func TestDirectController(t *testing.T) {
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	host, client, guest := topotest.MustNetNS(t, "kdptd-h"), topotest.MustNetNS(t, "kdptd-c"), topotest.MustNetNS(t, "kdptd-g")
	for _, n := range []*topo.NetNS{host, client, guest} {
		n.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	}
	mustExec(t, host, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "cl0", "netns", client.Name())
	mustExec(t, host, "ip", "addr", "add", directHost+"/24", "dev", "up0")
	mustExec(t, host, "ip", "link", "set", "up0", "up")
	mustExec(t, client, "ip", "addr", "add", directClient+"/24", "dev", "cl0")
	mustExec(t, client, "ip", "link", "set", "cl0", "up")

	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("kdptd-%08x", rand.Uint32()))
	t.Cleanup(func() { os.RemoveAll(root) })
	dp, err := dataplane.New(root)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := control.New(ctx, control.Config{Dataplane: dp, Taps: control.NetdevTaps{}, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.AddSandbox(ctx, control.SandboxSpec{ID: "dctl", NetNS: host.Path(), Uplink: "up0", Mode: control.ModeDirect}); err != nil {
		t.Fatal(err)
	}
	defer ctrl.DelSandbox(context.Background(), "dctl")
	req := netspec.AddRequest{Interface: netspec.Interface{
		Device: "tapdctl", Name: "eth0", MTU: 1500, HwAddr: directMACs[0].String(),
		IPAddresses: []*netspec.IPAddress{{Address: directAddrs[0].Addr().String(), Mask: "24"}},
	}}
	added, err := ctrl.AddIface(ctx, "dctl", req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := netdev.LookupLink(host.Path(), "tapdctl"); err != nil {
		t.Fatalf("tap not created beside the uplink: %v", err)
	}
	if in, out := tcxCount(t, host, "up0"); in != 1 || out != 1 {
		t.Fatalf("node programs on up0: ingress %d egress %d", in, out)
	}
	fds, err := netdev.OpenTap(host.Path(), "tapdctl", 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	b, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{MAC: directMACs[0], Addrs: []netip.Prefix{directAddrs[0]}, Offload: true})
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	pingOK(t, guest, directClient)
	pingOK(t, client, directAddrs[0].Addr().String())
	b.Close()
	// Stats dispatches to the direct-mode counters: both directions moved.
	stats, err := dp.Stats(ctx, control.Endpoint{Sandbox: "dctl", NetNS: host.Path(), Slot: 0, NIC: "eth0", Tap: "tapdctl",
		Uplink: "up0", MAC: directMACs[0], Addr: directAddrs[0], Mode: control.ModeDirect})
	if err != nil {
		t.Fatal(err)
	}
	if stats.FromGuest.Packets == 0 || stats.ToGuest.Packets == 0 {
		t.Errorf("counters did not move: %+v", stats)
	}

	if err := ctrl.DelIface(ctx, "dctl", added); err != nil {
		t.Fatal(err)
	}
	if _, err := netdev.LookupLink(host.Path(), "tapdctl"); err == nil {
		t.Error("tap kata-dp created is still there")
	}
	if in, out := tcxCount(t, host, "up0"); in != 0 || out != 0 {
		t.Errorf("node programs left on up0: ingress %d egress %d", in, out)
	}
	if _, err := netdev.LookupLink(host.Path(), "up0"); err != nil {
		t.Errorf("the uplink is gone: %v", err)
	}
	pingOK(t, host, directClient)
}
