package bench

import (
	"bufio"
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"strings"
	"testing"
)

// TestBarSVG draws two modes over three groups, one value missing, and reads the SVG back:
// well-formed XML, one bar per value present, names escaped, bars no higher than the plot.
func TestBarSVG(t *testing.T) {
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	writeBarSVG(w, "frames & more", "k/s", []string{"h2g-64", "g2h-64", "<x>"}, []chartSeries{
		{"tc", []float64{900, 850, math.NaN()}},
		{"macvtap", []float64{1000, 0, 12.5}},
	})
	w.Flush()
	d := xml.NewDecoder(&b)
	bars, texts := 0, []string{}
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed: %v\n%s", err, b.String())
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			for _, a := range se.Attr {
				if a.Name.Local == "height" && strings.HasPrefix(a.Value, "-") {
					t.Errorf("negative bar height %s", a.Value)
				}
			}
			if len(se.Attr) > 0 && se.Attr[0].Name.Local == "x" {
				bars++
			}
		}
		if cd, ok := tok.(xml.CharData); ok {
			texts = append(texts, string(cd))
		}
	}
	// 5 values present; the legend adds one square per series.
	if want := 5 + 2; bars != want {
		t.Errorf("%d rects with x, want %d", bars, want)
	}
	all := strings.Join(texts, "|")
	for _, s := range []string{"frames & more", "k/s", "<x>", "macvtap"} {
		if !strings.Contains(all, s) {
			t.Errorf("text %q missing from %q", s, all)
		}
	}
}

func TestNiceStep(t *testing.T) {
	for _, c := range []struct{ in, want float64 }{{0.3, 0.5}, {1, 1}, {1.2, 2}, {37, 50}, {210, 500}, {0, 1}} {
		if got := niceStep(c.in); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("niceStep(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
