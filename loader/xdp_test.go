package loader_test

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// xdpMd is struct xdp_md as BPF_PROG_TEST_RUN takes it: data_end must be the frame's length,
// and the ingress device must exist (the loopback device here).
type xdpMd struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

const (
	xdpAborted  = 0
	xdpDrop     = 1
	xdpPass     = 2
	xdpRedirect = 4
)

func runXDP(t *testing.T, prog *ebpf.Program, frame []byte) (int32, []byte) {
	t.Helper()
	out := make([]byte, len(frame)+256)
	ret, err := prog.Run(&ebpf.RunOptions{
		Data: frame, DataOut: out,
		Context: xdpMd{DataEnd: uint32(len(frame)), IngressIfindex: 1},
	})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return int32(ret), out[:len(frame)]
}

// partial turns a frame's L4 checksum into what a socket relying on checksum offload leaves
// there: the folded pseudo-header sum, not complemented.
func partial(f []byte) []byte {
	ip := f[14:]
	ihl := int(ip[0]&0xf) * 4
	l4len := int(binary.BigEndian.Uint16(ip[2:])) - ihl
	pseudo := make([]byte, 12)
	copy(pseudo, ip[12:20])
	pseudo[9] = ip[9]
	binary.BigEndian.PutUint16(pseudo[10:], uint16(l4len))
	off := 14 + ihl + 16
	if ip[9] == unix.IPPROTO_UDP {
		off = 14 + ihl + 6
	}
	binary.BigEndian.PutUint16(f[off:], fold(csumAdd(0, pseudo)))
	return f
}

func l4Csum(f []byte) uint16 {
	off := 14 + 20 + 16
	if f[14+9] == unix.IPPROTO_UDP {
		off = 14 + 20 + 6
	}
	return binary.BigEndian.Uint16(f[off:])
}

type xdpRig struct {
	sb       *loader.Sandbox
	eps      maps.EndpointMap
	stats    maps.StatsMap
	tap, upl *ebpf.Program
}

func newXDPRig(t *testing.T, id string) *xdpRig {
	sb := openSandbox(t, testRoot(t), id)
	m := sb.Maps()
	r := &xdpRig{sb: sb, eps: maps.ForSandbox(m).Endpoints, stats: maps.ForSandbox(m).Stats}
	r.tap, _ = sb.Program(loader.ProgXDPTap)
	r.upl, _ = sb.Program(loader.ProgXDPUplink)
	if r.tap.Type() != ebpf.XDP || r.upl.Type() != ebpf.XDP {
		t.Fatalf("program types %v %v, want XDP", r.tap.Type(), r.upl.Type())
	}
	return r
}

// port makes the loopback device (where test frames "arrive") an XDP port redirecting to
// itself: BPF_PROG_TEST_RUN reports the verdict and transmits nothing.
func (r *xdpRig) port(t *testing.T, maxLen, flags uint32) {
	t.Helper()
	if err := maps.ForSandbox(r.sb.Maps()).XDP.Set("", 1, 1, maps.XDPPort{MaxLen: maxLen, Flags: flags}); err != nil {
		t.Fatal(err)
	}
}

// TestXDPVerdicts: the XDP programs pass what is not theirs (no port, no endpoint, too long)
// untouched and uncounted, so the tc program sees it; and they redirect, drop and count like
// the tc programs for what is.
func TestXDPVerdicts(t *testing.T) {
	needRoot(t)
	r := newXDPRig(t, "xdpverdicts")
	const slot = 5
	all := maps.FlagAntiSpoof | maps.FlagStrictEgress
	good := udpFrame(guestMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32)
	big := udpFrame(guestMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 1600)

	type tc struct {
		name   string
		prog   *ebpf.Program
		port   bool
		ep     *maps.Endpoint
		frame  []byte
		want   int32
		dir    maps.Direction
		reason maps.DropReason // -1 forwarded, -2 untouched and uncounted
	}
	cases := []tc{
		{"no port: left to tc", r.tap, false, ptr(tapEndpoint(slot, 42, all)), good, xdpPass, maps.FromGuest, -2},
		{"no endpoint", r.tap, true, nil, good, xdpPass, maps.FromGuest, -2},
		{"too long for XDP: left to tc", r.tap, true, ptr(tapEndpoint(slot, 42, all)), big, xdpPass, maps.FromGuest, -2},
		{"from guest redirected", r.tap, true, ptr(tapEndpoint(slot, 42, all)), good, xdpRedirect, maps.FromGuest, -1},
		{"spoofed source MAC", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udpFrame(otherMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32), xdpDrop, maps.FromGuest, maps.DropSpoofMAC},
		{"spoofed source IP", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udpFrame(guestMAC, netip.MustParseAddr("172.16.0.99"), netip.MustParseAddr("172.16.0.1"), 32), xdpDrop, maps.FromGuest, maps.DropSpoofIP},
		{"spoofed ARP", r.tap, true, ptr(tapEndpoint(slot, 42, all)), arpFrame(guestMAC, otherMAC, guestIP, netip.MustParseAddr("172.16.0.1")), xdpDrop, maps.FromGuest, maps.DropSpoofARP},
		{"egress without route", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.9.0.1"), 32), xdpDrop, maps.FromGuest, maps.DropEgressNoRoute},
		// (tc's test run refuses an IPv4 frame cut off inside its header; XDP's takes it.)
		{"truncated IPv4", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udpFrame(guestMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32)[:30], xdpDrop, maps.FromGuest, maps.DropMalformed},
		{"truncated IPv4 from a foreign MAC", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udpFrame(otherMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32)[:30], xdpDrop, maps.FromGuest, maps.DropSpoofMAC},
		{"IPv6 UDP", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udp6Frame(guestMAC, guestLL, peerLL, 8), xdpRedirect, maps.FromGuest, -1},
		{"IPv6 extension chain too long", r.tap, true, ptr(tapEndpoint(slot, 42, all)), ip6Frame(otherMAC, guestMAC, guestLL, peerLL, []ext6{dstOpts, dstOpts, dstOpts, dstOpts, dstOpts, dstOpts, dstOpts}, unix.IPPROTO_UDP, udp6(8)), xdpDrop, maps.FromGuest, maps.DropMalformed},
		{"truncated IPv6", r.tap, true, ptr(tapEndpoint(slot, 42, all)), udp6Frame(guestMAC, guestLL, peerLL, 8)[:14+39], xdpDrop, maps.FromGuest, maps.DropMalformed},
		{"to guest redirected", r.upl, true, ptr(maps.Endpoint{PeerIfindex: 42, Slot: slot, Role: maps.RoleUplink}), good, xdpRedirect, maps.ToGuest, -1},
		{"to guest, wrong role", r.upl, true, ptr(tapEndpoint(slot, 42, all)), good, xdpPass, maps.ToGuest, -2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r.eps.Remove(1)
			maps.ForSandbox(r.sb.Maps()).XDP.Delete(1)
			if c.port {
				r.port(t, 1514, 0)
			}
			if c.ep != nil {
				if err := r.eps.Put(1, *c.ep); err != nil {
					t.Fatal(err)
				}
			}
			r.stats.Reset(slot)
			in := append([]byte(nil), c.frame...)
			got, out := runXDP(t, c.prog, in)
			if got != c.want {
				t.Fatalf("verdict %d, want %d", got, c.want)
			}
			st, err := r.stats.Read(slot, c.dir)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case c.reason == -2 && (st.Packets != 0 || st.TotalDrops() != 0 || string(out) != string(c.frame)):
				t.Errorf("frame left to tc was touched or counted: %s", st)
			case c.reason == -1 && (st.Packets != 1 || st.Bytes != uint64(len(c.frame)) || st.TotalDrops() != 0):
				t.Errorf("forwarded frame counted as %s, want packets=1 bytes=%d", st, len(c.frame))
			case c.reason >= 0 && (st.Packets != 0 || st.Drops[c.reason] != 1 || st.TotalDrops() != 1):
				t.Errorf("dropped frame counted as %s, want %s=1", st, c.reason)
			}
		})
	}
}

// TestXDPChecksumRepair: partial checksums (what a socket relying on offload leaves) are
// completed for TCP and UDP of every length class the chunked sum has; complete checksums,
// UDP without a checksum and frames of ports without the flag are left alone.
func TestXDPChecksumRepair(t *testing.T) {
	needRoot(t)
	r := newXDPRig(t, "xdpcsum")
	r.eps.Put(1, maps.Endpoint{PeerIfindex: 42, Slot: 0, Role: maps.RoleUplink})
	r.port(t, 9000, maps.XDPFlagCsum)
	s, d := netip.MustParseAddrPort("10.1.2.3:443"), netip.AddrPortFrom(guestIP, 51234)
	sizes := []int{0, 1, 2, 3, 5, 17, 63, 255, 256, 257, 511, 1000, 1371, 1440, 1452, 1472, 3000, 3001}
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		for _, n := range sizes {
			good := l4Frame(proto, otherMAC, s, d, 0x18, n)
			ret, out := runXDP(t, r.upl, partial(append([]byte(nil), good...)))
			if ret != xdpRedirect {
				t.Fatalf("proto %d len %d: verdict %d", proto, n, ret)
			}
			if got, want := l4Csum(out), l4Csum(good); got != want {
				t.Errorf("proto %d payload %d: partial checksum repaired to %#04x, want %#04x", proto, n, got, want)
			}
			if _, out := runXDP(t, r.upl, append([]byte(nil), good...)); string(out) != string(good) {
				t.Errorf("proto %d payload %d: frame with a complete checksum was changed", proto, n)
			}
		}
	}
	p0 := partial(l4Frame(unix.IPPROTO_TCP, otherMAC, s, d, 0x18, 100))
	// Ethernet padding after the IP packet is not summed.
	good := l4Frame(unix.IPPROTO_UDP, otherMAC, s, d, 0, 4)
	padded := append(partial(append([]byte(nil), good...)), make([]byte, 60-len(good))...)
	if _, out := runXDP(t, r.upl, padded); l4Csum(out) != l4Csum(good) {
		t.Errorf("padded frame: checksum %#04x, want %#04x", l4Csum(out), l4Csum(good))
	}
	// UDP without checksum stays without.
	nocs := l4Frame(unix.IPPROTO_UDP, otherMAC, s, d, 0, 40)
	nocs[14+20+6], nocs[14+20+7] = 0, 0
	if _, out := runXDP(t, r.upl, append([]byte(nil), nocs...)); l4Csum(out) != 0 {
		t.Errorf("UDP checksum 0 became %#04x", l4Csum(out))
	}
	// A segment claiming more than the frame holds is not touched (and left to tc).
	trunc := partial(l4Frame(unix.IPPROTO_TCP, otherMAC, s, d, 0x18, 100))
	cut := append([]byte(nil), trunc[:len(trunc)-10]...)
	if ret, out := runXDP(t, r.upl, append([]byte(nil), cut...)); ret != xdpPass || string(out) != string(cut) {
		t.Errorf("truncated segment: verdict %d, changed %v", ret, string(out) != string(cut))
	}
	// A frame the program leaves to tc keeps its partial checksum: where it is still an skb,
	// the skb's note says so, and a completed checksum would be summed again.
	r.eps.Remove(1)
	if ret, out := runXDP(t, r.upl, append([]byte(nil), p0...)); ret != xdpPass || string(out) != string(p0) {
		t.Errorf("frame left to tc: verdict %d, checksum rewritten %v", ret, string(out) != string(p0))
	}
	r.eps.Put(1, maps.Endpoint{PeerIfindex: 42, Slot: 0, Role: maps.RoleUplink})
	// Without the flag the program does not look at checksums.
	r.port(t, 9000, 0)
	p := partial(l4Frame(unix.IPPROTO_TCP, otherMAC, s, d, 0x18, 100))
	if _, out := runXDP(t, r.upl, append([]byte(nil), p...)); string(out) != string(p) {
		t.Error("checksum rewritten on a port without KDP_XDP_F_CSUM")
	}
}

// TestXDPLBNAT: the load balancer's DNAT and reverse NAT in the XDP programs, on frames with
// complete and with partial checksums: both checksums verify afterwards.
func TestXDPLBNAT(t *testing.T) {
	needRoot(t)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		r := newXDPRig(t, "xdplb")
		m := r.sb.Maps()
		lb := maps.ForSandbox(m).LB
		if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
			t.Fatal(err)
		}
		if err := lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1}); err != nil {
			t.Fatal(err)
		}
		if err := lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: proto, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
			t.Fatal(err)
		}
		r.port(t, 1514, maps.XDPFlagCsum)
		for i, flags := range []uint8{0x02, 0x10, 0x18} {
			for _, part := range []bool{false, true} {
				f := l4Frame(proto, guestMAC, client, vip, flags, 10+i*100)
				if part {
					partial(f)
				}
				r.eps.Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof))
				ret, out := runXDP(t, r.tap, f)
				if ret != xdpRedirect {
					t.Fatalf("proto %d: from guest: verdict %d", proto, ret)
				}
				if got := checkFrame(t, out); got != (tuple{client, backend}) {
					t.Errorf("proto %d partial=%v: DNAT gave %v, want %v -> %v", proto, part, got, client, backend)
				}
				f = l4Frame(proto, otherMAC, backend, client, flags, 33+i)
				if part {
					partial(f)
				}
				r.eps.Put(1, maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink})
				ret, out = runXDP(t, r.upl, f)
				if ret != xdpRedirect {
					t.Fatalf("proto %d: to guest: verdict %d", proto, ret)
				}
				if got := checkFrame(t, out); got != (tuple{vip, client}) {
					t.Errorf("proto %d partial=%v: reverse NAT gave %v, want %v -> %v", proto, part, got, vip, client)
				}
			}
		}
		st, err := lb.ReadStats(maps.StatsBackend, 7)
		if err != nil {
			t.Fatal(err)
		}
		if st.Conns != 1 || st.Inpkts != 6 || st.Outpkts != 6 {
			t.Errorf("proto %d: real server counters %+v, want 1 conn, 6 in, 6 out", proto, st)
		}
	}
}

// TestXDPPorts: SetXDPPort/DelXDPPort keep the devmap and the port map in step.
func TestXDPPorts(t *testing.T) {
	needRoot(t)
	r := newXDPRig(t, "xdpports")
	if err := maps.ForSandbox(r.sb.Maps()).XDP.Set("", 1, 1, maps.XDPPort{MaxLen: 1518, Flags: maps.XDPFlagCsum}); err != nil {
		t.Fatal(err)
	}
	ports, err := maps.ForSandbox(r.sb.Maps()).XDP.All()
	if err != nil {
		t.Fatal(err)
	}
	if p := ports[1]; len(ports) != 1 || p.MaxLen != 1518 || p.Flags != maps.XDPFlagCsum {
		t.Errorf("ports %+v", ports)
	}
	for range 2 { // idempotent
		if err := maps.ForSandbox(r.sb.Maps()).XDP.Delete(1); err != nil {
			t.Fatal(err)
		}
	}
	if ports, _ := maps.ForSandbox(r.sb.Maps()).XDP.All(); len(ports) != 0 {
		t.Errorf("ports left: %+v", ports)
	}
	var v [8]byte
	if err := r.sb.Maps().XDPTx.Lookup(uint32(1), &v); err == nil {
		t.Error("devmap entry left")
	}
}

// netnsWithVeth makes a throwaway netns with a veth pair (kdptxa, kdptxb) and a tap (kdptxt),
// all up, and returns its path.
func netnsWithVeth(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("kdptx-l%08x", rand.Uint32())
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	sh("netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	sh("-n", name, "link", "add", "kdptxa", "type", "veth", "peer", "name", "kdptxb")
	sh("-n", name, "tuntap", "add", "kdptxt", "mode", "tap")
	for _, dev := range []string{"kdptxa", "kdptxb", "kdptxt"} {
		sh("-n", name, "link", "set", dev, "up")
	}
	return "/run/netns/" + name
}

// TestAttachXDP: driver mode on a veth and a tap, the generic fallback, in-place update of a
// pinned link (by a second load of the sandbox), detach; and XDPRedirectTarget following the
// veth peer's GRO.
func TestAttachXDP(t *testing.T) {
	needRoot(t)
	ns := netnsWithVeth(t)
	root := testRoot(t)
	sb := openSandbox(t, root, "xdpattach")

	for _, c := range []struct {
		dev  string
		prog loader.Program
	}{{"kdptxa", loader.ProgXDPUplink}, {"kdptxt", loader.ProgXDPTap}} {
		a, err := sb.AttachXDP(ns, c.dev, c.prog)
		if err != nil {
			t.Fatal(err)
		}
		if a.Mode != "driver" || a.Netlink {
			t.Errorf("%s: attached %+v, want driver mode through a link", c.dev, a)
		}
		if name, mode, err := loader.XDPProgram(ns, c.dev); err != nil || name != string(c.prog) || mode != "driver" {
			t.Errorf("%s runs %q (%s, %v)", c.dev, name, mode, err)
		}
	}
	if _, err := sb.AttachXDP(ns, "kdptxa", loader.ProgTapIn); err == nil {
		t.Error("a tc program attached as XDP")
	}

	// A second load (an agent restart) moves the pinned links onto its programs in place.
	sb2, err := loader.Open(root, "xdpattach")
	if err != nil {
		t.Fatal(err)
	}
	p2, _ := sb2.Program(loader.ProgXDPUplink)
	info, _ := p2.Info()
	id2, _ := info.ID()
	sb2.Close()
	err = netdev.InNetNS(ns, func() error {
		l, err := netlink.LinkByName("kdptxa")
		if err != nil {
			return err
		}
		if got := l.Attrs().Xdp.ProgId; got != uint32(id2) {
			t.Errorf("after reload kdptxa runs program %d, want the new load's %d", got, id2)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Re-attaching replaces in place; detaching leaves nothing.
	if _, err := sb.AttachXDP(ns, "kdptxa", loader.ProgXDPTap); err != nil {
		t.Fatal(err)
	}
	if name, _, _ := loader.XDPProgram(ns, "kdptxa"); name != string(loader.ProgXDPTap) {
		t.Errorf("after re-attach kdptxa runs %q", name)
	}
	for _, dev := range []string{"kdptxa", "kdptxt"} {
		if err := sb.DetachXDP(ns, dev); err != nil {
			t.Fatal(err)
		}
		if name, _, _ := loader.XDPProgram(ns, dev); name != "" {
			t.Errorf("%s still runs %q", dev, name)
		}
	}
	if err := sb.DetachXDP(ns, "nosuchdev"); err != nil {
		t.Errorf("detach from a missing device: %v", err)
	}

	// Generic mode where driver mode is not wanted (or refused).
	sbg, err := loader.OpenWithOptions(root, "xdpattach", loader.Options{GenericXDP: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := sbg.AttachXDP(ns, "kdptxa", loader.ProgXDPUplink)
	sbg.Close()
	if err != nil || a.Mode != "generic" {
		t.Errorf("forced generic attach: %+v, %v", a, err)
	}
	if _, mode, _ := loader.XDPProgram(ns, "kdptxa"); mode != "generic" {
		t.Errorf("kdptxa XDP mode %q, want generic", mode)
	}
	sb.DetachXDP(ns, "kdptxa")

	// A tap always takes XDP frames; a veth only while its peer has XDP or GRO on.
	if ok, err := loader.XDPRedirectTarget(ns, "kdptxt"); err != nil || !ok {
		t.Errorf("tap as XDP target: %v, %v", ok, err)
	}
	for _, gro := range []bool{false, true, false} {
		if err := netdev.SetGRO(ns, "kdptxb", gro); err != nil {
			t.Fatal(err)
		}
		if ok, err := loader.XDPRedirectTarget(ns, "kdptxa"); err != nil || ok != gro {
			t.Errorf("veth as XDP target with peer GRO %v: %v, %v", gro, ok, err)
		}
	}
}

// TestDotsInNames: bpffs refuses names with a dot, which sandbox ids and device names may
// have ("pod.1", "eth0.100"): the sandbox's directory and its link pins still work, tc and
// XDP, across a reload, and LinkedDevices gives the device's own name back.
func TestDotsInNames(t *testing.T) {
	needRoot(t)
	ns := netnsWithVeth(t)
	name := filepath.Base(ns)
	for _, args := range [][]string{
		{"-n", name, "link", "add", "kdptx.1", "type", "veth", "peer", "name", "kdptx.2"},
		{"-n", name, "link", "set", "kdptx.1", "up"},
		{"-n", name, "link", "set", "kdptx.2", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	root := testRoot(t)
	sb := openSandbox(t, root, "kdp.dots")
	if _, err := sb.Attach(ns, "kdptx.1", loader.ProgTapIn); err != nil {
		t.Fatalf("tc attach to a device with a dot: %v", err)
	}
	if _, err := sb.AttachXDP(ns, "kdptx.2", loader.ProgXDPUplink); err != nil {
		t.Fatalf("XDP attach to a device with a dot: %v", err)
	}
	again := openSandbox(t, root, "kdp.dots") // a second load refreshes the pinned links
	devs, err := again.LinkedDevices()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"kdptx.1", "kdptx.2"}; !slices.Equal(devs, want) {
		t.Errorf("linked devices %v, want %v", devs, want)
	}
	if err := again.Detach(ns, "kdptx.1"); err != nil {
		t.Errorf("detach: %v", err)
	}
}
