package dataplane_test

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// rig is the standard sandbox topology with a guest behind the tap:
//
//	host netns (veth0 10.199.0.1) <-veth-> sandbox netns (eth0 | BPF | tap0_kata) <-guestemu-> guest netns (eth0 10.199.0.2)
type rig struct {
	sb     *topo.Sandbox
	guest  *topo.NetNS
	bridge *guestemu.Bridge
	dp     *dataplane.Dataplane
	root   string
	ep     control.Endpoint
}

func newRig(t *testing.T, id string) *rig {
	t.Helper()
	return newRigWith(t, id, loader.Options{})
}

// newRigWith is newRig with the loader options of the dataplane's sandboxes.
// lbMaps opens the sandbox's pinned maps, as another process would (closed at the test's
// end), and returns its load balancer's: what the datapath reads, for the tests to check.
func (r *rig) lbMaps(t *testing.T) maps.LB {
	t.Helper()
	sbm, err := loader.Open(r.root, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sbm.Close() })
	return maps.ForSandbox(sbm.Maps()).LB
}

func newRigWith(t *testing.T, id string, o loader.Options) *rig {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	r := &rig{root: topotest.BPFFS(t, "kdpt-dp")}
	r.sb = topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdpt-dp"})
	r.guest = topotest.MustNetNS(t, "kdpt-dpg")
	for _, n := range []*topo.NetNS{r.sb.Host, r.sb.NS, r.guest} {
		n.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	}
	fds, err := netdev.OpenTap(r.sb.NS.Path(), r.sb.Tap.Name, 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, f := range fds {
			f.Close()
		}
	})
	r.bridge, err = guestemu.NewBridge(fds, r.guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: r.sb.GuestMAC, Addrs: []netip.Prefix{r.sb.GuestAddr}, Offload: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.bridge.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := r.bridge.Start(ctx); err != nil {
		t.Fatal(err)
	}

	if r.dp, err = dataplane.NewWithOptions(r.root, o); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.Close() })
	if err := r.dp.EnsureSandbox(ctx, id, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.RemoveSandbox(context.Background(), id) })
	r.ep = control.Endpoint{
		Sandbox: id, NetNS: r.sb.NS.Path(), Slot: 0, NIC: "eth0", Tap: r.sb.Tap.Name, Uplink: r.sb.Veth.Name,
		MAC: r.sb.GuestMAC, Addr: r.sb.GuestAddr, MTU: 1500, Mode: control.ModeTC, AntiSpoof: true, StrictEgress: true,
	}
	if err := r.dp.AddEndpoint(ctx, r.ep); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rig) stats(t *testing.T) control.EndpointStats {
	t.Helper()
	s, err := r.dp.Stats(context.Background(), r.ep)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var pingRe = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// ping runs ping with the given interval and returns (transmitted, received).
func ping(t *testing.T, n *topo.NetNS, args ...string) (int, int) {
	t.Helper()
	out, _ := n.Exec(append([]string{"ping", "-n", "-q"}, args...)...)
	m := pingRe.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("ping %v: no summary in %q", args, out)
	}
	tx, _ := strconv.Atoi(m[1])
	rx, _ := strconv.Atoi(m[2])
	return tx, rx
}

// pingAll is ping for tests of reachability, where a lost frame is not what is tested: on a
// loaded machine a reply can come after ping stopped waiting. It runs ping again (up to three
// times in all) until every request was answered and returns the last (transmitted,
// received); a path that really drops frames loses them every time.
func pingAll(t *testing.T, n *topo.NetNS, args ...string) (int, int) {
	t.Helper()
	var tx, rx int
	for range 3 {
		if tx, rx = ping(t, n, args...); tx > 0 && rx == tx {
			break
		}
	}
	return tx, rx
}

func tcxPrograms(t *testing.T, nsPath, dev string) []string {
	t.Helper()
	var names []string
	for _, p := range topotest.TCX(t, nsPath, dev, ebpf.AttachTCXIngress) {
		names = append(names, p.Name)
	}
	return names
}

// TestTrafficThroughBPF: ping and TCP both ways through the BPF path, with no tc qdisc or
// filter on the devices, and counters equal to what crossed.
func TestTrafficThroughBPF(t *testing.T) {
	r := newRig(t, "traffic")
	host, guest := r.sb.Host, r.guest
	hostIP, guestIP := r.sb.HostAddr.Addr().String(), r.sb.GuestAddr.Addr().String()

	if tx, rx := pingAll(t, host, "-c", "5", "-i", "0.05", "-W", "2", guestIP); rx != tx {
		t.Fatalf("host->guest ping: %d/%d", rx, tx)
	}
	if tx, rx := pingAll(t, guest, "-c", "5", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("guest->host ping: %d/%d", rx, tx)
	}
	if err := topo.TCPTransfer(host, guest, guestIP+":5201", 4<<20, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := topo.TCPTransfer(guest, host, hostIP+":5202", 4<<20, 20*time.Second); err != nil {
		t.Fatal(err)
	}

	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		if got := tcxPrograms(t, r.sb.NS.Path(), dev); len(got) != 1 || !strings.HasPrefix(got[0], "kdp_") {
			t.Errorf("TCX programs on %s: %v, want one of kata-dp's", dev, got)
		}
		out, _ := r.sb.NS.Exec("tc", "qdisc", "show", "dev", dev)
		if strings.Contains(out, "clsact") || strings.Contains(out, "ingress") {
			t.Errorf("qdisc on %s: %s", dev, out)
		}
		if out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", dev, "ingress"); strings.TrimSpace(out) != "" {
			t.Errorf("tc filter on %s: %s", dev, out)
		}
	}

	// Counters: every frame the guest sent crossed tap ingress (forwarded or dropped), every
	// frame the guest received was redirected by the uplink's program.
	var s control.EndpointStats
	var b guestemu.Stats
	deadline := time.Now().Add(3 * time.Second)
	for {
		s, b = r.stats(t), r.bridge.Stats()
		if (s.FromGuest.Packets == b.TxFrames && s.ToGuest.Packets == b.RxFrames) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s.FromGuest.Packets != b.TxFrames || s.ToGuest.Packets != b.RxFrames {
		t.Errorf("BPF counters from_guest=%d to_guest=%d, emulator wrote %d and read %d frames",
			s.FromGuest.Packets, s.ToGuest.Packets, b.TxFrames, b.RxFrames)
	}
	if s.ToGuest.Bytes < 4<<20 || s.FromGuest.Bytes < 4<<20 {
		t.Errorf("byte counters too small for 4 MiB each way: %+v", s)
	}
	for dir, d := range map[string]control.DirStats{"from_guest": s.FromGuest, "to_guest": s.ToGuest} {
		for reason, n := range d.Drops {
			if n != 0 {
				t.Errorf("%s: %d drops (%s) in honest traffic", dir, n, reason)
			}
		}
	}
}

// TestSpoofAndEgress: frames with a source the guest does not own, and frames to a destination
// with no route, are dropped and counted; a route makes the destination reachable.
func TestSpoofAndEgress(t *testing.T) {
	r := newRig(t, "spoof")
	guest := r.guest
	hostIP := r.sb.HostAddr.Addr().String()

	// A second address on the guest: the datapath only knows the first.
	if _, err := guest.Exec("ip", "addr", "add", "10.199.0.99/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	// A static neighbour, so the guest sends IP frames at once instead of (spoofed) ARP.
	if _, err := guest.Exec("ip", "neigh", "replace", hostIP, "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, rx := ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "-I", "10.199.0.99", hostIP); rx != 0 {
		t.Errorf("spoofed source IP got %d replies", rx)
	}
	if got := r.stats(t).FromGuest.Drops["spoof_ip"]; got < 3 {
		t.Errorf("spoof_ip drops = %d, want >= 3", got)
	}
	// ARP claiming the other address is dropped too.
	guest.Exec("ip", "neigh", "del", hostIP, "dev", "eth0")
	ping(t, guest, "-c", "1", "-W", "1", "-I", "10.199.0.99", hostIP)
	if got := r.stats(t).FromGuest.Drops["spoof_arp"]; got < 1 {
		t.Errorf("spoof_arp drops = %d, want >= 1", got)
	}

	// A destination outside the subnet: reachable from the guest's point of view (static
	// neighbour), but not allowed by the datapath until a route covers it.
	if _, err := guest.Exec("ip", "route", "add", "10.200.0.0/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, err := guest.Exec("ip", "neigh", "replace", "10.200.0.1", "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	before := r.stats(t)
	ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "10.200.0.1")
	after := r.stats(t)
	if got := after.FromGuest.Drops["egress_no_route"] - before.FromGuest.Drops["egress_no_route"]; got != 3 {
		t.Errorf("egress_no_route drops = %d, want 3", got)
	}
	if err := r.dp.SetRoutes(context.Background(), r.ep.Sandbox, []control.Route{{Slot: 0, Dest: netip.MustParsePrefix("10.200.0.0/24")}}); err != nil {
		t.Fatal(err)
	}
	before = r.stats(t)
	ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "10.200.0.1")
	after = r.stats(t)
	if got := after.FromGuest.Drops["egress_no_route"] - before.FromGuest.Drops["egress_no_route"]; got != 0 {
		t.Errorf("egress_no_route drops with a route = %d, want 0", got)
	}
	if got := after.FromGuest.Packets - before.FromGuest.Packets; got < 3 {
		t.Errorf("forwarded with a route = %d, want >= 3", got)
	}
}

// TestReloadUnderTraffic reopens the sandbox's collection (what an agent restart or upgrade
// does) again and again while a ping flood runs: the pinned links are updated in place and
// not a single frame is lost by the datapath.
//
// The guest here is emulated in user space (guestemu copies frames between the sandbox's tap
// and a tap in the guest netns), and on a loaded machine its goroutines can stall long enough
// for a tap's queue (500 frames) to overflow: the kernel counts such a frame in the tap's
// tx_dropped. A reply missing for that reason is the emulation's, not the reload's, and is
// only logged; any other missing reply fails the test.
func TestReloadUnderTraffic(t *testing.T) {
	r := newRig(t, "reload")
	ctx := context.Background()
	queues0 := tapQueueDrops(t, r)
	st0, err := r.dp.Stats(ctx, r.ep)
	if err != nil {
		t.Fatal(err)
	}
	reloads, tx, rx := reloadUnderFlood(t, r.sb.Host, r.root, "reload", r.sb.GuestAddr.Addr().String())
	queues := tapQueueDrops(t, r) - queues0
	st, err := r.dp.Stats(ctx, r.ep)
	if err != nil {
		t.Fatal(err)
	}
	switch lost := tx - rx; {
	case tx == 0:
		t.Errorf("ping during %d reloads: nothing sent", reloads)
	case lost > queues:
		// What the datapath saw (ARP included) and dropped tells where the frames went.
		t.Errorf("ping during %d reloads: %d of %d replies; %d frames dropped at the emulated guest's tap queues; the datapath passed %d frames to the guest and %d from it, dropped %v to it and %v from it",
			reloads, rx, tx, queues, st.ToGuest.Packets-st0.ToGuest.Packets, st.FromGuest.Packets-st0.FromGuest.Packets, st.ToGuest.Drops, st.FromGuest.Drops)
	case lost > 0:
		t.Logf("%d replies missing, all of them dropped at the emulated guest's tap queues (%d frames), not by the datapath", lost, queues)
	}
	t.Logf("%d reloads, %d/%d replies", reloads, rx, tx)
}

// tapQueueDrops is the sum of the tx_dropped counters of the sandbox's tap and the emulated
// guest's tap: frames the kernel dropped because the user-space guest did not read its queue
// in time.
func tapQueueDrops(t *testing.T, r *rig) int {
	t.Helper()
	n := 0
	for _, d := range []struct {
		ns  *topo.NetNS
		dev string
	}{{r.sb.NS, r.sb.Tap.Name}, {r.guest, "eth0"}} {
		out, err := d.ns.Exec("cat", "/sys/class/net/"+d.dev+"/statistics/tx_dropped")
		if err != nil {
			t.Fatal(err)
		}
		v, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("tx_dropped of %s: %v", d.dev, err)
		}
		n += v
	}
	return n
}

// minReloads is how many times reloadUnderFlood reopens a sandbox.
const minReloads = 10

// reloadUnderFlood reopens the sandbox's collection minReloads times while ping floods dst from
// host, and returns the reloads and the flood's (transmitted, received) summed over its bursts.
// The flood runs in bursts until the reloads are done, so a slow machine makes the test longer
// instead of failing it for too few reloads within a fixed flood.
func reloadUnderFlood(t *testing.T, host *topo.NetNS, root, id, dst string) (reloads, tx, rx int) {
	t.Helper()
	stop := make(chan struct{})
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		var once sync.Once
		for {
			once.Do(func() { close(started) })
			// -w: wait for every reply (with -W ping waits two round trips for the last ones,
			// which a loaded machine can exceed without a frame being lost).
			out, _ := host.Exec("ping", "-n", "-q", "-c", "300", "-i", "0.001", "-w", "10", dst)
			m := pingRe.FindStringSubmatch(out)
			if m == nil {
				done <- fmt.Errorf("ping: no summary in %q", out)
				return
			}
			btx, _ := strconv.Atoi(m[1])
			brx, _ := strconv.Atoi(m[2])
			tx, rx = tx+btx, rx+brx
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
		}
	}()
	<-started
	time.Sleep(50 * time.Millisecond) // the first burst's ping is running
	for ; reloads < minReloads; reloads++ {
		sb, err := loader.Open(root, id)
		if err != nil {
			close(stop)
			<-done
			t.Fatal(err)
		}
		sb.Close()
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return reloads, tx, rx
}

// TestReconcileDetachesStaleLinks: an endpoint the saved state no longer has (its NIC removed
// while the agent was down, or its state lost) loses its pinned links and programs at
// reconciliation, not only its map entries.
func TestReconcileDetachesStaleLinks(t *testing.T) {
	r := newRig(t, "reconcile")
	ctx := context.Background()
	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		if got := tcxPrograms(t, r.sb.NS.Path(), dev); len(got) == 0 {
			t.Fatalf("no program on %s before: the test tests nothing", dev)
		}
	}
	sb := control.Sandbox{ID: "reconcile", NetNS: r.sb.NS.Path()}
	if err := r.dp.Reconcile(ctx, sb, nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		if got := tcxPrograms(t, r.sb.NS.Path(), dev); len(got) != 0 {
			t.Errorf("programs left on %s: %v", dev, got)
		}
	}
	if links, _ := filepath.Glob(filepath.Join(r.root, "reconcile", "links", "*")); len(links) != 0 {
		t.Errorf("pinned links left: %v", links)
	}
	// An endpoint the state still has keeps its links.
	if err := r.dp.AddEndpoint(ctx, r.ep); err != nil {
		t.Fatal(err)
	}
	if err := r.dp.Reconcile(ctx, sb, []control.Endpoint{r.ep}, nil); err != nil {
		t.Fatal(err)
	}
	if got := tcxPrograms(t, r.sb.NS.Path(), r.ep.Tap); len(got) == 0 {
		t.Error("the kept endpoint lost its programs")
	}
}
