package lbperf

import (
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvs/ipvstest"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

func needRoot(b testing.TB) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: loads BPF programs")
	}
}

type rig struct {
	tapIn *ebpf.Program
	lb    maps.LB
	dir   string // the sandbox's pin directory
}

var (
	guestMAC = [6]byte{2, 0x42, 0x20, 0x6f, 0xa3, 0x69}
	guestIP  = netip.MustParseAddr("172.16.0.3")
	vip      = netip.MustParseAddrPort("10.96.0.10:80")
)

func newRig(b *testing.B, services int) *rig { return newRigCT(b, services, 0) }

// newRigCT is newRig with a connection table of ctSize entries (0: the default).
func newRigCT(b *testing.B, services int, ctSize uint32) *rig {
	needRoot(b)
	root := topotest.BPFFS(b, "kdptp")
	sb, err := loader.OpenWithOptions(root, "perf", loader.Options{CTSize: ctSize})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { sb.Close(); loader.Remove(root, "perf") })
	m := sb.Maps()
	r := &rig{lb: maps.ForSandbox(m).LB, dir: sb.Dir()}
	r.tapIn, _ = sb.Program(loader.ProgTapIn)
	// BPF_PROG_TEST_RUN without a context runs the frame "on" the loopback device.
	ep := maps.Endpoint{PeerIfindex: 42, Role: maps.RoleTap, Flags: maps.FlagAntiSpoof | maps.FlagStrictEgress, MAC: guestMAC}
	ep.Addr = netip.PrefixFrom(guestIP, 8)
	if err := (maps.EndpointMap{Map: m.Endpoints}).Put(1, ep); err != nil {
		b.Fatal(err)
	}
	maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300})
	rs := func(id uint32) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(id)}), 80)
	}
	for id := uint32(1); id <= 3; id++ {
		r.lb.PutBackend(id, maps.Backend{Addr: rs(id), Weight: 1})
	}
	// As the dataplane writes them (control/dataplane serviceSpec): each slot with its real
	// server's address.
	var specs []maps.ServiceSpec
	for i := range services {
		a := netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)})
		specs = append(specs, maps.ServiceSpec{VIP: netip.AddrPortFrom(a, 80), Proto: unix.IPPROTO_TCP, ID: uint32(100 + i), Sched: maps.SchedRR,
			Slots: []uint32{1, 2, 3}, Addrs: []netip.AddrPort{rs(1), rs(2), rs(3)}})
	}
	specs = append(specs, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 99, Sched: maps.SchedRR, Slots: []uint32{3, 2, 1},
		Addrs: []netip.AddrPort{rs(3), rs(2), rs(1)}})
	if err := r.lb.PutServices(0, specs); err != nil {
		b.Fatal(err)
	}
	return r
}

func tcpFrame(dst netip.AddrPort, sport uint16, flags byte) []byte {
	f := make([]byte, 14+20+20)
	copy(f[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(f[6:12], guestMAC[:])
	binary.BigEndian.PutUint16(f[12:], unix.ETH_P_IP)
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 40)
	ip[8] = 64
	ip[9] = unix.IPPROTO_TCP
	s, d := guestIP.As4(), dst.Addr().As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	sum = sum>>16 + sum&0xffff
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum+sum>>16))
	binary.BigEndian.PutUint16(ip[20:], sport)
	binary.BigEndian.PutUint16(ip[22:], dst.Port())
	ip[20+12] = 5 << 4
	ip[20+13] = flags
	return f
}

// measure runs the program once per fresh frame (the program rewrites it), n times, and
// returns the kernel's per-run times.
func measure(b *testing.B, p *ebpf.Program, n int, frame func(i int) []byte) []time.Duration {
	out := make([]time.Duration, 0, n)
	for i := range n {
		_, d, err := p.Benchmark(frame(i), 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

func report(b *testing.B, name string, ds []time.Duration) time.Duration {
	slices.Sort(ds)
	med := ds[len(ds)/2]
	b.ReportMetric(float64(med.Nanoseconds()), name+"-median-ns")
	b.ReportMetric(float64(ds[0].Nanoseconds()), name+"-min-ns")
	b.ReportMetric(float64(ds[len(ds)*99/100].Nanoseconds()), name+"-p99-ns")
	b.ReportMetric(float64(ds[len(ds)-1].Nanoseconds()), name+"-max-ns")
	return med
}

// BenchmarkPerPacket compares, in one run and interleaved, the cost of the guest-side program
// for a frame to no service, a frame of an established connection to a service, and the first
// frame of a new connection (schedule + two connection entries), with 5000 services loaded.
func BenchmarkPerPacket(b *testing.B) {
	r := newRig(b, 5000)
	other := netip.MustParseAddrPort("172.16.0.1:80")
	// One established connection, and one whose real server is the VIP itself: the same
	// lookups and counters without the rewrite.
	self := netip.MustParseAddrPort("10.96.0.20:80")
	r.lb.PutBackend(50, maps.Backend{Addr: self, Weight: 1})
	r.lb.PutService(0, maps.ServiceSpec{VIP: self, Proto: unix.IPPROTO_TCP, ID: 98, Sched: maps.SchedRR, Slots: []uint32{50}, Addrs: []netip.AddrPort{self}})
	r.tapIn.Benchmark(tcpFrame(vip, 40000, 0x02), 1, nil)
	r.tapIn.Benchmark(tcpFrame(self, 40000, 0x02), 1, nil)
	var none, est, norw, fresh []time.Duration
	b.ResetTimer()
	for i := range b.N {
		none = append(none, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
		est = append(est, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(vip, 40000, 0x10) })...)
		norw = append(norw, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(self, 40000, 0x10) })...)
		sport := uint16(1024 + i%60000)
		fresh = append(fresh, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(vip, sport, 0x02) })...)
		if i%60000 == 59999 {
			r.lb.Sweep(^uint64(0), maps.Config{}, func(maps.Conn) bool { return true })
		}
	}
	b.StopTimer()
	n := report(b, "no-service", none)
	e := report(b, "established", est)
	w := report(b, "established-norewrite", norw)
	f := report(b, "new-conn", fresh)
	b.Logf("per packet (median): no service %v, established %v (+%v; without the rewrite %v, +%v), new connection %v (+%v)", n, e, e-n, w, w-n, f, f-n)
}

// table20000 is 5000 services with three real servers each: the user guide's limit.
func table20000(tb testing.TB) (*ipvs.Table, string) {
	rules := ipvstest.Rules(5000)
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules))
	if err != nil {
		tb.Fatal(err)
	}
	t := &ipvs.Table{}
	if err := t.Restore(cmds); err != nil {
		tb.Fatal(err)
	}
	return t, rules
}

func newDataplane(b *testing.B) (*dataplane.Dataplane, string) {
	needRoot(b)
	root := topotest.BPFFS(b, "kdptp")
	dp, err := dataplane.New(root)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close() })
	id := "perf"
	if err := dp.EnsureSandbox(context.Background(), id, ""); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.RemoveSandbox(context.Background(), id) })
	return dp, id
}

// BenchmarkRestore20000: parse + validate + install 20000 rules into the maps and switch them
// in (the restore path, without the CLI and the store).
func BenchmarkRestore20000(b *testing.B) {
	dp, id := newDataplane(b)
	_, text := table20000(b)
	ctx := context.Background()
	dp.RestoreLB(ctx, id, &ipvs.Table{}) // the agent knows the table is empty: a restore's case
	b.ResetTimer()
	for range b.N {
		cmds, err := ipvs.ParseRestore(strings.NewReader(text))
		if err != nil {
			b.Fatal(err)
		}
		t := &ipvs.Table{}
		if err := t.Restore(cmds); err != nil {
			b.Fatal(err)
		}
		if err := dp.RestoreLB(ctx, id, t); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		dp.RestoreLB(ctx, id, &ipvs.Table{})
		b.StartTimer()
	}
}

// BenchmarkAddAt20000: one add-server (then, alternating, its delete) on a table holding
// 20000 rules, the way the agent applies it: validate and apply to the live table (undo kept),
// write that service's new revision into the maps. The agent's save of the rules comes on top
// (see BenchmarkAddAt20000Saved).
func BenchmarkAddAt20000(b *testing.B) {
	dp, id := newDataplane(b)
	t, _ := table20000(b)
	ctx := context.Background()
	if err := dp.RestoreLB(ctx, id, t); err != nil {
		b.Fatal(err)
	}
	del, _ := ipvs.ParseParameters("-d -t 10.100.0.7:80 -r 172.16.1.8:80")
	add, _ := ipvs.ParseParameters("-a -t 10.100.0.7:80 -r 172.16.1.8:80 -w 1")
	t.Apply(del)
	dp.SetLB(ctx, id, t)
	b.ResetTimer()
	for i := range b.N {
		cmd := add
		if i%2 == 1 {
			cmd = del
		}
		undo := t.SnapshotService(cmd.Service)
		if _, err := t.Apply(cmd); err != nil {
			b.Fatal(err)
		}
		if err := dp.SetLBService(ctx, id, t, cmd.Service); err != nil {
			b.Fatal(err)
		}
		_ = undo
	}
}

// BenchmarkAddAt20000Saved: the same through the agent's kata-ipvs manager, which makes each
// edit durable before answering: one fsynced journal record (control/store's journal).
func BenchmarkAddAt20000Saved(b *testing.B) {
	st, err := store.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	benchSaved(b, st)
}

// BenchmarkAddAt20000SavedWhole: the baseline of BenchmarkAddAt20000Saved, a store without a
// journal, where every edit saves the whole 20000-rule table crash-safely (JSON, fsync,
// rename), as the manager did before the journal.
func BenchmarkAddAt20000SavedWhole(b *testing.B) {
	st, err := store.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	benchSaved(b, noJournal{st})
}

// noJournal hides control/store's journal from the manager.
type noJournal struct{ s *store.Store }

func (n noJournal) Put(key string, data []byte) error { return n.s.Put(key, data) }
func (n noJournal) Delete(key string) error           { return n.s.Delete(key) }
func (n noJournal) Load() (map[string][]byte, error)  { return n.s.Load() }

func benchSaved(b *testing.B, st ipvsctl.Store) {
	dp, id := newDataplane(b)
	_, text := table20000(b)
	ctx := context.Background()
	resolve := func(context.Context, string) (control.Sandbox, error) { return control.Sandbox{ID: id}, nil }
	m, err := ipvsctl.New(ctx, dp, st, resolve, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Restore(ctx, id, strings.NewReader(text)); err != nil {
		b.Fatal(err)
	}
	m.Ipvsadm(ctx, id, "-d -t 10.100.0.7:80 -r 172.16.1.8:80")
	b.ResetTimer()
	for i := range b.N {
		p := "-a -t 10.100.0.7:80 -r 172.16.1.8:80 -w 1"
		if i%2 == 1 {
			p = "-d -t 10.100.0.7:80 -r 172.16.1.8:80"
		}
		if _, err := m.Ipvsadm(ctx, id, p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkList20000: --list of 20000 rules with live counters read from the maps.
func BenchmarkList20000(b *testing.B) {
	dp, id := newDataplane(b)
	t, _ := table20000(b)
	ctx := context.Background()
	if err := dp.RestoreLB(ctx, id, t); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		c, err := dp.LBCounters(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		if out := t.List(ipvs.FormatPlain, c); len(out) < 20000*40 {
			b.Fatalf("listing too short: %d bytes", len(out))
		}
	}
}

// BenchmarkPerPacketRepeat measures with the kernel repeating the run (BPF_PROG_TEST_RUN's
// repeat: no per-run timing overhead) on frames that stay valid when re-run: a frame to no
// service, and a frame of an established connection whose real server is the VIP itself (the
// lookups and counters of the established path, without the rewrite).
func BenchmarkPerPacketRepeat(b *testing.B) {
	r := newRig(b, 5000)
	self := netip.MustParseAddrPort("10.96.0.20:80")
	r.lb.PutBackend(50, maps.Backend{Addr: self, Weight: 1})
	r.lb.PutService(0, maps.ServiceSpec{VIP: self, Proto: unix.IPPROTO_TCP, ID: 98, Sched: maps.SchedRR, Slots: []uint32{50}, Addrs: []netip.AddrPort{self}})
	r.tapIn.Benchmark(tcpFrame(self, 40000, 0x02), 1, nil)
	// Two services that are each other's real server: every run DNATs the frame to the other
	// one, an established connection each time (the first two runs made them), so the kernel's
	// repeat measures the established path with the rewrite (address, port, both checksums).
	a, c := netip.MustParseAddrPort("10.96.0.30:80"), netip.MustParseAddrPort("10.96.0.31:8080")
	r.lb.PutBackend(51, maps.Backend{Addr: c, Weight: 1})
	r.lb.PutBackend(52, maps.Backend{Addr: a, Weight: 1})
	r.lb.PutService(0, maps.ServiceSpec{VIP: a, Proto: unix.IPPROTO_TCP, ID: 97, Sched: maps.SchedRR, Slots: []uint32{51}})
	r.lb.PutService(0, maps.ServiceSpec{VIP: c, Proto: unix.IPPROTO_TCP, ID: 96, Sched: maps.SchedRR, Slots: []uint32{52}})
	r.tapIn.Benchmark(tcpFrame(a, 40000, 0x02), 2, nil)
	other := netip.MustParseAddrPort("172.16.0.1:80")
	var none, est, nat []time.Duration
	for range max(b.N/1000, 5) {
		for _, x := range []struct {
			dst netip.AddrPort
			ds  *[]time.Duration
		}{{other, &none}, {self, &est}, {a, &nat}} {
			f := tcpFrame(x.dst, 40000, 0x10)
			out := make([]byte, len(f))
			ret, d, err := r.tapIn.Benchmark(f, 1000, nil)
			if err != nil {
				b.Fatal(err)
			}
			// The DNAT frame must have been rewritten on every run (to the other service
			// and back): a redirect, as for the others.
			if x.dst == a {
				if _, err := r.tapIn.Run(&ebpf.RunOptions{Data: f, DataOut: out}); err != nil || string(out[30:34]) != string(c.Addr().AsSlice()) {
					b.Fatalf("the DNAT ring is broken (verdict %d, err %v): destination %v, want %v", ret, err, out[30:34], c.Addr())
				}
			}
			*x.ds = append(*x.ds, d)
		}
	}
	n := report(b, "no-service", none)
	e := report(b, "established-norewrite", est)
	t := report(b, "established-dnat", nat)
	b.Logf("per packet (median of %d x 1000 runs): no service %v, established without rewrite %v (+%v), established with DNAT %v (+%v)", len(none), n, e, e-n, t, t-n)
}

// BenchmarkServicesLoaded compares, in one run, the per-packet cost of ordinary (non-service)
// guest traffic in a sandbox without any service (the load balancer off) and in one with 5000
// services loaded: what the load balancer costs traffic that does not use it.
func BenchmarkServicesLoaded(b *testing.B) {
	none := newRig(b, 0)
	maps.WriteConfig(none.lb.Config, maps.Config{TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300})
	full := newRig(b, 5000)
	other := netip.MustParseAddrPort("172.16.0.1:80")
	var d0, d1 []time.Duration
	for range max(b.N/1000, 5) {
		for _, x := range []struct {
			r  *rig
			ds *[]time.Duration
		}{{none, &d0}, {full, &d1}} {
			_, d, err := x.r.tapIn.Benchmark(tcpFrame(other, 40000, 0x10), 1000, nil)
			if err != nil {
				b.Fatal(err)
			}
			*x.ds = append(*x.ds, d)
		}
	}
	n := report(b, "no-lb", d0)
	f := report(b, "5000-services", d1)
	b.Logf("non-service frame (median): no load balancer %v, 5000 services %v: %.2fx the cost, %.0f%% of the rate", n, f, float64(f)/float64(n), 100*float64(n)/float64(f))
}
