package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// metricDef describes a reported metric.
type metricDef struct {
	name, title, unit string
	// higherBetter says which way the ratio to tcfilter is good.
	higherBetter bool
}

var metricDefs = map[string]metricDef{
	"pps":       {"pps", "frames/s", "frames/s", true},
	"gbps":      {"gbps", "Gbit/s", "Gbit/s", true},
	"fwd_ns":    {"fwd_ns", "fwd CPU ns/frame", "ns", false},
	"cpu_ns":    {"cpu_ns", "sender CPU ns/frame", "ns", false},
	"reader_ns": {"reader_ns", "guest reader ns/frame", "ns", false},
	"loss_pct":  {"loss_pct", "lost %", "%", false},
	"p50_us":    {"p50_us", "p50 us", "us", false},
	"p99_us":    {"p99_us", "p99 us", "us", false},
}

// caseMetrics are the metrics shown per case, in order.
func caseMetrics(c caseDef) []string {
	switch {
	case c.dir == rr:
		return []string{"p50_us", "p99_us"}
	case c.dir == h2g && c.payload >= 1000:
		return []string{"pps", "gbps", "fwd_ns", "reader_ns", "loss_pct"}
	case c.dir == h2g:
		return []string{"pps", "fwd_ns", "cpu_ns", "reader_ns", "loss_pct"}
	case c.payload >= 1000:
		return []string{"pps", "gbps", "fwd_ns", "loss_pct"}
	default:
		return []string{"pps", "fwd_ns", "cpu_ns", "loss_pct"}
	}
}

func caseTitle(c caseDef) string {
	switch {
	case c.dir == h2g && c.vip:
		return fmt.Sprintf("host -> guest, one way, %d B UDP payload, replies of an established connection of the guest's to a VIP (reverse NAT in a +svc row)", c.payload)
	case c.dir == g2h && c.vip:
		return fmt.Sprintf("guest -> host, one way, %d B UDP payload, to a VIP over an established connection (DNAT in a +svc row)", c.payload)
	case c.dir == h2g && c.sock:
		return fmt.Sprintf("host -> guest, one way, %d B UDP payload, from a plain UDP socket (checksum offload)", c.payload)
	case c.dir == h2g:
		return fmt.Sprintf("host -> guest, one way, %d B UDP payload", c.payload)
	case c.dir == g2h:
		return fmt.Sprintf("guest -> host, one way, %d B UDP payload", c.payload)
	}
	if c.busy {
		return fmt.Sprintf("UDP request/response, %d B, one outstanding, busy-polling client", c.payload)
	}
	return fmt.Sprintf("UDP request/response, %d B, one outstanding, blocking client", c.payload)
}

// Result is one metric of one case of one mode over the rounds.
type Result struct {
	Mode   string  `json:"mode"`
	Case   string  `json:"case"`
	Metric string  `json:"metric"`
	Unit   string  `json:"unit"`
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Max    float64 `json:"max"`
	// Ratio is Median over tcfilter's median (0 when there is none).
	Ratio float64 `json:"ratio_to_tcfilter,omitempty"`
	// RatioMacvtap is Median over macvtap's median (0 when macvtap did not run): macvtap is
	// Kata's older and fastest model, the bar kata-dp's modes are held to beside tcfilter.
	RatioMacvtap float64 `json:"ratio_to_macvtap,omitempty"`
	// Runs counts the samples used; Flagged those left out.
	Runs    int `json:"runs"`
	Flagged int `json:"flagged"`
}

// Machine describes where the benchmark ran.
type Machine struct {
	Kernel string `json:"kernel"`
	CPU    string `json:"cpu"`
	CPUs   int    `json:"cpus"`
	Go     string `json:"go"`
	Date   string `json:"date"`
}

// Report is a benchmark's outcome.
type Report struct {
	Command string   `json:"command"`
	Machine Machine  `json:"machine"`
	Rounds  int      `json:"rounds"`
	Modes   []string `json:"modes"`
	Elapsed string   `json:"elapsed"`
	// Modes' descriptions.
	ModeInfo map[string]string `json:"mode_info"`
	Results  []Result          `json:"results"`
	Samples  []Sample          `json:"samples"`
	Notes    []string          `json:"notes,omitempty"`

	cases []caseDef
}

func newReport(o Options) *Report {
	r := &Report{
		Command:  "kata-dp bench " + strings.Join(commandArgs(o), " "),
		Machine:  machine(),
		Rounds:   o.Rounds,
		Modes:    o.Modes,
		ModeInfo: map[string]string{},
		cases:    o.cases,
	}
	for _, m := range o.Modes {
		d, _ := modeByName(m)
		r.ModeInfo[m] = d.desc
	}
	return r
}

func commandArgs(o Options) []string {
	var a []string
	if o.Quick {
		a = append(a, "--quick")
	}
	a = append(a, fmt.Sprintf("--rounds %d", o.Rounds), fmt.Sprintf("--duration %s", o.Duration), fmt.Sprintf("--requests %d", o.Requests),
		"--modes "+strings.Join(o.Modes, ","), fmt.Sprintf("--cpu-gen %d --cpu-guest %d", o.CPUGen, o.CPUGuest))
	if o.Batch != DefaultBatch {
		a = append(a, fmt.Sprintf("--batch %d", o.Batch))
	}
	if o.Output == "json" {
		a = append(a, "-o json")
	}
	return a
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Date: time.Now().UTC().Format(time.RFC3339)}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// finish derives the forward-path CPU (each sample's sender CPU per frame
// minus the median of the drop reference's for the same case) and
// aggregates the results.
func (r *Report) finish() *Report {
	base := map[string]float64{}
	for _, c := range r.cases {
		var good, all []float64
		for _, s := range r.Samples {
			if s.Mode == "ref-drop" && s.Case == c.name {
				if x, ok := s.Values["cpu_ns"]; ok {
					all = append(all, x)
					if len(s.Flags) == 0 {
						good = append(good, x)
					}
				}
			}
		}
		switch {
		case len(good) > 0:
			base[c.name] = median(good)
		case len(all) > 0:
			base[c.name] = median(all) // every sample flagged: the best there is
		}
	}
	for i := range r.Samples {
		s := &r.Samples[i]
		if x, ok := s.Values["cpu_ns"]; ok {
			if b, ok := base[s.Case]; ok {
				s.Values["fwd_ns"] = x - b
			}
		}
	}
	r.Results = nil
	for _, c := range r.cases {
		for _, mode := range r.Modes {
			for _, metric := range append(caseMetrics(c), "cpu_ns", "other_cpu") {
				if slices.ContainsFunc(r.Results, func(x Result) bool {
					return x.Mode == mode && x.Case == c.name && x.Metric == metric
				}) {
					continue
				}
				var good, all []float64
				for _, s := range r.Samples {
					if s.Mode != mode || s.Case != c.name {
						continue
					}
					x, ok := s.Values[metric]
					if !ok {
						continue
					}
					all = append(all, x)
					if len(s.Flags) == 0 {
						good = append(good, x)
					}
				}
				if len(all) == 0 {
					continue
				}
				use := good
				if len(use) == 0 {
					use = all // every sample flagged: show them, marked
				}
				res := Result{Mode: mode, Case: c.name, Metric: metric, Unit: metricDefs[metric].unit,
					Min: slices.Min(use), Median: median(use), Max: slices.Max(use), Runs: len(good), Flagged: len(all) - len(good)}
				r.Results = append(r.Results, res)
			}
		}
	}
	for i := range r.Results {
		x := &r.Results[i]
		for _, y := range r.Results {
			if y.Case != x.Case || y.Metric != x.Metric || y.Median == 0 {
				continue
			}
			switch y.Mode {
			case "tcfilter":
				x.Ratio = x.Median / y.Median
			case "macvtap":
				x.RatioMacvtap = x.Median / y.Median
			}
		}
	}
	return r
}

func (r *Report) result(mode, c, metric string) (Result, bool) {
	for _, x := range r.Results {
		if x.Mode == mode && x.Case == c && x.Metric == metric {
			return x, true
		}
	}
	return Result{}, false
}

// Load reads a report written with -o json and recomputes its results.
func Load(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load report: %w", err)
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("load report %s: %w", path, err)
	}
	for _, c := range allCases {
		if slices.ContainsFunc(r.Samples, func(s Sample) bool { return s.Case == c.name }) {
			r.cases = append(r.cases, c)
		}
	}
	return r.finish(), nil
}

// JSON writes the report as indented JSON.
func (r *Report) JSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// flagReasons name the kinds of flag (run.go's Sample.flag calls) by a prefix of their text.
var flagReasons = []struct{ prefix, name string }{
	{"other processes", "other processes busy"},
	{"counts do not add up", "counts do not add up"},
	{"no frames delivered", "no frames delivered"},
	{"frames with bad checksums", "bad checksums"},
	{"requests lost", "requests lost"},
}

// flagSummary says, per row, how many of its samples were flagged and why, in one line: which
// rows a busy machine hit, and whether anything but the machine's load flagged them.
func (r *Report) flagSummary() string {
	var parts []string
	for _, mode := range r.Modes {
		n, flagged := 0, 0
		why := map[string]int{}
		for _, s := range r.Samples {
			if s.Mode != mode {
				continue
			}
			n++
			if len(s.Flags) == 0 {
				continue
			}
			flagged++
			for _, f := range s.Flags {
				name := "other"
				for _, k := range flagReasons {
					if strings.Contains(f, k.prefix) {
						name = k.name
						break
					}
				}
				why[name]++
			}
		}
		if flagged == 0 {
			continue
		}
		var ws []string
		for _, k := range append(flagReasons, struct{ prefix, name string }{"", "other"}) {
			if why[k.name] > 0 {
				ws = append(ws, fmt.Sprintf("%s %d", k.name, why[k.name]))
			}
		}
		parts = append(parts, fmt.Sprintf("%s %d of %d (%s)", mode, flagged, n, strings.Join(ws, ", ")))
	}
	return strings.Join(parts, "; ") + "."
}

// againstBase writes, for every row that is a variant of another mode in the run (a +svc or
// +monitor row beside its mode), what the variant changes, round by round: frames/s as a ratio
// and the forward CPU per frame as a difference in ns (the VIP prefilter's goal is a difference,
// under +20 ns), median [min..max] over the rounds where neither sample was flagged.
func (r *Report) againstBase(b *strings.Builder) {
	wrote := false
	for _, mode := range r.Modes {
		m, ok := modeByName(mode)
		if !ok || m.base == "" || !slices.Contains(r.Modes, m.base) {
			continue
		}
		for _, c := range r.cases {
			if c.dir == rr {
				continue
			}
			// A vip case, which the mode without services does not run, is compared with
			// the same frames to no service there.
			like := c.name
			if base, _ := modeByName(m.base); !base.runs(c) {
				like = c.like
			}
			var pps, fwd []float64
			for _, s := range r.Samples {
				if s.Mode != mode || s.Case != c.name || len(s.Flags) > 0 {
					continue
				}
				i := slices.IndexFunc(r.Samples, func(x Sample) bool {
					return x.Mode == m.base && x.Case == like && x.Round == s.Round && len(x.Flags) == 0
				})
				if i < 0 {
					continue
				}
				o := r.Samples[i]
				if o.Values["pps"] > 0 {
					pps = append(pps, s.Values["pps"]/o.Values["pps"])
				}
				x, ok1 := s.Values["fwd_ns"]
				y, ok2 := o.Values["fwd_ns"]
				if ok1 && ok2 {
					fwd = append(fwd, x-y)
				}
			}
			if len(pps) == 0 && len(fwd) == 0 {
				continue
			}
			if !wrote {
				b.WriteString("Against the same mode without the variant (pairs of unflagged samples of the same round: frames/s as a ratio, " +
					"forward CPU per frame as a difference; median [min..max] over the pairs):\n\n")
				wrote = true
			}
			if like == c.name {
				fmt.Fprintf(b, "- %s %s vs %s:", c.name, mode, m.base)
			} else {
				fmt.Fprintf(b, "- %s %s vs %s %s:", c.name, mode, like, m.base)
			}
			var parts []string
			if len(pps) > 0 {
				parts = append(parts, fmt.Sprintf("frames/s %.2fx [%.2f..%.2f]", median(pps), slices.Min(pps), slices.Max(pps)))
			}
			if len(fwd) > 0 {
				parts = append(parts, fmt.Sprintf("fwd CPU %+.0f ns/frame [%+.0f..%+.0f]", median(fwd), slices.Min(fwd), slices.Max(fwd)))
			}
			fmt.Fprintf(b, " %s (%d pairs)\n", strings.Join(parts, ", "), max(len(pps), len(fwd)))
		}
	}
	if wrote {
		b.WriteString("\n")
	}
}

// lossAccount writes, per one-way case and mode, the frame counters along
// the path of the run whose frames/s was the median: where the frames that
// did not arrive were dropped.
func (r *Report) lossAccount(b *strings.Builder) {
	hops := [][2]string{
		{"gen_sent", "sent"}, {"emu_written", "written"}, {"hostdev_tx", "client tx"},
		{"hostveth_tx", "host veth tx"}, {"hostveth_tx_dropped", "host veth tx drop"},
		{"veth_rx", "eth0 rx"}, {"veth_tx", "eth0 tx"}, {"veth_tx_dropped", "eth0 tx drop"},
		{"guestdev_rx", "tap rx"}, {"guestdev_rx_dropped", "tap rx drop"},
		{"guestdev_tx", "tap tx"}, {"guestdev_tx_dropped", "tap tx drop"},
		{"hostveth_rx", "host veth rx"}, {"hostdev_rx", "client rx"}, {"emu_rx", "guest"}, {"vip_in", "LB in"}, {"vip_out", "LB out"},
		{"delivered", "delivered"},
	}
	wrote := false
	for _, c := range r.cases {
		if c.dir == rr {
			continue
		}
		for _, mode := range r.Modes {
			var run []Sample
			for _, s := range r.Samples {
				if s.Mode == mode && s.Case == c.name {
					run = append(run, s)
				}
			}
			if len(run) == 0 {
				continue
			}
			slices.SortFunc(run, func(x, y Sample) int {
				switch {
				case x.Values["pps"] < y.Values["pps"]:
					return -1
				case x.Values["pps"] > y.Values["pps"]:
					return 1
				}
				return 0
			})
			s := run[len(run)/2]
			if !wrote {
				b.WriteString("Loss account (frame counters along the path in the run with the median frames/s; " +
					"tap means the macvtap for macvtap):\n\n")
				wrote = true
			}
			var parts []string
			for _, h := range hops {
				if v, ok := s.Hops[h[0]]; ok && (v != 0 || h[0] == "delivered") {
					parts = append(parts, fmt.Sprintf("%s %d", h[1], v))
				}
			}
			fmt.Fprintf(b, "- %s %s (round %d): %s\n", c.name, mode, s.Round, strings.Join(parts, ", "))
		}
	}
	if wrote {
		b.WriteString("\n")
	}
}

func num(v float64, unit string) string {
	switch {
	case unit == "frames/s":
		return fmt.Sprintf("%.0fk", v/1e3)
	case unit == "Gbit/s":
		return fmt.Sprintf("%.2f", v)
	case unit == "%":
		return fmt.Sprintf("%.1f", v)
	case unit == "us":
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

// Markdown writes the report as Markdown tables, one per case: median
// [min..max] of every metric and its ratio to tcfilter (and to macvtap when it ran).
func (r *Report) Markdown(w io.Writer) error {
	b := &strings.Builder{}
	mvt := slices.Contains(r.Modes, "macvtap")
	fmt.Fprintf(b, "# kata-dp bench\n\n`%s`\n\n", r.Command)
	fmt.Fprintf(b, "Machine: %s, %d CPUs (%s), kernel %s, %s. %d rounds, modes interleaved, fresh topology per run; took %s.\n\n",
		r.Machine.CPU, r.Machine.CPUs, r.Machine.Go, r.Machine.Kernel, r.Machine.Date, r.Rounds, r.Elapsed)
	b.WriteString("Cells: median [min..max] over unflagged runs; xTCF: median / tcfilter's median")
	if mvt {
		b.WriteString("; xMVT: median / macvtap's median")
	}
	b.WriteString(". fwd CPU: sender + ksoftirqd CPU per frame minus ref-drop's.\n\n")
	ratio := func(row *strings.Builder, v float64, m string) {
		if v != 0 && m != "loss_pct" {
			fmt.Fprintf(row, " %.2f |", v)
		} else {
			row.WriteString(" - |")
		}
	}
	for _, c := range r.cases {
		metrics := caseMetrics(c)
		fmt.Fprintf(b, "## %s: %s\n\n| mode |", c.name, caseTitle(c))
		for _, m := range metrics {
			fmt.Fprintf(b, " %s | xTCF |", metricDefs[m].title)
			if mvt {
				b.WriteString(" xMVT |")
			}
		}
		b.WriteString(" runs (flagged) |\n|---|")
		for range metrics {
			b.WriteString("---:|---:|")
			if mvt {
				b.WriteString("---:|")
			}
		}
		b.WriteString("---:|\n")
		for _, mode := range r.Modes {
			any := false
			row := &strings.Builder{}
			fmt.Fprintf(row, "| %s |", mode)
			runs, flagged := 0, 0
			for _, m := range metrics {
				x, ok := r.result(mode, c.name, m)
				if !ok {
					row.WriteString(" - | - |")
					if mvt {
						row.WriteString(" - |")
					}
					continue
				}
				any = true
				runs, flagged = max(runs, x.Runs), max(flagged, x.Flagged)
				u := metricDefs[m].unit
				fmt.Fprintf(row, " %s [%s..%s] |", num(x.Median, u), num(x.Min, u), num(x.Max, u))
				ratio(row, x.Ratio, m)
				if mvt {
					ratio(row, x.RatioMacvtap, m)
				}
			}
			fmt.Fprintf(row, " %d (%d) |\n", runs, flagged)
			if any {
				b.WriteString(row.String())
			}
		}
		b.WriteString("\n")
	}
	r.againstBase(b)
	r.lossAccount(b)
	b.WriteString("Modes:\n\n")
	for _, m := range r.Modes {
		fmt.Fprintf(b, "- `%s`: %s\n", m, r.ModeInfo[m])
	}
	var flags []string
	for _, s := range r.Samples {
		if len(s.Flags) > 0 {
			flags = append(flags, fmt.Sprintf("- round %d %s %s: %s", s.Round, s.Mode, s.Case, strings.Join(s.Flags, "; ")))
		}
	}
	if len(flags) > 0 {
		fmt.Fprintf(b, "\nFlagged samples (left out of the medians): %s\n\n%s\n", r.flagSummary(), strings.Join(flags, "\n"))
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(b, "\nNotes:\n\n- %s\n", strings.Join(r.Notes, "\n- "))
	}
	_, err := io.WriteString(w, b.String())
	return err
}
