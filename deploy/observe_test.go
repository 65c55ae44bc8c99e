package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func promtool(t *testing.T, dir string, args ...string) {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (Debian package prometheus; hack/install-deps.sh installs it): %v", err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestAlertRules: the alert rules are valid (promtool check rules) and fire, with the right
// labels and annotations, on synthetic series (promtool test rules), and stay silent on the
// series that must not fire them.
func TestAlertRules(t *testing.T) {
	promtool(t, "prometheus", "check", "rules", "kata-dp-alerts.yml")
	promtool(t, "prometheus", "test", "rules", "kata-dp-alerts_test.yml")
}

var metricName = regexp.MustCompile(`kata_dp_[a-z0-9_]+`)

// documented returns the metric names docs/metrics.md lists.
func documented(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, n := range metricName.FindAllString(string(b), -1) {
		out[n] = true
	}
	return out
}

// TestDashboardAndRulesUseRealMetrics: the Grafana dashboard is valid JSON with a query in
// every panel, and every kata_dp_ metric it or the alert rules query is one docs/metrics.md
// lists (which control/metrics' tests hold to what the agent exposes): a renamed metric cannot
// leave a dashboard panel or an alert silently empty.
func TestDashboardAndRulesUseRealMetrics(t *testing.T) {
	docs := documented(t)
	b, err := os.ReadFile("grafana/kata-dp.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("grafana/kata-dp.json: %v (uid %q, %d panels)", err, dash.UID, len(dash.Panels))
	}
	var used []string
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			used = append(used, metricName.FindAllString(q.Expr, -1)...)
		}
	}
	rules, err := os.ReadFile("prometheus/kata-dp-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(rules), "\n") {
		if strings.Contains(line, "expr:") {
			used = append(used, metricName.FindAllString(line, -1)...)
		}
	}
	slices.Sort(used)
	for _, n := range slices.Compact(used) {
		name := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
		if !docs[name] {
			t.Errorf("%s is queried but not a documented kata-dp metric (docs/metrics.md)", n)
		}
	}
}
