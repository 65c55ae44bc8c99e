package metrics

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/control/watch"
	"github.com/prometheus/client_golang/prometheus"
)

const testNS = "/proc/self/ns/net"

// fakeLB is one sandbox's rules with fixed counters.
type fakeLB struct {
	id  string
	t   *ipvs.Table
	err error
}

func (f fakeLB) Sandboxes() []string { return []string{f.id} }
func (f fakeLB) Counters(context.Context, string) (*ipvs.Table, ipvs.Counters, error) {
	return f.t, fixedCounters{}, f.err
}

type fixedCounters struct{}

func (fixedCounters) Service(id uint32) ipvs.ServiceCounters {
	return ipvs.ServiceCounters{Stats: ipvs.Stats{Conns: 7, InPkts: 70, OutPkts: 60, InBytes: 7000, OutBytes: 6000}}
}
func (fixedCounters) Server(id uint32) ipvs.ServerCounters {
	return ipvs.ServerCounters{ActiveConn: 2, InActConn: 1, Stats: ipvs.Stats{Conns: 3 + uint64(id)}}
}

type fakeDatapath struct{}

func (fakeDatapath) ConnTable(context.Context, string) (int, int, error) { return 10, 16384, nil }
func (fakeDatapath) MapMemory(context.Context, string) (map[string]uint64, error) {
	return map[string]uint64{"kdp_lb_ct2": 4096}, nil
}

func newController(t *testing.T) *control.Controller {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	taps := controltest.NewMemTaps()
	taps.AddLink(testNS, "eth0", false)
	ctrl, err := control.New(context.Background(), control.Config{
		Dataplane: controltest.NewMemDataplane(), Taps: taps, Store: st,
		CheckNetNS: func(string) error { return nil }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return ctrl
}

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

func TestMetrics(t *testing.T) {
	ctrl := newController(t)
	ctx := context.Background()
	if _, err := ctrl.AddSandbox(ctx, control.SandboxSpec{ID: "m1", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.AddIface(ctx, "m1", mustAddRequest(t)); err != nil {
		t.Fatal(err)
	}
	tbl := &ipvs.Table{}
	for _, p := range []string{"-A -t 10.96.0.10:80 -s rr -p 60", "-a -t 10.96.0.10:80 -r 10.0.0.11:80 -m -w 2"} {
		cmd, err := ipvs.ParseParameters(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tbl.Apply(cmd); err != nil {
			t.Fatal(err)
		}
	}
	m := New("v-test")
	m.AddSources(Sources{Controller: ctrl, LB: fakeLB{id: "m1", t: tbl}, Datapath: fakeDatapath{}})
	m.Observe("add-iface", 1000, nil)
	m.Reconciled(1, 0)
	m.Task(watch.Task{Name: "lb-sweep", Run: func(context.Context) error { return errors.New("x") }}).Run(ctx)
	body := scrape(t, m)
	for _, want := range []string{
		`kata_dp_endpoint_packets_total{direction="from_guest",mode="tc",nic="eth1",sandbox="m1"} 0`,
		`kata_dp_endpoint_bytes_total{direction="to_guest",mode="tc",nic="eth1",sandbox="m1"} 0`,
		`kata_dp_agent_info{version="v-test"} 1`,
		`kata_dp_operations_total{op="add-iface",result="ok"} 1`,
		`kata_dp_operation_duration_seconds_bucket{op="add-iface",le="0.0005"} 1`,
		`kata_dp_endpoints{sandbox="m1"} 1`,
		`kata_dp_sandboxes{state="ready"} 1`,
		`kata_dp_sandboxes{state="unhealthy"} 0`,
		`kata_dp_lb_service_connections_total{protocol="TCP",sandbox="m1",service="10.96.0.10:80"} 7`,
		`kata_dp_lb_service_packets_total{direction="in",protocol="TCP",sandbox="m1",service="10.96.0.10:80"} 70`,
		`kata_dp_lb_service_bytes_total{direction="out",protocol="TCP",sandbox="m1",service="10.96.0.10:80"} 6000`,
		`kata_dp_lb_server_active_connections{protocol="TCP",sandbox="m1",server="10.0.0.11:80",service="10.96.0.10:80"} 2`,
		`kata_dp_lb_server_inactive_connections{protocol="TCP",sandbox="m1",server="10.0.0.11:80",service="10.96.0.10:80"} 1`,
		`kata_dp_lb_server_weight{protocol="TCP",sandbox="m1",server="10.0.0.11:80",service="10.96.0.10:80"} 2`,
		`kata_dp_conntrack_entries{sandbox="m1"} 10`,
		`kata_dp_conntrack_capacity{sandbox="m1"} 16384`,
		`kata_dp_bpf_map_memory_bytes{map="kdp_lb_ct2",sandbox="m1"} 4096`,
		`kata_dp_reconciles_total{result="ok"} 1`,
		`kata_dp_qmp_errors_total{call="plug"} 0`,
		`kata_dp_task_runs_total{result="error",task="lb-sweep"} 1`,
		`kata_dp_lb_stats_errors 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if !strings.Contains(body, "kata_dp_reconcile_last_success_timestamp_seconds 1") {
		t.Errorf("last reconcile time not set")
	}
	promtoolCheck(t, body)
}

// promtoolCheck runs `promtool check metrics` (Prometheus's own linter of names, help and
// types) on an exposition.
func promtoolCheck(t *testing.T, body string) {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (Debian package prometheus; hack/install-deps.sh installs it): %v", err)
	}
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

func mustAddRequest(t *testing.T) netspec.AddRequest {
	t.Helper()
	var req netspec.AddRequest
	in := `{"device":"tap1","name":"eth1","IPAddresses":[{"address":"10.0.0.2","mask":"24"}],"hwAddr":"02:00:00:00:00:01","mtu":1500}`
	if err := json.Unmarshal([]byte(in), &req); err != nil {
		t.Fatal(err)
	}
	return req
}

func TestLBErrorsCounted(t *testing.T) {
	ctrl := newController(t)
	m := New("v")
	m.AddSources(Sources{Controller: ctrl, LB: fakeLB{id: "gone", err: errors.New("sandbox not loaded")}})
	if body := scrape(t, m); !strings.Contains(body, "kata_dp_lb_stats_errors 1") {
		t.Errorf("a failed LB read is not counted:\n%s", body)
	}
}

func TestHotplugCounted(t *testing.T) {
	m := New("v")
	hp := controltest.NewMemHotplugger()
	hp.Fail = func(method, _ string) error {
		if method == "Healthy" {
			return errors.New("qmp: connection refused")
		}
		return nil
	}
	h := m.Hotplug(hp)
	h.Healthy(context.Background(), control.Sandbox{ID: "x"})
	h.Plug(context.Background(), control.Sandbox{ID: "x"}, control.Endpoint{})
	body := scrape(t, m)
	for _, want := range []string{`kata_dp_qmp_errors_total{call="health"} 1`, `kata_dp_qmp_errors_total{call="plug"} 0`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestReadiness(t *testing.T) {
	h := &Health{}
	done := h.Gate("state", "loading the saved state")
	h.Add("discovery", func(context.Context) error { return nil })
	get := func(path string) (int, string) {
		rec := httptest.NewRecorder()
		srv := NewServer(New("v"), h)
		srv.Handler.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable ||
		body != "[-]state failed: not yet: loading the saved state\n[+]discovery ok\nnot ready\n" {
		t.Errorf("/readyz before the gate = %d %q", code, body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	done()
	if code, body := get("/readyz"); code != 200 || body != "ok\n" {
		t.Errorf("/readyz after the gate = %d %q", code, body)
	}
	if code, body := get("/readyz?verbose"); code != 200 || body != "[+]state ok\n[+]discovery ok\nok\n" {
		t.Errorf("/readyz?verbose = %d %q", code, body)
	}
	h.Add("discovery", func(context.Context) error { return errors.New("kata: /run/vc unreadable") })
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "[-]discovery failed: kata: /run/vc unreadable\n") {
		t.Errorf("/readyz with a failed check = %d %q", code, body)
	}
}

func TestCheckAddr(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		remote bool
		ok     bool
	}{
		{"127.0.0.1:9464", false, true},
		{"[::1]:9464", false, true},
		{"localhost:9464", false, true},
		{"127.0.0.2:0", false, true},
		{":9464", false, false},
		{"0.0.0.0:9464", false, false},
		{"10.0.0.1:9464", false, false},
		{"10.0.0.1:9464", true, true},
		{":9464", true, true},
		{"9464", true, false},
	} {
		err := CheckAddr(tc.addr, tc.remote)
		if (err == nil) != tc.ok {
			t.Errorf("CheckAddr(%q, %v) = %v, want ok=%v", tc.addr, tc.remote, err, tc.ok)
		}
		if err != nil && !tc.remote && tc.addr != "9464" && !errors.Is(err, ErrRemote) {
			t.Errorf("CheckAddr(%q) = %v, want ErrRemote", tc.addr, err)
		}
	}
}

// TestMetricsDocumented: every kata_dp_ metric the agent exposes is in docs/metrics.md (which
// deploy's tests hold the dashboard and the alert rules to).
func TestMetricsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	ctrl := newController(t)
	m := New("v")
	m.AddSources(Sources{Controller: ctrl})
	m.Task(watch.Task{Name: "x", Run: func(context.Context) error { return nil }}).Run(context.Background())
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range families {
		names = append(names, f.GetName())
	}
	// The collectors' descriptions (series that need a sandbox, a service, ...).
	ch := make(chan *prometheus.Desc, 64)
	go func() { (&collector{}).Describe(ch); close(ch) }()
	for d := range ch {
		name := strings.TrimPrefix(d.String(), `Desc{fqName: "`)
		names = append(names, name[:strings.IndexByte(name, '"')])
	}
	for _, n := range names {
		if strings.HasPrefix(n, "kata_dp_") && !strings.Contains(string(doc), "`"+n+"`") {
			t.Errorf("%s is not documented in docs/metrics.md", n)
		}
	}
}
