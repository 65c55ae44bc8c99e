package main

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

// TestE2EQEMUIPv6: the real QEMU guest gets an IPv4 and an IPv6 address through add-iface
// (kata-network takes one per family) and exchanges ping6 and TCP over IPv6 with the host
// through the BPF path, with anti-spoofing and strict egress on (issue 12).
func TestE2EQEMUIPv6(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdpt6", NoTap: true, IPv6: true,
		HostAddr: netip.MustParsePrefix("10.196.0.1/24"), GuestAddr: netip.MustParsePrefix("10.196.0.2/24")})
	const mac = "02:42:20:6f:a3:96"
	if out, err := sb.Host.Exec("ip", "-6", "addr", "add", "fd00:196::1/64", "dev", "veth0", "nodad"); err != nil {
		t.Fatalf("host IPv6 address: %v: %s", err, out)
	}
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{
		mac: "10.196.0.2/24+fd00:196::2/64",
	}})

	a, p := startTestAgent(t, sb.Host, sb.NS, "kdpt6")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--qmp", g.QMPPath}, result{stdout: sandboxID + "\n"})

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	in := `{"device":"tap-six","name":"eth-six","IPAddresses":[{"address":"10.196.0.2","mask":"24"},{"address":"fd00:196::2","mask":"64"}],"hwAddr":"` + mac + `","mtu":1500}`
	r := a.cli(t, in, "kata-network", "add-iface", "6ec7a98", "-")
	if r.code != 0 {
		t.Fatalf("add-iface: %+v\nagent:\n%s", r, p.stderr)
	}
	if !strings.Contains(r.stdout, `{"Family":10,"Address":"fd00:196::2","Mask":"64"}`) {
		t.Errorf("add-iface stdout lacks the IPv6 address with Family 10: %q", r.stdout)
	}
	if _, err := g.WaitNICUp(ctx, from, mac); err != nil {
		t.Fatalf("guest never saw the NIC: %v\n%s", err, g.Log())
	}
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: `[{"name":"eth-six","mac":"` + mac + `","ip":["10.196.0.2/24","fd00:196::2/64"],"mtu":1500}]` + "\n"})

	// ping6 (neighbour discovery both ways through the checks), then TCP over IPv6 both ways.
	if err := sb.Host.Ping("fd00:196::2", 3, 20*time.Second); err != nil {
		t.Fatalf("ping6 the guest: %v\n%s", err, g.Log())
	}
	guestTCPBothWays(t, sb.Host, "fd00:196::2", 1<<20)
	// IPv4 on the same NIC still works.
	if err := sb.Host.Ping("10.196.0.2", 2, 10*time.Second); err != nil {
		t.Errorf("ping the guest's IPv4 address: %v", err)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
