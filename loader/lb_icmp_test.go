package loader_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// icmp4Err builds Ethernet + IPv4 + an ICMP error (type, code, 4 bytes of zeros or the MTU)
// quoting the IP packet quote, every checksum computed from scratch.
func icmp4Err(src net.HardwareAddr, s, d netip.Addr, typ, code uint8, quote []byte) []byte {
	ip := make([]byte, 20+8+len(quote))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
	ip[8] = 64
	ip[9] = unix.IPPROTO_ICMP
	sa, da := s.As4(), d.As4()
	copy(ip[12:], sa[:])
	copy(ip[16:], da[:])
	binary.BigEndian.PutUint16(ip[10:], ipChecksum(ip[:20]))
	icmp := ip[20:]
	icmp[0], icmp[1] = typ, code
	if typ == 3 && code == 4 {
		binary.BigEndian.PutUint16(icmp[6:], 1400) // next-hop MTU
	}
	copy(icmp[8:], quote)
	binary.BigEndian.PutUint16(icmp[2:], ^fold(csumAdd(0, icmp)))
	return append(ethHdr(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, unix.ETH_P_IP), ip...)
}

// icmp6Err builds Ethernet + IPv6 + an ICMPv6 error quoting the IPv6 packet quote, with the
// ICMPv6 checksum (pseudo header included) computed from scratch.
func icmp6Err(src net.HardwareAddr, s, d netip.Addr, typ, code uint8, quote []byte) []byte {
	msg := make([]byte, 8, 8+len(quote))
	msg[0], msg[1] = typ, code
	if typ == 2 {
		binary.BigEndian.PutUint32(msg[4:], 1280) // MTU
	}
	return ip6Frame(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, s, d, nil, unix.IPPROTO_ICMPV6, append(msg, quote...))
}

// quote4 is the IP packet of an IPv4 TCP/UDP frame as an error quotes it: whole, or cut to n
// bytes.
func quote(frame []byte, n int) []byte {
	q := frame[14:]
	if n > 0 && n < len(q) {
		q = q[:n]
	}
	return append([]byte(nil), q...)
}

type icmpRig struct {
	v                          maps.Sandbox
	tapIn, upIn, xdpTap, xdpUp *ebpf.Program
}

func newICMPRig(t *testing.T) *icmpRig {
	sb := openSandbox(t, testRoot(t), "lbicmp")
	m := sb.Maps()
	r := &icmpRig{v: maps.ForSandbox(m)}
	r.tapIn, _ = sb.Program(loader.ProgTapIn)
	r.upIn, _ = sb.Program(loader.ProgUplinkIn)
	r.xdpTap, _ = sb.Program(loader.ProgXDPTap)
	r.xdpUp, _ = sb.Program(loader.ProgXDPUplink)
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	if err := r.v.XDP.Set("", 1, 1, maps.XDPPort{MaxLen: 1514}); err != nil {
		t.Fatal(err)
	}
	return r
}

// run sends frame through the hook's program for the direction and returns the verdict
// translated to tc's (redirect, drop), the frame as it left, and the direction's counters.
func (r *icmpRig) run(t *testing.T, hook string, toGuest bool, ep maps.Endpoint, frame []byte) (int32, []byte, maps.Stats) {
	t.Helper()
	dir := maps.FromGuest
	prog := map[string]*ebpf.Program{"tc": r.tapIn, "xdp": r.xdpTap}[hook]
	if toGuest {
		dir = maps.ToGuest
		prog = map[string]*ebpf.Program{"tc": r.upIn, "xdp": r.xdpUp}[hook]
	}
	if err := r.v.Endpoints.Put(1, ep); err != nil {
		t.Fatal(err)
	}
	r.v.Stats.Reset(ep.Slot)
	var ret int32
	var out []byte
	if hook == "tc" {
		ret, out = runOut(t, prog, append([]byte(nil), frame...))
	} else {
		ret, out = runXDP(t, prog, append([]byte(nil), frame...))
		ret = map[int32]int32{xdpRedirect: tcxRedirect, xdpDrop: tcxDrop}[ret]
	}
	st, err := r.v.Stats.Read(ep.Slot, dir)
	if err != nil {
		t.Fatal(err)
	}
	return ret, out, st
}

// TestLBICMPErrors (issues 12, 19): ICMP and ICMPv6 errors about load-balanced connections are
// translated both ways in the tc and XDP programs, as IPVS does: an error toward the guest
// quoting guest -> real server quotes guest -> VIP afterwards (and comes from the VIP when the
// real server sent it), one from the guest quoting VIP -> guest quotes real server -> guest
// and goes to the real server. Each expected frame is built from scratch with the checksums
// computed in Go (outer IPv4 header, ICMP/ICMPv6 with its pseudo header, the quoted IPv4
// header and the quoted TCP/UDP checksum), so equal bytes mean every checksum is right.
// Errors about no connection, and other ICMP, pass unchanged; a cut quote is malformed.
func TestLBICMPErrors(t *testing.T) {
	needRoot(t)
	r := newICMPRig(t)
	guestEP := tapEndpoint(0, 42, maps.FlagAntiSpoof)
	guestEP6 := tapEndpoint(0, 42, 0) // the NIC has no IPv6 address: the IPv6 checks are guard_test's
	uplinkEP := maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink}

	vip6 := netip.MustParseAddrPort("[2001:db8::10]:80")
	be6 := netip.MustParseAddrPort("[fd00::4]:8080")
	client6 := netip.MustParseAddrPort("[fd00:1::2]:40000")
	router4 := netip.MustParseAddr("10.0.0.1")
	router6 := netip.MustParseAddr("fd00::1")
	if err := r.v.LB.PutBackend(7, maps.Backend{Addr: backend, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.v.LB.PutBackend(8, maps.Backend{Addr: be6, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	for i, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		if err := r.v.LB.PutService(0, maps.ServiceSpec{VIP: vip, Proto: proto, ID: 3 + uint32(i), Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
			t.Fatal(err)
		}
		if err := r.v.LB.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: proto, ID: 5 + uint32(i), Sched: maps.SchedRR, Slots: []uint32{8}}); err != nil {
			t.Fatal(err)
		}
		// The connections the errors are about.
		if ret, _, _ := r.run(t, "tc", false, guestEP, l4Frame(proto, guestMAC, client, vip, 0x02, 0)); ret != tcxRedirect {
			t.Fatalf("connection %d: verdict %d", proto, ret)
		}
		if ret, _, _ := r.run(t, "tc", false, guestEP6, lbFrame6(proto, guestMAC, client6, vip6, 0x02, 0)); ret != tcxRedirect {
			t.Fatalf("IPv6 connection %d: verdict %d", proto, ret)
		}
	}
	tcp, udp := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_UDP)
	// What the real server's side saw of the guest's packets, and what the guest saw of the
	// real server's.
	q4 := func(proto uint8, s, d netip.AddrPort, n int) []byte {
		return quote(l4Frame(proto, guestMAC, s, d, 0x18, 24), n)
	}
	q6 := func(proto uint8, s, d netip.AddrPort, n int) []byte {
		return quote(lbFrame6(proto, guestMAC, s, d, 0x18, 24), n)
	}
	cut := netip.MustParseAddrPort("10.0.0.99:9")
	cut6 := netip.MustParseAddrPort("[fd00::99]:9")
	type tcase struct {
		name    string
		toGuest bool
		ep      maps.Endpoint
		in      []byte
		want    []byte // nil: unchanged
		reason  maps.DropReason
	}
	cases := []tcase{
		{"port unreachable from the real server (UDP)", true, uplinkEP,
			icmp4Err(otherMAC, backend.Addr(), client.Addr(), 3, 3, q4(udp, client, backend, 0)),
			icmp4Err(otherMAC, vip.Addr(), client.Addr(), 3, 3, q4(udp, client, vip, 0)), -1},
		{"fragmentation needed from a router (TCP)", true, uplinkEP,
			icmp4Err(otherMAC, router4, client.Addr(), 3, 4, q4(tcp, client, backend, 0)),
			icmp4Err(otherMAC, router4, client.Addr(), 3, 4, q4(tcp, client, vip, 0)), -1},
		{"time exceeded quoting 8 bytes of TCP", true, uplinkEP,
			icmp4Err(otherMAC, router4, client.Addr(), 11, 0, q4(tcp, client, backend, 28)),
			icmp4Err(otherMAC, router4, client.Addr(), 11, 0, q4(tcp, client, vip, 28)), -1},
		{"parameter problem from the real server quoting 20 bytes of UDP", true, uplinkEP,
			icmp4Err(otherMAC, backend.Addr(), client.Addr(), 12, 0, q4(udp, client, backend, 40)),
			icmp4Err(otherMAC, vip.Addr(), client.Addr(), 12, 0, q4(udp, client, vip, 40)), -1},
		{"port unreachable from the guest about a reply (UDP)", false, guestEP,
			icmp4Err(guestMAC, client.Addr(), vip.Addr(), 3, 3, q4(udp, vip, client, 0)),
			icmp4Err(guestMAC, client.Addr(), backend.Addr(), 3, 3, q4(udp, backend, client, 0)), -1},
		{"host unreachable from the guest about a reply (TCP)", false, guestEP,
			icmp4Err(guestMAC, client.Addr(), vip.Addr(), 3, 1, q4(tcp, vip, client, 0)),
			icmp4Err(guestMAC, client.Addr(), backend.Addr(), 3, 1, q4(tcp, backend, client, 0)), -1},
		{"about no connection: unchanged", true, uplinkEP,
			icmp4Err(otherMAC, cut.Addr(), client.Addr(), 3, 3, q4(udp, client, cut, 0)), nil, -1},
		{"from the guest about no connection: unchanged", false, guestEP,
			icmp4Err(guestMAC, client.Addr(), cut.Addr(), 3, 3, q4(udp, cut, client, 0)), nil, -1},
		{"echo reply: unchanged", true, uplinkEP,
			icmp4Err(otherMAC, backend.Addr(), client.Addr(), 0, 0, q4(udp, client, backend, 0)), nil, -1},
		{"quote cut inside the IP header: malformed", true, uplinkEP,
			icmp4Err(otherMAC, backend.Addr(), client.Addr(), 3, 3, q4(udp, client, backend, 12)), nil, maps.DropMalformed},
		{"quote cut inside the ports: malformed", true, uplinkEP,
			icmp4Err(otherMAC, backend.Addr(), client.Addr(), 3, 3, q4(udp, client, backend, 24)), nil, maps.DropMalformed},

		{"IPv6 port unreachable from the real server (UDP)", true, uplinkEP,
			icmp6Err(otherMAC, be6.Addr(), client6.Addr(), 1, 4, q6(udp, client6, be6, 0)),
			icmp6Err(otherMAC, vip6.Addr(), client6.Addr(), 1, 4, q6(udp, client6, vip6, 0)), -1},
		{"IPv6 packet too big from a router (TCP)", true, uplinkEP,
			icmp6Err(otherMAC, router6, client6.Addr(), 2, 0, q6(tcp, client6, be6, 0)),
			icmp6Err(otherMAC, router6, client6.Addr(), 2, 0, q6(tcp, client6, vip6, 0)), -1},
		{"IPv6 time exceeded quoting 8 bytes of TCP", true, uplinkEP,
			icmp6Err(otherMAC, router6, client6.Addr(), 3, 0, q6(tcp, client6, be6, 48)),
			icmp6Err(otherMAC, router6, client6.Addr(), 3, 0, q6(tcp, client6, vip6, 48)), -1},
		{"IPv6 port unreachable from the guest about a reply (UDP)", false, guestEP6,
			icmp6Err(guestMAC, client6.Addr(), vip6.Addr(), 1, 4, q6(udp, vip6, client6, 0)),
			icmp6Err(guestMAC, client6.Addr(), be6.Addr(), 1, 4, q6(udp, be6, client6, 0)), -1},
		{"IPv6 parameter problem from the guest about a reply (TCP)", false, guestEP6,
			icmp6Err(guestMAC, client6.Addr(), vip6.Addr(), 4, 0, q6(tcp, vip6, client6, 0)),
			icmp6Err(guestMAC, client6.Addr(), be6.Addr(), 4, 0, q6(tcp, be6, client6, 0)), -1},
		{"IPv6 about no connection: unchanged", true, uplinkEP,
			icmp6Err(otherMAC, cut6.Addr(), client6.Addr(), 1, 4, q6(udp, client6, cut6, 0)), nil, -1},
		{"IPv6 echo reply: unchanged", true, uplinkEP,
			icmp6Err(otherMAC, be6.Addr(), client6.Addr(), 129, 0, q6(udp, client6, be6, 0)), nil, -1},
		{"IPv6 quote cut inside the IPv6 header: malformed", true, uplinkEP,
			icmp6Err(otherMAC, be6.Addr(), client6.Addr(), 1, 4, q6(udp, client6, be6, 30)), nil, maps.DropMalformed},
		{"IPv6 quote cut inside the ports: malformed", false, guestEP6,
			icmp6Err(guestMAC, client6.Addr(), vip6.Addr(), 1, 4, q6(udp, vip6, client6, 44)), nil, maps.DropMalformed},
	}
	for _, c := range cases {
		for _, hook := range []string{"tc", "xdp"} {
			t.Run(hook+"/"+c.name, func(t *testing.T) {
				ret, out, st := r.run(t, hook, c.toGuest, c.ep, c.in)
				if c.reason >= 0 {
					if ret != tcxDrop || st.Drops[c.reason] != 1 || st.TotalDrops() != 1 {
						t.Errorf("verdict %d, counters %s; want a drop counted as %s", ret, st, c.reason)
					}
					return
				}
				if ret != tcxRedirect || st.Packets != 1 || st.TotalDrops() != 0 {
					t.Fatalf("verdict %d, counters %s; want forwarded", ret, st)
				}
				want := c.want
				if want == nil {
					want = c.in
				}
				if !bytes.Equal(out, want) {
					t.Errorf("frame\n got %x\nwant %x", out, want)
				}
			})
		}
	}
}
