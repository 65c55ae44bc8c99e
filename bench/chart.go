package bench

import (
	"fmt"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// writeCharts draws grouped bar charts (one bar per mode, one group per
// case; the tables hold min and max) of frames per second, forward-path CPU
// per frame and latency into dir as SVG.
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
		{"latency.svg", "UDP request/response, one outstanding", "microseconds (p50, p99)", lat, []string{"p50_us", "p99_us"}, 1},
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

func barChart(r *Report, path, title, ylabel string, cases, metrics []string, scale float64) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
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
	var shown []string
	for _, mode := range r.Modes {
		for _, c := range cases {
			for _, m := range metrics {
				if _, ok := r.result(mode, c, m); ok && (len(shown) == 0 || shown[len(shown)-1] != mode) {
					shown = append(shown, mode)
				}
			}
		}
	}
	w := vg.Points(60 / float64(max(1, len(shown))))
	for i, mode := range shown {
		vals := make(plotter.Values, len(groups))
		j := 0
		for _, c := range cases {
			for _, m := range metrics {
				if x, ok := r.result(mode, c, m); ok {
					vals[j] = x.Median * scale
				}
				j++
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = vg.Length(0)
		bars.Color = plotutil.Color(i)
		bars.Offset = w * vg.Length(float64(i)-float64(len(shown)-1)/2)
		p.Add(bars)
		p.Legend.Add(mode, bars)
	}
	p.Legend.Top = true
	p.NominalX(groups...)
	p.Y.Min = 0
	width := vg.Length(max(6, 1.6*float64(len(groups)))) * vg.Inch
	return p.Save(width, 4*vg.Inch, path)
}
