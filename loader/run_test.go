package loader_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and pins them in bpffs")
	}
}

// testRoot is a throwaway pin root for one test, removed with everything under it.
func testRoot(t testing.TB) string {
	t.Helper()
	return topotest.BPFFS(t, "kdpt-loader")
}

func openSandbox(t testing.TB, root, id string) *loader.Sandbox {
	t.Helper()
	sb, err := loader.Open(root, id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sb.Close()
		if err := loader.Remove(root, id); err != nil {
			t.Error(err)
		}
	})
	return sb
}

// skbCtx is the head of struct __sk_buff, as BPF_PROG_TEST_RUN accepts it: only ifindex is
// set, so the program sees the frame as arriving on that device.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority uint32
	IngressIfindex, Ifindex                                                               uint32
}

const (
	tcxNext     = -1 // TCX_NEXT / TC_ACT_UNSPEC
	tcxDrop     = 2  // TCX_DROP / TC_ACT_SHOT
	tcxRedirect = 7  // TCX_REDIRECT / TC_ACT_REDIRECT
)

func run(t *testing.T, prog *ebpf.Program, ifindex uint32, frame []byte) int32 {
	t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, Context: skbCtx{Ifindex: ifindex}})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return int32(ret)
}

var (
	guestMAC = net.HardwareAddr{0x02, 0x42, 0x20, 0x6f, 0xa3, 0x69}
	otherMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	guestIP  = netip.MustParseAddr("172.16.0.3")
	guestLL  = netip.MustParseAddr("fe80::42:20ff:fe6f:a369") // EUI-64 of guestMAC
	peerLL   = netip.MustParseAddr("fe80::1")
)

func ethHdr(dst, src net.HardwareAddr, proto uint16) []byte {
	b := make([]byte, 14)
	copy(b, dst)
	copy(b[6:], src)
	binary.BigEndian.PutUint16(b[12:], proto)
	return b
}

// udpFrame builds Ethernet + IPv4 + UDP with a valid IP header checksum.
func udpFrame(src net.HardwareAddr, sip, dip netip.Addr, payload int) []byte {
	ip := make([]byte, 20+8+payload)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
	ip[8] = 64
	ip[9] = unix.IPPROTO_UDP
	s, d := sip.As4(), dip.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], ipChecksum(ip[:20]))
	binary.BigEndian.PutUint16(ip[20:], 40000)
	binary.BigEndian.PutUint16(ip[22:], 5000)
	binary.BigEndian.PutUint16(ip[24:], uint16(8+payload))
	return append(ethHdr(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, unix.ETH_P_IP), ip...)
}

func arpFrame(src, sha net.HardwareAddr, spa, tpa netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:], 1)
	binary.BigEndian.PutUint16(b[2:], unix.ETH_P_IP)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], 1)
	copy(b[8:], sha)
	s, d := spa.As4(), tpa.As4()
	copy(b[14:], s[:])
	copy(b[24:], d[:])
	return append(ethHdr(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, src, unix.ETH_P_ARP), b...)
}

func ipChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

func tapEndpoint(slot, peer uint32, flags maps.Flags) maps.Endpoint {
	e := maps.Endpoint{PeerIfindex: peer, Slot: slot, Role: maps.RoleTap, Flags: flags}
	e.SetMAC(guestMAC)
	e.Addr = netip.PrefixFrom(guestIP, 16)
	return e
}

// TestVerdicts runs both programs on crafted frames and checks every verdict and the counter
// it moves. The frames "arrive" on the loopback device (ifindex 1), whose endpoint entry the
// test rewrites per case; nothing is transmitted.
func TestVerdicts(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "verdicts")
	m := sb.Maps()
	eps := maps.ForSandbox(m).Endpoints
	stats := maps.ForSandbox(m).Stats
	routes := maps.ForSandbox(m).Routes
	tapIn, _ := sb.Program(loader.ProgTapIn)
	uplinkIn, _ := sb.Program(loader.ProgUplinkIn)
	const lo, peer, slot = 1, 42, 3
	all := maps.FlagAntiSpoof | maps.FlagStrictEgress

	if err := routes.Replace([]maps.Route{{Slot: slot, Dest: netip.MustParsePrefix("10.8.0.0/16")}}); err != nil {
		t.Fatal(err)
	}
	good := udpFrame(guestMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32)

	cases := []struct {
		name   string
		prog   *ebpf.Program
		ep     *maps.Endpoint
		frame  []byte
		want   int32
		dir    maps.Direction
		reason maps.DropReason // -1: forwarded
	}{
		{"not ours: no endpoint", tapIn, nil, good, tcxNext, 0, -2},
		{"not ours: wrong role", uplinkIn, ptr(tapEndpoint(slot, peer, all)), good, tcxNext, 0, -2},
		{"from guest redirected", tapIn, ptr(tapEndpoint(slot, peer, all)), good, tcxRedirect, maps.FromGuest, -1},
		{"from guest not joined goes on", tapIn, ptr(tapEndpoint(slot, 0, all)), good, tcxNext, maps.FromGuest, -1},
		{"to guest redirected", uplinkIn, ptr(maps.Endpoint{PeerIfindex: peer, Slot: slot, Role: maps.RoleUplink}), good, tcxRedirect, maps.ToGuest, -1},
		{"spoofed source MAC", tapIn, ptr(tapEndpoint(slot, peer, all)), udpFrame(otherMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32), tcxDrop, maps.FromGuest, maps.DropSpoofMAC},
		{"spoofed source IP", tapIn, ptr(tapEndpoint(slot, peer, all)), udpFrame(guestMAC, netip.MustParseAddr("172.16.0.99"), netip.MustParseAddr("172.16.0.1"), 32), tcxDrop, maps.FromGuest, maps.DropSpoofIP},
		{"spoofed ARP sender MAC", tapIn, ptr(tapEndpoint(slot, peer, all)), arpFrame(guestMAC, otherMAC, guestIP, netip.MustParseAddr("172.16.0.1")), tcxDrop, maps.FromGuest, maps.DropSpoofARP},
		{"spoofed ARP sender IP", tapIn, ptr(tapEndpoint(slot, peer, all)), arpFrame(guestMAC, guestMAC, netip.MustParseAddr("172.16.0.9"), netip.MustParseAddr("172.16.0.1")), tcxDrop, maps.FromGuest, maps.DropSpoofARP},
		{"ARP probe from 0.0.0.0 allowed", tapIn, ptr(tapEndpoint(slot, peer, all)), arpFrame(guestMAC, guestMAC, netip.MustParseAddr("0.0.0.0"), guestIP), tcxRedirect, maps.FromGuest, -1},
		{"honest ARP", tapIn, ptr(tapEndpoint(slot, peer, all)), arpFrame(guestMAC, guestMAC, guestIP, netip.MustParseAddr("172.16.0.1")), tcxRedirect, maps.FromGuest, -1},
		{"spoofing allowed when off", tapIn, ptr(tapEndpoint(slot, peer, maps.FlagStrictEgress)), udpFrame(otherMAC, netip.MustParseAddr("172.16.0.99"), netip.MustParseAddr("172.16.0.1"), 32), tcxRedirect, maps.FromGuest, -1},
		{"egress outside subnet and routes", tapIn, ptr(tapEndpoint(slot, peer, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.9.0.1"), 32), tcxDrop, maps.FromGuest, maps.DropEgressNoRoute},
		{"egress covered by a route", tapIn, ptr(tapEndpoint(slot, peer, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.8.3.4"), 32), tcxRedirect, maps.FromGuest, -1},
		{"route of another NIC does not count", tapIn, ptr(tapEndpoint(slot+1, peer, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.8.3.4"), 32), tcxDrop, maps.FromGuest, maps.DropEgressNoRoute},
		{"egress unchecked when off", tapIn, ptr(tapEndpoint(slot, peer, maps.FlagAntiSpoof)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.9.0.1"), 32), tcxRedirect, maps.FromGuest, -1},
		{"broadcast always allowed", tapIn, ptr(tapEndpoint(slot, peer, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("255.255.255.255"), 32), tcxRedirect, maps.FromGuest, -1},
		{"truncated ARP", tapIn, ptr(tapEndpoint(slot, peer, all)), arpFrame(guestMAC, guestMAC, guestIP, guestIP)[:30], tcxDrop, maps.FromGuest, maps.DropMalformed},
		{"truncated ARP allowed when spoofing off", tapIn, ptr(tapEndpoint(slot, peer, maps.FlagStrictEgress)), arpFrame(guestMAC, guestMAC, guestIP, guestIP)[:30], tcxRedirect, maps.FromGuest, -1},
		// IPv6: parsed (flow.h), extension headers walked; what is impossible is dropped.
		{"IPv6 UDP", tapIn, ptr(tapEndpoint(slot, peer, all)), udp6Frame(guestMAC, guestLL, peerLL, 8), tcxRedirect, maps.FromGuest, -1},
		{"IPv6 extension headers walked", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{hopByHop, dstOpts, routing, fragment6(0, true), dstOpts}, unix.IPPROTO_UDP, udp6(8)), tcxRedirect, maps.FromGuest, -1},
		{"IPv6 later fragment", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{fragment6(8, false)}, unix.IPPROTO_UDP, make([]byte, 16)), tcxRedirect, maps.FromGuest, -1},
		{"IPv6 extension chain too long", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{dstOpts, dstOpts, dstOpts, dstOpts, dstOpts, dstOpts, dstOpts}, unix.IPPROTO_UDP, udp6(8)), tcxDrop, maps.FromGuest, maps.DropMalformed},
		{"IPv6 hop-by-hop not first", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{dstOpts, hopByHop}, unix.IPPROTO_UDP, udp6(8)), tcxDrop, maps.FromGuest, maps.DropMalformed},
		{"IPv6 version not 6", tapIn, ptr(tapEndpoint(slot, peer, all)), append(ethHdr(otherMAC, guestMAC, unix.ETH_P_IPV6), make([]byte, 48)...), tcxDrop, maps.FromGuest, maps.DropMalformed},
		// (A frame cut inside its IPv4 or IPv6 header cannot be run in tc: BPF_PROG_TEST_RUN
		// refuses it. TestXDPVerdicts runs it.)
		{"IPv6 truncated extension header", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{hopByHop}, unix.IPPROTO_UDP, nil)[:14+40+6], tcxDrop, maps.FromGuest, maps.DropMalformed},
		{"IPv6 truncated ICMPv6", tapIn, ptr(tapEndpoint(slot, peer, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, nil, unix.IPPROTO_ICMPV6, []byte{128, 0}), tcxDrop, maps.FromGuest, maps.DropMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eps.Remove(lo)
			if tc.ep != nil {
				if err := eps.Put(lo, *tc.ep); err != nil {
					t.Fatal(err)
				}
			}
			s := uint32(slot)
			if tc.ep != nil {
				s = tc.ep.Slot
			}
			stats.Reset(s)
			if got := run(t, tc.prog, lo, append([]byte(nil), tc.frame...)); got != tc.want {
				t.Fatalf("verdict %d, want %d", got, tc.want)
			}
			if tc.reason == -2 {
				return
			}
			st, err := stats.Read(s, tc.dir)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.reason == -1 && (st.Packets != 1 || st.Bytes != uint64(len(tc.frame)) || st.TotalDrops() != 0):
				t.Errorf("forwarded frame counted as %s, want packets=1 bytes=%d", st, len(tc.frame))
			case tc.reason >= 0 && (st.Packets != 0 || st.Drops[tc.reason] != 1 || st.TotalDrops() != 1):
				t.Errorf("dropped frame counted as %s, want %s=1", st, tc.reason)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
