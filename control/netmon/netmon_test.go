package netmon_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netmon"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

// rig is a real controller (BPF dataplane, netlink taps, a state store; no VM) and a netmon
// Monitor over it, with sandboxes in throwaway namespaces.
type rig struct {
	t      *testing.T
	dir    string // state
	root   string // bpffs
	dp     *dataplane.Dataplane
	ctrl   *control.Controller
	stop   func()
	log    *syncBuffer
	mu     sync.Mutex
	rounds map[string]int // reconciles per sandbox
	errs   map[string]error
	wake   chan struct{}
}

func newRig(t *testing.T) *rig {
	topotest.RequireRoot(t, "creates network namespaces, veths, taps and BPF programs")
	r := &rig{t: t, dir: t.TempDir(), root: topotest.BPFFS(t, "kdptnm"),
		log: &syncBuffer{}, rounds: map[string]int{}, errs: map[string]error{}, wake: make(chan struct{}, 1)}
	r.start()
	t.Cleanup(func() {
		r.halt()
		if t.Failed() {
			t.Logf("log:\n%s", r.log.String())
		}
	})
	return r
}

// start opens the controller from the saved state and starts a Monitor.
func (r *rig) start() {
	t := r.t
	dp, err := dataplane.New(r.root)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(r.dir)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var mon *netmon.Monitor
	ctrl, err := control.New(context.Background(), control.Config{Dataplane: dp, Taps: control.NetdevTaps{}, Store: st, Logger: log,
		OnSandboxAdded: func(control.Sandbox) { mon.Sync() }, OnSandboxRemoved: func(string) { mon.Sync() }})
	if err != nil {
		t.Fatal(err)
	}
	mon = netmon.New(ctrl, netmon.Options{Logger: log, RetryAfter: 50 * time.Millisecond, OnReconciled: func(id string, err error) {
		r.mu.Lock()
		r.rounds[id]++
		r.errs[id] = err
		r.mu.Unlock()
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		mon.Run(ctx)
	}()
	r.dp, r.ctrl = dp, ctrl
	r.stop = func() {
		cancel()
		<-done
		dp.Close()
	}
}

// halt stops the Monitor and closes the dataplane (the pins stay, as when the agent stops).
func (r *rig) halt() {
	if r.stop != nil {
		r.stop()
		r.stop = nil
	}
}

// sandbox registers a sandbox in a new netns with a veth eth0 (its uplink) toward a host netns.
func (r *rig) sandbox(id string, netmonOn bool) (sb, host *topo.NetNS) {
	t := r.t
	sb, host = topotest.MustNetNS(t, "kdptnm-s"), topotest.MustNetNS(t, "kdptnm-h")
	if err := topo.VethPair(host, "veth0", sb, "eth0"); err != nil {
		t.Fatal(err)
	}
	mustIP(t, sb, "link", "set", "eth0", "up")
	if _, err := r.ctrl.AddSandbox(context.Background(), control.SandboxSpec{ID: id, NetNS: sb.Path(), Netmon: netmonOn}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if r.stop != nil {
			r.ctrl.DelSandbox(context.Background(), id)
		}
	})
	return sb, host
}

func mustIP(t *testing.T, ns *topo.NetNS, args ...string) {
	t.Helper()
	if out, err := ns.Exec(append([]string{"ip"}, args...)...); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// nics describes the sandbox's NICs as "name source mac [addrs] uplink mtu=N" lines and its
// routes as "route dest gw dev", sorted.
func (r *rig) nics(id string) []string {
	nics, routes, err := r.ctrl.NICs(id)
	if err != nil {
		r.t.Fatal(err)
	}
	var out []string
	for _, n := range nics {
		out = append(out, fmt.Sprintf("%s %s %s %v %s mtu=%d", n.Spec.Name, n.Source, n.Spec.HwAddr, addrs(n.Spec.IPAddresses), n.Uplink, n.Spec.MTU))
	}
	for _, rt := range routes {
		out = append(out, fmt.Sprintf("route %s %s %s", rt.Dest, rt.Gateway, rt.Device))
	}
	slices.Sort(out)
	return out
}

func addrs(as []*netspec.IPAddress) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.Address+"/"+a.Mask)
	}
	return out
}

// waitNICs waits until the sandbox's NICs and routes are want, checking after every reconcile
// of any sandbox. The bound only guards against a hang.
func (r *rig) waitNICs(id string, want []string) {
	r.t.Helper()
	slices.Sort(want)
	guard := time.After(60 * time.Second)
	for {
		got := r.nics(id)
		if slices.Equal(got, want) {
			return
		}
		select {
		case <-r.wake:
		case <-guard:
			r.mu.Lock()
			err := r.errs[id]
			r.mu.Unlock()
			r.t.Fatalf("sandbox %s never converged:\n got %q\nwant %q\nlast reconcile error: %v", id, got, want, err)
		}
	}
}

func macOf(t *testing.T, ns *topo.NetNS, dev string) string {
	t.Helper()
	li, err := ns.Link(dev)
	if err != nil {
		t.Fatal(err)
	}
	return li.MAC.String()
}

// taps lists the tuntap links of the netns.
func taps(t *testing.T, ns *topo.NetNS) []string {
	t.Helper()
	out, err := ns.Exec("ip", "-o", "-d", "link", "show", "type", "tun")
	if err != nil {
		t.Fatalf("list taps: %v\n%s", err, out)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	slices.Sort(names)
	return names
}

// TestJoinUpdateLeave: a veth that appears in the netns, up with an address and a route, joins
// as a netmon NIC (its name, MAC, address; its tap joined to it; the route through it); links
// netmon must not take (loopback, a tap, a down link, the sandbox's uplink) are left alone; an
// address change reaches update-iface; removing the veth removes the NIC, its tap and its route.
func TestJoinUpdateLeave(t *testing.T) {
	r := newRig(t)
	sb, host := r.sandbox("nmjoin", true)
	mustIP(t, sb, "link", "set", "lo", "up")
	mustIP(t, sb, "tuntap", "add", "name", "tap9_kata", "mode", "tap")
	mustIP(t, sb, "link", "set", "tap9_kata", "up")
	mustIP(t, sb, "tuntap", "add", "name", "tun9", "mode", "tun") // no MAC
	mustIP(t, sb, "link", "set", "tun9", "up")
	if err := topo.VethPair(host, "veth-down", sb, "down1"); err != nil {
		t.Fatal(err)
	}
	mustIP(t, sb, "link", "set", "down1", "down")
	if err := topo.VethPair(host, "veth1", sb, "net1"); err != nil {
		t.Fatal(err)
	}
	mac := macOf(t, sb, "net1")
	mustIP(t, sb, "addr", "add", "10.50.0.2/24", "dev", "net1")
	mustIP(t, sb, "link", "set", "net1", "up")
	mustIP(t, sb, "route", "add", "10.60.0.0/16", "via", "10.50.0.1", "dev", "net1")
	r.waitNICs("nmjoin", []string{"net1 netmon " + mac + " [10.50.0.2/24] net1 mtu=1500", "route 10.60.0.0/16 10.50.0.1 net1"})
	st := r.ctrl.Status(context.Background())
	ep := st[0].Endpoints[0]
	if !ep.TapCreated || ep.Uplink != "net1" || ep.Source != control.SourceNetmon {
		t.Errorf("endpoint %+v: want a tap kata-dp created, joined to net1, source netmon", ep)
	}
	if got := taps(t, sb); !slices.Equal(got, sortedOf(ep.Tap, "tap9_kata", "tun9")) {
		t.Errorf("taps %q", got)
	}
	for _, skipped := range []string{"link=lo reason=loopback", "link=tap9_kata", "link=tun9", "link=down1 reason=down", "link=eth0"} {
		if !strings.Contains(r.log.String(), skipped) {
			t.Errorf("log does not say why %q is not joined", skipped)
		}
	}

	// The address changes: update-iface. (With promote_secondaries the new address survives
	// the old one's removal, and so does the route.)
	if out, err := sb.Exec("sysctl", "-w", "net.ipv4.conf.net1.promote_secondaries=1"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	mustIP(t, sb, "addr", "add", "10.50.0.3/24", "dev", "net1")
	mustIP(t, sb, "addr", "del", "10.50.0.2/24", "dev", "net1")
	r.waitNICs("nmjoin", []string{"net1 netmon " + mac + " [10.50.0.3/24] net1 mtu=1500", "route 10.60.0.0/16 10.50.0.1 net1"})
	if eps := r.ctrl.Endpoints(); len(eps) != 1 || eps[0].Addr.String() != "10.50.0.3/24" {
		t.Errorf("dataplane endpoint after the change: %+v", eps)
	}

	// Down is not gone: a joined link taken down stays joined (here its address changes while
	// it is down, so the NIC shows a reconcile that saw it down).
	mustIP(t, sb, "link", "set", "net1", "down")
	mustIP(t, sb, "addr", "add", "10.50.0.4/24", "dev", "net1")
	mustIP(t, sb, "addr", "del", "10.50.0.3/24", "dev", "net1")
	r.waitNICs("nmjoin", []string{"net1 netmon " + mac + " [10.50.0.4/24] net1 mtu=1500"})
	tap := r.ctrl.Status(context.Background())[0].Endpoints[0].Tap

	// The MTU changes (what add-iface fixed): the NIC is added again with the new one.
	mustIP(t, sb, "link", "set", "net1", "mtu", "1400", "up")
	r.waitNICs("nmjoin", []string{"net1 netmon " + mac + " [10.50.0.4/24] net1 mtu=1400"})
	if ep := r.ctrl.Status(context.Background())[0].Endpoints[0]; ep.Tap != tap || !ep.TapCreated || ep.Uplink != "net1" {
		t.Errorf("endpoint after the MTU change %+v, want tap %s re-created and joined", ep, tap)
	}

	// The veth goes: the NIC, its route and its tap go.
	mustIP(t, sb, "link", "del", "net1")
	r.waitNICs("nmjoin", nil)
	if got := taps(t, sb); !slices.Equal(got, []string{"tap9_kata", "tun9"}) {
		t.Errorf("taps after the link went: %q", got)
	}
}

func sortedOf(s ...string) []string { slices.Sort(s); return s }

// TestBurst: ten links added at once join, and removed at once leave, converging to the right
// set; a netmon-off sandbox next to it is never watched.
func TestBurst(t *testing.T) {
	r := newRig(t)
	sb, host := r.sandbox("nmburst", true)
	off, offHost := r.sandbox("nmoff", false)
	var batch, offBatch []string
	for i := range 10 {
		batch = append(batch, fmt.Sprintf("link add b%d type veth peer name p%d netns %s", i, i, host.Name()),
			fmt.Sprintf("addr add 10.70.%d.2/24 dev b%d", i, i), fmt.Sprintf("link set b%d up", i))
	}
	offBatch = append(offBatch, "link add o1 type veth peer name po1 netns "+offHost.Name(), "link set o1 up")
	mustBatch(t, off, offBatch)
	mustBatch(t, sb, batch)
	var want []string
	for i := range 10 {
		want = append(want, fmt.Sprintf("b%d netmon %s [10.70.%d.2/24] b%d mtu=1500", i, macOf(t, sb, fmt.Sprintf("b%d", i)), i, i))
	}
	r.waitNICs("nmburst", want)
	if n := len(taps(t, sb)); n != 10 {
		t.Errorf("%d taps, want 10", n)
	}
	var del []string
	for i := range 10 {
		del = append(del, fmt.Sprintf("link del b%d", i))
	}
	mustBatch(t, sb, del)
	r.waitNICs("nmburst", nil)
	if got := taps(t, sb); len(got) != 0 {
		t.Errorf("taps left: %q", got)
	}
	// netmon off: never watched, nothing joined.
	r.mu.Lock()
	n := r.rounds["nmoff"]
	r.mu.Unlock()
	if n != 0 {
		t.Errorf("sandbox without netmon reconciled %d times", n)
	}
	if got := r.nics("nmoff"); len(got) != 0 {
		t.Errorf("sandbox without netmon has NICs %q", got)
	}
}

func mustBatch(t *testing.T, ns *topo.NetNS, cmds []string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "batch")
	if err := os.WriteFile(f, []byte(strings.Join(cmds, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Exec("ip", "-batch", f); err != nil {
		t.Fatalf("ip -batch: %v\n%s", err, out)
	}
}

// TestRestartReconciles: what changed in the netns while the agent was down is reconciled from
// the netns and the saved state, not replayed: a NIC whose link went is removed, a link that
// came joins, a tap an interrupted join left behind is removed and the link joined properly.
func TestRestartReconciles(t *testing.T) {
	r := newRig(t)
	sb, host := r.sandbox("nmrestart", true)
	if err := topo.VethPair(host, "veth1", sb, "net1"); err != nil {
		t.Fatal(err)
	}
	mustIP(t, sb, "link", "set", "net1", "up")
	mac1 := macOf(t, sb, "net1")
	r.waitNICs("nmrestart", []string{"net1 netmon " + mac1 + " [] net1 mtu=1500"})

	r.halt()
	mustIP(t, sb, "link", "del", "net1")
	if err := topo.VethPair(host, "veth2", sb, "net2"); err != nil {
		t.Fatal(err)
	}
	li, err := sb.Link("net2")
	if err != nil {
		t.Fatal(err)
	}
	// An agent killed in the middle of net2's join left its tap (netmon's name for it).
	leftover := netmon.TapName("nmrestart", li.Index)
	mustIP(t, sb, "tuntap", "add", "name", leftover, "mode", "tap")
	mustIP(t, sb, "link", "set", "net2", "up")
	r.start()
	r.waitNICs("nmrestart", []string{"net2 netmon " + macOf(t, sb, "net2") + " [] net2 mtu=1500"})
	if !strings.Contains(r.log.String(), "removed a tap left behind") {
		t.Errorf("the leftover tap %s was not removed first", leftover)
	}
	st := r.ctrl.Status(context.Background())
	if ep := st[0].Endpoints[0]; !ep.TapCreated || ep.Uplink != "net2" {
		t.Errorf("endpoint after restart %+v", ep)
	}
}

// syncBuffer is safe for concurrent writers and readers.
type syncBuffer = controltest.SyncBuffer
