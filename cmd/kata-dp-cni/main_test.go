package main

// Tests of kata-dp-cni with the real CNI tools: libcni runs a conflist of the reference bridge
// and host-local plugins followed by kata-dp-cni, against a kata-dp agent running as a
// subprocess. The bridge lives in a "host" netns the test makes (never the real host's), the
// container netns is another, and a guest emulator in a third plays the VM behind the tap.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/cni"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

const (
	nsPrefix    = "kdptc-cni"
	pluginsVer  = "v1.9.1"
	networkName = "kdptc-net"
	subnet      = "10.231.0.0/24"
	gateway     = "10.231.0.1"
)

var (
	binDir   string // kata-dp-cni and the reference plugins: the CNI_PATH
	agentBin string // kata-dp
	buildErr error  // our binaries did not build: the tests fail
	refErr   error  // the reference plugins are not available: the tests skip
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run() // every test skips
	}
	tmp, err := os.MkdirTemp("", "kdptc-cni-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	binDir = filepath.Join(tmp, "cni")
	agentBin = filepath.Join(tmp, "kata-dp")
	buildErr = errors.Join(
		goCmd(5*time.Minute, nil, "build", "-o", filepath.Join(binDir, "kata-dp-cni"), "github.com/kata-dp/kata-dp/cmd/kata-dp-cni"),
		goCmd(5*time.Minute, nil, "build", "-o", agentBin, "github.com/kata-dp/kata-dp/cmd/kata-dp"))
	refErr = referencePlugins()
	return m.Run()
}

// referencePlugins puts bridge and host-local into binDir: from $KDP_CNI_PLUGINS when set
// (hack/cni-plugins.sh), else with go install.
func referencePlugins() error {
	if dir := os.Getenv("KDP_CNI_PLUGINS"); dir != "" {
		for _, p := range []string{"bridge", "host-local"} {
			if err := os.Symlink(filepath.Join(dir, p), filepath.Join(binDir, p)); err != nil {
				return err
			}
			if _, err := os.Stat(filepath.Join(binDir, p)); err != nil {
				return fmt.Errorf("KDP_CNI_PLUGINS=%s: %w", dir, err)
			}
		}
		return nil
	}
	return goCmd(5*time.Minute, []string{"GOBIN=" + binDir}, "install",
		"github.com/containernetworking/plugins/plugins/main/bridge@"+pluginsVer,
		"github.com/containernetworking/plugins/plugins/ipam/host-local@"+pluginsVer)
}

func goCmd(timeout time.Duration, env []string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func requireSetup(t *testing.T) {
	t.Helper()
	topotest.RequireRoot(t, "creates network namespaces, taps and BPF programs, and runs the agent")
	if buildErr != nil {
		t.Fatalf("build: %v", buildErr)
	}
	if refErr != nil {
		t.Skipf("reference CNI plugins %s unavailable (run hack/cni-plugins.sh and set KDP_CNI_PLUGINS): %v", pluginsVer, refErr)
	}
}

// syncBuffer is safe for concurrent writers and readers.
type syncBuffer = controltest.SyncBuffer

// agentProc is a kata-dp agent subprocess with its own socket, state and bpffs directory.
type agentProc struct {
	t                       *testing.T
	socket, stateDir, bpffs string
	cmd                     *exec.Cmd
	stderr                  *syncBuffer
	client                  *api.Client
}

func startAgent(t *testing.T) *agentProc {
	t.Helper()
	dir := t.TempDir()
	a := &agentProc{t: t, socket: filepath.Join(dir, "s.sock"), stateDir: filepath.Join(dir, "state"),
		bpffs: topotest.BPFFS(t, "kdptc"), stderr: &syncBuffer{}}
	a.client = api.NewClient(a.socket)
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("agent log:\n%s", a.stderr)
		}
	})
	a.start()
	return a
}

func (a *agentProc) start() {
	a.t.Helper()
	a.cmd = exec.Command(agentBin, "agent", "--socket", a.socket, "--state-dir", a.stateDir, "--bpffs-root", a.bpffs, "--log-level", "debug")
	a.cmd.Stderr = a.stderr
	a.cmd.Stdout = a.stderr
	if err := proctest.Start(a.cmd); err != nil {
		a.t.Fatalf("start agent: %v", err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := a.client.Version(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent did not answer on %s: %v\n%s", a.socket, err, a.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill9 kills the agent with SIGKILL, as a crash would.
func (a *agentProc) kill9() {
	a.t.Helper()
	if a.cmd == nil {
		return
	}
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		a.t.Fatalf("kill agent: %v", err)
	}
	a.cmd.Wait()
	a.cmd = nil
}

func (a *agentProc) stop() {
	if a.cmd == nil {
		return
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { a.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-done
	}
	a.cmd = nil
}

// placeholder reports whether the agent runs the placeholder dataplane (no BPF, no traffic).
func (a *agentProc) placeholder() bool {
	return strings.Contains(a.stderr.String(), "PLACEHOLDER DATAPLANE")
}

func (a *agentProc) sandbox(t *testing.T, id string) *control.Sandbox {
	t.Helper()
	sbs, err := a.client.Sandboxes(context.Background())
	if err != nil {
		t.Fatalf("sandboxes: %v", err)
	}
	for _, sb := range sbs {
		if sb.ID == id {
			return &sb
		}
	}
	return nil
}

// env is one container attached to the test network.
type env struct {
	t         *testing.T
	host, ctr *topo.NetNS
	agent     *agentProc
	cni       *libcni.CNIConfig
	list      *libcni.NetworkConfigList
	rt        *libcni.RuntimeConf
	stateDir  string
	ipamDir   string
	tap       string // the tap ADD makes: tapName of the config, else derived from the container id
}

// derivedTap is the tap name kata-dp-cni derives when tapName is not set: "kdp" and the first
// 12 characters of the container id (the test's ids hold only characters a name may have).
func derivedTap(containerID string) string {
	return "kdp" + containerID[:min(len(containerID), 12)]
}

// conflist returns the test network: bridge + host-local, then kata-dp-cni with kdp's keys.
func conflist(t *testing.T, socket, stateDir, ipamDir string, kdp map[string]any) *libcni.NetworkConfigList {
	t.Helper()
	plugin := map[string]any{"type": "kata-dp-cni", "socket": socket, "stateDir": stateDir}
	for k, v := range kdp {
		plugin[k] = v
	}
	conf := map[string]any{
		"cniVersion": "1.1.0",
		"name":       networkName,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "kdptc-br0", "isGateway": true, "ipMasq": false,
				"capabilities": map[string]any{"mac": true},
				"ipam": map[string]any{"type": "host-local", "subnet": subnet, "dataDir": ipamDir,
					"routes": []any{map[string]any{"dst": "0.0.0.0/0"}}},
			},
			plugin,
		},
	}
	b, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatalf("conflist: %v", err)
	}
	return list
}

// newEnv makes a container netns and the network configuration. With peer nil it makes a new
// network (host-side netns, bridge, address pool); else the container joins peer's network.
func newEnv(t *testing.T, agent *agentProc, peer *env, kdp map[string]any) *env {
	t.Helper()
	dir := t.TempDir()
	var host *topo.NetNS
	ipamDir := filepath.Join(dir, "ipam")
	if peer != nil {
		host, ipamDir = peer.host, peer.ipamDir
	} else {
		host = topotest.MustNetNS(t, nsPrefix+"h")
		if err := host.DisableIPv6(); err != nil {
			t.Fatal(err)
		}
	}
	ctr := topotest.MustNetNS(t, nsPrefix+"c")
	if err := ctr.DisableIPv6(); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, host: host, ctr: ctr, agent: agent,
		cni:      libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(dir, "cache"), nil),
		stateDir: filepath.Join(dir, "kdp-state"), ipamDir: ipamDir,
		rt: &libcni.RuntimeConf{ContainerID: topo.UniqueName("kdptc-", 12), NetNS: ctr.Path(), IfName: "eth0"},
	}
	e.tap = derivedTap(e.rt.ContainerID)
	if name, ok := kdp["tapName"].(string); ok && netspec.ValidName("tapName", name) == nil {
		e.tap = name // an invalid one (TestBadConfig) makes no tap at all
	}
	e.list = conflist(t, agent.socket, e.stateDir, e.ipamDir, kdp)
	t.Cleanup(func() {
		// Best effort, for tests that failed half way: the namespaces go anyway.
		if err := e.del(); err != nil {
			t.Logf("cleanup: DEL: %v", err)
		}
	})
	return e
}

// The libcni calls run inside the host-side netns, so that the bridge plugin makes its bridge
// there (plugins inherit the netns of the thread that starts them).
func (e *env) add() (*current.Result, error) {
	var res *current.Result
	err := e.host.Do(func() error {
		r, err := e.cni.AddNetworkList(context.Background(), e.list, e.rt)
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	return res, err
}

func (e *env) check() error {
	return e.host.Do(func() error { return e.cni.CheckNetworkList(context.Background(), e.list, e.rt) })
}

func (e *env) del() error {
	return e.host.Do(func() error { return e.cni.DelNetworkList(context.Background(), e.list, e.rt) })
}

func (e *env) gc(valid ...types.GCAttachment) error {
	return e.host.Do(func() error {
		return e.cni.GCNetworkList(context.Background(), e.list, &libcni.GCArgs{ValidAttachments: valid})
	})
}

func (e *env) status() error {
	return e.host.Do(func() error { return e.cni.GetStatusNetworkList(context.Background(), e.list) })
}

// cniCode returns the code of a CNI error (0 when err is not one).
func cniCode(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

func linkExists(t *testing.T, ns *topo.NetNS, name string) bool {
	t.Helper()
	_, err := netdev.LookupLink(ns.Path(), name)
	if err != nil && !errors.Is(err, netdev.ErrNotFound) {
		t.Fatalf("look up %s: %v", name, err)
	}
	return err == nil
}

// records lists what the plugin keeps in its state directory (the lock file aside).
func records(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && filepath.Base(p) != "lock" {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	return out
}

// leases lists the addresses host-local holds for the container (its lease files hold the
// container id).
func leases(t *testing.T, ipamDir, containerID string) []string {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(ipamDir, networkName))
	var out []string
	for _, e := range ents {
		if net.ParseIP(e.Name()) == nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(ipamDir, networkName, e.Name()))
		if err == nil && strings.Contains(string(b), containerID) {
			out = append(out, e.Name())
		}
	}
	return out
}

// assertGone checks that nothing of the attachment is left: no tap, no container interface,
// no sandbox in the agent, no bpffs directory, no records, no address lease.
func (e *env) assertGone(t *testing.T) {
	t.Helper()
	for _, dev := range []string{e.tap, e.rt.IfName} {
		if linkExists(t, e.ctr, dev) {
			t.Errorf("%s still exists in the container netns", dev)
		}
	}
	if sb := e.agent.sandbox(t, e.rt.ContainerID); sb != nil {
		t.Errorf("sandbox still registered: %+v", sb)
	}
	if _, err := os.Stat(filepath.Join(e.agent.bpffs, e.rt.ContainerID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bpffs directory of the sandbox: %v (want it gone)", err)
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state left: %v", got)
	}
	if got := leases(t, e.ipamDir, e.rt.ContainerID); len(got) != 0 {
		t.Errorf("address leases left: %v", got)
	}
}

// vm finds the container interface, the tap and the VM's NIC in an ADD result.
func (e *env) vm(t *testing.T, res *current.Result) (veth, tap, vm int, addr netip.Prefix) {
	t.Helper()
	veth, tap, vm = -1, -1, -1
	for i, ifc := range res.Interfaces {
		switch {
		case ifc.Name == e.rt.IfName && ifc.Sandbox == e.rt.NetNS:
			veth = i
		case ifc.Name == e.tap && ifc.Sandbox == e.rt.NetNS:
			tap = i
		case ifc.Name == e.tap && ifc.Sandbox == e.rt.ContainerID:
			vm = i
		}
	}
	if veth < 0 || tap < 0 || vm < 0 {
		t.Fatalf("result lacks an interface (veth %d, tap %d, vm %d): %+v", veth, tap, vm, res.Interfaces)
	}
	for _, ip := range res.IPs {
		if ip.Interface != nil && *ip.Interface == vm {
			p, _ := netip.AddrFromSlice(ip.Address.IP.To4())
			ones, _ := ip.Address.Mask.Size()
			addr = netip.PrefixFrom(p, ones)
		}
	}
	if !addr.IsValid() {
		t.Fatalf("result has no address for the VM's interface: %+v", res.IPs)
	}
	return veth, tap, vm, addr
}

// assertAdded checks the ADD result and the agent's view of the sandbox.
func (e *env) assertAdded(t *testing.T, res *current.Result) (mac net.HardwareAddr, addr netip.Prefix) {
	t.Helper()
	veth, tap, vm, addr := e.vm(t, res)
	li, err := netdev.LookupLink(e.ctr.Path(), e.rt.IfName)
	if err != nil {
		t.Fatal(err)
	}
	ti, err := netdev.LookupTap(e.ctr.Path(), e.tap)
	if err != nil {
		t.Fatalf("tap: %v", err)
	}
	if diff := cmp.Diff(li.MAC.String(), res.Interfaces[vm].Mac); diff != "" {
		t.Errorf("VM NIC MAC (-veth +result):\n%s", diff)
	}
	if diff := cmp.Diff(li.MAC.String(), res.Interfaces[veth].Mac); diff != "" {
		t.Errorf("veth MAC (-veth +result):\n%s", diff)
	}
	if diff := cmp.Diff(ti.MAC.String(), res.Interfaces[tap].Mac); diff != "" {
		t.Errorf("tap MAC (-tap +result):\n%s", diff)
	}
	if !ti.VnetHdr || !ti.Up {
		t.Errorf("tap %+v: want vnet_hdr and up", ti)
	}
	sb := e.agent.sandbox(t, e.rt.ContainerID)
	if sb == nil {
		t.Fatalf("sandbox %s not registered in the agent", e.rt.ContainerID)
	}
	if sb.NetNS != e.rt.NetNS || sb.Uplink != e.rt.IfName {
		t.Errorf("sandbox %+v: want netns %s, uplink %s", sb, e.rt.NetNS, e.rt.IfName)
	}
	out, err := e.agent.client.KataNetwork(context.Background(), e.rt.ContainerID, api.OpListIfaces, nil)
	if err != nil {
		t.Fatalf("list-ifaces: %v", err)
	}
	var got []netspec.IfaceInfo
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("list-ifaces %s: %v", out, err)
	}
	want := []netspec.IfaceInfo{{Name: e.rt.IfName, MAC: li.MAC.String(), IP: []string{addr.String()}, MTU: li.MTU}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("list-ifaces (-want +got):\n%s", diff)
	}
	return li.MAC, addr
}

// assertCheck runs CHECK: it passes with the real dataplane; the placeholder attaches no
// program, which CHECK must report.
func (e *env) assertCheck(t *testing.T) {
	t.Helper()
	err := e.check()
	if e.agent.placeholder() {
		if cniCode(err) != cni.CodeCheckFailed || !strings.Contains(err.Error(), "no kata-dp datapath program") {
			t.Errorf("CHECK with the placeholder dataplane: %v; want code %d about the missing datapath program", err, cni.CodeCheckFailed)
		}
		return
	}
	if err != nil {
		t.Errorf("CHECK: %v", err)
	}
}

// assertTraffic runs TCP both ways between the host-side netns (the bridge's address) and a
// guest emulator behind the tap, through the BPF datapath, and (when the agent is up) checks
// the datapath's counters.
func (e *env) assertTraffic(t *testing.T, mac net.HardwareAddr, addr netip.Prefix, agentUp bool) {
	t.Helper()
	if e.agent.placeholder() {
		t.Skip("the agent runs the placeholder dataplane (cmd/kata-dp/deps.go does not wire the BPF dataplane in yet): no traffic is forwarded, so the traffic assertion cannot run")
	}
	guest := topotest.MustNetNS(t, nsPrefix+"g")
	if err := guest.DisableIPv6(); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(e.ctr.Path(), e.tap, 1, true, true)
	if err != nil {
		t.Fatalf("open tap: %v", err)
	}
	b, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{MAC: mac, Addrs: []netip.Prefix{addr},
		Gateway: netip.MustParseAddr(gateway)})
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); b.Close() })
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := topo.TCPTransfer(e.host, guest, netip.AddrPortFrom(addr.Addr(), 7001).String(), 1<<20, 15*time.Second); err != nil {
		t.Errorf("host side -> guest: %v", err)
	}
	if err := topo.TCPTransfer(guest, e.host, gateway+":7002", 1<<20, 15*time.Second); err != nil {
		t.Errorf("guest -> host side: %v", err)
	}
	if !agentUp {
		return
	}
	st, err := e.agent.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range st {
		for _, ep := range sb.Endpoints {
			if sb.ID == e.rt.ContainerID && ep.NIC == e.rt.IfName {
				if ep.Stats == nil || ep.Stats.FromGuest.Packets == 0 || ep.Stats.ToGuest.Packets == 0 {
					t.Errorf("datapath counters of %s: %+v (%s); want packets both ways", ep.NIC, ep.Stats, ep.StatsError)
				}
				return
			}
		}
	}
	t.Errorf("endpoint %s/%s missing from the agent's status", e.rt.ContainerID, e.rt.IfName)
}

// TestLifecycle: ADD through the whole chain, traffic through the BPF path, CHECK, DEL leaving
// nothing behind, and DEL again.
func TestLifecycle(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	res, err := e.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if b, err := json.Marshal(res); err == nil {
		t.Logf("ADD result: %s", b)
	}
	mac, addr := e.assertAdded(t, res)
	if got := records(t, e.stateDir); len(got) != 2 {
		t.Errorf("plugin state %v: want the attachment record and the sandbox marker", got)
	}
	t.Run("traffic", func(t *testing.T) { e.assertTraffic(t, mac, addr, true) })
	e.assertCheck(t)
	if err := e.status(); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	if err := e.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	e.assertGone(t)
	if err := e.del(); err != nil {
		t.Errorf("second DEL: %v", err)
	}
}

// TestAgentRestart: an attachment survives a SIGKILL of the agent (the datapath keeps
// forwarding, the restarted agent re-adopts it, CHECK and DEL work), and ADD works after the
// restart.
func TestAgentRestart(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	a := newEnv(t, agent, nil, nil)
	res, err := a.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	mac, addr := a.assertAdded(t, res)
	agent.kill9()
	t.Run("traffic-while-down", func(t *testing.T) { a.assertTraffic(t, mac, addr, false) })
	agent.start()
	a.assertAdded(t, res)
	a.assertCheck(t)
	if err := a.del(); err != nil {
		t.Fatalf("DEL after restart: %v", err)
	}
	a.assertGone(t)

	agent.kill9()
	agent.start()
	b := newEnv(t, agent, nil, nil)
	res, err = b.add()
	if err != nil {
		t.Fatalf("ADD after a restart: %v", err)
	}
	mac, addr = b.assertAdded(t, res)
	t.Run("traffic-after-restart", func(t *testing.T) { b.assertTraffic(t, mac, addr, true) })
	b.assertCheck(t)
	if err := b.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	b.assertGone(t)
}

// TestAgentDown: without an agent, ADD fails with the plugin's code and a message that says
// why, and leaves nothing of its own; STATUS reports the plugin unavailable; the runtime's DEL
// then cleans up the rest of the chain.
func TestAgentDown(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	agent.kill9()
	e := newEnv(t, agent, nil, nil)
	_, err := e.add()
	if cniCode(err) != cni.CodeAgentUnreachable || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("ADD without an agent: %v; want code %d, agent unreachable", err, cni.CodeAgentUnreachable)
	}
	if linkExists(t, e.ctr, e.tap) {
		t.Errorf("tap created although ADD failed")
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state after a failed ADD: %v", got)
	}
	if err := e.status(); cniCode(err) != types.ErrPluginNotAvailable {
		t.Errorf("STATUS without an agent: %v; want code %d", err, types.ErrPluginNotAvailable)
	}
	if err := e.del(); err != nil {
		t.Fatalf("DEL after a failed ADD: %v", err)
	}
	agent.start()
	e.assertGone(t)
	if err := e.status(); err != nil {
		t.Errorf("STATUS with the agent back: %v", err)
	}
}

// TestBadConfig: a conflist whose kata-dp-cni entry is invalid fails ADD with code 7 and a
// message naming the key, before anything of kata-dp's is made, and DEL still cleans up the
// chain.
func TestBadConfig(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	network := newEnv(t, agent, nil, nil)
	for _, tc := range []struct {
		name string
		kdp  map[string]any
		want string
	}{
		{"mode", map[string]any{"mode": "warp"}, `mode "warp"`},
		{"macvtap", map[string]any{"mode": "macvtap"}, `"macvtap" is not supported`},
		{"macvtap-bpf", map[string]any{"mode": "macvtap-bpf"}, `nor "macvtap-bpf"`},
		{"tapName", map[string]any{"tapName": "tap 0"}, "tapName"},
		{"socket", map[string]any{"socket": "kata-dp.sock"}, "socket"},
		{"antiSpoof", map[string]any{"antiSpoof": "yes"}, "antiSpoof"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, agent, network, tc.kdp)
			_, err := e.add()
			var te *types.Error
			if !errors.As(err, &te) || te.Code < types.ErrDecodingFailure || te.Code > types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ADD: %v; want a decode or invalid-configuration error about %s", err, tc.want)
			}
			if linkExists(t, e.ctr, e.tap) {
				t.Errorf("tap created by a failed ADD")
			}
			if sb := agent.sandbox(t, e.rt.ContainerID); sb != nil {
				t.Errorf("sandbox registered by a failed ADD: %+v", sb)
			}
			if err := e.del(); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			e.assertGone(t)
		})
	}
}

// TestRuntimeSandbox: when the runtime registered the sandbox itself, ADD adds only the NIC
// and DEL removes only the NIC.
func TestRuntimeSandbox(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	off := false
	if _, err := agent.client.AddSandbox(context.Background(), control.SandboxSpec{ID: e.rt.ContainerID, NetNS: e.rt.NetNS, StrictEgress: &off}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.client.DelSandbox(context.Background(), e.rt.ContainerID) })
	res, err := e.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	e.assertAdded(t, res)
	if got := records(t, e.stateDir); len(got) != 1 {
		t.Errorf("plugin state %v: want only the attachment record", got)
	}
	e.assertCheck(t)
	if err := e.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	sb := agent.sandbox(t, e.rt.ContainerID)
	if sb == nil || sb.StrictEgress {
		t.Fatalf("the runtime's sandbox after DEL: %+v; want it kept as registered", sb)
	}
	out, err := agent.client.KataNetwork(context.Background(), e.rt.ContainerID, api.OpListIfaces, nil)
	if err != nil || strings.TrimSpace(string(out)) != "null" {
		t.Errorf("list-ifaces after DEL: %s, %v; want null", out, err)
	}
	if linkExists(t, e.ctr, e.tap) {
		t.Errorf("tap left after DEL")
	}
}

// TestGC: GC releases attachments the runtime no longer lists, and keeps the others.
func TestGC(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	if _, err := e.add(); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	keep := types.GCAttachment{ContainerID: e.rt.ContainerID, IfName: e.rt.IfName}
	if err := e.gc(keep); err != nil {
		t.Fatalf("GC keeping the attachment: %v", err)
	}
	if agent.sandbox(t, e.rt.ContainerID) == nil || !linkExists(t, e.ctr, e.tap) {
		t.Fatalf("GC removed a valid attachment")
	}
	if err := e.gc(); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if agent.sandbox(t, e.rt.ContainerID) != nil || linkExists(t, e.ctr, e.tap) {
		t.Errorf("GC left the stale attachment's sandbox or tap")
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state after GC: %v", got)
	}
}

// TestVersion: VERSION through libcni.
func TestVersion(t *testing.T) {
	requireSetup(t)
	c := libcni.NewCNIConfig([]string{binDir}, nil)
	info, err := c.GetVersionInfo(context.Background(), "kata-dp-cni")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"1.0.0", "1.1.0"}, info.SupportedVersions()); diff != "" {
		t.Errorf("supported versions (-want +got):\n%s", diff)
	}
}

// TestNetNSGone: DEL succeeds and cleans the agent when the runtime removed the container
// netns first.
func TestNetNSGone(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	if _, err := e.add(); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := e.ctr.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.del(); err != nil {
		t.Fatalf("DEL with the netns gone: %v", err)
	}
	if sb := agent.sandbox(t, e.rt.ContainerID); sb != nil {
		t.Errorf("sandbox left after DEL: %+v", sb)
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state left: %v", got)
	}
}

// TestCheckBroken: CHECK fails with the plugin's code when the tap is gone, and DEL still
// cleans up.
func TestCheckBroken(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	if _, err := e.add(); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if out, err := e.ctr.Exec("ip", "link", "del", e.tap); err != nil {
		t.Fatalf("delete the tap: %v: %s", err, out)
	}
	if err := e.check(); cniCode(err) != cni.CodeCheckFailed || !strings.Contains(err.Error(), e.tap) {
		t.Errorf("CHECK without the tap: %v; want code %d naming %s", err, cni.CodeCheckFailed, e.tap)
	}
	if err := e.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	e.assertGone(t)
}

// TestTwoContainers: two containers on one bridge with the default configuration. The agent
// reserves tap names host-wide (the kata-network contract's "device unique on the host"), so
// each container gets a tap named after its id; both must work side by side, and DEL of one
// must leave the other working.
func TestTwoContainers(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	a := newEnv(t, agent, nil, nil)
	b := newEnv(t, agent, a, nil)
	if a.tap == b.tap {
		t.Fatalf("both containers would use tap %s", a.tap)
	}
	resA, err := a.add()
	if err != nil {
		t.Fatalf("ADD a: %v", err)
	}
	macA, addrA := a.assertAdded(t, resA)
	resB, err := b.add()
	if err != nil {
		t.Fatalf("ADD b: %v", err)
	}
	macB, addrB := b.assertAdded(t, resB)
	if addrA == addrB {
		t.Fatalf("both containers got %s", addrA)
	}
	a.assertCheck(t)
	b.assertCheck(t)
	t.Run("traffic-a", func(t *testing.T) { a.assertTraffic(t, macA, addrA, true) })
	t.Run("traffic-b", func(t *testing.T) { b.assertTraffic(t, macB, addrB, true) })
	if err := b.del(); err != nil {
		t.Fatalf("DEL b: %v", err)
	}
	b.assertGone(t)
	a.assertCheck(t)
	t.Run("traffic-a-after-del-b", func(t *testing.T) { a.assertTraffic(t, macA, addrA, true) })
	if err := a.del(); err != nil {
		t.Fatalf("DEL a: %v", err)
	}
	a.assertGone(t)
}

// TestExplicitTapName: a configured tapName is used as is, and CHECK and DEL use the tap ADD
// recorded even when the configuration no longer names it. A second container with the same
// tapName is refused by the agent (tap names are reserved host-wide) and fails cleanly,
// leaving the first one working.
func TestExplicitTapName(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	kdp := map[string]any{"tapName": "tap0_kata"}
	a := newEnv(t, agent, nil, kdp)
	if a.tap != "tap0_kata" {
		t.Fatalf("env tap %s", a.tap)
	}
	res, err := a.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	mac, addr := a.assertAdded(t, res)
	if linkExists(t, a.ctr, derivedTap(a.rt.ContainerID)) {
		t.Errorf("the derived tap exists although tapName is set")
	}
	a.assertCheck(t)

	b := newEnv(t, agent, a, kdp)
	_, err = b.add()
	if cniCode(err) != cni.CodeAgentFailed || !strings.Contains(err.Error(), "already used by sandbox") {
		t.Fatalf("ADD of a second container with the same tapName: %v; want code %d, tap already used", err, cni.CodeAgentFailed)
	}
	if sb := agent.sandbox(t, b.rt.ContainerID); sb != nil {
		t.Errorf("failed ADD left its sandbox: %+v", sb)
	}
	if linkExists(t, b.ctr, b.tap) {
		t.Errorf("failed ADD left a tap")
	}
	if got := records(t, b.stateDir); len(got) != 0 {
		t.Errorf("failed ADD left plugin state: %v", got)
	}
	if err := b.del(); err != nil {
		t.Fatalf("DEL b: %v", err)
	}
	b.assertGone(t)

	t.Run("traffic", func(t *testing.T) { a.assertTraffic(t, mac, addr, true) })
	// The configuration changes under the attachment: CHECK and DEL go by the record.
	a.list = conflist(t, agent.socket, a.stateDir, a.ipamDir, nil)
	a.assertCheck(t)
	if err := a.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	a.assertGone(t)
}

// TestModes: the whole cycle with every dataplane mode the configuration can ask for, and with
// a cniVersion 1.0.0 conflist.
func TestModes(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	for _, tc := range []struct {
		name       string
		kdp        map[string]any
		cniVersion string
	}{
		{"tc-cni-1.0.0", map[string]any{"mode": "tc"}, "1.0.0"},
		{"xdp", map[string]any{"mode": "xdp"}, ""},
		{"tcfilter", map[string]any{"mode": "tcfilter"}, ""},
		{"checks-off", map[string]any{"antiSpoof": false, "strictEgress": false}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, agent, nil, tc.kdp)
			if tc.cniVersion != "" {
				e.list = conflistVersion(t, e.list, tc.cniVersion)
			}
			res, err := e.add()
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			mac, addr := e.assertAdded(t, res)
			sb := agent.sandbox(t, e.rt.ContainerID)
			if m, _ := tc.kdp["mode"].(string); m != "" && sb.Mode != m {
				t.Errorf("sandbox mode %s, want %s", sb.Mode, m)
			}
			if v, ok := tc.kdp["antiSpoof"].(bool); ok && sb.AntiSpoof != v {
				t.Errorf("sandbox antiSpoof %v, want %v", sb.AntiSpoof, v)
			}
			t.Run("traffic", func(t *testing.T) { e.assertTraffic(t, mac, addr, true) })
			e.assertCheck(t)
			if err := e.del(); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			e.assertGone(t)
		})
	}
}

// conflistVersion returns list with another cniVersion.
func conflistVersion(t *testing.T, list *libcni.NetworkConfigList, v string) *libcni.NetworkConfigList {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(list.Bytes, &m); err != nil {
		t.Fatal(err)
	}
	m["cniVersion"] = v
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	out, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestQEMU is the runtime's flow with a real VM: a QEMU guest (TCG) runs in the container
// netns, the runtime registers the sandbox with its QMP socket, and the CNI ADD makes the agent
// hot-plug the NIC (the veth's MAC, the address host-local gave) into the running guest; TCP
// crosses the BPF datapath between the bridge and the guest; CHECK passes; DEL unplugs the NIC
// and leaves the runtime's sandbox registered.
func TestQEMU(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	const mac = "02:42:0a:e7:00:02"
	e.rt.CapabilityArgs = map[string]any{"mac": mac}
	// host-local hands out the first free address of a fresh pool: .2 (.1 is the gateway).
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: e.ctr.Path(), NetTable: map[string]string{mac: "10.231.0.2/24"}, Gateway: gateway})
	if _, err := agent.client.AddSandbox(context.Background(), control.SandboxSpec{ID: e.rt.ContainerID, NetNS: e.rt.NetNS, QMP: g.QMPPath}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.client.DelSandbox(context.Background(), e.rt.ContainerID) })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	res, err := e.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	_, addr := e.assertAdded(t, res)
	if addr.String() != "10.231.0.2/24" {
		t.Fatalf("host-local gave %s; the guest was booted for 10.231.0.2/24", addr)
	}
	if _, err := g.WaitNICUp(ctx, from, mac); err != nil {
		t.Fatalf("the guest never saw the NIC: %v\n%s", err, g.Log())
	}
	c, err := e.host.Dial("tcp", netip.AddrPortFrom(addr.Addr(), guesttest.EchoPort).String(), 10*time.Second)
	if err != nil {
		t.Fatalf("connect to the guest: %v\n%s", err, g.Log())
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat([]byte("kata-dp-cni "), 10000)
	go func() { c.Write(msg) }()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("echo through the guest: %v", err)
	}
	c.Close()
	e.assertCheck(t)
	from = g.Lines()
	if err := e.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if err := g.WaitNICGone(ctx, from, mac); err != nil {
		t.Errorf("the guest still has the NIC: %v", err)
	}
	if linkExists(t, e.ctr, e.tap) {
		t.Errorf("tap left after DEL")
	}
	if sb := agent.sandbox(t, e.rt.ContainerID); sb == nil || sb.QMP != g.QMPPath {
		t.Errorf("the runtime's sandbox after DEL: %+v; want it kept", sb)
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state left: %v", got)
	}
}

// TestQEMUColdPlug is the other runtime flow of docs/cni.md: the plugin registers the sandbox
// (no QMP), and the VM is started afterwards in the container netns on the tap ADD left there,
// with the VM NIC's MAC from the result.
func TestQEMUColdPlug(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	res, err := e.add()
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	mac, addr := e.assertAdded(t, res)
	_, _, vm, _ := e.vm(t, res)
	if res.Interfaces[vm].Mac != mac.String() {
		t.Fatalf("VM NIC MAC %s, want the veth's %s", res.Interfaces[vm].Mac, mac)
	}
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: e.ctr.Path(), NetTable: map[string]string{mac.String(): addr.String()}, Gateway: gateway,
		QEMUArgs: []string{
			"-netdev", "tap,id=cni0,ifname=" + e.tap + ",script=no,downscript=no,vhost=off,vnet_hdr=on",
			"-device", "virtio-net-pci,netdev=cni0,bus=pcie.0,mac=" + mac.String(),
		}})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := g.WaitNICUp(ctx, 0, mac.String()); err != nil {
		t.Fatalf("the guest never brought the NIC up: %v\n%s", err, g.Log())
	}
	c, err := e.host.Dial("tcp", netip.AddrPortFrom(addr.Addr(), guesttest.EchoPort).String(), 10*time.Second)
	if err != nil {
		t.Fatalf("connect to the guest: %v\n%s", err, g.Log())
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat([]byte("cold plug "), 10000)
	go func() { c.Write(msg) }()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("echo through the guest: %v", err)
	}
	c.Close()
	e.assertCheck(t)
	g.Kill()
	<-g.Exited()
	if err := e.del(); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	e.assertGone(t)
}

// TestQEMUGoneBeforeDel: the runtime stops the VM before the CNI DEL. The agent refuses to
// touch the unhealthy sandbox, so DEL leaves the NIC to the runtime's sandbox removal instead
// of blocking the runtime; that removal then takes the tap.
func TestQEMUGoneBeforeDel(t *testing.T) {
	requireSetup(t)
	agent := startAgent(t)
	e := newEnv(t, agent, nil, nil)
	const mac = "02:42:0a:e7:00:02"
	e.rt.CapabilityArgs = map[string]any{"mac": mac}
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: e.ctr.Path(), NetTable: map[string]string{mac: "10.231.0.2/24"}})
	if _, err := agent.client.AddSandbox(context.Background(), control.SandboxSpec{ID: e.rt.ContainerID, NetNS: e.rt.NetNS, QMP: g.QMPPath}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.client.DelSandbox(context.Background(), e.rt.ContainerID) })
	if _, err := e.add(); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	g.Kill()
	<-g.Exited()
	if err := e.del(); err != nil {
		t.Fatalf("DEL with the VM gone: %v", err)
	}
	if got := records(t, e.stateDir); len(got) != 0 {
		t.Errorf("plugin state left: %v", got)
	}
	if sb := agent.sandbox(t, e.rt.ContainerID); sb == nil {
		t.Fatalf("DEL removed the runtime's sandbox")
	}
	if err := agent.client.DelSandbox(context.Background(), e.rt.ContainerID); err != nil {
		t.Fatalf("the runtime's sandbox removal: %v", err)
	}
	if linkExists(t, e.ctr, e.tap) {
		t.Errorf("tap left after the sandbox was removed")
	}
}
