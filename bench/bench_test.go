package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/control/ipvs"
)

// TestHarness runs one tiny round of every mode through Main, to prove the
// harness works end to end. It asserts that traffic flowed and checksums
// held, never how fast: speed is measured by `kata-dp bench`, not here.
func TestHarness(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and loads BPF programs")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var out, log bytes.Buffer
	dir := t.TempDir()
	err := Main(ctx, []string{"--rounds", "1", "--duration", "100ms", "--requests", "20", "--wait-quiet", "0", "-o", "json", "--charts", dir}, &out, &log)
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, log.String())
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("json output: %v\n%s", err, out.String())
	}
	got := map[string]bool{}
	for _, s := range rep.Samples {
		got[s.Mode+" "+s.Case] = true
		if s.Hops["emu_csum_bad"] != 0 {
			t.Errorf("%s %s: %d frames with bad checksums at the guest", s.Mode, s.Case, s.Hops["emu_csum_bad"])
		}
		switch {
		case strings.HasPrefix(s.Case, "lat-"):
			if s.Values["p50_us"] <= 0 {
				t.Errorf("%s %s: no round trips: %v", s.Mode, s.Case, s.Values)
			}
		case s.Values["pps"] <= 0:
			t.Errorf("%s %s: no frames delivered: %v %v", s.Mode, s.Case, s.Values, s.Hops)
		}
		// A +svc row's vip cases go through the load balancer: the VIP's service counts
		// every frame delivered, the guest's to it (DNAT) and the replies (reverse NAT), and
		// no more than were sent.
		if m, _ := modeByName(s.Mode); m.svc > 0 {
			switch s.Case {
			case "g2h-vip-64":
				if in, del := s.Hops["vip_in"], s.Hops["delivered"]; in == 0 || in < del || in > s.Hops["emu_written"] {
					t.Errorf("%s %s: the VIP's service counted %d frames from the guest, %d written, %d delivered", s.Mode, s.Case, in, s.Hops["emu_written"], del)
				}
			case "h2g-vip-64":
				if out, del := s.Hops["vip_out"], s.Hops["delivered"]; out == 0 || out < del || out > s.Hops["gen_sent"] {
					t.Errorf("%s %s: the VIP's service counted %d replies, %d sent, %d delivered", s.Mode, s.Case, out, s.Hops["gen_sent"], del)
				}
			}
		}
	}
	if !got["tc+svc5000 h2g-vip-64"] || got["tc h2g-vip-64"] {
		t.Errorf("vip cases: want them in tc+svc5000 and not in tc; ran %v", got)
	}
	var want []string
	for _, m := range modes() {
		if slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.HasPrefix(n, "mode "+m.name+" skipped") }) {
			t.Logf("mode %s skipped on this machine", m.name)
			continue
		}
		for _, c := range allCases {
			if m.runs(c) {
				want = append(want, m.name+" "+c.name)
			}
		}
	}
	var missing []string
	for _, w := range want {
		if !got[w] {
			missing = append(missing, w)
		}
	}
	if len(missing) > 0 {
		t.Errorf("no samples for %v\n%s", missing, log.String())
	}
	for _, name := range []string{"pps.svg", "cpu.svg", "latency.svg"} {
		if st, err := os.Stat(dir + "/" + name); err != nil || st.Size() == 0 {
			t.Errorf("chart %s: %v", name, err)
		}
	}
	var md bytes.Buffer
	if err := rep.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", md.String())
}

func TestFlags(t *testing.T) {
	o, err := parseFlags([]string{"--quick"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o.Batch != DefaultBatch || slices.ContainsFunc(commandArgs(o), func(a string) bool { return strings.HasPrefix(a, "--batch") }) {
		t.Errorf("default batch %d (want %d), command %q", o.Batch, DefaultBatch, commandArgs(o))
	}
	var cases []string
	for _, c := range o.cases {
		cases = append(cases, c.name)
	}
	if diff := cmp.Diff(quickCases, cases); diff != "" {
		t.Errorf("quick cases (-want +got):\n%s", diff)
	}
	if o.Rounds != 3 || o.Duration != time.Second {
		t.Errorf("quick: rounds %d duration %s, want 3 and 1s", o.Rounds, o.Duration)
	}
	for _, n := range []int{1, 7, maxBatch} {
		b, err := parseFlags([]string{"--batch", strconv.Itoa(n)}, &bytes.Buffer{})
		if err != nil || b.Batch != n || !slices.Contains(commandArgs(b), "--batch "+strconv.Itoa(n)) {
			t.Errorf("--batch %d: batch %d, command %q, err %v", n, b.Batch, commandArgs(b), err)
		}
	}
	// A zero Options.Batch (a caller that does not set it) is the default.
	z := Options{Modes: []string{"tc"}, Rounds: 1, Output: "table", CPUGen: 0, CPUGuest: 1, Duration: time.Second, Requests: 10}
	if err := z.validate(); err != nil || z.Batch != DefaultBatch {
		t.Errorf("zero batch: %d, %v; want %d", z.Batch, err, DefaultBatch)
	}
	for _, bad := range [][]string{
		{"--modes", "nosuch"},
		{"--cases", "nosuch"},
		{"-o", "xml"},
		{"--rounds", "0"},
		{"--cpu-gen", "1", "--cpu-guest", "1"},
		{"extra"},
		{"--modes", "tc+svc0"},
		{"--modes", "tc+svc05"},
		{"--modes", "tc+svc5001"},
		{"--modes", "tc+svc"},
		{"--modes", "nosuch+svc5"},
		{"--modes", "ref-drop+svc5"},
		{"--modes", "tc+monitor+svc5"},
		{"--batch", "0"},
		{"--batch", "-1"},
		{"--batch", "1025"},
		{"--batch", "x"},
	} {
		if _, err := parseFlags(bad, &bytes.Buffer{}); err == nil {
			t.Errorf("flags %q accepted", bad)
		}
	}
}

// TestSvcModes: a kata-dp mode with +svc<N> is a row of that mode with N services, accepted
// by --modes whether or not it is in the default list, and in the default list as tc+svc5000.
func TestSvcModes(t *testing.T) {
	o, err := parseFlags([]string{"--modes", "tc,tc+svc5000,xdp+svc1,tc+svc250,ref-drop"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][2]any{"tc+svc5000": {5000, "tc"}, "xdp+svc1": {1, "xdp"}, "tc+svc250": {250, "tc"}} {
		m, ok := modeByName(name)
		if !ok || m.svc != want[0] || m.base != want[1] || m.ref || m.desc == "" {
			t.Errorf("mode %s: %+v, want %d services on %s", name, m, want[0], want[1])
		}
	}
	if !slices.Contains(DefaultModes(), "tc+svc5000") || !slices.Contains(quickModes(), "tc+svc5000") {
		t.Errorf("tc+svc5000 missing from the default or quick modes: %v / %v", DefaultModes(), quickModes())
	}
	if r := newReport(o); r.ModeInfo["tc+svc250"] == "" {
		t.Errorf("no description for tc+svc250: %v", r.ModeInfo)
	}
	vip := caseDef{dir: g2h, vip: true}
	for name, want := range map[string]bool{"tc": false, "tc+monitor": false, "tc+svc5000": true, "ref-drop": true} {
		if m, _ := modeByName(name); m.runs(vip) != want {
			t.Errorf("mode %s runs vip cases: %v, want %v", name, !want, want)
		}
	}
}

// TestBenchServices: the services a +svc row loads are a valid restore of the largest table a
// sandbox holds, with the schedulers and features the datapath has, and none of them is the
// address of the harness's traffic except the vip cases' service, whose one real server is
// vipServer, an address of the host's subnet the other cases do not use.
func TestBenchServices(t *testing.T) {
	server := netip.MustParseAddr("10.199.0.1")
	cmds, err := ipvs.ParseRestore(strings.NewReader(benchServices(maxBenchServices, server)))
	if err != nil {
		t.Fatal(err)
	}
	tab := &ipvs.Table{}
	if err := tab.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if len(tab.Services) != maxBenchServices || tab.Rules() > ipvs.MaxRules {
		t.Fatalf("%d services, %d rules; want %d services, at most %d rules", len(tab.Services), tab.Rules(), maxBenchServices, ipvs.MaxRules)
	}
	traffic := []netip.Addr{server, netip.MustParseAddr("10.199.0.2"), host6, guest6.Addr()}
	seen := map[string]int{}
	for _, s := range tab.Services {
		if s.Addr == benchVIP {
			if len(s.Servers) != 1 || s.Servers[0].Addr != netip.AddrPortFrom(server, vipServerPort) || s.Proto != ipvs.UDP {
				t.Errorf("vip service %s: %+v", benchVIP, s)
			}
			continue
		}
		if slices.Contains(traffic, s.Addr.Addr()) {
			t.Errorf("service %s on an address of the harness's traffic", s.ServiceKey)
		}
		for _, d := range s.Servers {
			if slices.Contains(traffic, d.Addr.Addr()) {
				t.Errorf("service %s: real server %s on an address of the harness's traffic", s.ServiceKey, d.Addr)
			}
		}
		seen[s.Scheduler]++
		seen[s.Proto.String()]++
		if s.Persistent > 0 {
			seen["persistent"]++
		}
		if s.Addr.Addr().Is6() {
			seen["v6"]++
		}
	}
	for _, f := range []string{"rr", "wrr", "sh", "TCP", "UDP", "persistent", "v6"} {
		if seen[f] == 0 {
			t.Errorf("no service with %s: %v", f, seen)
		}
	}
}

func TestUDPFrameChecksums(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	for _, n := range []int{0, 1, 64, 1400} {
		f := guestemu.UDPFrame(mac, mac, netip.MustParseAddrPort("10.1.2.3:1"), netip.MustParseAddrPort("10.3.2.1:2"), payloadOf(n))
		ip := f[14:34]
		if got := fold(sum(0, ip)); got != 0xffff {
			t.Errorf("payload %d: ip checksum sums to %#x", n, got)
		}
		udp := f[34:]
		ps := sum(0, ip[12:20]) + 17 + uint32(len(udp))
		if got := fold(sum(ps, udp)); got != 0xffff {
			t.Errorf("payload %d: udp checksum sums to %#x", n, got)
		}
	}
}

func sum(s uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func TestReport(t *testing.T) {
	o := Options{Modes: []string{"tcfilter", "tc", "ref-drop"}, Rounds: 3, Output: "table", CPUGen: 0, CPUGuest: 1, Duration: time.Second, Requests: 10, Cases: []string{"h2g-64"}}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	r := newReport(o)
	add := func(mode string, pps, cpu float64, flags ...string) {
		r.Samples = append(r.Samples, Sample{Mode: mode, Case: "h2g-64", Values: map[string]float64{"pps": pps, "cpu_ns": cpu}, Flags: flags})
	}
	add("tcfilter", 100, 500)
	add("tcfilter", 200, 600)
	add("tcfilter", 300, 700)
	add("tc", 200, 650)
	add("tc", 999, 1, "other processes used 50% of a CPU")
	add("ref-drop", 1000, 300)
	r.finish()
	got := map[string]Result{}
	for _, x := range r.Results {
		got[x.Mode+" "+x.Metric] = x
	}
	want := map[string]Result{
		"tcfilter pps":    {Mode: "tcfilter", Case: "h2g-64", Metric: "pps", Unit: "frames/s", Min: 100, Median: 200, Max: 300, Ratio: 1, Runs: 3},
		"tc pps":          {Mode: "tc", Case: "h2g-64", Metric: "pps", Unit: "frames/s", Min: 200, Median: 200, Max: 200, Ratio: 1, Runs: 1, Flagged: 1},
		"tcfilter fwd_ns": {Mode: "tcfilter", Case: "h2g-64", Metric: "fwd_ns", Unit: "ns", Min: 200, Median: 300, Max: 400, Ratio: 1, Runs: 3},
		"tc fwd_ns":       {Mode: "tc", Case: "h2g-64", Metric: "fwd_ns", Unit: "ns", Min: 350, Median: 350, Max: 350, Ratio: 350.0 / 300, Runs: 1, Flagged: 1},
	}
	for k, w := range want {
		if diff := cmp.Diff(w, got[k]); diff != "" {
			t.Errorf("%s (-want +got):\n%s", k, diff)
		}
	}
	var md bytes.Buffer
	if err := r.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"## h2g-64", "| tc | 0k [0k..0k] | 1.00 |", "Flagged samples (left out of the medians): tc 1 of 2 (other processes busy 1)."} {
		if !strings.Contains(md.String(), s) {
			t.Errorf("markdown lacks %q:\n%s", s, md.String())
		}
	}
	if strings.Contains(md.String(), "xMVT") {
		t.Errorf("an xMVT column without macvtap in the run:\n%s", md.String())
	}
}

// TestReportMacvtapRatio: with macvtap in the run every row gets its ratio to macvtap (xMVT)
// beside the one to tcfilter.
func TestReportMacvtapRatio(t *testing.T) {
	o := Options{Modes: []string{"tcfilter", "tc", "macvtap", "ref-drop"}, Rounds: 1, Output: "table", CPUGen: 0, CPUGuest: 1, Duration: time.Second, Requests: 10, Cases: []string{"h2g-64"}}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	r := newReport(o)
	for mode, pps := range map[string]float64{"tcfilter": 100e3, "tc": 120e3, "macvtap": 150e3, "ref-drop": 1e6} {
		r.Samples = append(r.Samples, Sample{Mode: mode, Case: "h2g-64", Values: map[string]float64{"pps": pps, "cpu_ns": 500}})
	}
	r.finish()
	for _, x := range r.Results {
		if x.Mode == "tc" && x.Metric == "pps" && (x.Ratio != 1.2 || x.RatioMacvtap != 0.8) {
			t.Errorf("tc pps ratios %v / %v, want 1.2 to tcfilter and 0.8 to macvtap", x.Ratio, x.RatioMacvtap)
		}
	}
	var md bytes.Buffer
	if err := r.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"xMVT: median / macvtap's median", "| frames/s | xTCF | xMVT |", "| tc | 120k [120k..120k] | 1.20 | 0.80 |", "| macvtap | 150k [150k..150k] | 1.50 | 1.00 |"} {
		if !strings.Contains(md.String(), s) {
			t.Errorf("markdown lacks %q:\n%s", s, md.String())
		}
	}
}

// TestReportAgainstBase: a +svc row is compared, round by round, with its mode without
// services: frames/s as a ratio, forward CPU as a difference in ns; its vip cases with the same
// frames to no service, and a flagged sample leaves its pair out.
func TestReportAgainstBase(t *testing.T) {
	o := Options{Modes: []string{"tc", "tc+svc5000", "ref-drop"}, Rounds: 2, Output: "table", CPUGen: 0, CPUGuest: 1, Duration: time.Second, Requests: 10, Cases: []string{"h2g-64", "h2g-vip-64"}}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	r := newReport(o)
	add := func(mode, c string, round int, pps, cpu float64, flags ...string) {
		r.Samples = append(r.Samples, Sample{Mode: mode, Case: c, Round: round, Values: map[string]float64{"pps": pps, "cpu_ns": cpu}, Flags: flags})
	}
	for round := 1; round <= 2; round++ {
		add("ref-drop", "h2g-64", round, 1000, 300)
		add("ref-drop", "h2g-vip-64", round, 1000, 300)
	}
	add("tc", "h2g-64", 1, 200, 600)
	add("tc+svc5000", "h2g-64", 1, 190, 610)
	add("tc", "h2g-64", 2, 100, 700)
	add("tc+svc5000", "h2g-64", 2, 100, 730)
	add("tc+svc5000", "h2g-vip-64", 1, 100, 800)
	add("tc+svc5000", "h2g-vip-64", 2, 50, 900, "other processes used 50% of a CPU")
	r.finish()
	var md bytes.Buffer
	if err := r.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{
		"- h2g-64 tc+svc5000 vs tc: frames/s 0.97x [0.95..1.00], fwd CPU +20 ns/frame [+10..+30] (2 pairs)",
		"- h2g-vip-64 tc+svc5000 vs h2g-64 tc: frames/s 0.50x [0.50..0.50], fwd CPU +200 ns/frame [+200..+200] (1 pairs)",
	} {
		if !strings.Contains(md.String(), s) {
			t.Errorf("markdown lacks %q:\n%s", s, md.String())
		}
	}
}
