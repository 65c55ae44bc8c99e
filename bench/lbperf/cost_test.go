package lbperf

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/lbcost"
	"github.com/kata-dp/kata-dp/maps"
)

// costVariants are BenchmarkLBCost's programs: the product's kdp_tap_in, the breakdown build
// with nothing left out ("full"), and the build with one part left out (or done twice) each.
var costVariants = []lbcost.Part{
	0, lbcost.Prefilter, lbcost.CTMiss, lbcost.Master2, lbcost.Sched, lbcost.Pick, lbcost.Claim,
	lbcost.Insert, lbcost.Count, lbcost.Plain, lbcost.Mon, lbcost.Rewrite, lbcost.Rem,
	lbcost.CTLookup2, lbcost.Refresh, lbcost.LB,
	lbcost.StopPorts, lbcost.StopLookup, lbcost.StopTouch, lbcost.StopMaster, lbcost.StopSched,
	lbcost.StopInsert, lbcost.StopNAT,
}

// costChains are the stops each path passes, in order, from no load balancer to the whole
// path: the consecutive differences are its parts, and they add up to it.
var costChains = map[string][]lbcost.Part{
	"new":  {lbcost.LB, lbcost.StopPorts, lbcost.StopLookup, lbcost.StopMaster, lbcost.StopSched, lbcost.StopInsert, lbcost.StopNAT, 0},
	"cold": {lbcost.LB, lbcost.StopPorts, lbcost.StopLookup, lbcost.StopMaster, lbcost.StopSched, lbcost.StopInsert, lbcost.StopNAT, 0},
	"est":  {lbcost.LB, lbcost.StopPorts, lbcost.StopLookup, lbcost.StopTouch, lbcost.StopNAT, 0},
}

// Frames per variant and round: fresh frames of new connections (each after a frame to no
// service), and kernel repeats of 1000 runs of the established connection's frame.
const (
	costFresh   = 200
	costRepeats = 8
)

// BenchmarkLBCost says where the load balancer's per-packet nanoseconds go, part by part: in
// one run, interleaved, the product's kdp_tap_in and the breakdown build (bench/lbcost) with
// each part of the load balancer's paths left out in turn (or, for the service's master and
// the connection lookup, done twice; for the bucket's mask, the remainder instead) time
//
//   - new: the first frame of a new connection, one fresh frame per run, as
//     BenchmarkNewConnTable's 64-entry table (warm buckets) times it, each after a frame to
//     no service;
//   - cold: the same in the default table (16384 entries, 768 KiB): its bucket is cold, as
//     BenchmarkNewConnTable's ct-16384 times it;
//   - est: the established connection's frame with DNAT in kernel repeat, as
//     BenchmarkPerPacketRepeat times it (the ring of two services), beside the repeated
//     frame to no service.
//
// A round runs every variant, frame by frame in turn; b.N is the number of rounds. Beside
// the parts left out one at a time, the stops (lbcost.StopPorts...) end the path at one point
// each: the steps from one stop to the next split the path into consecutive parts that add up
// to it (the log's "chain" lines).
// What a part costs is the paired difference, round by round, between the build with
// nothing left out and the build without the part (or the build doing it twice less the
// full one): min / median / max over the rounds. Metrics: <kind>-<variant>-ns, the median
// frame time over the rounds (a round's: the interquartile mean of its frames), and
// <kind>-<variant>-part-ns, the part's paired median.
//
//	go test -run XXX -bench LBCost -benchtime 12x ./bench/lbperf/
func BenchmarkLBCost(b *testing.B) {
	newRig := newRigCT(b, 5000, 64)
	coldRig := newRigCT(b, 5000, 0)
	estRig := newRigCT(b, 5000, 0)
	// Touch every page of the default table once: this guest maps memory in on its first
	// touch (see BenchmarkNewConnTable).
	ct := coldRig.lb.CT
	for idx := uint32(0); idx < ct.MaxEntries(); idx += max(4096/ct.ValueSize(), 1) {
		if _, err := ct.LookupBytes(idx); err != nil {
			b.Fatal(err)
		}
	}
	// The established ring of BenchmarkPerPacketRepeat, made by the product's program.
	a, c := netip.MustParseAddrPort("10.96.0.30:80"), netip.MustParseAddrPort("10.96.0.31:8080")
	estRig.lb.PutBackend(51, maps.Backend{Addr: c, Weight: 1})
	estRig.lb.PutBackend(52, maps.Backend{Addr: a, Weight: 1})
	estRig.lb.PutService(0, maps.ServiceSpec{VIP: a, Proto: unix.IPPROTO_TCP, ID: 97, Sched: maps.SchedRR, Slots: []uint32{51}})
	estRig.lb.PutService(0, maps.ServiceSpec{VIP: c, Proto: unix.IPPROTO_TCP, ID: 96, Sched: maps.SchedRR, Slots: []uint32{52}})
	estRig.tapIn.Benchmark(tcpFrame(a, 40000, 0x02), 2, nil)
	other := netip.MustParseAddrPort("172.16.0.1:80")

	type variant struct {
		name              string
		part              lbcost.Part
		newP, coldP, estP *ebpf.Program
		none, fresh       []time.Duration // per round
		noneC, cold       []time.Duration
		noneR, estDNA     []time.Duration
	}
	vs := []*variant{{name: "product", newP: newRig.tapIn, coldP: coldRig.tapIn, estP: estRig.tapIn}}
	for _, p := range costVariants {
		v := &variant{name: p.String(), part: p}
		var err error
		if v.newP, err = lbcost.TapIn(newRig.dir, p); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.newP.Close() })
		if v.coldP, err = lbcost.TapIn(coldRig.dir, p); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.coldP.Close() })
		if v.estP, err = lbcost.TapIn(estRig.dir, p); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.estP.Close() })
		vs = append(vs, v)
	}
	// A round's value of a variant: the mean of its samples' middle half (the interquartile
	// mean), which, unlike the median, resolves differences finer than the kernel's 10 ns
	// steps of a single run's time.
	iqm := func(ds []time.Duration) time.Duration {
		slices.Sort(ds)
		mid := ds[len(ds)/4 : len(ds)-len(ds)/4]
		var sum time.Duration
		for _, d := range mid {
			sum += d
		}
		return sum / time.Duration(len(mid))
	}
	none := make([][]time.Duration, len(vs))
	fresh := make([][]time.Duration, len(vs))
	noneC := make([][]time.Duration, len(vs))
	cold := make([][]time.Duration, len(vs))
	noneR := make([][]time.Duration, len(vs))
	est := make([][]time.Duration, len(vs))
	sport := 0
	b.ResetTimer()
	for round := range b.N {
		// Every variant's frames interleaved frame by frame, so that the machine's drift
		// within a round weighs on all of them alike; the order rotates every frame.
		for i := range costFresh {
			for j := range vs {
				v := (i + j + round) % len(vs)
				none[v] = append(none[v], measure(b, vs[v].newP, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
				p := uint16(1024 + sport%60000)
				sport++
				fresh[v] = append(fresh[v], measure(b, vs[v].newP, 1, func(int) []byte { return tcpFrame(vip, p, 0x02) })...)
				noneC[v] = append(noneC[v], measure(b, vs[v].coldP, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
				cold[v] = append(cold[v], measure(b, vs[v].coldP, 1, func(int) []byte { return tcpFrame(vip, p, 0x02) })...)
			}
		}
		for i := range costRepeats {
			for j := range vs {
				v := (i + j + round) % len(vs)
				for _, x := range []struct {
					dst netip.AddrPort
					ds  *[]time.Duration
				}{{other, &noneR[v]}, {a, &est[v]}} {
					_, d, err := vs[v].estP.Benchmark(tcpFrame(x.dst, 40000, 0x10), 1000, nil)
					if err != nil {
						b.Fatal(err)
					}
					*x.ds = append(*x.ds, d)
				}
			}
		}
		for v, x := range vs {
			x.none = append(x.none, iqm(none[v]))
			x.fresh = append(x.fresh, iqm(fresh[v]))
			x.noneC = append(x.noneC, iqm(noneC[v]))
			x.cold = append(x.cold, iqm(cold[v]))
			x.noneR = append(x.noneR, iqm(noneR[v]))
			x.estDNA = append(x.estDNA, iqm(est[v]))
			none[v], fresh[v], noneR[v], est[v] = none[v][:0], fresh[v][:0], noneR[v][:0], est[v][:0]
			noneC[v], cold[v] = noneC[v][:0], cold[v][:0]
		}
	}
	b.StopTimer()
	mmm := func(ds []time.Duration) (lo, mid, hi time.Duration) {
		ds = slices.Clone(ds)
		slices.Sort(ds)
		return ds[0], ds[len(ds)/2], ds[len(ds)-1]
	}
	full := vs[1]
	var out strings.Builder
	fmt.Fprintf(&out, "%d rounds; per variant: frame time median of the rounds' interquartile means, over no service, and the part: full - variant (twice, rem: variant - full) paired by round, min / median / max\n", b.N)
	for _, v := range vs {
		for _, k := range []struct {
			kind             string
			ds, base, fullDs []time.Duration
		}{{"new", v.fresh, v.none, full.fresh}, {"cold", v.cold, v.noneC, full.cold}, {"est", v.estDNA, v.noneR, full.estDNA}} {
			var over, part []time.Duration
			for r := range k.ds {
				over = append(over, k.ds[r]-k.base[r])
				d := k.fullDs[r] - k.ds[r]
				if v.part&(lbcost.Master2|lbcost.CTLookup2|lbcost.Rem) != 0 {
					d = -d
				}
				part = append(part, d)
			}
			_, m, _ := mmm(k.ds)
			_, om, _ := mmm(over)
			plo, pm, phi := mmm(part)
			b.ReportMetric(float64(m.Nanoseconds()), k.kind+"-"+v.name+"-ns")
			b.ReportMetric(float64(pm.Nanoseconds()), k.kind+"-"+v.name+"-part-ns")
			fmt.Fprintf(&out, "%s %-10s %5d ns (over no service %+5d)  part %+4d / %+4d / %+4d\n", k.kind, v.name, m.Nanoseconds(), om.Nanoseconds(), plo.Nanoseconds(), pm.Nanoseconds(), phi.Nanoseconds())
		}
	}
	byPart := map[lbcost.Part]*variant{}
	for _, v := range vs[1:] {
		byPart[v.part] = v
	}
	for _, kind := range []string{"new", "cold", "est"} {
		chain := costChains[kind]
		var sum time.Duration
		for i := 1; i < len(chain); i++ {
			from, to := byPart[chain[i-1]], byPart[chain[i]]
			fd, td := from.fresh, to.fresh
			switch kind {
			case "cold":
				fd, td = from.cold, to.cold
			case "est":
				fd, td = from.estDNA, to.estDNA
			}
			var d []time.Duration
			for r := range fd {
				d = append(d, td[r]-fd[r])
			}
			lo, m, hi := mmm(d)
			sum += m
			b.ReportMetric(float64(m.Nanoseconds()), kind+"-step-"+to.name+"-ns")
			fmt.Fprintf(&out, "chain %s %-11s -> %-11s %+4d / %+4d / %+4d  (sum %+d)\n", kind, from.name, to.name, lo.Nanoseconds(), m.Nanoseconds(), hi.Nanoseconds(), sum.Nanoseconds())
		}
	}
	if b.N > 1 {
		b.Log("\n" + out.String())
	}
}
