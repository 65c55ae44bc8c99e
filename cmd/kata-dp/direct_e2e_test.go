package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

// TestE2EDirectQEMU: a direct-mode sandbox with a real QEMU guest, through the real CLI and
// agent: the tap is created beside the uplink (no bridge, no veth pair into a sandbox netns),
// the NIC is hot-plugged, a client behind the uplink reaches the VM (ping, TCP both ways)
// through the node programs on the uplink and the sandbox's tap program, and removing the NIC
// takes kata-dp's programs off the uplink while the host's own address there keeps working.
func TestE2EDirectQEMU(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	host, client := topotest.MustNetNS(t, "kdptx-h"), topotest.MustNetNS(t, "kdptx-c")
	for _, n := range []*topo.NetNS{host, client} {
		n.DisableIPv6()
	}
	if _, err := host.Exec("ip", "link", "add", "up0", "type", "veth", "peer", "name", "cl0", "netns", client.Name()); err != nil {
		t.Fatal(err)
	}
	for _, c := range [][]string{{"ip", "addr", "add", "10.77.0.254/24", "dev", "up0"}, {"ip", "link", "set", "up0", "up"}} {
		if _, err := host.Exec(c...); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range [][]string{{"ip", "addr", "add", "10.77.0.1/24", "dev", "cl0"}, {"ip", "link", "set", "cl0", "up"}} {
		if _, err := client.Exec(c...); err != nil {
			t.Fatal(err)
		}
	}
	const mac = "02:42:0a:4d:00:02"
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: host.Path(), NetTable: map[string]string{mac: "10.77.0.2/24"}})

	a, p := startTestAgent(t, host, host, "kdptx")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--mode", "direct", "--uplink", "up0", "--netns", host.Path(), "--qmp", g.QMPPath},
		result{stdout: sandboxID + "\n"})

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	in := `{"device":"tapd0","name":"eth0","IPAddresses":[{"address":"10.77.0.2","mask":"24"}],"hwAddr":"` + mac + `","mtu":1500}`
	if r := a.cli(t, in, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 0 || !strings.Contains(r.stdout, `"pciAddr"`) {
		t.Fatalf("add-iface: %+v\nagent:\n%s", r, p.stderr)
	}
	if _, err := g.WaitNICUp(ctx, from, mac); err != nil {
		t.Fatalf("guest never saw the NIC: %v", err)
	}
	if in, out := topotest.TCXCount(t, host.Path(), "up0"); in != 1 || out != 1 {
		t.Errorf("programs on the uplink: ingress %d, egress %d; want kata-dp's two", in, out)
	}
	if err := client.Ping("10.77.0.2", 3, 10*time.Second); err != nil {
		t.Fatalf("client -> VM ping: %v\n%s", err, g.Log())
	}
	const size = 1 << 20
	guestTCPBothWays(t, client, "10.77.0.2", size)
	if err := client.Ping("10.77.0.254", 2, 5*time.Second); err != nil {
		t.Errorf("the host's own address on the uplink: %v", err)
	}
	if st := a.cli(t, "", "status"); !strings.Contains(st.stdout, "direct") {
		t.Errorf("status does not show direct mode:\n%s", st.stdout)
	}

	from = g.Lines()
	a.check(t, in, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{stdout: "null\n"})
	if err := g.WaitNICGone(ctx, from, mac); err != nil {
		t.Errorf("guest still has the NIC: %v", err)
	}
	if _, err := host.Link("tapd0"); err == nil {
		t.Error("tap survived del-iface")
	}
	if in, out := topotest.TCXCount(t, host.Path(), "up0"); in != 0 || out != 0 {
		t.Errorf("programs left on the uplink: ingress %d, egress %d", in, out)
	}
	if err := client.Ping("10.77.0.254", 2, 5*time.Second); err != nil {
		t.Errorf("the host's own address on the uplink after removal: %v", err)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
