package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/bench/guestemu"
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
	}
	var want []string
	for _, m := range modes {
		if slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.HasPrefix(n, "mode "+m.name+" skipped") }) {
			t.Logf("mode %s skipped on this machine", m.name)
			continue
		}
		for _, c := range allCases {
			if (c.dir == g2h && m.h2gOnly) || (c.dir == rr && m.noLatency) {
				continue
			}
			want = append(want, m.name+" "+c.name)
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
	for _, bad := range [][]string{
		{"--modes", "nosuch"},
		{"--cases", "nosuch"},
		{"-o", "xml"},
		{"--rounds", "0"},
		{"--cpu-gen", "1", "--cpu-guest", "1"},
		{"extra"},
	} {
		if _, err := parseFlags(bad, &bytes.Buffer{}); err == nil {
			t.Errorf("flags %q accepted", bad)
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
	for _, s := range []string{"## h2g-64", "| tc | 0k [0k..0k] | 1.00 |", "Flagged samples"} {
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
