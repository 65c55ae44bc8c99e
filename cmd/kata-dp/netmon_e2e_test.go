package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

var (
	cniToolsOnce sync.Once
	cniToolsDir  string
	cniToolsErr  error
)

// cniTools installs cnitool (at the CNI library version of go.mod) and the reference bridge and
// host-local plugins (at the plugins version of go.mod) into a temporary directory, once.
func cniTools(t *testing.T) string {
	t.Helper()
	cniToolsOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kdptn-cni-")
		if err != nil {
			cniToolsErr = err
			return
		}
		cniToolsDir = dir
		ver := func(mod string) string {
			out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", mod).Output()
			if err != nil {
				cniToolsErr = fmt.Errorf("go list -m %s: %w", mod, err)
			}
			return strings.TrimSpace(string(out))
		}
		cni, plugins := ver("github.com/containernetworking/cni"), ver("github.com/containernetworking/plugins")
		if cniToolsErr != nil {
			return
		}
		for _, pkgs := range [][]string{
			{"github.com/containernetworking/cni/cnitool@" + cni},
			{"github.com/containernetworking/plugins/plugins/main/bridge@" + plugins, "github.com/containernetworking/plugins/plugins/ipam/host-local@" + plugins},
		} {
			cmd := exec.Command("go", append([]string{"install"}, pkgs...)...)
			cmd.Env = append(os.Environ(), "GOBIN="+dir)
			if out, err := cmd.CombinedOutput(); err != nil {
				cniToolsErr = fmt.Errorf("go install %s: %w\n%s", pkgs, err, out)
				return
			}
		}
	})
	if cniToolsErr != nil {
		t.Skipf("cnitool and the reference CNI plugins are unavailable: %v", cniToolsErr)
	}
	return cniToolsDir
}

// TestNetmonCNI: a sandbox with netmon on and a real QEMU guest; a second network is attached
// to its netns with the real CNI bridge plugin through cnitool while the guest runs: the guest
// gets a NIC with the veth's MAC by itself (the time from cnitool returning to the guest's link
// up is logged), traffic crosses kata-dp's BPF path both ways, the route the network brings
// reaches the sandbox, an address change on the veth reaches update-iface, and cnitool del
// unplugs the NIC and removes its tap.
func TestNetmonCNI(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU, CNI plugins and the BPF dataplane in namespaces")
	bin := cniTools(t)
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptn", NoTap: true})
	const mac = "02:42:0a:58:00:05"
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{mac: "10.88.0.5/24"}})

	a, p := startTestAgent(t, sb.Host, sb.NS, "kdptn")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--qmp", g.QMPPath, "--netmon"}, result{stdout: sandboxID + "\n"})

	// The second network: a bridge in the host netns, the container side net1 in the sandbox
	// netns with the given MAC, one address and a route through the bridge's gateway.
	dir := t.TempDir()
	conf := filepath.Join(dir, "net.d")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	netconf := `{"cniVersion":"1.0.0","name":"nmnet","plugins":[{"type":"bridge","bridge":"kdptnbr0","isGateway":true,
 "ipam":{"type":"host-local","dataDir":"` + filepath.Join(dir, "ipam") + `","routes":[{"dst":"10.89.0.0/16"}],
  "ranges":[[{"subnet":"10.88.0.0/24","rangeStart":"10.88.0.5","rangeEnd":"10.88.0.5","gateway":"10.88.0.1"}]]}}]}`
	if err := os.WriteFile(filepath.Join(conf, "nmnet.conflist"), []byte(netconf), 0o644); err != nil {
		t.Fatal(err)
	}
	cnitool := func(op string) {
		t.Helper()
		cmd := exec.Command("nsenter", "--net="+sb.Host.Path(), filepath.Join(bin, "cnitool"), op, "nmnet", sb.NS.Path())
		cmd.Env = append(os.Environ(), "CNI_PATH="+bin, "NETCONFPATH="+conf, "CNI_IFNAME=net1", "CNI_ARGS=IgnoreUnknown=1;MAC="+mac)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cnitool %s: %v\n%s", op, err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	cnitool("add")
	added := time.Now()
	ifname, err := g.WaitNICUp(ctx, from, mac)
	if err != nil {
		t.Fatalf("guest never saw the network's NIC: %v\nagent:\n%s\nguest:\n%s", err, p.stderr, g.Log())
	}
	t.Logf("netmon: guest NIC %s up %v after cnitool add returned", ifname, time.Since(added))

	// status: the NIC came from netmon, with the veth's MAC and address; the route followed.
	ep := netmonEndpoint(t, a, "net1")
	if ep == nil || ep.Source != control.SourceNetmon || ep.MAC != mac || ep.Addr != "10.88.0.5/24" || ep.Uplink != "net1" || !ep.TapCreated || ep.PCIAddr == "" {
		t.Fatalf("status endpoint %+v\nagent:\n%s", ep, p.stderr)
	}
	waitCLI(t, a, `{"dest":"10.89.0.0/16","gateway":"10.88.0.1","device":"net1"}`, "kata-network", "list-routes", "6ec7a98")

	// Traffic both ways through the BPF path.
	if err := sb.Host.Ping("10.88.0.5", 3, 10*time.Second); err != nil {
		t.Fatalf("ping the guest on the second network: %v\nguest:\n%s", err, g.Log())
	}
	const size = 1 << 20
	guestTCPBothWays(t, sb.Host, "10.88.0.5", size)
	if ep := netmonEndpoint(t, a, "net1"); ep.Stats == nil || ep.Stats.FromGuest.Bytes < size || ep.Stats.ToGuest.Bytes < size {
		t.Errorf("BPF counters of net1 too small for 1 MiB each way: %+v", ep.Stats)
	}

	// An address change on the veth reaches update-iface.
	if out, err := sb.NS.Exec("sh", "-c", "sysctl -qw net.ipv4.conf.net1.promote_secondaries=1 && ip addr add 10.88.0.6/24 dev net1 && ip addr del 10.88.0.5/24 dev net1"); err != nil {
		t.Fatalf("change the address: %v\n%s", err, out)
	}
	waitCLI(t, a, `"ip":["10.88.0.6/24"]`, "kata-network", "list-ifaces", "6ec7a98")

	// cnitool del: the NIC is unplugged and its tap removed.
	from = g.Lines()
	cnitool("del")
	if err := g.WaitNICGone(ctx, from, mac); err != nil {
		t.Errorf("guest still has the NIC after cnitool del: %v", err)
	}
	waitCLI(t, a, "[]", "kata-network", "list-ifaces", "6ec7a98")
	if _, err := sb.NS.Link(ep.Tap); err == nil {
		t.Errorf("tap %s survived cnitool del", ep.Tap)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}

// netmonEndpoint returns the NIC named nic from status -o json (nil when absent).
func netmonEndpoint(t *testing.T, a *testAgent, nic string) *control.EndpointStatus {
	t.Helper()
	var st []control.SandboxStatus
	out := a.cli(t, "", "status", "-o", "json")
	if err := json.Unmarshal([]byte(out.stdout), &st); err != nil {
		t.Fatalf("status -o json: %v: %q", err, out.stdout)
	}
	for _, s := range st {
		for _, ep := range s.Endpoints {
			if ep.NIC == nic {
				return &ep
			}
		}
	}
	return nil
}

// waitCLI runs a kata-dp command until its stdout contains want; the bound only guards
// against a hang.
func waitCLI(t *testing.T, a *testAgent, want string, args ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		r := a.cli(t, "", args...)
		if strings.Contains(r.stdout, want) || (want == "[]" && r.stdout == "null\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("kata-dp %s never printed %q: last %+v", strings.Join(args, " "), want, r)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
