package lbperf

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/bench/refprog"
	"github.com/kata-dp/kata-dp/maps"
)

// coldRounds splits a run into consecutive rounds; each reports its medians, so a run gives
// min / median / max over rounds as BenchmarkPerPacket's three runs do.
const coldRounds = 5

// coldKs are the numbers of distinct entries a frame touches (0 is the baseline).
var coldKs = []int{1, 2, 4, 8}

// coldPlace chooses the entries one frame touches.
type coldPlace struct {
	name  string
	add   bool // atomic add instead of a read (the datapath's counters)
	chain bool // each index depends on the entry before (service master -> slot -> real server)
	maps  bool // hash: entry i in the i-th of eight maps (refprog.ColdHashes)
	// pick returns k indices; warm places return the same ones every frame.
	pick func(r *rand.Rand, k int) []uint32
}

// BenchmarkColdEntries measures what touching k distinct map entries costs a BPF program run
// once per fresh frame (BPF_PROG_TEST_RUN, the kernel's timing, as BenchmarkPerPacket times a
// new connection), over the same program touching none, with the entries
//
//   - warm: the same k every frame;
//   - in distinct pages of a large map (array: a random 64-byte line of k random 4 KiB pages;
//     hash: k random keys), read, atomically added to, or chained (each index read from the
//     entry before, so the misses cannot overlap);
//   - in one page (array: k random lines of one random page, read or chained): a page's
//     TLB miss paid once, each line's cache miss;
//   - hash: one entry in each of k distinct hash maps (maps-warm, maps-cold), as the new
//     connection looks into three.
//
// Sub-benchmarks: the array at the load balancer's connection table's size (768 KiB) and at
// 64 MiB (beyond the caches), the hash map with 20000 of its 40960 keys (kdp_lb_svc's entries
// for 5000 services). All frame kinds of a sub-benchmark are interleaved. Metrics:
// <place>-k<k>-ns, the median over coldRounds rounds of (the round's median minus the
// round's k = 0 median), with -min-ns and -max-ns over the rounds; k0-ns is the baseline.
//
//	go test -run XXX -bench ColdEntries -benchtime 4000x ./bench/lbperf/
func BenchmarkColdEntries(b *testing.B) {
	needRoot(b)
	b.Run("array-768KiB", func(b *testing.B) { benchCold(b, refprog.ColdArray, 768<<10/refprog.ColdLine) })
	b.Run("array-64MiB", func(b *testing.B) { benchCold(b, refprog.ColdArray, 64<<20/refprog.ColdLine) })
	b.Run("hash-20000", func(b *testing.B) { benchCold(b, refprog.ColdHash, 20000) })
}

func benchCold(b *testing.B, m refprog.ColdMap, n uint32) {
	var c *refprog.Cold
	var err error
	if m == refprog.ColdHash {
		c, err = refprog.LoadCold(0, n)
	} else {
		c, err = refprog.LoadCold(n, 0)
	}
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	places := coldPlaces(m, n)
	prog := c.Program(m)
	rng := rand.New(rand.NewPCG(1, 2))
	// samples[p][k][round]; p = len(places) is the baseline (k = 0, index 0 only).
	samples := make([][][][]time.Duration, len(places)+1)
	for p := range samples {
		samples[p] = make([][][]time.Duration, len(coldKs))
		for k := range samples[p] {
			samples[p][k] = make([][]time.Duration, coldRounds)
		}
	}
	// Touch every entry once first: this guest's memory is mapped in on first touch (a fault
	// into the hypervisor, microseconds), which is not what a running datapath pays.
	step := uint32(refprog.ColdLinesPerPage) // array: every page
	if m == refprog.ColdHash {
		step = 1 // every key: the elements are allocated one by one
	}
	var all []uint32
	for i := uint32(0); i < n; i += step {
		if all = append(all, i); len(all) == refprog.ColdMaxK || i+step >= n {
			if ret, err := prog.Run(&ebpf.RunOptions{Data: refprog.ColdFrame(all, false, false)}); err != nil || ret == refprog.ColdBad {
				b.Fatalf("warm-up run on %v: %d, %v", all, ret, err)
			}
			all = all[:0]
		}
		if m == refprog.ColdHash { // key i of the other seven maps too
			same := slices.Repeat([]uint32{i}, refprog.ColdMaxK)
			if ret, err := c.Program(refprog.ColdHashes).Run(&ebpf.RunOptions{Data: refprog.ColdFrame(same, false, false)}); err != nil || ret == refprog.ColdBad {
				b.Fatalf("warm-up run on key %d of every map: %d, %v", i, ret, err)
			}
		}
	}
	rounds := min(coldRounds, b.N)
	b.ResetTimer()
	for i := range b.N {
		round := i * rounds / b.N
		base := &samples[len(places)][0][round]
		*base = append(*base, measure(b, prog, 1, func(int) []byte { return refprog.ColdFrame(nil, false, false) })...)
		for p, pl := range places {
			for ki, k := range coldKs {
				f := refprog.ColdFrame(pl.pick(rng, k), pl.add, pl.chain)
				s := &samples[p][ki][round]
				pp := prog
				if pl.maps {
					pp = c.Program(refprog.ColdHashes)
				}
				*s = append(*s, measure(b, pp, 1, func(int) []byte { return f })...)
			}
		}
	}
	b.StopTimer()
	med := func(ds []time.Duration) time.Duration {
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	var base []time.Duration
	for r := range rounds {
		base = append(base, med(samples[len(places)][0][r]))
	}
	b.ReportMetric(float64(med(slices.Clone(base)).Nanoseconds()), "k0-ns")
	var tab strings.Builder
	fmt.Fprintf(&tab, "%v, %d entries: ns per frame over k = 0 (%v), median [min..max] of %d rounds\n%-15s", m, n, med(slices.Clone(base)), rounds, "")
	for _, k := range coldKs {
		fmt.Fprintf(&tab, " %18s", fmt.Sprintf("k=%d", k))
	}
	fmt.Fprintf(&tab, " %10s\n", "per entry")
	for p, pl := range places {
		fmt.Fprintf(&tab, "%-15s", pl.name)
		var last time.Duration
		for ki, k := range coldKs {
			var over []time.Duration
			for r := range rounds {
				over = append(over, med(samples[p][ki][r])-base[r])
			}
			slices.Sort(over)
			lo, mid, hi := over[0], over[len(over)/2], over[len(over)-1]
			name := fmt.Sprintf("%s-k%d", pl.name, k)
			b.ReportMetric(float64(mid.Nanoseconds()), name+"-ns")
			b.ReportMetric(float64(lo.Nanoseconds()), name+"-min-ns")
			b.ReportMetric(float64(hi.Nanoseconds()), name+"-max-ns")
			fmt.Fprintf(&tab, " %18s", fmt.Sprintf("%d [%d..%d]", mid.Nanoseconds(), lo.Nanoseconds(), hi.Nanoseconds()))
			last = mid / time.Duration(k)
		}
		fmt.Fprintf(&tab, " %10d\n", last.Nanoseconds())
	}
	if b.N > 1 { // the framework's first probing run (b.N = 1) would crowd out the real one's table
		b.Log(strings.TrimSuffix(tab.String(), "\n"))
	}
}

// coldPlaces are the frame kinds for map m of n entries.
func coldPlaces(m refprog.ColdMap, n uint32) []coldPlace {
	pages := n / refprog.ColdLinesPerPage
	// k distinct random values below lim.
	distinct := func(r *rand.Rand, k int, lim uint32) []uint32 {
		out := make([]uint32, 0, k)
		for len(out) < k {
			x := r.Uint32N(lim)
			if !slices.Contains(out, x) {
				out = append(out, x)
			}
		}
		return out
	}
	// The warm entries: chosen once, as the cold ones are (distinct pages, or keys).
	warm := distinct(rand.New(rand.NewPCG(3, 4)), refprog.ColdMaxK, max(pages, 1))
	if m == refprog.ColdHash {
		warm = distinct(rand.New(rand.NewPCG(3, 4)), refprog.ColdMaxK, n)
		hot := func(_ *rand.Rand, k int) []uint32 { return warm[:k] }
		cold := func(r *rand.Rand, k int) []uint32 { return distinct(r, k, n) }
		return []coldPlace{
			{name: "warm", pick: hot},
			{name: "warm-add", add: true, pick: hot},
			{name: "cold", pick: cold},
			{name: "cold-add", add: true, pick: cold},
			{name: "cold-chain", chain: true, pick: cold},
			{name: "maps-warm", maps: true, pick: hot},
			{name: "maps-cold", maps: true, pick: cold},
		}
	}
	for i := range warm {
		warm[i] = warm[i]*refprog.ColdLinesPerPage + uint32(i)
	}
	hot := func(_ *rand.Rand, k int) []uint32 { return warm[:k] }
	inPages := func(r *rand.Rand, k int) []uint32 {
		out := distinct(r, k, pages)
		for i := range out {
			out[i] = out[i]*refprog.ColdLinesPerPage + r.Uint32N(refprog.ColdLinesPerPage)
		}
		return out
	}
	inPage := func(r *rand.Rand, k int) []uint32 {
		page := r.Uint32N(pages)
		out := distinct(r, k, refprog.ColdLinesPerPage)
		for i := range out {
			out[i] += page * refprog.ColdLinesPerPage
		}
		return out
	}
	return []coldPlace{
		{name: "warm", pick: hot},
		{name: "warm-add", add: true, pick: hot},
		{name: "pages", pick: inPages},
		{name: "pages-add", add: true, pick: inPages},
		{name: "pages-chain", chain: true, pick: inPages},
		{name: "one-page", pick: inPage},
		{name: "one-page-chain", chain: true, pick: inPage},
	}
}

// BenchmarkNewConnTable is the cold-entry measurement in the datapath itself: the new
// connection's frame (BenchmarkPerPacket's, 5000 services) over a frame to no service, in
// three sandboxes that differ only in the size of the connection table: 64 entries (8 buckets
// in 3 KiB: the bucket a new connection touches is warm), the default 16384 (768 KiB,
// random cold buckets) and 1048576 (48 MiB). All six frame kinds are interleaved; metrics as
// BenchmarkColdEntries': <table>-ns is the new connection over no service, median of the
// rounds' medians, with -min-ns and -max-ns; <table>-over-ct-64-ns what the table adds over
// the warm one, round by round.
//
//	go test -run XXX -bench NewConnTable -benchtime 5000x ./bench/lbperf/
func BenchmarkNewConnTable(b *testing.B) {
	tables := []struct {
		name string
		size uint32
	}{{"ct-64", 64}, {"ct-16384", 16384}, {"ct-1048576", 1 << 20}}
	other := netip.MustParseAddrPort("172.16.0.1:80")
	rigs := make([]*rig, len(tables))
	for i, t := range tables {
		rigs[i] = newRigCT(b, 5000, t.size)
		// Touch every page of the table once: this guest maps memory in on its first touch,
		// microseconds (see BenchmarkColdEntries).
		ct := rigs[i].lb.CT
		for idx := uint32(0); idx < ct.MaxEntries(); idx += max(4096/ct.ValueSize(), 1) {
			if _, err := ct.LookupBytes(idx); err != nil {
				b.Fatal(err)
			}
		}
	}
	rounds := min(coldRounds, b.N)
	// none[t][round], fresh[t][round]
	none := make([][][]time.Duration, len(tables))
	fresh := make([][][]time.Duration, len(tables))
	for t := range tables {
		none[t] = make([][]time.Duration, rounds)
		fresh[t] = make([][]time.Duration, rounds)
	}
	b.ResetTimer()
	for i := range b.N {
		round := i * rounds / b.N
		sport := uint16(1024 + i%60000)
		for t, r := range rigs {
			none[t][round] = append(none[t][round], measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
			fresh[t][round] = append(fresh[t][round], measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(vip, sport, 0x02) })...)
		}
		if i%60000 == 59999 {
			for _, r := range rigs {
				r.lb.Sweep(^uint64(0), maps.Config{}, func(maps.Conn) bool { return true })
			}
		}
	}
	b.StopTimer()
	med := func(ds []time.Duration) time.Duration {
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	// over[t][round]: the new connection over no service.
	over := make([][]time.Duration, len(tables))
	for t := range tables {
		for r := range rounds {
			over[t] = append(over[t], med(fresh[t][r])-med(none[t][r]))
		}
	}
	var out strings.Builder
	fmt.Fprintf(&out, "new connection over no service, median [min..max] of %d rounds:", rounds)
	stat := func(name string, ds []time.Duration) {
		slices.Sort(ds)
		lo, mid, hi := ds[0], ds[len(ds)/2], ds[len(ds)-1]
		b.ReportMetric(float64(mid.Nanoseconds()), name+"-ns")
		b.ReportMetric(float64(lo.Nanoseconds()), name+"-min-ns")
		b.ReportMetric(float64(hi.Nanoseconds()), name+"-max-ns")
		fmt.Fprintf(&out, " %s %d [%d..%d];", name, mid.Nanoseconds(), lo.Nanoseconds(), hi.Nanoseconds())
	}
	for t, tb := range tables {
		if t > 0 { // what the larger table's cold buckets add, round by round
			var d []time.Duration
			for r := range rounds {
				d = append(d, over[t][r]-over[0][r])
			}
			stat(tb.name+"-over-"+tables[0].name, d)
		}
		stat(tb.name, slices.Clone(over[t]))
	}
	if b.N > 1 { // as in BenchmarkColdEntries
		b.Log(strings.TrimSuffix(out.String(), ";"))
	}
}

// BenchmarkNewConnWarmBuckets is BenchmarkNewConnTable's warm case alone, for a profile of what
// a new connection costs beside its bucket: a frame to no service and a new connection's,
// alternating, in a sandbox whose connection table has 64 entries (8 buckets, 3 KiB).
//
//	go test -c -o lbperf.test ./bench/lbperf
//	perf record -F 10000 -g ./lbperf.test -test.run XXX -test.bench NewConnWarmBuckets -test.benchtime 200000x
func BenchmarkNewConnWarmBuckets(b *testing.B) {
	r := newRigCT(b, 5000, 64)
	other := netip.MustParseAddrPort("172.16.0.1:80")
	var none, fresh []time.Duration
	b.ResetTimer()
	for i := range b.N {
		none = append(none, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
		sport := uint16(1024 + i%60000)
		fresh = append(fresh, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(vip, sport, 0x02) })...)
	}
	b.StopTimer()
	n := report(b, "no-service", none)
	f := report(b, "new-conn", fresh)
	b.Logf("per packet (median): no service %v, new connection with warm buckets %v (+%v)", n, f, f-n)
}
