package kata_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
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
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/kata"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/internal/proctest"
	"github.com/vishvananda/netlink"
)

// node is a Kata-shaped node in throwaway namespaces and a temporary runtime directory: a pod
// netns whose veth has the pod's MAC, address and default route (as the CNI left it), Kata's
// tap0_kata joined to it by Kata's tcfilter recipe, a guest behind the tap with the veth's
// identity, a stand-in hypervisor process whose command line names the sandbox (as Kata's
// QEMU's -name sandbox-<id> does), and persist.json in Kata's schema.
type node struct {
	id      string
	dir     string // --kata-dir
	state   string // the agent's state dir
	root    string // bpffs root
	sb      *topo.Sandbox
	guest   *topo.NetNS
	hv      *exec.Cmd // the stand-in hypervisor
	logs    *syncBuffer
	agentMu sync.Mutex
	agent   *agent // the running one
}

type agent struct {
	dp     *dataplane.Dataplane
	ctrl   *control.Controller
	disc   *kata.Discovery
	cancel context.CancelFunc
	done   chan error
}

type syncBuffer = controltest.SyncBuffer

func newNode(t *testing.T) *node { return newNodeWith(t, true) }

// newNodeWith builds the node; without writeState Kata's directories are left to the test
// (the agent starts before the sandbox appears).
func newNodeWith(t *testing.T, writeState bool) *node {
	t.Helper()
	topotest.RequireRoot(t, "builds namespaces, taps and loads BPF programs")
	n := &node{
		id:    fmt.Sprintf("kdpt%08x", rand.Uint32()),
		dir:   t.TempDir(),
		state: t.TempDir(),
		root:  topotest.BPFFS(t, "kdpt-kata"),
		logs:  &syncBuffer{},
	}
	n.sb = topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdpt-kt"})
	n.guest = topotest.MustNetNS(t, "kdpt-ktg")
	n.guest.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	// The pod's identity on its veth, as the CNI bridge + host-local plugins leave it.
	if err := n.sb.NS.AddAddr(n.sb.Veth.Name, n.sb.GuestAddr.String()); err != nil {
		t.Fatal(err)
	}
	if err := n.sb.NS.Up(n.sb.Veth.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := n.sb.NS.Exec("ip", "route", "add", "default", "via", n.sb.HostAddr.Addr().String(), "dev", n.sb.Veth.Name); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(n.sb.NS.Path(), n.sb.Tap.Name, 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, f := range fds {
			f.Close()
		}
	})
	br, err := guestemu.NewBridge(fds, n.guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: n.sb.GuestMAC, Addrs: []netip.Prefix{n.sb.GuestAddr}, Offload: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { br.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.guest.Exec("ip", "route", "add", "default", "via", n.sb.HostAddr.Addr().String()); err != nil {
		t.Fatal(err)
	}
	// Kata's plumbing: `tc filter add dev <src> parent ffff: protocol all u32 match u8 0 0
	// action mirred egress redirect dev <dst>` both ways (network_linux.go).
	if err := n.sb.InstallTCFilter(); err != nil {
		t.Fatal(err)
	}
	if err := n.sb.Host.Ping(n.sb.GuestAddr.Addr().String(), 1, 5*time.Second); err != nil {
		t.Fatalf("guest not reachable through Kata's tcfilter: %v", err)
	}
	// The stand-in hypervisor: its command line names the sandbox.
	n.hv = exec.Command("sh", "-c", `exec -a "qemu-system-x86_64 -name sandbox-`+n.id+`" sleep 3600`)
	if err := proctest.Start(n.hv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.hv.Process.Kill(); n.hv.Wait() })
	if writeState {
		n.writeState(t)
	}
	return n
}

// writeState writes persist.json as Kata's fs driver does (json.Encoder of SandboxState).
func (n *node) writeState(t *testing.T) {
	t.Helper()
	st := kata.SandboxState{PersistVersion: 2, State: "running",
		HypervisorState: kata.HypervisorState{Type: "qemu", Pid: n.hv.Process.Pid},
		Network: kata.NetworkInfo{NetworkID: n.sb.NS.Path(), Endpoints: []kata.NetworkEndpoint{{
			Type: "virtual",
			Veth: &kata.PairEndpoint{NetPair: kata.NetworkInterfacePair{
				ID: "pair-0", Name: "br0_kata",
				TAPIface:             kata.NetworkInterface{Name: n.sb.Tap.Name, HardAddr: n.sb.GuestMAC.String()},
				VirtIface:            kata.NetworkInterface{Name: n.sb.Veth.Name, HardAddr: "86:1f:0a:33:5b:e2"},
				NetInterworkingModel: 2,
			}},
		}}},
	}
	for _, d := range []string{filepath.Join(n.dir, "sbs", n.id), filepath.Join(n.dir, "vm", n.id)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.OpenFile(filepath.Join(n.dir, "sbs", n.id, "persist.json"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := json.NewEncoder(f).Encode(st); err != nil {
		t.Fatal(err)
	}
}

// start starts an agent's control plane and discovery over the node's state.
func (n *node) start(t *testing.T) *agent {
	t.Helper()
	log := slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dp, err := dataplane.New(n.root)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(n.state)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := control.New(context.Background(), control.Config{Dataplane: dp, Taps: control.NetdevTaps{}, Store: st, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	disc := kata.New(ctrl, kata.Options{Dir: n.dir, StateDir: n.state, Logger: log})
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{dp: dp, ctrl: ctrl, disc: disc, cancel: cancel, done: make(chan error, 1)}
	go func() { a.done <- disc.Run(ctx) }()
	n.agentMu.Lock()
	n.agent = a
	n.agentMu.Unlock()
	t.Cleanup(func() { n.stop(a) })
	waitFor(t, "discovery running", disc.Running)
	return a
}

// stop stops the agent as a crash would leave things: the datapath stays pinned.
func (n *node) stop(a *agent) {
	if a.cancel == nil {
		return
	}
	a.cancel()
	<-a.done
	a.cancel = nil
	a.dp.Close()
}

// cleanupAll removes what kata-dp left for the sandbox, for tests that stop halfway.
func (n *node) cleanupAll(t *testing.T) {
	t.Cleanup(func() {
		if a := n.agent; a != nil && a.cancel != nil {
			a.ctrl.DelSandbox(context.Background(), n.id)
		}
	})
}

// waitFor waits (up to 30 s, a hang guard, not a timing assertion) for cond.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (a *agent) nics(id string) []control.EndpointStatus {
	for _, s := range a.ctrl.Status(context.Background()) {
		if s.ID == id {
			return s.Endpoints
		}
	}
	return nil
}

func (a *agent) registered(id string) (control.Sandbox, bool) {
	for _, sb := range a.ctrl.Sandboxes() {
		if sb.ID == id {
			return sb, true
		}
	}
	return control.Sandbox{}, false
}

// maxTransitionLoss is the most pings a takeover or release may lose.
const maxTransitionLoss = 0

var replyRe = regexp.MustCompile(`icmp_seq=(\d+) `)

// flood pings the guest from the host side in the background (200 frames/s) until the
// returned function is called; it returns the pings sent up to the last one answered and
// those of them that got no answer (the ones still in flight when it stops do not count).
func (n *node) flood(t *testing.T) func() (sent, lost int) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", n.sb.Host.Name(), "ping", "-n", "-i", "0.005", n.sb.GuestAddr.Addr().String())
	var out syncBuffer
	cmd.Stdout = &out
	if err := proctest.Start(cmd); err != nil {
		t.Fatal(err)
	}
	// Let the flood settle before the change under test.
	time.Sleep(300 * time.Millisecond)
	return func() (int, int) {
		time.Sleep(300 * time.Millisecond)
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		seen := map[int]bool{}
		last := 0
		for _, m := range replyRe.FindAllStringSubmatch(out.String(), -1) {
			seq, _ := strconv.Atoi(m[1])
			seen[seq] = true
			last = max(last, seq)
		}
		if last == 0 {
			t.Fatalf("ping: no replies in %q", out.String())
		}
		lost := 0
		for seq := 1; seq <= last; seq++ {
			if !seen[seq] {
				lost++
				t.Logf("ping %d of %d lost", seq, last)
			}
		}
		return last, lost
	}
}

// tcFilters is the number of filters on the ingress qdisc of dev ("-" when there is none).
func (n *node) tcFilters(t *testing.T, dev string) string {
	t.Helper()
	out := "-"
	err := netdev.InNetNS(n.sb.NS.Path(), func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		qs, err := netlink.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qs {
			if q.Type() == "ingress" {
				fs, err := netlink.FilterList(l, netlink.MakeHandle(0xffff, 0))
				if err != nil {
					return err
				}
				out = strconv.Itoa(len(fs))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// tcx lists the TCX ingress programs of dev.
func (n *node) tcx(t *testing.T, dev string) []string {
	t.Helper()
	var names []string
	for _, p := range topotest.TCX(t, n.sb.NS.Path(), dev, ebpf.AttachTCXIngress) {
		names = append(names, p.Name)
	}
	return names
}

// taken checks that the pair runs through kata-dp: NIC registered from discovery with the
// veth's identity, BPF on both devices, no u32/mirred filter left.
func (n *node) taken(t *testing.T, a *agent) {
	t.Helper()
	eps := a.nics(n.id)
	if len(eps) != 1 {
		t.Fatalf("NICs = %+v, want one", eps)
	}
	ep := eps[0]
	if ep.Source != control.SourceDiscovery || ep.Tap != n.sb.Tap.Name || ep.Uplink != n.sb.Veth.Name || ep.MAC != n.sb.GuestMAC.String() || ep.Addr != n.sb.GuestAddr.String() || ep.TapCreated {
		t.Errorf("NIC = %+v", ep)
	}
	for _, dev := range []string{n.sb.Veth.Name, n.sb.Tap.Name} {
		// Kata's ingress qdisc stays, empty (see mirred's dropEmptyIngress).
		if f := n.tcFilters(t, dev); f != "0" {
			t.Errorf("%s: %s filters on the ingress qdisc after takeover, want an empty qdisc", dev, f)
		}
		if p := n.tcx(t, dev); !slices.ContainsFunc(p, func(s string) bool { return strings.HasPrefix(s, "kdp_") }) {
			t.Errorf("%s: TCX programs %v, want kata-dp's", dev, p)
		}
	}
}

// TestKataNode walks a Kata sandbox through discovery: takeover under traffic, the datapath's
// checks, release under traffic, re-adoption, an agent restart, the hypervisor's death, and
// garbage collection when Kata removes its directories. The agent starts after the sandbox.
func TestKataNode(t *testing.T) {
	n := newNode(t)
	n.cleanupAll(t)

	// Takeover under a ping flood: the agent arrives on a node where the sandbox runs.
	stopFlood := n.flood(t)
	a := n.start(t)
	waitFor(t, "the takeover", func() bool { return len(a.nics(n.id)) == 1 })
	sent, lost := stopFlood()
	t.Logf("takeover under ping: %d sent, %d lost", sent, lost)
	// BPF runs before the ingress qdisc's filters and the qdisc itself is never added or
	// removed under traffic (that deactivates the device's queues: see mirred): no loss.
	if lost > maxTransitionLoss {
		t.Errorf("takeover lost %d of %d pings, want at most %d", lost, sent, maxTransitionLoss)
	}
	if !strings.Contains(n.logs.String(), "Kata pair taken over") || !strings.Contains(n.logs.String(), "lostEstimate=") {
		t.Errorf("no takeover log line with the loss:\n%s", n.logs)
	}
	sb, ok := a.registered(n.id)
	if !ok || sb.Source != control.SourceDiscovery || sb.NetNS != n.sb.NS.Path() || sb.QMP != "" || !strings.Contains(sb.NoHotplug, "extra_monitor_socket") ||
		!sb.Netmon || sb.Uplink != n.sb.Veth.Name {
		t.Errorf("registered sandbox = %+v (ok %v)", sb, ok)
	}
	n.taken(t, a)

	// Traffic through BPF, both ways; a spoofed source from the guest is dropped and counted.
	if err := n.guest.Ping(n.sb.HostAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Errorf("guest -> host ping: %v", err)
	}
	if err := topo.TCPTransfer(n.sb.Host, n.guest, n.sb.GuestAddr.Addr().String()+":5201", 2<<20, 20*time.Second); err != nil {
		t.Errorf("tcp host -> guest: %v", err)
	}
	if err := topo.TCPTransfer(n.guest, n.sb.Host, n.sb.HostAddr.Addr().String()+":5202", 2<<20, 20*time.Second); err != nil {
		t.Errorf("tcp guest -> host: %v", err)
	}
	hostIP := n.sb.HostAddr.Addr().String()
	n.guest.Exec("ip", "addr", "add", "10.199.0.99/24", "dev", "eth0")
	n.guest.Exec("ip", "neigh", "replace", hostIP, "lladdr", n.sb.HostVeth.MAC.String(), "dev", "eth0")
	n.guest.Exec("ping", "-n", "-q", "-c", "3", "-i", "0.05", "-W", "1", "-I", "10.199.0.99", hostIP)
	n.guest.Exec("ip", "addr", "del", "10.199.0.99/24", "dev", "eth0")
	if eps := a.nics(n.id); len(eps) != 1 || eps[0].Stats == nil || eps[0].Stats.FromGuest.Drops["spoof_ip"] < 3 {
		t.Errorf("spoofed frames not counted: %+v", eps)
	}

	// Release under traffic: Kata's filters come back, kata-dp's programs and pins go.
	stopFlood = n.flood(t)
	if err := a.disc.Release(context.Background(), n.id); err != nil {
		t.Fatalf("release: %v", err)
	}
	sent, lost = stopFlood()
	t.Logf("release under ping: %d sent, %d lost", sent, lost)
	if lost > maxTransitionLoss {
		t.Errorf("release lost %d of %d pings, want at most %d", lost, sent, maxTransitionLoss)
	}
	if _, ok := a.registered(n.id); ok {
		t.Error("released sandbox still registered")
	}
	for _, dev := range []string{n.sb.Veth.Name, n.sb.Tap.Name} {
		if f := n.tcFilters(t, dev); f != "1" {
			t.Errorf("%s: %s filters after release, want Kata's one", dev, f)
		}
		if p := n.tcx(t, dev); len(p) != 0 {
			t.Errorf("%s: TCX programs %v after release", dev, p)
		}
	}
	if _, err := os.Stat(filepath.Join(n.root, n.id)); !os.IsNotExist(err) {
		t.Errorf("pins of the released sandbox: %v", err)
	}
	// It stays released: a scan (and an agent restart) leave it with Kata.
	a.disc.Scan(context.Background())
	n.stop(a)
	a = n.start(t)
	if _, ok := a.registered(n.id); ok {
		t.Error("released sandbox adopted again after a restart")
	}

	// Re-adoption.
	if err := a.disc.Adopt(context.Background(), n.id); err != nil {
		t.Fatalf("adopt: %v", err)
	}
	n.taken(t, a)
	if err := n.sb.Host.Ping(n.sb.GuestAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Errorf("host -> guest ping after re-adoption: %v", err)
	}

	// A restart re-adopts the pinned datapath and leaves it as it is.
	n.stop(a)
	a = n.start(t)
	n.taken(t, a)

	// The hypervisor dies: the sandbox is unhealthy, with the reason.
	n.hv.Process.Kill()
	waitFor(t, "the sandbox unhealthy", func() bool { return a.ctrl.Unhealthy()[n.id] != "" })
	if why := a.ctrl.Unhealthy()[n.id]; !strings.Contains(why, "hypervisor") {
		t.Errorf("unhealthy because %q", why)
	}
	n.hv.Wait()

	// Kata removes its directories: the sandbox is garbage-collected; Kata's tap stays.
	os.RemoveAll(filepath.Join(n.dir, "sbs", n.id))
	os.RemoveAll(filepath.Join(n.dir, "vm", n.id))
	waitFor(t, "garbage collection", func() bool { _, ok := a.registered(n.id); return !ok })
	if _, err := os.Stat(filepath.Join(n.root, n.id)); !os.IsNotExist(err) {
		t.Errorf("pins left after GC: %v", err)
	}
	for _, dev := range []string{n.sb.Veth.Name, n.sb.Tap.Name} {
		if p := n.tcx(t, dev); len(p) != 0 {
			t.Errorf("%s: TCX programs %v after GC", dev, p)
		}
		if f := n.tcFilters(t, dev); f != "-" && f != "0" {
			t.Errorf("%s: %s filters after GC", dev, f)
		}
	}
	if _, err := n.sb.NS.Link(n.sb.Tap.Name); err != nil {
		t.Errorf("Kata's tap is gone: %v", err)
	}
	if ents, _ := os.ReadDir(n.state); slices.ContainsFunc(ents, func(e os.DirEntry) bool { return strings.Contains(e.Name(), n.id) }) {
		t.Errorf("state of the collected sandbox left in %s: %v", n.state, ents)
	}
}

// TestKataNodeAgentFirst: the agent runs before Kata creates the sandbox; the sandbox is taken
// over as Kata writes its directories (inotify, no polling), without losing a ping.
func TestKataNodeAgentFirst(t *testing.T) {
	n := newNodeWith(t, false)
	n.cleanupAll(t)
	a := n.start(t)
	stopFlood := n.flood(t)
	n.writeState(t)
	waitFor(t, "the takeover", func() bool { return len(a.nics(n.id)) == 1 })
	sent, lost := stopFlood()
	t.Logf("takeover under ping: %d sent, %d lost", sent, lost)
	if lost > maxTransitionLoss {
		t.Errorf("takeover lost %d of %d pings", lost, sent)
	}
	n.taken(t, a)
	if err := n.guest.Ping(n.sb.HostAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Errorf("guest -> host ping: %v", err)
	}
}

// TestKataNodeCrashMidTakeover: the agent dies (kill -9) after the datapath took the pair over
// and Kata's filters went, before the NIC was saved. The next agent finishes the takeover.
func TestKataNodeCrashMidTakeover(t *testing.T) {
	n := newNode(t)
	n.cleanupAll(t)
	// What the dead agent left: the sandbox saved, the pair's programs attached and pinned,
	// Kata's filters removed, the NIC not saved.
	dp, err := dataplane.New(n.root)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(n.state)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := control.New(context.Background(), control.Config{Dataplane: dp, Taps: control.NetdevTaps{}, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.AddSandbox(context.Background(), control.SandboxSpec{ID: n.id, NetNS: n.sb.NS.Path(), Mode: control.ModeTC, Source: control.SourceDiscovery}); err != nil {
		t.Fatal(err)
	}
	ep := control.Endpoint{Sandbox: n.id, NetNS: n.sb.NS.Path(), NIC: n.sb.Veth.Name, Tap: n.sb.Tap.Name, Uplink: n.sb.Veth.Name,
		MAC: n.sb.GuestMAC, Addr: n.sb.GuestAddr, MTU: 1500, Mode: control.ModeTC, AntiSpoof: true, StrictEgress: true}
	if err := dp.AddEndpoint(context.Background(), ep); err != nil {
		t.Fatal(err)
	}
	dp.Close()
	if f := n.tcFilters(t, n.sb.Veth.Name); f != "0" {
		t.Fatalf("Kata's filters still there (%s): the crash is not where this test wants it", f)
	}

	a := n.start(t)
	waitFor(t, "the takeover finished", func() bool { return len(a.nics(n.id)) == 1 })
	n.taken(t, a)
	if err := n.sb.Host.Ping(n.sb.GuestAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Errorf("host -> guest ping: %v", err)
	}
	if err := topo.TCPTransfer(n.guest, n.sb.Host, n.sb.HostAddr.Addr().String()+":5203", 1<<20, 20*time.Second); err != nil {
		t.Errorf("tcp guest -> host: %v", err)
	}
	// And it can still be released to Kata.
	if err := a.disc.Release(context.Background(), n.id); err != nil {
		t.Fatal(err)
	}
	if f := n.tcFilters(t, n.sb.Veth.Name); f != "1" {
		t.Errorf("veth: %s filters after release, want Kata's one", f)
	}
	if err := n.sb.Host.Ping(n.sb.GuestAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Errorf("host -> guest ping after release: %v", err)
	}
}
