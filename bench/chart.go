package bench

import (
	"bufio"
	"fmt"
	"html"
	"math"
	"os"
	"path/filepath"
	"strconv"
)

// writeCharts draws grouped bar charts (one bar per mode, one group per
// case; the tables hold min and max) of frames per second, forward-path CPU
// per frame and latency into dir as SVG.
//
// The SVG is written by hand: a plotting library (gonum/plot) linked into the one kata-dp
// binary parsed its fonts at every start of every kata-dp process, the CLI's kata-network and
// kata-ipvs calls included (2-3 ms of each start and 7 MB of the binary, docs/performance.md).
func writeCharts(r *Report, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("charts: %w", err)
	}
	var oneWay, lat []string
	for _, c := range r.cases {
		if c.dir == rr {
			lat = append(lat, c.name)
		} else {
			oneWay = append(oneWay, c.name)
		}
	}
	charts := []struct {
		file, title, ylabel string
		groups              []string
		metrics             []string
		scale               float64
	}{
		{"pps.svg", "One-way throughput (median)", "thousand frames/s", oneWay, []string{"pps"}, 1e-3},
		{"cpu.svg", "Forward-path CPU per frame above a drop at ingress", "ns per frame", oneWay, []string{"fwd_ns"}, 1},
		{"latency.svg", "UDP request/response, one outstanding: median round trip", "microseconds (p50)", lat, []string{"p50_us"}, 1},
		{"latency-p99.svg", "UDP request/response, one outstanding: 99th percentile", "microseconds (p99)", lat, []string{"p99_us"}, 1},
	}
	for _, ch := range charts {
		if len(ch.groups) == 0 {
			continue
		}
		if err := barChart(r, filepath.Join(dir, ch.file), ch.title, ch.ylabel, ch.groups, ch.metrics, ch.scale); err != nil {
			return fmt.Errorf("chart %s: %w", ch.file, err)
		}
	}
	return nil
}

// chartSeries is one mode's bars: a value per group (NaN: no result).
type chartSeries struct {
	name string
	vals []float64
}

func barChart(r *Report, path, title, ylabel string, cases, metrics []string, scale float64) error {
	var groups []string
	for _, c := range cases {
		for _, m := range metrics {
			if len(metrics) > 1 {
				groups = append(groups, c+" "+metricDefs[m].title)
			} else {
				groups = append(groups, c)
			}
		}
	}
	var series []chartSeries
	for _, mode := range r.Modes {
		s := chartSeries{name: mode}
		has := false
		for _, c := range cases {
			for _, m := range metrics {
				v := math.NaN()
				if x, ok := r.result(mode, c, m); ok {
					v, has = max(0, x.Median*scale), true
				}
				s.vals = append(s.vals, v)
			}
		}
		if has {
			series = append(series, s)
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	writeBarSVG(w, title, ylabel, groups, series)
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writeBarSVG draws the grouped bars: one group per entry of groups, one bar per series in
// it, a y axis from 0 with round ticks and head room for the legend in the top right corner.
// Lengths are points (72 per inch): 4 inches high, 1.4 inches per group (6 at least) wide.
func writeBarSVG(w *bufio.Writer, title, ylabel string, groups []string, series []chartSeries) {
	const (
		height                          = 288.0
		left, right, top, bottom, barsW = 64.0, 12.0, 30.0, 34.0, 64.0
	)
	width := 72 * max(6, 1.4*float64(len(groups)+1))
	plotW, plotH := width-left-right, height-top-bottom
	hi := 0.0
	for _, s := range series {
		for _, v := range s.vals {
			if !math.IsNaN(v) {
				hi = max(hi, v)
			}
		}
	}
	// Head room for the legend, as many lines as series.
	ymax := hi * (1.1 + 0.07*float64(len(series)))
	if ymax <= 0 {
		ymax = 1
	}
	step := niceStep(ymax / 5)
	y := func(v float64) float64 { return top + plotH - v/ymax*plotH }
	num := func(v float64) string { return strconv.FormatFloat(v, 'f', 2, 64) }
	esc := html.EscapeString

	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="%spt" height="%spt" viewBox="0 0 %s %s" font-family="Liberation Sans, Arial, Helvetica, sans-serif">
<rect width="100%%" height="100%%" fill="white"/>
`, num(width), num(height), num(width), num(height))
	fmt.Fprintf(w, "<text x=\"%s\" y=\"18\" font-size=\"12\" text-anchor=\"middle\">%s</text>\n", num(left+plotW/2), esc(title))
	fmt.Fprintf(w, "<text transform=\"translate(14 %s) rotate(-90)\" font-size=\"10\" text-anchor=\"middle\">%s</text>\n", num(top+plotH/2), esc(ylabel))
	// The y axis and its ticks.
	for v := 0.0; v <= ymax+step*1e-9; v += step {
		fmt.Fprintf(w, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" stroke=\"#ddd\" stroke-width=\"0.5\"/>\n", num(left), num(y(v)), num(left+plotW), num(y(v)))
		fmt.Fprintf(w, "<text x=\"%s\" y=\"%s\" font-size=\"9\" text-anchor=\"end\">%s</text>\n", num(left-4), num(y(v)+3), strconv.FormatFloat(v, 'g', 6, 64))
	}
	fmt.Fprintf(w, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" stroke=\"black\"/>\n", num(left), num(top), num(left), num(top+plotH))
	fmt.Fprintf(w, "<line x1=\"%s\" y1=\"%s\" x2=\"%s\" y2=\"%s\" stroke=\"black\"/>\n", num(left), num(top+plotH), num(left+plotW), num(top+plotH))
	// The groups, each centred in its slot, and their bars side by side.
	slot := plotW / float64(max(1, len(groups)))
	bw := barsW / float64(max(1, len(series)))
	for g, name := range groups {
		cx := left + slot*(float64(g)+0.5)
		fmt.Fprintf(w, "<text x=\"%s\" y=\"%s\" font-size=\"10\" text-anchor=\"middle\">%s</text>\n", num(cx), num(top+plotH+14), esc(name))
		for i, s := range series {
			v := s.vals[g]
			if math.IsNaN(v) {
				continue
			}
			x := cx + bw*(float64(i)-float64(len(series))/2)
			fmt.Fprintf(w, "<rect x=\"%s\" y=\"%s\" width=\"%s\" height=\"%s\" fill=\"%s\"><title>%s %s: %s</title></rect>\n",
				num(x), num(y(v)), num(bw), num(top+plotH-y(v)), palette[i%len(palette)], esc(s.name), esc(name), strconv.FormatFloat(v, 'g', 6, 64))
		}
	}
	// The legend, top right.
	for i, s := range series {
		ly := top + 6 + 13*float64(i)
		fmt.Fprintf(w, "<rect x=\"%s\" y=\"%s\" width=\"9\" height=\"9\" fill=\"%s\"/>\n", num(left+plotW-10), num(ly), palette[i%len(palette)])
		fmt.Fprintf(w, "<text x=\"%s\" y=\"%s\" font-size=\"9\" text-anchor=\"end\">%s</text>\n", num(left+plotW-14), num(ly+8), esc(s.name))
	}
	fmt.Fprint(w, "</svg>\n")
}

// niceStep rounds a tick step up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 || math.IsNaN(raw) || math.IsInf(raw, 0) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

// palette has a colour for each mode.
var palette = []string{
	"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
	"#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
}
