package control_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/store"
)

// fixtureSandbox is the longest sandbox id of the fixture (the one with kata-ipvs rules).
const fixtureSandbox = "6ec7a98f3b2c41d0a6f1e9b7c5d3a201"

// recorder is a dataplane that records what Reconcile is given at start and programs it, as
// the real dataplane re-adopts its pins.
type recorder struct {
	*controltest.MemDataplane
	b strings.Builder
}

func (r *recorder) Reconcile(ctx context.Context, sb control.Sandbox, eps []control.Endpoint, routes []control.Route) error {
	fmt.Fprintf(&r.b, "reconcile %s: %d endpoints\n", sb.ID, len(eps))
	for _, rt := range routes {
		fmt.Fprintf(&r.b, "  programmed route slot=%d dest=%s gateway=%s\n", rt.Slot, rt.Dest, rt.Gateway)
	}
	for _, ep := range eps {
		if err := r.AddEndpoint(ctx, ep); err != nil {
			return err
		}
	}
	return r.SetRoutes(ctx, sb.ID, routes)
}

// lbRecorder is a kata-ipvs dataplane that records the tables it is given.
type lbRecorder struct{ saved map[string]*ipvs.Table }

func (l *lbRecorder) SetLB(_ context.Context, id string, t *ipvs.Table) error {
	l.saved[id] = t
	return nil
}
func (l *lbRecorder) RestoreLB(ctx context.Context, id string, t *ipvs.Table) error {
	return l.SetLB(ctx, id, t)
}
func (l *lbRecorder) LBCounters(context.Context, string) (ipvs.Counters, error) { return nil, nil }
func (l *lbRecorder) CleanupConns(context.Context, string, netip.Addr, uint8) (int, error) {
	return 0, nil
}

// TestStateFromBefore loads testdata/state-v1, a state directory written by the agent of
// 2026-12-04 (before the API and dataplane restructuring; see testdata/state-v1/README), and
// checks that today's code reads the same sandboxes, NICs, routes, endpoints and kata-ipvs
// rules from it, hands the same endpoints and routes to the dataplane, and reports the same
// status. The want files were written by that same agent from that state.
func TestStateFromBefore(t *testing.T) {
	dir := t.TempDir()
	// A copy: the agent may rewrite and clean its state directory.
	if out, err := exec.Command("cp", "-a", "testdata/state-v1/state", dir).CombinedOutput(); err != nil {
		t.Fatalf("copy fixture: %v\n%s", err, out)
	}
	dir = filepath.Join(dir, "state")
	s, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rec := &recorder{MemDataplane: controltest.NewMemDataplane()}
	taps := controltest.NewMemTaps()
	c, err := control.New(ctx, control.Config{Dataplane: rec, Taps: taps, Store: s, Hotplug: controltest.NewMemHotplugger(),
		CheckNetNS: func(string) error { return nil }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var g strings.Builder
	for _, sb := range c.Sandboxes() {
		// The fields the agent of before had, printed as its %+v did; newer fields must
		// take their defaults.
		fmt.Fprintf(&g, "sandbox {ID:%s NetNS:%s QMP:%s Uplink:%s Mode:%s AntiSpoof:%v StrictEgress:%v}\n",
			sb.ID, sb.NetNS, sb.QMP, sb.Uplink, sb.Mode, sb.AntiSpoof, sb.StrictEgress)
		if sb.Vhost != "" {
			t.Errorf("sandbox %s from before: vhost %q, want \"\" (auto)", sb.ID, sb.Vhost)
		}
		ifs, err := c.Ifaces(ctx, sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		for _, i := range ifs {
			b, _ := json.Marshal(i)
			fmt.Fprintf(&g, "  iface %s\n", b)
		}
		rs, err := c.Routes(ctx, sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			b, _ := json.Marshal(r)
			fmt.Fprintf(&g, "  route %s\n", b)
		}
	}
	for _, ep := range c.Endpoints() {
		fmt.Fprintf(&g, "endpoint %s slot=%d nic=%s tap=%s uplink=%s mac=%s addr=%s mtu=%d queues=%d mode=%s antiSpoof=%v strictEgress=%v netns=%s\n",
			ep.Sandbox, ep.Slot, ep.NIC, ep.Tap, ep.Uplink, ep.MAC, ep.Addr, ep.MTU, ep.Queues, ep.Mode, ep.AntiSpoof, ep.StrictEgress, ep.NetNS)
	}
	for _, id := range []string{"6ec7", "b2", "direct1"} {
		for _, op := range []string{"list-ifaces", "list-routes"} {
			out, err := api.KataNetwork(ctx, c, id, op, nil)
			fmt.Fprintf(&g, "kata-network %s %s: %q %v\n", op, id, out, err)
		}
	}
	g.WriteString(rec.b.String())

	ist, err := store.Open(filepath.Join(dir, "ipvs"))
	if err != nil {
		t.Fatal(err)
	}
	lb := &lbRecorder{saved: map[string]*ipvs.Table{}}
	m, err := ipvsctl.New(ctx, lb, ist, c.Health, c.Sandboxes(), nil)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&g, "ipvs save %s:\n%s", fixtureSandbox, m.Table(fixtureSandbox).Save())
	if got := lb.saved[fixtureSandbox]; got == nil || got.Save() != m.Table(fixtureSandbox).Save() {
		t.Errorf("kata-ipvs rules not reinstalled in the dataplane: %v", got)
	}
	if got, want := m.Table(fixtureSandbox).ConnTimeouts, (ipvs.Timeouts{TCP: 600, TCPFin: 60, UDP: 200}); got != want {
		t.Errorf("kata-ipvs timeouts %+v, want %+v", got, want)
	}

	want, err := os.ReadFile("testdata/state-v1/want.txt")
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(string(want), g.String()); d != "" {
		t.Errorf("state from before (-want +got):\n%s", d)
	}
	st, _ := json.MarshalIndent(c.Status(ctx), "", " ")
	wantSt, err := os.ReadFile("testdata/state-v1/want-status.json")
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(string(wantSt), string(st)+"\n"); d != "" {
		t.Errorf("status of the state from before (-want +got):\n%s", d)
	}
}
