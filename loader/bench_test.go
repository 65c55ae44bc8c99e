package loader_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// BenchmarkFastPath measures, with BPF_PROG_TEST_RUN repeating each run 1000 times, what the
// programs cost the common frame: one that passes every check and is redirected, tc and XDP,
// from the guest (anti-spoofing and strict egress on; to its subnet, or through a route) and to
// it, with the load balancer off and on (services loaded, none of them the frame's). The
// frames are not rewritten on these paths, so repeating them is sound. It reports the median
// and the mean ns per frame over b.N rounds (the kernel reports whole ns per run).
func BenchmarkFastPath(b *testing.B) {
	needRoot(b)
	sb := openSandbox(b, testRoot(b), "fastpath")
	v := maps.ForSandbox(sb.Maps())
	prog := func(p loader.Program) *ebpf.Program {
		x, err := sb.Program(p)
		if err != nil {
			b.Fatal(err)
		}
		return x
	}
	if err := v.Routes.Replace([]maps.Route{{Slot: 0, Dest: netip.MustParsePrefix("10.8.0.0/16")}}); err != nil {
		b.Fatal(err)
	}
	if err := v.XDP.Set("", 1, 1, maps.XDPPort{MaxLen: 1518}); err != nil {
		b.Fatal(err)
	}
	lb := func(on bool) {
		cfg := maps.Config{TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}
		if on {
			cfg.Flags = maps.ConfigLB
		}
		cfg.RouteGen = must(maps.ReadConfig(v.LB.Config)).RouteGen
		if err := maps.WriteConfig(v.LB.Config, cfg); err != nil {
			b.Fatal(err)
		}
	}
	for i := range 16 {
		vip := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)}), 80)
		if err := v.LB.PutBackend(uint32(i+1), maps.Backend{Addr: netip.MustParseAddrPort("172.16.9.9:8080"), Weight: 1}); err != nil {
			b.Fatal(err)
		}
		if err := v.LB.PutService(0, maps.ServiceSpec{VIP: vip, Proto: 17, ID: uint32(100 + i), Sched: maps.SchedRR, Slots: []uint32{uint32(i + 1)}}); err != nil {
			b.Fatal(err)
		}
	}
	all := maps.FlagAntiSpoof | maps.FlagStrictEgress
	tapEP := tapEndpoint(0, 42, all)
	upEP := maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink}
	subnet := udpFrame(guestMAC, guestIP, netip.MustParseAddr("172.16.0.1"), 32)
	routed := udpFrame(guestMAC, guestIP, netip.MustParseAddr("10.8.3.4"), 32)
	toGuest := udpFrame(otherMAC, netip.MustParseAddr("172.16.0.1"), guestIP, 32)
	for _, c := range []struct {
		name  string
		p     loader.Program
		ep    maps.Endpoint
		frame []byte
		lb    bool
		want  uint32
	}{
		{"tc-from-guest", loader.ProgTapIn, tapEP, subnet, false, tcxRedirect},
		{"tc-from-guest-routed", loader.ProgTapIn, tapEP, routed, false, tcxRedirect},
		{"tc-from-guest-lb", loader.ProgTapIn, tapEP, subnet, true, tcxRedirect},
		{"tc-to-guest", loader.ProgUplinkIn, upEP, toGuest, false, tcxRedirect},
		{"tc-to-guest-lb", loader.ProgUplinkIn, upEP, toGuest, true, tcxRedirect},
		{"xdp-from-guest", loader.ProgXDPTap, tapEP, subnet, false, xdpRedirect},
		{"xdp-from-guest-lb", loader.ProgXDPTap, tapEP, subnet, true, xdpRedirect},
		{"xdp-to-guest", loader.ProgXDPUplink, upEP, toGuest, false, xdpRedirect},
	} {
		b.Run(c.name, func(b *testing.B) {
			if err := v.Endpoints.Put(1, c.ep); err != nil {
				b.Fatal(err)
			}
			lb(c.lb)
			// Without a context the kernel runs the program on the loopback device
			// (ifindex 1), the device whose entries are set here.
			p := prog(c.p)
			var ds []time.Duration
			for range b.N {
				ret, d, err := p.Benchmark(c.frame, 1000, nil)
				if err != nil {
					b.Fatal(err)
				}
				if ret != c.want {
					b.Fatalf("verdict %d, want %d", int32(ret), int32(c.want))
				}
				ds = append(ds, d)
			}
			var sum time.Duration
			for _, d := range ds {
				sum += d
			}
			slices.Sort(ds)
			b.ReportMetric(float64(ds[len(ds)/2].Nanoseconds()), "median-ns/frame")
			b.ReportMetric(float64(sum.Nanoseconds())/float64(len(ds)), "mean-ns/frame")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
