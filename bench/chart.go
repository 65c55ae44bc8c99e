package bench

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
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
	w := vg.Points(64 / float64(max(1, len(shown))))
	top := 0.0
	for i, mode := range shown {
		vals := make(plotter.Values, len(groups))
		j := 0
		for _, c := range cases {
			for _, m := range metrics {
				if x, ok := r.result(mode, c, m); ok {
					vals[j] = max(0, x.Median*scale)
					top = max(top, vals[j])
				}
				j++
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = vg.Length(0)
		bars.Color = palette[i%len(palette)]
		bars.Offset = w * vg.Length(float64(i)-float64(len(shown)-1)/2)
		p.Add(bars)
		p.Legend.Add(mode, bars)
	}
	p.Legend.Top = true
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.NominalX(groups...)
	p.X.Min, p.X.Max = -0.6, float64(len(groups))-0.4
	// Head room for the legend, which sits in the top right corner.
	p.Y.Min, p.Y.Max = 0, top*(1.1+0.07*float64(len(shown)))
	width := vg.Length(max(6, 1.4*float64(len(groups)+1))) * vg.Inch
	return p.Save(width, 4*vg.Inch, path)
}

// palette has a colour for each mode (plotutil's repeats after seven).
var palette = []color.Color{
	color.RGBA{0x1f, 0x77, 0xb4, 0xff}, color.RGBA{0xff, 0x7f, 0x0e, 0xff}, color.RGBA{0x2c, 0xa0, 0x2c, 0xff},
	color.RGBA{0xd6, 0x27, 0x28, 0xff}, color.RGBA{0x94, 0x67, 0xbd, 0xff}, color.RGBA{0x8c, 0x56, 0x4b, 0xff},
	color.RGBA{0xe3, 0x77, 0xc2, 0xff}, color.RGBA{0x7f, 0x7f, 0x7f, 0xff}, color.RGBA{0xbc, 0xbd, 0x22, 0xff},
	color.RGBA{0x17, 0xbe, 0xcf, 0xff},
}
