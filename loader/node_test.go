package loader_test

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

func openNode(t *testing.T, root, nsPath, uplink string) *loader.Node {
	t.Helper()
	n, err := loader.OpenNode(root, nsPath, uplink)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := loader.RemoveNode(root, nsPath, uplink); err != nil {
			t.Error(err)
		}
	})
	return n
}

// unicast is a frame of 60 bytes for dst (the payload does not matter to the node programs).
func unicast(dst, src net.HardwareAddr) []byte {
	return append(ethHdr(dst, src, 0x0800), make([]byte, 46)...)
}

// TestNodeVerdicts runs the node programs on crafted frames: a guest's MAC goes to its tap and
// no other, an ARP request for a guest's address only to that guest, everything else on
// (TCX_NEXT), and on egress a local guest's or the host's MAC turned around. Which tap a
// redirect went to is read from the per-tap counters the programs move.
func TestNodeVerdicts(t *testing.T) {
	needRoot(t)
	ln := openNode(t, testRoot(t), "", "kdptd-up0")
	in, _ := ln.Program(loader.ProgDirectIn)
	out, _ := ln.Program(loader.ProgDirectOut)
	n := maps.Node(ln.Maps())

	macA := net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 1}
	macB := net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 2}
	hostMAC := net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 3}
	client := net.HardwareAddr{0x02, 0xdd, 0, 0, 0, 4}
	ipA, ipB := netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("10.77.0.3")
	const tapA, tapB = 101, 102
	if err := n.PutGuest(macA, ipA, tapA); err != nil {
		t.Fatal(err)
	}
	if err := n.PutGuest(macB, ipB, tapB); err != nil {
		t.Fatal(err)
	}
	ip6A, ip6B := netip.MustParseAddr("fd00:77::2"), netip.MustParseAddr("fd00:77::3")
	if err := n.SetND(macA, []netip.Addr{ip6A, maps.LinkLocalOf([6]byte(macA))}); err != nil {
		t.Fatal(err)
	}
	if err := n.SetND(macB, []netip.Addr{ip6B}); err != nil {
		t.Fatal(err)
	}
	ns := func(src net.HardwareAddr, sip, target netip.Addr) []byte {
		body := make([]byte, 20)
		tb := target.As16()
		copy(body[4:], tb[:])
		body = append(body, ndOpt(1, src)...)
		sn := solicitedNode(target)
		b := sn.As16()
		return ip6Frame(net.HardwareAddr{0x33, 0x33, 0xff, b[13], b[14], b[15]}, src, sip, sn, nil, unix.IPPROTO_ICMPV6, icmp6(135, body))
	}
	cfgMAC := [6]byte(hostMAC)
	type cfg struct {
		Mac            [6]byte
		Pad            uint16
		Ifindex, Flags uint32
	}
	if err := n.Config.Put(uint32(0), cfg{Mac: cfgMAC, Ifindex: 1}); err != nil {
		t.Fatal(err)
	}
	if c, err := n.GuestCount(); err != nil || c != 2 {
		t.Fatalf("guest count %d, %v", c, err)
	}

	arpReply := arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), ipA)
	arpReply[14+7] = 2 // op = reply, still broadcast
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	type delta struct{ packets, arp, local uint64 }
	for _, c := range []struct {
		name   string
		prog   *ebpf.Program
		frame  []byte
		want   int32
		dA, dB delta
	}{
		{"in: to guest A", in, unicast(macA, client), tcxRedirect, delta{1, 0, 0}, delta{}},
		{"in: to guest B", in, unicast(macB, client), tcxRedirect, delta{}, delta{1, 0, 0}},
		{"in: unknown unicast", in, unicast(net.HardwareAddr{0x02, 9, 9, 9, 9, 9}, client), tcxNext, delta{}, delta{}},
		{"in: to the host", in, unicast(hostMAC, client), tcxNext, delta{}, delta{}},
		{"in: broadcast IPv4", in, unicast(bcast, client), tcxNext, delta{}, delta{}},
		{"in: multicast", in, unicast(net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}, client), tcxNext, delta{}, delta{}},
		{"in: arp for A only to A", in, arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), ipA), tcxRedirect, delta{1, 1, 0}, delta{}},
		{"in: arp for B only to B", in, arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), ipB), tcxRedirect, delta{}, delta{1, 1, 0}},
		{"in: arp for an unknown address", in, arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.9")), tcxNext, delta{}, delta{}},
		{"in: broadcast arp reply", in, arpReply, tcxNext, delta{}, delta{}},
		{"in: truncated arp", in, arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), ipA)[:30], tcxNext, delta{}, delta{}},
		{"in: NS for A only to A", in, ns(client, netip.MustParseAddr("fd00:77::1"), ip6A), tcxRedirect, delta{1, 1, 0}, delta{}},
		{"in: NS for A's link-local only to A", in, ns(client, netip.MustParseAddr("fe80::1"), maps.LinkLocalOf([6]byte(macA))), tcxRedirect, delta{1, 1, 0}, delta{}},
		{"in: NS for B only to B", in, ns(client, netip.MustParseAddr("fd00:77::1"), ip6B), tcxRedirect, delta{}, delta{1, 1, 0}},
		{"in: NS for an unknown address", in, ns(client, netip.MustParseAddr("fd00:77::1"), netip.MustParseAddr("fd00:77::9")), tcxNext, delta{}, delta{}},
		{"in: IPv6 unicast to A", in, ip6Frame(macA, client, netip.MustParseAddr("fd00:77::1"), ip6A, nil, unix.IPPROTO_UDP, udp6(8)), tcxRedirect, delta{1, 0, 0}, delta{}},
		{"out: A's NS for B goes to B", out, ns(macA, ip6A, ip6B), tcxRedirect, delta{}, delta{1, 1, 1}},
		{"out: A to B stays local", out, unicast(macB, macA), tcxRedirect, delta{}, delta{1, 0, 1}},
		{"out: A's arp for B goes to B", out, arpFrame(macA, macA, ipA, ipB), tcxRedirect, delta{}, delta{1, 1, 1}},
		{"out: A to the host turns around", out, unicast(hostMAC, macA), tcxRedirect, delta{}, delta{}},
		{"out: A to the client leaves", out, unicast(client, macA), tcxNext, delta{}, delta{}},
		{"out: A's arp for the client leaves", out, arpFrame(macA, macA, ipA, netip.MustParseAddr("10.77.0.1")), tcxNext, delta{}, delta{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			a0, _ := n.TapStats(tapA)
			b0, _ := n.TapStats(tapB)
			if got := run(t, c.prog, 1, c.frame); got != c.want {
				t.Fatalf("verdict %d, want %d", got, c.want)
			}
			a1, _ := n.TapStats(tapA)
			b1, _ := n.TapStats(tapB)
			gotA := delta{a1.Packets - a0.Packets, a1.Arp - a0.Arp, a1.Local - a0.Local}
			gotB := delta{b1.Packets - b0.Packets, b1.Arp - b0.Arp, b1.Local - b0.Local}
			if gotA != c.dA || gotB != c.dB {
				t.Errorf("tap A %+v (want %+v), tap B %+v (want %+v)", gotA, c.dA, gotB, c.dB)
			}
		})
	}
	if c, _ := n.Counter(maps.NodeOutHost); c != 1 {
		t.Errorf("out-host counter %d, want 1", c)
	}

	// A removed guest is no longer anyone's: its frames and ARP go on, B is untouched.
	if err := n.DelGuest(macA, ipA, tapA); err != nil {
		t.Fatal(err)
	}
	if got := run(t, in, 1, unicast(macA, client)); got != tcxNext {
		t.Errorf("frame for a removed guest: %d", got)
	}
	if got := run(t, in, 1, arpFrame(client, client, netip.MustParseAddr("10.77.0.1"), ipA)); got != tcxNext {
		t.Errorf("arp for a removed guest: %d", got)
	}
	if got := run(t, in, 1, unicast(macB, client)); got != tcxRedirect {
		t.Errorf("frame for the remaining guest: %d", got)
	}
	if err := n.PutGuest(net.HardwareAddr{0x03, 0, 0, 0, 0, 1}, ipA, 5); err == nil {
		t.Error("multicast guest mac accepted")
	}
}

// TestNodeAttach attaches the node programs to a veth in a throwaway netns, re-opens the node
// (links updated in place, never doubled) and removes it (no program of ours left).
func TestNodeAttach(t *testing.T) {
	needRoot(t)
	nsPath := netnsWithVeth(t)
	root := testRoot(t)
	n := openNode(t, root, nsPath, "kdptxa")
	if err := n.Attach(); err != nil {
		t.Fatal(err)
	}
	if !n.Attached() {
		t.Fatal("not attached")
	}
	count := func() (in, out int) { t.Helper(); return topotest.TCXCount(t, nsPath, "kdptxa") }
	if i, o := count(); i != 1 || o != 1 {
		t.Fatalf("programs: ingress %d egress %d", i, o)
	}
	n2, err := loader.OpenNode(root, nsPath, "kdptxa")
	if err != nil {
		t.Fatal(err)
	}
	if err := n2.Attach(); err != nil {
		t.Fatal(err)
	}
	n2.Close()
	if i, o := count(); i != 1 || o != 1 {
		t.Fatalf("after re-open: ingress %d egress %d", i, o)
	}
	if err := loader.RemoveNode(root, nsPath, "kdptxa"); err != nil {
		t.Fatal(err)
	}
	if i, o := count(); i != 0 || o != 0 {
		t.Fatalf("after remove: ingress %d egress %d", i, o)
	}
	if _, err := os.Stat(filepath.Join(root, loader.NodeDir)); err != nil {
		t.Fatal(err) // the parent stays; the uplink's directory is gone
	}
	if m, _ := filepath.Glob(filepath.Join(root, loader.NodeDir, "*")); len(m) != 0 {
		t.Fatalf("left: %v", m)
	}
}

// TestDirectRNAT: in direct mode replies reach the tap from the node programs, not through
// kdp_uplink_in; kdp_direct_rnat, loaded against the sandbox's maps, reverse-NATs them.
func TestDirectRNAT(t *testing.T) {
	needRoot(t)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		sb := openSandbox(t, testRoot(t), "rnat")
		m := sb.Maps()
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
		if err := (maps.EndpointMap{Map: m.Endpoints}).Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof)); err != nil {
			t.Fatal(err)
		}
		tapIn, _ := sb.Program(loader.ProgTapIn)
		rnat, err := sb.DirectRNATProgram()
		if err != nil {
			t.Fatal(err)
		}
		defer rnat.Close()
		ret, out := runOut(t, tapIn, l4Frame(proto, guestMAC, client, vip, 0x02, 10))
		if ret != tcxRedirect || checkFrame(t, out) != (tuple{client, backend}) {
			t.Fatalf("proto %d: DNAT: verdict %d, %v", proto, ret, checkFrame(t, out))
		}
		ret, out = runOut(t, rnat, l4Frame(proto, otherMAC, backend, client, 0x12, 20))
		if ret != tcxNext {
			t.Fatalf("proto %d: rnat verdict %d", proto, ret)
		}
		if got := checkFrame(t, out); got != (tuple{vip, client}) {
			t.Errorf("proto %d: reverse NAT gave %v, want %v -> %v", proto, got, vip, client)
		}
		// A frame of no connection goes on untouched.
		other := l4Frame(proto, otherMAC, netip.MustParseAddrPort("10.0.0.99:53"), client, 0x10, 5)
		if ret, out := runOut(t, rnat, append([]byte(nil), other...)); ret != tcxNext || string(out) != string(other) {
			t.Errorf("proto %d: unrelated frame: verdict %d, rewritten %v", proto, ret, string(out) != string(other))
		}
	}
}

// TestNodeDirOfDeadNetNSNotReused: a netns's inode keys its node directory, and a new netns
// can get the inode of a dead one. The directory then left (its links defunct, its FDB naming
// taps of the dead netns) must not be adopted: OpenNode starts afresh.
func TestNodeDirOfDeadNetNSNotReused(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	dead := netnsWithVeth(t)
	n, err := loader.OpenNode(root, dead, "kdptxa")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Attach(); err != nil {
		t.Fatal(err)
	}
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 0x42}
	if err := maps.Node(n.Maps()).PutGuest(mac, netip.Addr{}, 7); err != nil {
		t.Fatal(err)
	}
	deadDir := n.Dir()
	n.Close()
	// The netns goes (its devices with it); a new one gets the same inode: here, the
	// directory is moved to the new netns's name.
	if out, err := exec.Command("ip", "netns", "del", filepath.Base(dead)).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	fresh := netnsWithVeth(t)
	freshDir, err := loader.NodeDirOf(root, fresh, "kdptxa")
	if err != nil {
		t.Fatal(err)
	}
	// The kernel detaches the dead netns's links asynchronously (netns cleanup runs in a
	// workqueue): wait for it, bounded.
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, err := link.LoadPinnedLink(filepath.Join(deadDir, "links", string(loader.ProgDirectIn)), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err == nil && info.TCX() != nil && info.TCX().Ifindex == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("link of the dead netns still attached")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The kernel may really have given the new netns the dead one's inode (then the directory
	// is already the new netns's: bpffs refuses a rename onto itself with EEXIST).
	if deadDir != freshDir {
		if err := os.Rename(deadDir, freshDir); err != nil {
			t.Fatal(err)
		}
	}
	n2 := openNode(t, root, fresh, "kdptxa")
	if ifindex, ok, err := maps.Node(n2.Maps()).Guest(mac); err != nil || ok {
		t.Errorf("the dead netns's FDB entry was adopted: tap %d (%v)", ifindex, err)
	}
}
