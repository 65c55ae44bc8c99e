package dataplane_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

var (
	host6  = netip.MustParsePrefix("fd00:199::1/64")
	guest6 = netip.MustParsePrefix("fd00:199::2/64")
)

// newRig6 is newModeRig with IPv6 on: the host and the guest have IPv6 addresses on one
// prefix, the endpoint has the guest's, and nothing in the namespaces has IPv6 turned off.
func newRig6(t *testing.T, id string, o rigOpts) *modeRig {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	r := &modeRig{root: topotest.BPFFS(t, "kdpt6")}
	r.sb = topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdpt6-", IPv6: true})
	r.guest = topotest.MustNetNS(t, "kdpt6-g")
	if err := r.sb.Host.AddAddr(r.sb.HostVeth.Name, host6.String()); err != nil {
		t.Fatal(err)
	}
	if o.peerGRO {
		if err := netdev.SetGRO(r.sb.Host.Path(), r.sb.HostVeth.Name, true); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r.ctx = ctx
	var err error
	if r.dp, err = dataplane.NewWithOptions(r.root, loader.Options{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.Close() })
	if err := r.dp.EnsureSandbox(ctx, id, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	r.ep = control.Endpoint{
		Sandbox: id, NetNS: r.sb.NS.Path(), Slot: 0, NIC: "eth0", Tap: r.sb.Tap.Name, Uplink: r.sb.Veth.Name,
		MAC: r.sb.GuestMAC, Addr: r.sb.GuestAddr, Addr6: guest6, MTU: 1500, Mode: o.mode, AntiSpoof: true, StrictEgress: true,
	}
	if err := r.dp.AddEndpoint(ctx, r.ep); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.dp.DelEndpoint(context.Background(), r.ep)
		r.dp.RemoveSandbox(context.Background(), id)
	})
	var fds []*os.File
	if mv, ok := r.dp.Macvtap(r.ep); ok {
		fds, err = mv.Open(1, true)
	} else {
		fds, err = netdev.OpenTap(r.sb.NS.Path(), r.sb.Tap.Name, 1, true, true)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	b, err := guestemu.NewBridge(fds, r.guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: r.sb.GuestMAC, Addrs: []netip.Prefix{r.sb.GuestAddr, guest6}, Offload: o.offload,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.bridge = b
	t.Cleanup(func() { b.Close() })
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return r
}

// rawSock is an AF_PACKET socket on dev in netns n, receiving every protocol.
type rawSock struct {
	fd, ifindex int
}

func openRaw(t *testing.T, n *topo.NetNS, dev string) *rawSock {
	t.Helper()
	s := &rawSock{}
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		s.ifindex = l.Attrs().Index
		if s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL))); err != nil {
			return err
		}
		return unix.Bind(s.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: s.ifindex})
	})
	if err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(300 * time.Millisecond))
	unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

func (s *rawSock) send(t *testing.T, frame []byte) {
	t.Helper()
	if err := unix.Sendto(s.fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: s.ifindex, Halen: 6, Addr: [8]byte(append(append([]byte{}, frame[:6]...), 0, 0))}); err != nil {
		t.Fatal(err)
	}
}

// got reports whether a frame holding marker arrives within 2 s (generous: a loaded machine).
func (s *rawSock) got(marker []byte) bool {
	buf := make([]byte, 4096)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			return false
		}
		if bytes.Contains(buf[:n], marker) {
			return true
		}
	}
	return false
}

// eui64 is the link-local address a guest with mac forms.
func eui64(mac net.HardwareAddr) netip.Addr { return maps.LinkLocalOf([6]byte(mac)) }

// icmp6Raw is Ethernet + IPv6 + an ICMPv6 message of type typ carrying marker (checksum left
// zero: it never reaches a stack that would check it).
func icmp6Raw(dst, src net.HardwareAddr, sip, dip netip.Addr, typ uint8, marker []byte) []byte {
	body := append([]byte{typ, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, marker...)
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(body)))
	ip[6], ip[7] = unix.IPPROTO_ICMPV6, 255
	s, d := sip.As16(), dip.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	f := append(append(append([]byte{}, dst...), src...), 0x86, 0xdd)
	return append(append(f, ip...), body...)
}

// TestIPv6 runs IPv6 through real devices in tc, xdp and macvtap-bpf mode: ping and TCP both ways, and a
// spoofed source, a router advertisement and a VLAN-tagged frame from the guest never reach the
// host, with the counters saying why.
func TestIPv6(t *testing.T) {
	for _, c := range []struct {
		name string
		o    rigOpts
	}{
		{"tc", rigOpts{mode: control.ModeTC, offload: true}},
		{"xdp", rigOpts{mode: control.ModeXDP, offload: true, peerGRO: true}},
		{"macvtap-bpf", rigOpts{mode: control.ModeMacvtapBPF, offload: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newRig6(t, "v6-"+c.name, c.o)
			host, guest := r.sb.Host, r.guest
			hostIP, guestIP := host6.Addr().String(), guest6.Addr().String()
			if tx, rx := pingAll(t, host, "-6", "-c", "5", "-i", "0.05", "-W", "2", guestIP); rx != tx {
				t.Fatalf("host->guest ping6: %d/%d", rx, tx)
			}
			if tx, rx := pingAll(t, guest, "-6", "-c", "5", "-i", "0.05", "-W", "2", hostIP); rx != tx {
				t.Fatalf("guest->host ping6: %d/%d", rx, tx)
			}
			if err := topo.TCPTransfer(host, guest, "["+guestIP+"]:5201", 1<<20, 20*time.Second); err != nil {
				t.Fatalf("tcp host->guest: %v", err)
			}
			if err := topo.TCPTransfer(guest, host, "["+hostIP+"]:5202", 1<<20, 20*time.Second); err != nil {
				t.Fatalf("tcp guest->host: %v", err)
			}

			before, err := r.dp.Stats(r.ctx, r.ep)
			if err != nil {
				t.Fatal(err)
			}
			hs := openRaw(t, host, r.sb.HostVeth.Name)
			gs := openRaw(t, guest, "eth0")
			gmac := r.sb.GuestMAC
			hmac := func() net.HardwareAddr {
				var m net.HardwareAddr
				host.Do(func() error {
					l, err := netlink.LinkByName(r.sb.HostVeth.Name)
					if err == nil {
						m = l.Attrs().HardwareAddr
					}
					return err
				})
				return m
			}()
			allNodes := net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
			// Positive control: an echo request from the guest's link-local reaches the host.
			ok := []byte("kdp-v6-ok")
			gs.send(t, icmp6Raw(allNodes, gmac, eui64(gmac), netip.MustParseAddr("ff02::1"), 128, ok))
			if !hs.got(ok) {
				t.Fatal("an honest frame from the guest did not reach the host: the probe is blind")
			}
			spoof := []byte("kdp-v6-spoof")
			gs.send(t, icmp6Raw(hmac, gmac, netip.MustParseAddr("fd00:199::99"), host6.Addr(), 128, spoof))
			ra := []byte("kdp-v6-ra")
			gs.send(t, icmp6Raw(allNodes, gmac, eui64(gmac), netip.MustParseAddr("ff02::1"), 134, ra))
			vlan := []byte("kdp-v6-vlan")
			tagged := icmp6Raw(allNodes, gmac, eui64(gmac), netip.MustParseAddr("ff02::1"), 128, vlan)
			tagged = append(append(append([]byte{}, tagged[:12]...), 0x81, 0x00, 0x00, 0x05), tagged[12:]...)
			gs.send(t, tagged)
			for _, m := range [][]byte{spoof, ra, vlan} {
				if hs.got(m) {
					t.Errorf("frame %q from the guest reached the host", m)
				}
			}
			after, err := r.dp.Stats(r.ctx, r.ep)
			if err != nil {
				t.Fatal(err)
			}
			for _, reason := range []string{"spoof_ip6", "ra", "vlan"} {
				if d := after.FromGuest.Drops[reason] - before.FromGuest.Drops[reason]; d < 1 {
					t.Errorf("%s drops +%d, want at least 1 (%v)", reason, d, after.FromGuest.Drops)
				}
			}
		})
	}
}
