package loader_test

import (
	"fmt"
	"math/rand/v2"
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
			if err := v.LB.PutServices(0, []maps.ServiceSpec{{VIP: kept4, Proto: unix.IPPROTO_UDP, ID: 2, Sched: maps.SchedRR, Slots: []uint32{7}}}, false); err != nil {
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
			if err := m.LBVIPs.Lookup(uint32(0), &set); err != nil || set.Valid != 1 {
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
