package loader_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestLBVIPPrefilter (issue 19): the VIP prefilter (kdp_lb_vips) never hides a service or a
// connection from the load balancer. Every VIP of many random services, both families, is
// balanced (the control plane's bit is the datapath's); a connection keeps its NAT after its
// service is deleted; and a sandbox whose filter was never filled (pinned before it existed:
// valid 0, no bits) balances its services without it, and its first service write fills it
// from the services and connections already there.
func TestLBVIPPrefilter(t *testing.T) {
	needRoot(t)
	for _, hook := range []string{"tc", "xdp"} {
		t.Run(hook, func(t *testing.T) {
			sb := openSandbox(t, testRoot(t), "lbvips"+hook)
			m := sb.Maps()
			v := maps.ForSandbox(m)
			tapProg := loader.ProgTapIn
			redirect := int32(tcxRedirect)
			if hook == "xdp" {
				tapProg, redirect = loader.ProgXDPTap, xdpRedirect
				if err := v.XDP.Set("", 1, 1, maps.XDPPort{MaxLen: 1514}); err != nil {
					t.Fatal(err)
				}
			}
			tap, _ := sb.Program(tapProg)
			if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
				t.Fatal(err)
			}
			if err := v.Endpoints.Put(1, tapEndpoint(0, 42, 0)); err != nil {
				t.Fatal(err)
			}
			be4 := netip.MustParseAddrPort("10.0.0.10:8080")
			be6 := netip.MustParseAddrPort("[fd00::4]:8080")
			v.LB.PutBackend(7, maps.Backend{Addr: be4, Weight: 1})
			v.LB.PutBackend(8, maps.Backend{Addr: be6, Weight: 1})
			// dst runs a UDP frame from the guest to vip and returns where it went.
			dst := func(vip netip.AddrPort, sport uint16) netip.AddrPort {
				t.Helper()
				var f []byte
				src := netip.AddrPortFrom(guestIP, sport)
				if vip.Addr().Is6() {
					f = lbFrame6(unix.IPPROTO_UDP, guestMAC, netip.AddrPortFrom(netip.MustParseAddr("fd00:1::2"), sport), vip, 0, 8)
				} else {
					f = l4Frame(unix.IPPROTO_UDP, guestMAC, src, vip, 0, 8)
				}
				var ret int32
				var out []byte
				if hook == "tc" {
					ret, out = runOut(t, tap, f)
				} else {
					ret, out = runXDP(t, tap, f)
				}
				if ret != redirect {
					t.Fatalf("to %v: verdict %d", vip, ret)
				}
				if vip.Addr().Is6() {
					return lbCheckFrame6(t, out).dst
				}
				return checkFrame(t, out).dst
			}

			// A sandbox from before the filter: services there, the filter empty and off.
			old4 := netip.MustParseAddrPort("10.96.7.7:53")
			if err := v.LB.PutService(0, maps.ServiceSpec{VIP: old4, Proto: unix.IPPROTO_UDP, ID: 1, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
				t.Fatal(err)
			}
			if got := dst(old4, 1000); got != be4 { // a connection, then its service goes
				t.Fatalf("to %v: %v, want %v", old4, got, be4)
			}
			if err := v.LB.DeleteService(0, old4, unix.IPPROTO_UDP); err != nil {
				t.Fatal(err)
			}
			if err := m.LBVIPs.Update(uint32(0), loader.DatapathLbVipset{}, ebpf.UpdateAny); err != nil {
				t.Fatal(err)
			}
			kept4 := netip.MustParseAddrPort("10.96.8.8:53")
			if err := v.LB.PutServices(0, []maps.ServiceSpec{{VIP: kept4, Proto: unix.IPPROTO_UDP, ID: 2, Sched: maps.SchedRR, Slots: []uint32{7}}}); err != nil {
				t.Fatal(err)
			}
			if err := m.LBVIPs.Update(uint32(0), loader.DatapathLbVipset{}, ebpf.UpdateAny); err != nil {
				t.Fatal(err)
			}
			if got := dst(kept4, 1001); got != be4 {
				t.Errorf("unfilled filter: to %v: %v, want %v", kept4, got, be4)
			}
			// Many random services, both families: the first write fills the filter
			// from what is there, then every VIP is balanced with it on.
			var vips []netip.AddrPort
			for i := range 300 {
				var a netip.Addr
				if i%2 == 0 {
					a = netip.AddrFrom4([4]byte{10, byte(97 + rand.IntN(10)), byte(rand.IntN(256)), byte(rand.IntN(256))})
				} else {
					var b [16]byte
					b[0], b[1] = 0x20, 0x01
					for j := 2; j < 16; j++ {
						b[j] = byte(rand.IntN(256))
					}
					a = netip.AddrFrom16(b)
				}
				vip := netip.AddrPortFrom(a, uint16(1+rand.IntN(65535)))
				slot := uint32(7)
				if a.Is6() {
					slot = 8
				}
				if err := v.LB.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_UDP, ID: uint32(10 + i), Sched: maps.SchedRR, Slots: []uint32{slot}}); err != nil {
					t.Fatal(err)
				}
				vips = append(vips, vip)
			}
			var set loader.DatapathLbVipset
			if err := m.LBVIPs.Lookup(uint32(0), &set); err != nil || set.Valid != maps.PrefilterVersion {
				t.Fatalf("filter valid %d (%v), want on after a write", set.Valid, err)
			}
			for i, vip := range vips {
				want := be4
				if vip.Addr().Is6() {
					want = be6
				}
				if got := dst(vip, uint16(2000+i)); got != want {
					t.Errorf("to %v: %v, want %v (%s)", vip, got, want, fmt.Sprint(i))
				}
			}
			if got := dst(kept4, 1001); got != be4 {
				t.Errorf("service from before the filter: to %v: %v, want %v", kept4, got, be4)
			}
			if got := dst(old4, 1000); got != be4 {
				t.Errorf("connection of a deleted service from before the filter: to %v: %v, want %v", old4, got, be4)
			}
			// Not a service: untouched.
			other := netip.MustParseAddrPort("172.16.0.1:53")
			if got := dst(other, 3000); got != other {
				t.Errorf("to %v (no service): went to %v", other, got)
			}
		})
	}
}

// TestLBRealServerPrefilter (issue 19): the prefilter's real-server bits never hide a reply
// from the load balancer. Replies from each of many random real servers, both families, are
// reverse-NATed to their VIP (the control plane's bits are the datapath's); in a sandbox whose
// filter an older hash filled, replies are NATed without it, and the first real server
// written refills it from the real servers and connections already there; a
// frame from an address that is no real server passes untouched.
func TestLBRealServerPrefilter(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "lbrsf")
	m := sb.Maps()
	v := maps.ForSandbox(m)
	tapIn, _ := sb.Program(loader.ProgTapIn)
	upIn, _ := sb.Program(loader.ProgUplinkIn)
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	guest6 := netip.MustParseAddr("fd00:1::2")
	frame := func(src net.HardwareAddr, s, d netip.AddrPort) []byte {
		if s.Addr().Is6() {
			return lbFrame6(unix.IPPROTO_UDP, src, s, d, 0, 8)
		}
		return l4Frame(unix.IPPROTO_UDP, src, s, d, 0, 8)
	}
	check := func(out []byte, v6 bool) tuple {
		if v6 {
			return lbCheckFrame6(t, out)
		}
		return checkFrame(t, out)
	}
	// conn opens a connection from the guest to vip (it must reach rs) and returns the
	// guest's side.
	conn := func(vip, rs netip.AddrPort, sport uint16) netip.AddrPort {
		t.Helper()
		c := netip.AddrPortFrom(guestIP, sport)
		if vip.Addr().Is6() {
			c = netip.AddrPortFrom(guest6, sport)
		}
		v.Endpoints.Put(1, tapEndpoint(0, 42, 0))
		ret, out := runOut(t, tapIn, frame(guestMAC, c, vip))
		if ret != tcxRedirect {
			t.Fatalf("to %v: verdict %d", vip, ret)
		}
		if got := check(out, vip.Addr().Is6()).dst; got != rs {
			t.Fatalf("to %v: went to %v, want %v", vip, got, rs)
		}
		return c
	}
	// reply sends a frame from rs to the guest's c and returns its source as the guest sees it.
	reply := func(rs, c netip.AddrPort) netip.AddrPort {
		t.Helper()
		v.Endpoints.Put(1, maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink})
		ret, out := runOut(t, upIn, frame(otherMAC, rs, c))
		if ret != tcxRedirect {
			t.Fatalf("from %v: verdict %d", rs, ret)
		}
		return check(out, rs.Addr().Is6()).src
	}
	type svc struct{ vip, rs, c netip.AddrPort }
	var svcs []svc
	add := func(i int) {
		t.Helper()
		var rs, vip netip.Addr
		if i%2 == 0 {
			rs = netip.AddrFrom4([4]byte{10, byte(rand.IntN(256)), byte(rand.IntN(256)), byte(rand.IntN(256))})
			vip = netip.AddrFrom4([4]byte{172, 20, byte(i >> 8), byte(i)})
		} else {
			var b [16]byte
			b[0], b[1] = 0xfd, 0x0a
			for j := 2; j < 16; j++ {
				b[j] = byte(rand.IntN(256))
			}
			rs = netip.AddrFrom16(b)
			vip = netip.AddrFrom16([16]byte{0xfd, 0x0b, 14: byte(i >> 8), 15: byte(i)})
		}
		s := svc{vip: netip.AddrPortFrom(vip, 53), rs: netip.AddrPortFrom(rs, 5353)}
		id := uint32(100 + i)
		if err := v.LB.PutBackend(id, maps.Backend{Addr: s.rs, Weight: 1}); err != nil {
			t.Fatal(err)
		}
		if err := v.LB.PutService(0, maps.ServiceSpec{VIP: s.vip, Proto: unix.IPPROTO_UDP, ID: id, Sched: maps.SchedRR, Slots: []uint32{id}}); err != nil {
			t.Fatal(err)
		}
		s.c = conn(s.vip, s.rs, uint16(10000+i))
		svcs = append(svcs, s)
	}
	for i := range 4 {
		add(i)
	}
	// A sandbox whose filter an older hash filled (version 1): connections there, none of their
	// bits set the way this version sets them. The datapath must not use it.
	if err := m.LBVIPs.Update(uint32(0), loader.DatapathLbVipset{Valid: 1}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		if got := reply(s.rs, s.c); got != s.vip {
			t.Errorf("unfilled filter: reply from %v: source %v, want %v", s.rs, got, s.vip)
		}
	}
	for i := 4; i < 300; i++ { // the first of these fills the filter
		add(i)
	}
	var set loader.DatapathLbVipset
	if err := m.LBVIPs.Lookup(uint32(0), &set); err != nil || set.Valid != maps.PrefilterVersion {
		t.Fatalf("filter valid %d (%v), want on after a write", set.Valid, err)
	}
	for _, s := range svcs {
		if got := reply(s.rs, s.c); got != s.vip {
			t.Errorf("reply from %v: source %v, want %v", s.rs, got, s.vip)
		}
	}
	other := netip.MustParseAddrPort("192.0.2.9:5353")
	if got := reply(other, svcs[0].c); got != other {
		t.Errorf("from %v (no real server): source became %v", other, got)
	}
}
