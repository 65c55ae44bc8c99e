package loader_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

func csumAdd(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// l4Checksum computes the TCP/UDP checksum of the IPv4 frame with the checksum field zeroed.
func l4Checksum(frame []byte) uint16 {
	ip := frame[14:]
	ihl := int(ip[0]&0xf) * 4
	l4 := append([]byte(nil), ip[ihl:binary.BigEndian.Uint16(ip[2:])]...)
	off := 16
	if ip[9] == unix.IPPROTO_UDP {
		off = 6
	}
	l4[off], l4[off+1] = 0, 0
	pseudo := make([]byte, 12)
	copy(pseudo, ip[12:20])
	pseudo[9] = ip[9]
	binary.BigEndian.PutUint16(pseudo[10:], uint16(len(l4)))
	c := ^fold(csumAdd(csumAdd(0, pseudo), l4))
	if c == 0 && ip[9] == unix.IPPROTO_UDP {
		c = 0xffff
	}
	return c
}

// l4Frame builds Ethernet + IPv4 + TCP (flags) or UDP with correct checksums.
func l4Frame(proto uint8, src net.HardwareAddr, s, d netip.AddrPort, tcpFlags uint8, payload int) []byte {
	l4len := 8
	if proto == unix.IPPROTO_TCP {
		l4len = 20
	}
	ip := make([]byte, 20+l4len+payload)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
	ip[8] = 64
	ip[9] = proto
	sa, da := s.Addr().As4(), d.Addr().As4()
	copy(ip[12:], sa[:])
	copy(ip[16:], da[:])
	binary.BigEndian.PutUint16(ip[10:], ipChecksum(ip[:20]))
	l4 := ip[20:]
	binary.BigEndian.PutUint16(l4[0:], s.Port())
	binary.BigEndian.PutUint16(l4[2:], d.Port())
	for i := range payload {
		l4[l4len+i] = byte(i)
	}
	if proto == unix.IPPROTO_TCP {
		l4[12] = 5 << 4
		l4[13] = tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 65535)
	} else {
		binary.BigEndian.PutUint16(l4[4:], uint16(l4len+payload))
	}
	f := append(ethHdr(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, unix.ETH_P_IP), ip...)
	off := 14 + 20 + 16
	if proto == unix.IPPROTO_UDP {
		off = 14 + 20 + 6
	}
	binary.BigEndian.PutUint16(f[off:], l4Checksum(f))
	return f
}

type tuple struct {
	src, dst netip.AddrPort
}

// checkFrame verifies both checksums and returns the frame's addresses.
func checkFrame(t *testing.T, f []byte) tuple {
	t.Helper()
	ip := f[14:]
	if got := ipChecksum(ip[:20]); got != 0 {
		t.Errorf("IP checksum does not verify (residue %#04x)", got)
	}
	off := 14 + 20 + 16
	if ip[9] == unix.IPPROTO_UDP {
		off = 14 + 20 + 6
	}
	if got, want := binary.BigEndian.Uint16(f[off:]), l4Checksum(f); got != want && !(ip[9] == unix.IPPROTO_UDP && got == 0) {
		t.Errorf("L4 checksum %#04x, want %#04x", got, want)
	}
	a := func(b []byte) netip.Addr { return netip.AddrFrom4([4]byte(b)) }
	return tuple{
		netip.AddrPortFrom(a(ip[12:16]), binary.BigEndian.Uint16(ip[20:])),
		netip.AddrPortFrom(a(ip[16:20]), binary.BigEndian.Uint16(ip[22:])),
	}
}

func runOut(t *testing.T, prog *ebpf.Program, frame []byte) (int32, []byte) {
	t.Helper()
	out := make([]byte, len(frame)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out, Context: skbCtx{Ifindex: 1}})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return int32(ret), out[:len(frame)]
}

type lbRig struct {
	lb          maps.LB
	eps         maps.EndpointMap
	tapIn, upIn *ebpf.Program
}

// putRRService writes real server 7 (backend) and service 3 (vip, TCP, rr) with it as its
// one slot: the service most of the load balancer's tests run their frames through.
func (r *lbRig) putRRService(t *testing.T) {
	t.Helper()
	if err := r.lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
		t.Fatal(err)
	}
}

func newLBRig(t *testing.T) *lbRig {
	sb := openSandbox(t, testRoot(t), "lb")
	m := sb.Maps()
	r := &lbRig{
		lb:  maps.ForSandbox(m).LB,
		eps: maps.ForSandbox(m).Endpoints,
	}
	r.tapIn, _ = sb.Program(loader.ProgTapIn)
	r.upIn, _ = sb.Program(loader.ProgUplinkIn)
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	return r
}

// fromGuest runs a frame through the tap's program (as the guest's), toGuest through the uplink's.
func (r *lbRig) fromGuest(t *testing.T, f []byte) (int32, []byte) {
	t.Helper()
	r.eps.Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof))
	return runOut(t, r.tapIn, f)
}

func (r *lbRig) toGuest(t *testing.T, f []byte) (int32, []byte) {
	t.Helper()
	r.eps.Put(1, maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink})
	return runOut(t, r.upIn, f)
}

var (
	vip     = netip.MustParseAddrPort("172.17.0.7:80")
	client  = netip.AddrPortFrom(guestIP, 40000)
	backend = netip.MustParseAddrPort("10.0.0.10:8080")
)

// TestLBNAT: DNAT of the guest's frames to the real server and reverse NAT of the replies,
// for TCP and UDP, with both checksums correct after the rewrite.
func TestLBNAT(t *testing.T) {
	needRoot(t)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		r := newLBRig(t)
		if err := r.lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1}); err != nil {
			t.Fatal(err)
		}
		if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: proto, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
			t.Fatal(err)
		}
		for i, flags := range []uint8{0x02, 0x10, 0x18} { // SYN, ACK, PSH|ACK
			ret, out := r.fromGuest(t, l4Frame(proto, guestMAC, client, vip, flags, 10+i*100))
			if ret != tcxRedirect {
				t.Fatalf("proto %d: from guest: verdict %d", proto, ret)
			}
			if got := checkFrame(t, out); got != (tuple{client, backend}) {
				t.Errorf("proto %d: DNAT gave %v, want %v -> %v", proto, got, client, backend)
			}
			ret, out = r.toGuest(t, l4Frame(proto, otherMAC, backend, client, flags, 33+i))
			if ret != tcxRedirect {
				t.Fatalf("proto %d: to guest: verdict %d", proto, ret)
			}
			if got := checkFrame(t, out); got != (tuple{vip, client}) {
				t.Errorf("proto %d: reverse NAT gave %v, want %v -> %v", proto, got, vip, client)
			}
		}
		st, err := r.lb.ReadStats(maps.StatsBackend, 7)
		if err != nil {
			t.Fatal(err)
		}
		if st.Conns != 1 || st.Inpkts != 3 || st.Outpkts != 3 {
			t.Errorf("proto %d: real server counters %+v, want 1 conn, 3 in, 3 out", proto, st)
		}
		// A frame that is not for a service is untouched.
		other := l4Frame(proto, guestMAC, client, netip.MustParseAddrPort("172.16.0.1:80"), 0x02, 0)
		if _, out := r.fromGuest(t, append([]byte(nil), other...)); string(out) != string(other) {
			t.Errorf("proto %d: frame to a non-service was rewritten", proto)
		}
	}
}

// TestLBCountersArrays: the counters are arrays whose entries name their owner
// (bpf/lib/lb.h, lb_cnt_slot). Installing a service or real server claims its entry with zero
// counters, a restore's ids are claimed at once (ClaimCounters) and a claim of an id that owns
// its entry already keeps its counters (an edit, a restore of the same ids). The datapath
// counts new connections, established frames and replies in the entries of their ids only; the
// sweeper fixes a wrong count of a live real server and leaves a deleted one's entry alone. A
// deleted real server's entry is claimed by the next id of its slot: that id starts from zero,
// and the deleted one's draining connection counts in nothing of it.
func TestLBCountersArrays(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	for id := uint32(7); id <= 8; id++ {
		if err := r.lb.PutBackend(id, maps.Backend{Addr: netip.AddrPortFrom(backend.Addr(), 8080+uint16(id)), Weight: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.PutServices(0, []maps.ServiceSpec{{VIP: netip.MustParseAddrPort("172.17.0.8:80"), Proto: unix.IPPROTO_TCP, ID: 4, Sched: maps.SchedRR, Slots: []uint32{8}}}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.PutBackends(map[uint32]maps.Backend{9: {Addr: backend, Weight: 1}}, true); err != nil {
		t.Fatal(err)
	}
	counters := func() (map[maps.LBStatsKey]maps.LBStats, map[uint32]maps.LBConns) {
		t.Helper()
		st, err := r.lb.AllStats()
		if err != nil {
			t.Fatal(err)
		}
		cn, err := r.lb.AllConns()
		if err != nil {
			t.Fatal(err)
		}
		return st, cn
	}
	svcKey := func(id uint32) maps.LBStatsKey { return maps.LBStatsKey{Kind: maps.StatsService, Id: id} }
	beKey := func(id uint32) maps.LBStatsKey { return maps.LBStatsKey{Kind: maps.StatsBackend, Id: id} }
	if st, cn := counters(); len(st) != 3 || len(cn) != 2 || st[svcKey(3)] != (maps.LBStats{}) || st[beKey(7)] != (maps.LBStats{}) {
		t.Fatalf("entries claimed by PutService and PutBackend: %v %v, want service 3 and real servers 7, 8, all zero", st, cn)
	}
	// The batched writers leave the claims to the restore, which claims many ids at once (more
	// than ClaimCounters looks up one by one).
	var many []uint32
	for id := uint32(100); id < 200; id++ {
		many = append(many, id)
	}
	if err := r.lb.ClaimCounters([]uint32{4}, append(many, 9), false); err != nil {
		t.Fatal(err)
	}
	if st, cn := counters(); len(st) != 105 || len(cn) != 103 {
		t.Fatalf("entries after the restore's claim: %d counters, %d connection counts; want 105 and 103", len(st), len(cn))
	}

	for i := range 2 {
		ret, _ := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, uint16(40000+i)), vip, 0x02, 10))
		if ret != tcxRedirect {
			t.Fatalf("connection %d: verdict %d", i, ret)
		}
	}
	st, cn := counters()
	svc, be := st[svcKey(3)], st[beKey(7)]
	if svc.Conns != 2 || svc.Inpkts != 2 || be.Conns != 2 || be.Inbytes != svc.Inbytes || st[beKey(8)] != (maps.LBStats{}) {
		t.Errorf("counters after two connections: %+v, want service 3 and real server 7 with 2 connections each", st)
	}
	if cn[7] != (maps.LBConns{Active: 2}) || cn[8] != (maps.LBConns{}) {
		t.Errorf("connection counts after two connections: %+v, want 7: 2 active", cn)
	}
	// A claim of ids that own their entries (a restore of the same table) keeps the counters.
	if err := r.lb.ClaimCounters([]uint32{3}, []uint32{7}, false); err != nil {
		t.Fatal(err)
	}
	if st, _ := r.lb.ReadStats(maps.StatsService, 3); st != svc {
		t.Errorf("service 3's counters after claiming them again: %+v, want %+v", st, svc)
	}

	// A wrong count of a live real server is fixed by the sweep; a deleted real server's
	// entry (99: no real server) is left as it is.
	if err := r.lb.SetConns(7, maps.LBConns{Active: 5, Inactive: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.SetConns(99, maps.LBConns{Active: 1}); err != nil {
		t.Fatal(err)
	}
	cfg, err := maps.ReadConfig(r.lb.Config)
	if err != nil {
		t.Fatal(err)
	}
	res, err := r.lb.Sweep(maps.MonotonicNow(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Live != 2 {
		t.Errorf("sweep found %d live connections, want 2", res.Live)
	}
	if c, _ := r.lb.ReadConns(7); c != (maps.LBConns{Active: 2}) {
		t.Errorf("real server 7's counts after the sweep: %+v, want 2 active", c)
	}
	if c, _ := r.lb.ReadConns(99); c != (maps.LBConns{Active: 1}) {
		t.Errorf("deleted real server 99's entry after the sweep: %+v, want it untouched", c)
	}

	// Real server 7 is deleted; its connections drain and count on in its entry, unseen.
	if err := r.lb.DeleteBackend(7); err != nil {
		t.Fatal(err)
	}
	if ret, _ := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, 40000), vip, 0x10, 10)); ret != tcxRedirect {
		t.Errorf("established connection after its real server's removal: verdict %d", ret)
	}
	// The next id of its slot takes the entry over from zero, and the service is moved to it.
	next := uint32(7 + loader.CounterHalf)
	if loader.CounterSlot(next) != loader.CounterSlot(7) {
		t.Fatalf("ids %d and 7 do not share a slot", next)
	}
	if err := r.lb.PutBackend(next, maps.Backend{Addr: netip.MustParseAddrPort("10.0.0.12:8080"), Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{next}}); err != nil {
		t.Fatal(err)
	}
	if st, _ := r.lb.ReadStats(maps.StatsBackend, next); st != (maps.LBStats{}) {
		t.Errorf("counters of %d, which took 7's slot: %+v, want zero", next, st)
	}
	if st, _ := r.lb.ReadStats(maps.StatsBackend, 7); st != (maps.LBStats{}) {
		t.Errorf("counters of the deleted 7 after its slot was taken: %+v, want none", st)
	}
	// 7's draining connection: the frame goes on to 7, the reply comes back, neither counts
	// for the slot's new owner; the service counts both.
	ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, 40000), vip, 0x10, 10))
	if got := checkFrame(t, out); ret != tcxRedirect || got.dst != netip.AddrPortFrom(backend.Addr(), 8087) {
		t.Errorf("draining connection: verdict %d, sent to %v, want %v", ret, got.dst, netip.AddrPortFrom(backend.Addr(), 8087))
	}
	if ret, _ := r.toGuest(t, l4Frame(unix.IPPROTO_TCP, otherMAC, netip.AddrPortFrom(backend.Addr(), 8087), netip.AddrPortFrom(guestIP, 40000), 0x10, 5)); ret != tcxRedirect {
		t.Errorf("draining connection's reply: verdict %d", ret)
	}
	if st, _ := r.lb.ReadStats(maps.StatsBackend, next); st != (maps.LBStats{}) {
		t.Errorf("counters of %d after frames of 7's draining connection: %+v, want zero", next, st)
	}
	if c, _ := r.lb.ReadConns(next); c != (maps.LBConns{}) {
		t.Errorf("connection counts of %d after 7's drain: %+v, want zero", next, c)
	}
	// A new connection counts in the new owner's entry.
	if ret, _ := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, 40100), vip, 0x02, 10)); ret != tcxRedirect {
		t.Fatalf("new connection to %d: verdict %d", next, ret)
	}
	if st, _ := r.lb.ReadStats(maps.StatsBackend, next); st.Conns != 1 || st.Inpkts != 1 {
		t.Errorf("counters of %d after its first connection: %+v, want 1 connection, 1 frame", next, st)
	}
	if c, _ := r.lb.ReadConns(next); c != (maps.LBConns{Active: 1}) {
		t.Errorf("connection counts of %d after its first connection: %+v, want 1 active", next, c)
	}
	if st, _ := r.lb.ReadStats(maps.StatsService, 3); st.Conns != 3 || st.Inpkts != 5 || st.Outpkts != 1 {
		t.Errorf("service 3's counters: %+v, want 3 connections, 5 frames in, 1 out", st)
	}

	// The arrays are read and claimed in their memory mappings; without them (StatsMem and
	// ConnsMem nil), with system calls: both ways see and do the same.
	if r.lb.StatsMem == nil || r.lb.ConnsMem == nil {
		t.Fatal("the counter arrays are not mapped")
	}
	plain := r.lb
	plain.StatsMem, plain.ConnsMem = nil, nil
	st, cn = counters()
	pst, err := plain.AllStats()
	if err != nil {
		t.Fatal(err)
	}
	pcn, err := plain.AllConns()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(pst) != fmt.Sprint(st) || fmt.Sprint(pcn) != fmt.Sprint(cn) {
		t.Errorf("counters read with system calls:\n%v %v\nin place:\n%v %v", pst, pcn, st, cn)
	}
	for _, fresh := range []bool{false, true} {
		lb, ids := plain, []uint32{100 + loader.CounterHalf} // the entries of 100..199 (many, above)
		if fresh {
			lb, ids = r.lb, []uint32{100 + 2*loader.CounterHalf} // the same entries again
		}
		for i := range 100 {
			ids = append(ids, ids[0]+uint32(i)+1)
		}
		if err := lb.ClaimCounters(nil, ids, fresh); err != nil {
			t.Fatal(err)
		}
		st, cn := counters()
		for _, id := range ids {
			if _, ok := st[beKey(id)]; !ok {
				t.Errorf("fresh %v: %d did not claim its counters", fresh, id)
			}
			if _, ok := cn[id]; !ok {
				t.Errorf("fresh %v: %d did not claim its connection counts", fresh, id)
			}
			if _, ok := cn[id-loader.CounterHalf]; ok {
				t.Errorf("fresh %v: %d still owns its entry after %d claimed it", fresh, id-loader.CounterHalf, id)
			}
		}
	}
}

// TestLBConnTableFullBucket: the IPv4 connection table is an array of buckets of
// loader.CTWays slots, a connection's two entries in a pair of slots of the bucket of the
// guest's port (maps and the datapath choose it alike: the ports are found with
// loader.CTHash); a new connection whose bucket is full takes the pair whose newer entry is
// the oldest (a stamp tie: the first), so new connections are never refused, the evicted
// connection loses both entries, and the others keep theirs, their real servers and their
// reverse NAT.
func TestLBConnTableFullBucket(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	servers := []netip.AddrPort{backend, netip.MustParseAddrPort("10.0.0.11:8080")}
	for i, s := range servers {
		if err := r.lb.PutBackend(uint32(7+i), maps.Backend{Addr: s, Weight: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7, 8}}); err != nil {
		t.Fatal(err)
	}
	key := func(port uint16) loader.DatapathCtKey {
		return loader.DatapathCtKey{Saddr: ne32(guestIP), Daddr: ne32(vip.Addr()), Sport: htons(port), Dport: htons(vip.Port()), Proto: unix.IPPROTO_TCP}
	}
	// CTWays/2+1 client ports whose connections share a bucket.
	n := r.lb.CT.MaxEntries()
	want := loader.CTHash(key(1024)) % n
	ports := []uint16{1024}
	for p := uint16(1025); len(ports) <= loader.CTWays/2 && p < 65535; p++ {
		if loader.CTHash(key(p))%n == want {
			ports = append(ports, p)
		}
	}
	if len(ports) <= loader.CTWays/2 {
		t.Fatalf("found only %d ports of one bucket", len(ports))
	}
	picked := map[uint16]netip.AddrPort{}
	for _, p := range ports {
		ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, p), vip, 0x02, 0))
		if ret != tcxRedirect {
			t.Fatalf("new connection from port %d: verdict %d", p, ret)
		}
		picked[p] = checkFrame(t, out).dst
	}
	for i, p := range ports {
		_, err := r.lb.ConnEntry(key(p))
		_, rerr := r.lb.ConnEntry(loader.DatapathCtKey{Saddr: ne32(picked[p].Addr()), Daddr: ne32(guestIP),
			Sport: htons(picked[p].Port()), Dport: htons(p), Proto: unix.IPPROTO_TCP, Dir: 1})
		if evicted := i == 0; evicted != (err != nil) || evicted != (rerr != nil) {
			t.Errorf("connection %d (port %d): entry lookups %v, %v (reply), want evicted %v", i, p, err, rerr, evicted)
		}
		if i == 0 {
			continue
		}
		// The reply first: the original's frame below refreshes its entry.
		ret, out := r.toGuest(t, l4Frame(unix.IPPROTO_TCP, otherMAC, picked[p], netip.AddrPortFrom(guestIP, p), 0x10, 0))
		if want := (tuple{vip, netip.AddrPortFrom(guestIP, p)}); ret != tcxRedirect || checkFrame(t, out) != want {
			t.Errorf("connection %d (port %d): reply verdict %d, reverse NAT gave %v, want %v", i, p, ret, checkFrame(t, out), want)
		}
		_, out = r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, p), vip, 0x10, 0))
		if got := checkFrame(t, out).dst; got != picked[p] {
			t.Errorf("connection %d (port %d) moved from %v to %v", i, p, picked[p], got)
		}
	}
}

// TestLBSlotAddress: rr and wrr slots that carry their real server's address (as the
// dataplane writes them) are scheduled from the slot alone: with the real server's kdp_lb_be
// entry gone, their new connections still reach it, while a slot without the address (as an
// older agent wrote it) is looked up and finds no real server.
func TestLBSlotAddress(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	other := netip.MustParseAddrPort("10.0.0.11:8081")
	for i, s := range []netip.AddrPort{backend, other} {
		if err := r.lb.PutBackend(uint32(7+i), maps.Backend{Addr: s, Weight: 1}); err != nil {
			t.Fatal(err)
		}
	}
	pick := func(sport uint16) (int32, netip.AddrPort) {
		t.Helper()
		ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, sport), vip, 0x02, 0))
		if ret != tcxRedirect {
			return ret, netip.AddrPort{}
		}
		return ret, checkFrame(t, out).dst
	}
	for _, c := range []struct {
		name  string
		spec  maps.ServiceSpec
		picks []netip.AddrPort
	}{
		{"rr", maps.ServiceSpec{Sched: maps.SchedRR, Slots: []uint32{7, 8}, Addrs: []netip.AddrPort{backend, other}}, []netip.AddrPort{backend, other, backend}},
		{"wrr", maps.ServiceSpec{Sched: maps.SchedWRR, Slots: []uint32{8, 7}, Weights: []uint16{2, 1}, Addrs: []netip.AddrPort{other, backend}}, []netip.AddrPort{other, backend, other}},
	} {
		c.spec.VIP, c.spec.Proto, c.spec.ID = vip, unix.IPPROTO_TCP, 3
		if err := r.lb.PutService(0, c.spec); err != nil {
			t.Fatal(err)
		}
		for i, want := range c.picks {
			if _, got := pick(uint16(2000 + 10*len(c.name) + i)); got != want {
				t.Errorf("%s: connection %d went to %v, want %v", c.name, i, got, want)
			}
		}
	}
	// Without kdp_lb_be entries: the slots' addresses are enough; slots without them are not.
	r.lb.Backend.Delete(uint32(7))
	r.lb.Backend.Delete(uint32(8))
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}, Addrs: []netip.AddrPort{backend}})
	if ret, got := pick(3000); got != backend {
		t.Errorf("slot with the address, no kdp_lb_be entry: verdict %d, went to %v, want %v", ret, got, backend)
	}
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}})
	if ret, _ := pick(3001); ret != tcxDrop {
		t.Errorf("slot without the address, no kdp_lb_be entry: verdict %d, want drop", ret)
	}
}

// TestLBUDPZeroChecksum: a UDP frame without checksum stays without one.
func TestLBUDPZeroChecksum(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	r.lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1})
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_UDP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}})
	f := l4Frame(unix.IPPROTO_UDP, guestMAC, client, vip, 0, 20)
	f[14+20+6], f[14+20+7] = 0, 0
	_, out := r.fromGuest(t, f)
	if c := binary.BigEndian.Uint16(out[14+20+6:]); c != 0 {
		t.Errorf("UDP checksum 0 became %#04x", c)
	}
	checkFrame(t, out)
}

// TestLBSchedulers: the datapath follows the slot tables (rr/wrr/sh) and the least-connection
// scan (wlc, lc, sed, nq) as IPVS would; no real server means a counted drop.
func TestLBSchedulers(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	servers := map[uint32]netip.AddrPort{}
	for id := uint32(1); id <= 3; id++ {
		servers[id] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(id)}), 80)
		if err := r.lb.PutBackend(id, maps.Backend{Addr: servers[id], Weight: uint16(id)}); err != nil {
			t.Fatal(err)
		}
	}
	pick := func(sport uint16) netip.AddrPort {
		t.Helper()
		ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, sport), vip, 0x02, 0))
		if ret != tcxRedirect {
			t.Fatalf("verdict %d", ret)
		}
		return checkFrame(t, out).dst
	}

	// wrr: IPVS's walk over the servers in kernel order (3, 2, 1 with weights 3, 2, 1) picks
	// 3, 2, 1, 3, 3, 2 and repeats (ipvs.WRRSequence).
	seq := []uint32{3, 2, 1, 3, 3, 2}
	wrr := maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedWRR, Slots: []uint32{3, 2, 1}, Weights: []uint16{3, 2, 1}}
	if err := r.lb.PutService(0, wrr); err != nil {
		t.Fatal(err)
	}
	for i := range 12 {
		if got, want := pick(uint16(1000+i)), servers[seq[i%len(seq)]]; got != want {
			t.Errorf("wrr connection %d went to %v, want %v", i, got, want)
		}
	}
	// An established connection keeps its server across an edit.
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedRR, Slots: []uint32{1}})
	if got := pick(1000); got != servers[3] {
		t.Errorf("established connection moved to %v after an edit", got)
	}
	if got := pick(2000); got != servers[1] {
		t.Errorf("new connection after the edit went to %v", got)
	}

	// wlc: overhead (active*256+inactive)/weight, least wins, kernel order breaks ties.
	r.lb.SetConns(1, maps.LBConns{Active: 1}) // 256/1
	r.lb.SetConns(2, maps.LBConns{Active: 2}) // 512/2
	r.lb.SetConns(3, maps.LBConns{Active: 2}) // 512/3
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedWLC, Slots: []uint32{3, 2, 1}})
	if got := pick(3000); got != servers[3] {
		t.Errorf("wlc picked %v, want %v", got, servers[3])
	}
	// lc ignores weights: 1 has the fewest.
	r.lb.SetConns(3, maps.LBConns{Active: 2})
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedLC, Slots: []uint32{3, 2, 1}})
	if got := pick(3001); got != servers[1] {
		t.Errorf("lc picked %v, want %v", got, servers[1])
	}
	// nq: an idle server wins at once.
	r.lb.SetConns(2, maps.LBConns{})
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedNQ, Slots: []uint32{3, 2, 1}})
	if got := pick(3002); got != servers[2] {
		t.Errorf("nq picked %v, want the idle %v", got, servers[2])
	}
	// Weight 0 is never picked.
	r.lb.PutBackend(2, maps.Backend{Addr: servers[2], Weight: 0})
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedLC, Slots: []uint32{2}})
	ret, _ := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, 4000), vip, 0x02, 0))
	if ret != tcxDrop {
		t.Errorf("service with only a quiesced server: verdict %d, want drop", ret)
	}
	// sh: the bucket of the source address.
	table := make([]uint32, maps.HashBuckets)
	for i := range table {
		table[i] = uint32(i%3) + 1
	}
	r.lb.PutBackend(2, maps.Backend{Addr: servers[2], Weight: 2})
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedSH, Buckets: table}); err != nil {
		t.Fatal(err)
	}
	if got, want := pick(5000), servers[table[ipvs.SHHash(guestIP)]]; got != want {
		t.Errorf("sh picked %v, want %v (bucket %d)", got, want, ipvs.SHHash(guestIP))
	}
	// dh: the bucket of the destination (the VIP).
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 10, Sched: maps.SchedDH, Buckets: table})
	if got, want := pick(5001), servers[table[ipvs.DHHash(vip.Addr())]]; got != want {
		t.Errorf("dh picked %v, want %v (bucket %d)", got, want, ipvs.DHHash(vip.Addr()))
	}
}

// TestLBWRRWalk: the datapath's wrr walk picks exactly ipvs.WRRSequence for weights whose
// period is long, from the first pick, and starts again from it after an edit (a new
// revision); a service of five real servers is one service-map entry (its master holds its
// slots) whatever its weights.
func TestLBWRRWalk(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	weights := []int{7, 0, 12, 5, 30} // kernel order; period (7+12+5+30)/1 = 54
	var ids []uint32
	for i, w := range weights {
		id := uint32(100 + i)
		ids = append(ids, id)
		if err := r.lb.PutBackend(id, maps.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i + 1)}), 80), Weight: uint16(w)}); err != nil {
			t.Fatal(err)
		}
	}
	reduced, _ := ipvs.WRRWeights(weights)
	spec := maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_UDP, ID: 20, Sched: maps.SchedWRR, Slots: ids}
	for _, w := range reduced {
		spec.Weights = append(spec.Weights, uint16(w))
	}
	want := ipvs.WRRSequence(weights)
	for round := range 2 { // the second round after an edit that changes nothing but the revision
		if err := r.lb.PutService(0, spec); err != nil {
			t.Fatal(err)
		}
		for i := range 2 * len(want) {
			ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_UDP, guestMAC, netip.AddrPortFrom(guestIP, uint16(10000+round*1000+i)), vip, 0, 8))
			if ret != tcxRedirect {
				t.Fatalf("round %d pick %d: verdict %d", round, i, ret)
			}
			got := checkFrame(t, out).dst.Addr().As4()
			if w := want[i%len(want)]; int(got[3]) != w+1 {
				t.Fatalf("round %d pick %d went to server %d, want %d (sequence %v)", round, i, got[3]-1, w, want)
			}
		}
	}
	var m struct{ slots int }
	all, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](r.lb.Svc)
	if err != nil {
		t.Fatal(err)
	}
	m.slots = len(all)
	if m.slots != 1 {
		t.Errorf("wrr service takes %d service-map entries, want 1", m.slots)
	}
}

// TestLBSlotBlocks: services of every size pick as their slots say, whether the slots are all
// in the master (up to maps.InlineSlots) or partly in slot blocks: rr's sequence, wrr's walk
// and the least-connection scan (its least loaded server placed last, in the last block), over
// IPv4 and IPv6, written one by one (PutService) or in a restore (PutServices); a service
// takes its master and its blocks in the service map, and an edit that shrinks it leaves no
// block behind.
func TestLBSlotBlocks(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	const most = 64
	addr4 := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 3, byte(i >> 8), byte(i)}), 80)
	}
	addr6 := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("fd00:3::%x", i)), 8080)
	}
	for i := 1; i <= most; i++ {
		if err := r.lb.PutBackend(uint32(i), maps.Backend{Addr: addr4(i), Weight: 1}); err != nil {
			t.Fatal(err)
		}
		if err := r.lb.PutBackend(uint32(1000+i), maps.Backend{Addr: addr6(i), Weight: 1}); err != nil {
			t.Fatal(err)
		}
	}
	vip6 := netip.MustParseAddrPort("[2001:db8::30]:80")
	sport := uint16(1000)
	pick := func(v6 bool) netip.AddrPort {
		t.Helper()
		sport++
		if v6 {
			ret, out := r.fromGuest6(t, lbFrame6(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(netip.MustParseAddr("fd00:1::2"), sport), vip6, 0x02, 0))
			if ret != tcxRedirect {
				t.Fatalf("verdict %d", ret)
			}
			return lbCheckFrame6(t, out).dst
		}
		ret, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, netip.AddrPortFrom(guestIP, sport), vip, 0x02, 0))
		if ret != tcxRedirect {
			t.Fatalf("verdict %d", ret)
		}
		return checkFrame(t, out).dst
	}
	entries := func() int {
		t.Helper()
		all, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](r.lb.Svc)
		if err != nil {
			t.Fatal(err)
		}
		return len(all)
	}
	id := uint32(10)
	for _, n := range []int{1, maps.InlineSlots, maps.InlineSlots + 1, 20, most} {
		for _, v6 := range []bool{false, true} {
			for _, restore := range []bool{false, true} {
				name := fmt.Sprintf("%d servers, IPv6 %v, restore %v", n, v6, restore)
				// Slots in reverse id order, with their addresses for IPv4.
				spec := maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, Sched: maps.SchedRR}
				at := addr4
				if v6 {
					spec.VIP, at = vip6, addr6
				}
				srv := func(i int) uint32 { // server i's id
					if v6 {
						return uint32(1000 + i)
					}
					return uint32(i)
				}
				for i := n; i >= 1; i-- {
					spec.Slots = append(spec.Slots, srv(i))
					spec.Addrs = append(spec.Addrs, at(i))
				}
				put := func(s maps.ServiceSpec) {
					t.Helper()
					id++
					s.ID = id
					var err error
					if restore { // as control/dataplane's RestoreLB: the counters claimed beside
						r.lb.DeleteGeneration(0)
						err = errors.Join(r.lb.PutServices(0, []maps.ServiceSpec{s}), r.lb.ClaimCounters([]uint32{id}, nil, false))
					} else {
						err = r.lb.PutService(0, s)
					}
					if err != nil {
						t.Fatalf("%s: %v", name, err)
					}
				}
				// The master (IPv4; IPv6's is in its own map) and the slot blocks.
				want := (n - 1) / maps.InlineSlots
				if !v6 {
					want++
				}
				count := func(after string) {
					t.Helper()
					if got := entries(); got != want {
						t.Errorf("%s, after %s: %d service-map entries, want %d", name, after, got, want)
					}
				}
				r.lb.DeleteGeneration(0)
				// rr: the sequence, twice round.
				put(spec)
				count("rr")
				for i := range 2 * n {
					if got, want := pick(v6), at(n-i%n); got != want {
						t.Fatalf("%s: rr connection %d went to %v, want %v", name, i, got, want)
					}
				}
				// wrr, weights 1..n reduced by their gcd (1): ipvs.WRRSequence.
				w := make([]int, n)
				wrr := spec
				wrr.Sched, wrr.Weights = maps.SchedWRR, make([]uint16, n)
				for i := range w {
					w[i] = 1 + i%3
					wrr.Weights[i] = uint16(w[i])
				}
				put(wrr)
				count("wrr")
				seq := ipvs.WRRSequence(w)
				for i := range min(len(seq), 3*most) {
					if got, want := pick(v6), at(n-seq[i]); got != want {
						t.Fatalf("%s: wrr connection %d went to %v, want %v", name, i, got, want)
					}
				}
				// wlc without the slots' addresses: every server has one active connection
				// but the last slot's.
				lc := spec
				lc.Sched, lc.Addrs = maps.SchedWLC, nil
				for i := 1; i <= n; i++ {
					c := maps.LBConns{Active: 1}
					if i == 1 {
						c = maps.LBConns{}
					}
					if err := r.lb.SetConns(srv(i), c); err != nil {
						t.Fatal(err)
					}
				}
				put(lc)
				count("wlc")
				if got, want := pick(v6), at(1); got != want {
					t.Errorf("%s: wlc picked %v, want the idle %v", name, got, want)
				}
			}
		}
	}
	// Shrinking a service frees its blocks; the master takes the new slots.
	r.lb.DeleteGeneration(0)
	big := maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 99, Sched: maps.SchedRR}
	for i := 1; i <= most; i++ {
		big.Slots = append(big.Slots, uint32(i))
	}
	if err := r.lb.PutService(0, big); err != nil {
		t.Fatal(err)
	}
	small := maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 99, Sched: maps.SchedRR, Slots: []uint32{2, 1}, Addrs: []netip.AddrPort{addr4(2), addr4(1)}}
	if err := r.lb.PutService(0, small); err != nil {
		t.Fatal(err)
	}
	if got := entries(); got != 1 {
		t.Errorf("after shrinking to 2 servers: %d service-map entries, want 1", got)
	}
	for i := range 4 {
		if got, want := pick(false), small.Addrs[i%2]; got != want {
			t.Errorf("after shrinking: connection %d went to %v, want %v", i, got, want)
		}
	}
	if err := r.lb.DeleteService(0, vip, unix.IPPROTO_TCP); err != nil {
		t.Fatal(err)
	}
	if got := entries(); got != 0 {
		t.Errorf("after deleting the services: %d service-map entries, want 0", got)
	}
}

// lbFrame6 builds Ethernet + IPv6 + TCP (flags) or UDP with a correct checksum.
func lbFrame6(proto uint8, src net.HardwareAddr, s, d netip.AddrPort, tcpFlags uint8, payload int) []byte {
	l4len := 8
	if proto == unix.IPPROTO_TCP {
		l4len = 20
	}
	ip := make([]byte, 40+l4len+payload)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(l4len+payload))
	ip[6] = proto
	ip[7] = 64
	sa, da := s.Addr().As16(), d.Addr().As16()
	copy(ip[8:], sa[:])
	copy(ip[24:], da[:])
	l4 := ip[40:]
	binary.BigEndian.PutUint16(l4[0:], s.Port())
	binary.BigEndian.PutUint16(l4[2:], d.Port())
	for i := range payload {
		l4[l4len+i] = byte(i)
	}
	if proto == unix.IPPROTO_TCP {
		l4[12] = 5 << 4
		l4[13] = tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 65535)
	} else {
		binary.BigEndian.PutUint16(l4[4:], uint16(l4len+payload))
	}
	f := append(ethHdr(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, unix.ETH_P_IPV6), ip...)
	binary.BigEndian.PutUint16(f[14+40+lbCsumOff(proto):], lbCsum6(f))
	return f
}

func lbCsumOff(proto uint8) int {
	if proto == unix.IPPROTO_UDP {
		return 6
	}
	return 16
}

// lbCsum6 computes the TCP/UDP checksum of the IPv6 frame with the checksum field zeroed.
func lbCsum6(frame []byte) uint16 {
	ip := frame[14:]
	proto := ip[6]
	l4 := append([]byte(nil), ip[40:40+int(binary.BigEndian.Uint16(ip[4:]))]...)
	off := lbCsumOff(proto)
	l4[off], l4[off+1] = 0, 0
	pseudo := make([]byte, 40)
	copy(pseudo, ip[8:40])
	binary.BigEndian.PutUint32(pseudo[32:], uint32(len(l4)))
	pseudo[39] = proto
	c := ^fold(csumAdd(csumAdd(0, pseudo), l4))
	if c == 0 && proto == unix.IPPROTO_UDP {
		c = 0xffff
	}
	return c
}

// lbCheckFrame6 verifies the L4 checksum of an IPv6 frame and returns its addresses.
func lbCheckFrame6(t *testing.T, f []byte) tuple {
	t.Helper()
	ip := f[14:]
	off := 14 + 40 + lbCsumOff(ip[6])
	if got, want := binary.BigEndian.Uint16(f[off:]), lbCsum6(f); got != want {
		t.Errorf("L4 checksum %#04x, want %#04x", got, want)
	}
	a := func(b []byte) netip.Addr { return netip.AddrFrom16([16]byte(b)) }
	return tuple{
		netip.AddrPortFrom(a(ip[8:24]), binary.BigEndian.Uint16(ip[40:])),
		netip.AddrPortFrom(a(ip[24:40]), binary.BigEndian.Uint16(ip[42:])),
	}
}

// fromGuest6 is fromGuest with anti-spoofing off: these tests are about the load balancer, and
// the NIC has no IPv6 address for the IPv6 checks (guard.h) to accept.
func (r *lbRig) fromGuest6(t *testing.T, f []byte) (int32, []byte) {
	t.Helper()
	r.eps.Put(1, tapEndpoint(0, 42, 0))
	return runOut(t, r.tapIn, f)
}

// TestLBNAT6 (issue 12): an IPv6 service: DNAT of the guest's TCP and UDP to the real server
// and reverse NAT of the replies, with the L4 checksums correct after the rewrite (the IPv6
// addresses are in the pseudo header); persistence by a /64 prefix; sh over IPv6 sources.
func TestLBNAT6(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	vip6 := netip.MustParseAddrPort("[2001:db8::10]:80")
	servers := map[uint32]netip.AddrPort{
		61: netip.MustParseAddrPort("[fd00::4]:8080"),
		62: netip.MustParseAddrPort("[fd00::5]:8080"),
	}
	for id, a := range servers {
		if err := r.lb.PutBackend(id, maps.Backend{Addr: a, Weight: 1}); err != nil {
			t.Fatal(err)
		}
	}
	client6 := netip.MustParseAddrPort("[fd00:1::2]:40000")
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: proto, ID: 60 + uint32(proto), Sched: maps.SchedRR, Slots: []uint32{61}}); err != nil {
			t.Fatal(err)
		}
		ret, out := r.fromGuest6(t, lbFrame6(proto, guestMAC, client6, vip6, 0x02, 33))
		if ret != tcxRedirect {
			t.Fatalf("proto %d from guest: verdict %d", proto, ret)
		}
		if got, want := lbCheckFrame6(t, out), (tuple{client6, servers[61]}); got != want {
			t.Errorf("proto %d DNAT: %v, want %v", proto, got, want)
		}
		ret, out = r.toGuest(t, lbFrame6(proto, guestMAC, servers[61], client6, 0x12, 17))
		if ret != tcxRedirect {
			t.Fatalf("proto %d to guest: verdict %d", proto, ret)
		}
		if got, want := lbCheckFrame6(t, out), (tuple{vip6, client6}); got != want {
			t.Errorf("proto %d reverse NAT: %v, want %v", proto, got, want)
		}
	}

	// Persistence with -M 64: clients of one /64 stick to the real server the first got.
	mask64 := netip.MustParseAddr("ffff:ffff:ffff:ffff::")
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: unix.IPPROTO_UDP, ID: 77, Sched: maps.SchedRR,
		Slots: []uint32{61, 62}, Persist: 600, PMask: mask64}); err != nil {
		t.Fatal(err)
	}
	pick := func(src netip.AddrPort) netip.AddrPort {
		t.Helper()
		ret, out := r.fromGuest6(t, lbFrame6(unix.IPPROTO_UDP, guestMAC, src, vip6, 0, 8))
		if ret != tcxRedirect {
			t.Fatalf("verdict %d", ret)
		}
		return lbCheckFrame6(t, out).dst
	}
	first := pick(netip.MustParseAddrPort("[fd00:7::1]:1000"))
	for i := range 4 {
		src := netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("fd00:7::%x", 100+i)), uint16(2000+i))
		if got := pick(src); got != first {
			t.Errorf("client %v of the same /64 went to %v, want %v", src, got, first)
		}
	}
	// Another /64 is scheduled afresh (rr: the other server).
	if got := pick(netip.MustParseAddrPort("[fd00:8::1]:1000")); got == first {
		t.Errorf("a client of another /64 stuck to %v", got)
	}

	// sh over IPv6: the bucket of the folded source (ipvs.SHHash).
	table := make([]uint32, maps.HashBuckets)
	for i := range table {
		table[i] = 61 + uint32(i%2)
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: unix.IPPROTO_TCP, ID: 78, Sched: maps.SchedSH, Buckets: table}); err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		src := netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("fd00:9::%x", i+1)), 3000)
		ret, out := r.fromGuest6(t, lbFrame6(unix.IPPROTO_TCP, guestMAC, src, vip6, 0x02, 0))
		if ret != tcxRedirect {
			t.Fatalf("sh: verdict %d", ret)
		}
		if got, want := lbCheckFrame6(t, out).dst, servers[table[ipvs.SHHash(src.Addr())]]; got != want {
			t.Errorf("sh from %v: %v, want %v", src, got, want)
		}
	}
	// Deleting the service frees its entries in both families' maps.
	for _, k := range []struct {
		id    uint32
		proto uint8
	}{{66, unix.IPPROTO_TCP}, {77, unix.IPPROTO_UDP}} {
		if err := r.lb.DeleteService(0, vip6, k.proto); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := r.lb.Usage(); err != nil || got != (maps.Budget{}) {
		t.Errorf("after deleting the IPv6 services the maps hold %v (%v)", got, err)
	}
}

// TestXDPLBNAT6: IPv6 DNAT and reverse NAT in the XDP programs (complete checksums, as a
// guest's virtio-net without offload sends them): the L4 checksums verify afterwards.
func TestXDPLBNAT6(t *testing.T) {
	needRoot(t)
	vip6 := netip.MustParseAddrPort("[2001:db8::10]:80")
	be6 := netip.MustParseAddrPort("[fd00::4]:8080")
	client6 := netip.MustParseAddrPort("[fd00:1::2]:40000")
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		r := newXDPRig(t, "xdplb6")
		m := r.sb.Maps()
		lb := maps.ForSandbox(m).LB
		if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
			t.Fatal(err)
		}
		if err := lb.PutBackend(7, maps.Backend{Addr: be6, Weight: 1}); err != nil {
			t.Fatal(err)
		}
		if err := lb.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: proto, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
			t.Fatal(err)
		}
		r.port(t, 1514, 0)
		for i, flags := range []uint8{0x02, 0x10, 0x18} {
			r.eps.Put(1, tapEndpoint(0, 42, 0)) // the IPv6 checks are not this test's
			ret, out := runXDP(t, r.tap, lbFrame6(proto, guestMAC, client6, vip6, flags, 10+i*100))
			if ret != xdpRedirect {
				t.Fatalf("proto %d: from guest: verdict %d", proto, ret)
			}
			if got := lbCheckFrame6(t, out); got != (tuple{client6, be6}) {
				t.Errorf("proto %d: DNAT gave %v, want %v -> %v", proto, got, client6, be6)
			}
			r.eps.Put(1, maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink})
			ret, out = runXDP(t, r.upl, lbFrame6(proto, otherMAC, be6, client6, flags, 33+i))
			if ret != xdpRedirect {
				t.Fatalf("proto %d: to guest: verdict %d", proto, ret)
			}
			if got := lbCheckFrame6(t, out); got != (tuple{vip6, client6}) {
				t.Errorf("proto %d: reverse NAT gave %v, want %v -> %v", proto, got, vip6, client6)
			}
		}
		st, err := lb.ReadStats(maps.StatsBackend, 7)
		if err != nil {
			t.Fatal(err)
		}
		if st.Conns != 1 || st.Inpkts != 3 || st.Outpkts != 3 {
			t.Errorf("proto %d: real server counters %+v, want 1 conn, 3 in, 3 out", proto, st)
		}
	}
}

// TestLBClockAhead: the load balancer stamps connections with the coarse monotonic clock (the
// last tick), and a connection whose stamp is ahead of it (written from the precise clock, by
// an agent version before, or on another CPU) is fresh, not expired by an unsigned wrap: its
// frames keep their real server. One stamped long ago (past the timeout) is expired: the next
// frame is scheduled again.
func TestLBClockAhead(t *testing.T) {
	needRoot(t)
	r := newLBRig(t)
	r.lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1})
	other := netip.MustParseAddrPort("10.0.0.11:8080")
	r.lb.PutBackend(8, maps.Backend{Addr: other, Weight: 1})
	r.lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7, 8}})
	_, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, client, vip, 0x02, 0))
	first := checkFrame(t, out).dst
	key := loader.DatapathCtKey{Saddr: ne32(client.Addr()), Daddr: ne32(vip.Addr()), Sport: htons(client.Port()), Dport: htons(vip.Port()), Proto: unix.IPPROTO_TCP}
	e, err := r.lb.ConnEntry(key)
	if err != nil {
		t.Fatalf("no connection entry: %v", err)
	}
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	now := uint64(ts.Nano())
	for _, c := range []struct {
		name     string
		seen     uint64
		sameReal bool
	}{
		{"stamp 5 s ahead", now + 5e9, true},
		{"stamp past the 900 s timeout", now - 1000e9, false},
	} {
		e.LastSeen = c.seen
		if err := r.lb.SetConnEntry(key, e); err != nil {
			t.Fatal(err)
		}
		_, out := r.fromGuest(t, l4Frame(unix.IPPROTO_TCP, guestMAC, client, vip, 0x10, 0))
		got := checkFrame(t, out).dst
		if (got == first) != c.sameReal {
			t.Errorf("%s: frame went to %v, first to %v (same real server wanted: %v)", c.name, got, first, c.sameReal)
		}
		if e, err = r.lb.ConnEntry(key); err != nil {
			t.Fatal(err)
		}
		first = got
	}
}

func ne32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}
