package loader_test

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// drain reads every event the ring holds now.
func drain(t *testing.T, r *ringbuf.Reader) []maps.Event {
	t.Helper()
	var out []maps.Event
	r.SetDeadline(time.Now()) // no waiting: what is there is there (the programs ran already)
	for {
		rec, err := r.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(rec.RawSample) != maps.EventSize {
			t.Fatalf("event of %d bytes, want %d", len(rec.RawSample), maps.EventSize)
		}
		e, err := maps.DecodeEvent(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
}

// TestMonitorEvents: one frame of each drop class gives exactly one drop event with the
// reason, NIC slot, direction, ethertype, addresses, ports and protocol of the frame; nothing is
// reported while the monitor is off; traces and new load-balanced connections when asked.
func TestMonitorEvents(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "monitor")
	m := sb.Maps()
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	r := &lbRig{lb: maps.ForSandbox(m).LB, eps: maps.EndpointMap{Map: m.Endpoints}}
	r.tapIn, _ = sb.Program(loader.ProgTapIn)
	mon := maps.MonitorConfig{Map: m.Mon}
	rd, err := ringbuf.NewReader(m.MonEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	const lo, peer, slot = 1, 42, 5
	all := maps.FlagAntiSpoof | maps.FlagStrictEgress
	if err := (maps.RouteTable{Routes: m.Routes, Config: m.Config}).Replace([]maps.Route{{Slot: slot, Dest: netip.MustParsePrefix("10.0.0.0/24")}}); err != nil {
		t.Fatal(err)
	}
	// A service without a usable real server, for lb_no_backend.
	deadVIP := netip.MustParseAddrPort("172.17.0.9:80")
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: deadVIP, Proto: unix.IPPROTO_TCP, ID: 4, Sched: maps.SchedRR, Slots: []uint32{99}}); err != nil {
		t.Fatal(err)
	}
	dst := netip.MustParseAddr("172.16.0.1")
	udp := func(src net.HardwareAddr, s netip.Addr, d netip.Addr) []byte { return udpFrame(src, s, d, 16) }
	cases := []struct {
		name   string
		frame  []byte
		reason maps.DropReason
		src    netip.AddrPort
		dst    netip.AddrPort
		proto  uint8
		etype  uint16
	}{
		{"spoof_mac", udp(otherMAC, guestIP, dst), maps.DropSpoofMAC, netip.AddrPortFrom(guestIP, 40000), netip.AddrPortFrom(dst, 5000), unix.IPPROTO_UDP, unix.ETH_P_IP},
		{"spoof_ip", udp(guestMAC, netip.MustParseAddr("172.16.0.99"), dst), maps.DropSpoofIP, netip.MustParseAddrPort("172.16.0.99:40000"), netip.AddrPortFrom(dst, 5000), unix.IPPROTO_UDP, unix.ETH_P_IP},
		{"spoof_arp", arpFrame(guestMAC, otherMAC, guestIP, dst), maps.DropSpoofARP, netip.AddrPort{}, netip.AddrPort{}, 0, unix.ETH_P_ARP},
		{"egress_no_route", udp(guestMAC, guestIP, netip.MustParseAddr("10.9.0.1")), maps.DropEgressNoRoute, netip.AddrPortFrom(guestIP, 40000), netip.MustParseAddrPort("10.9.0.1:5000"), unix.IPPROTO_UDP, unix.ETH_P_IP},
		{"malformed", arpFrame(guestMAC, guestMAC, guestIP, guestIP)[:30], maps.DropMalformed, netip.AddrPort{}, netip.AddrPort{}, 0, unix.ETH_P_ARP},
		{"lb_no_backend", l4Frame(unix.IPPROTO_TCP, guestMAC, client, deadVIP, 0x02, 0), maps.DropLBNoBackend, client, deadVIP, unix.IPPROTO_TCP, unix.ETH_P_IP},
	}
	run1 := func(f []byte) {
		r.eps.Put(lo, tapEndpoint(slot, peer, all))
		run(t, r.tapIn, lo, append([]byte(nil), f...))
	}

	// Off: drops are counted, not reported.
	for _, tc := range cases {
		run1(tc.frame)
	}
	if ev := drain(t, rd); len(ev) != 0 {
		t.Fatalf("monitor off reported %d events", len(ev))
	}

	if err := mon.Set(maps.MonitorDrop, 0, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			run1(tc.frame)
			ev := drain(t, rd)
			if len(ev) != 1 {
				t.Fatalf("%d events, want 1: %+v", len(ev), ev)
			}
			e := ev[0]
			want := maps.Event{Time: e.Time, Ifindex: lo, Slot: slot, Len: uint32(len(tc.frame)), Type: maps.EventDrop, Dir: maps.FromGuest,
				Reason: tc.reason, Ethertype: tc.etype, Proto: tc.proto, Src: tc.src, Dst: tc.dst}
			if e != want {
				t.Errorf("event\n%+v, want\n%+v", e, want)
			}
		})
	}
	// An honest frame is forwarded without a drop event; with traces on it gives a trace.
	honest := udp(guestMAC, guestIP, dst)
	run1(honest)
	if ev := drain(t, rd); len(ev) != 0 {
		t.Errorf("forwarded frame reported %+v with only drops asked", ev)
	}
	if err := mon.Set(maps.MonitorDrop|maps.MonitorTrace|maps.MonitorLB, 0, 0); err != nil {
		t.Fatal(err)
	}
	run1(honest)
	ev := drain(t, rd)
	if len(ev) != 1 || ev[0].Type != maps.EventTrace || ev[0].Slot != slot || ev[0].Dst != netip.AddrPortFrom(dst, 5000) {
		t.Errorf("trace of a forwarded frame: %+v", ev)
	}
	// A new load-balanced connection: one lb event with the VIP and the real server (and the
	// trace of the frame, now addressed to the real server).
	r.putRRService(t)
	run1(l4Frame(unix.IPPROTO_TCP, guestMAC, client, vip, 0x02, 0))
	run1(l4Frame(unix.IPPROTO_TCP, guestMAC, client, vip, 0x10, 0)) // the same connection: no new lb event
	ev = drain(t, rd)
	var lb, traces int
	for _, e := range ev {
		switch e.Type {
		case maps.EventLB:
			lb++
			if e.Src != client || e.Dst != vip || e.Server != backend || e.Proto != unix.IPPROTO_TCP || e.Ifindex != lo || e.Slot != maps.NoSlot {
				t.Errorf("lb event %+v, want %v -> %v via %v", e, client, vip, backend)
			}
		case maps.EventTrace:
			traces++
			if e.Dst != backend {
				t.Errorf("trace after DNAT to %v, want %v", e.Dst, backend)
			}
		}
	}
	if lb != 1 || traces != 2 {
		t.Errorf("%d lb and %d trace events, want 1 and 2: %+v", lb, traces, ev)
	}
	// Off again: nothing.
	mon.Set(0, 0, 0)
	run1(cases[0].frame)
	run1(honest)
	if ev := drain(t, rd); len(ev) != 0 {
		t.Errorf("monitor switched off still reports %+v", ev)
	}
}

// TestMonitorRateLimit: a flood of bad frames gets through the per-CPU token bucket at most
// its burst (plus what the bucket refills during the flood), and every event it suppressed is
// accounted for: in the suppressed count of the next event, or pending in the bucket.
func TestMonitorRateLimit(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "monrate")
	m := sb.Maps()
	eps := maps.EndpointMap{Map: m.Endpoints}
	tapIn, _ := sb.Program(loader.ProgTapIn)
	rd, err := ringbuf.NewReader(m.MonEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	if err := eps.Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof)); err != nil {
		t.Fatal(err)
	}
	const burst, rate, flood = 20, 1, 5000 // 1 event/s: the flood takes well under a second per refill
	if err := (maps.MonitorConfig{Map: m.Mon}).Set(maps.MonitorDrop, rate, burst); err != nil {
		t.Fatal(err)
	}
	bad := udpFrame(otherMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 16)
	start := time.Now()
	for range flood {
		run(t, tapIn, 1, append([]byte(nil), bad...))
	}
	// Each CPU has its bucket (the test may move between CPUs), refilled rate/s, and to full
	// after an idle second: over a flood of d seconds at most burst*CPUs*(d+1) events pass (d
	// is 0 unless the machine stalls the test).
	refills := (int(time.Since(start).Seconds()) + 1) * ebpf.MustPossibleCPU()
	ev := drain(t, rd)
	var reported uint64
	for _, e := range ev {
		reported += uint64(e.Suppressed)
	}
	pending, err := (maps.MonitorPending{Map: m.MonRL}).Take()
	if err != nil {
		t.Fatal(err)
	}
	if len(ev) < burst || len(ev) > burst*refills {
		t.Errorf("%d events got through buckets of %d (%d bucket fills at most)", len(ev), burst, refills)
	}
	if got := uint64(len(ev)) + reported + pending; got != flood {
		t.Errorf("events %d + suppressed in events %d + pending %d = %d, want the %d frames", len(ev), reported, pending, got, flood)
	}
	st, _ := maps.StatsMap{Map: m.Stats}.Read(0, maps.FromGuest)
	if st.Drops[maps.DropSpoofMAC] != flood {
		t.Errorf("counter says %d drops, want %d: the rate limit must not touch the counters", st.Drops[maps.DropSpoofMAC], flood)
	}
	if again, _ := (maps.MonitorPending{Map: m.MonRL}).Take(); again != 0 {
		t.Errorf("Take left %d pending", again)
	}
}

// TestMonitorEveryDropClass: every drop class of the guard (issue 12's table, IPv6, NDP, RA,
// VLAN, ethertypes included) gives exactly one drop event with its reason, in tc and in XDP:
// drops reach the monitor through drop_frame whatever their reason.
func TestMonitorEveryDropClass(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "monguard")
	m := sb.Maps()
	v := maps.ForSandbox(m)
	tapIn, _ := sb.Program(loader.ProgTapIn)
	xdpTap, _ := sb.Program(loader.ProgXDPTap)
	if err := v.XDP.Set("", 1, 1, maps.XDPPort{MaxLen: 1514}); err != nil {
		t.Fatal(err)
	}
	if err := v.Routes.Replace([]maps.Route{
		{Slot: 3, Dest: netip.MustParsePrefix("10.8.0.0/16")},
		{Slot: 3, Dest: netip.MustParsePrefix("2001:db8:8::/48"), Gateway: gatewayIP6},
	}); err != nil {
		t.Fatal(err)
	}
	rd, err := ringbuf.NewReader(m.MonEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	// A bucket no test run empties: this test counts events, not the rate limit.
	if err := (maps.MonitorConfig{Map: m.Mon}).Set(maps.MonitorDrop, 1000000, 1000000); err != nil {
		t.Fatal(err)
	}
	seen := map[maps.DropReason]bool{}
	for _, c := range guardCases() {
		if c.reason < 0 {
			continue
		}
		for _, hook := range []string{"tc", "xdp"} {
			if hook == "tc" && c.xdp {
				continue
			}
			t.Run(hook+"/"+c.name, func(t *testing.T) {
				if err := v.Endpoints.Put(1, c.ep); err != nil {
					t.Fatal(err)
				}
				if hook == "tc" {
					run(t, tapIn, 1, append([]byte(nil), c.frame...))
				} else {
					runXDP(t, xdpTap, append([]byte(nil), c.frame...))
				}
				ev := drain(t, rd)
				if len(ev) != 1 {
					t.Fatalf("%d events, want 1: %+v", len(ev), ev)
				}
				e := ev[0]
				if e.Type != maps.EventDrop || e.Reason != c.reason || e.Slot != c.ep.Slot || e.Dir != maps.FromGuest ||
					e.Ifindex != 1 || e.Len != uint32(len(c.frame)) || (len(c.frame) >= 14 && e.Ethertype != binary.BigEndian.Uint16(c.frame[12:])) {
					t.Errorf("event %+v, want a %s drop of slot %d, %d bytes, ethertype %#04x", e, c.reason, c.ep.Slot, len(c.frame), binary.BigEndian.Uint16(c.frame[12:]))
				}
				// An IPv6 frame's source, as the guard parsed it.
				if e.Ethertype == unix.ETH_P_IPV6 && len(c.frame) >= 54 && e.Src.IsValid() {
					if want := netip.AddrFrom16([16]byte(c.frame[22:38])); e.Src.Addr() != want {
						t.Errorf("source %v, want %v", e.Src.Addr(), want)
					}
				}
				seen[c.reason] = true
			})
		}
	}
	for _, r := range maps.DropReasons() {
		switch r {
		case maps.DropLBNoBackend, maps.DropLBRewrite, maps.DropSpoofMAC, maps.DropSpoofIP, maps.DropSpoofARP, maps.DropEgressNoRoute:
			continue // TestMonitorEvents has them
		}
		if !seen[r] {
			t.Errorf("no guard case dropped for %s: add one", r)
		}
	}
}

// TestMonitorLB6: a new connection to an IPv6 service is reported with the VIP and the IPv6
// real server chosen.
func TestMonitorLB6(t *testing.T) {
	needRoot(t)
	sb := openSandbox(t, testRoot(t), "monlb6")
	m := sb.Maps()
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	r := &lbRig{lb: maps.ForSandbox(m).LB, eps: maps.ForSandbox(m).Endpoints}
	r.tapIn, _ = sb.Program(loader.ProgTapIn)
	rd, err := ringbuf.NewReader(m.MonEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	if err := (maps.MonitorConfig{Map: m.Mon}).Set(maps.MonitorLB, 0, 0); err != nil {
		t.Fatal(err)
	}
	vip6 := netip.MustParseAddrPort("[2001:db8::10]:80")
	server := netip.MustParseAddrPort("[fd00::4]:8080")
	client6 := netip.MustParseAddrPort("[fd00:1::2]:40000")
	if err := r.lb.PutBackend(61, maps.Backend{Addr: server, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.lb.PutService(0, maps.ServiceSpec{VIP: vip6, Proto: unix.IPPROTO_TCP, ID: 60, Sched: maps.SchedRR, Slots: []uint32{61}}); err != nil {
		t.Fatal(err)
	}
	r.fromGuest6(t, lbFrame6(unix.IPPROTO_TCP, guestMAC, client6, vip6, 0x02, 0))
	ev := drain(t, rd)
	if len(ev) != 1 {
		t.Fatalf("%d events, want 1: %+v", len(ev), ev)
	}
	e := ev[0]
	if e.Type != maps.EventLB || e.Src != client6 || e.Dst != vip6 || e.Server != server || e.Ethertype != unix.ETH_P_IPV6 || e.Proto != unix.IPPROTO_TCP {
		t.Errorf("lb event %+v, want %v -> %v via %v", e, client6, vip6, server)
	}
}
