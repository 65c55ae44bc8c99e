package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/api"
)

// TestUpgradeUnderTraffic replaces agent A (version "1.0.0-a") by agent B ("1.1.0-b") the way
// the systemd unit does on an upgrade: SIGTERM to the agent process only (KillMode=process, no
// ExecStop), wait for it to exit, start the new binary. A ping flood through the sandbox's NIC
// runs all along: not one frame is lost, the NIC, route, tap and TCX links are the same after,
// and the agent answering is B.
func TestUpgradeUnderTraffic(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptu", NoTap: true})
	guest := topotest.MustNetNS(t, "kdptug")
	guest.DisableIPv6()
	sock, args := agentFiles(t, "kdptu", "--config", "")

	t.Setenv("KDP_TEST_VERSION", "1.0.0-a")
	p := startAgentProcess(t, sb.Host, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: sb.NS}
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path()}, result{stdout: sandboxID + "\n"})
	const addr, mac = "10.199.0.2", "02:42:0a:c7:00:02"
	in := fmt.Sprintf(`{"device":"tap-u","name":"eth0","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500}`, addr, mac)
	if r := a.cli(t, in, "kata-network", "add-iface", "6ec", "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v", r)
	}
	hw, _ := net.ParseMAC(mac)
	emulateGuest(t, sb.NS.Path(), "tap-u", guest, "eth0", guestemu.BridgeOptions{MAC: hw, Addrs: []netip.Prefix{netip.MustParsePrefix(addr + "/24")}})
	if err := sb.Host.Ping(addr, 1, 5*time.Second); err != nil {
		t.Fatalf("guest not reachable before the upgrade: %v", err)
	}
	route := `{"dest":"10.200.0.0/16","gateway":"10.199.0.1","device":"eth0"}`
	a.check(t, route, []string{"kata-network", "add-route", "6ec", "-"}, result{stdout: "[" + route + "]\n"})
	ifaces := a.cli(t, "", "kata-network", "list-ifaces", "6ec")
	routes := a.cli(t, "", "kata-network", "list-routes", "6ec")
	links := map[string][]link.ID{}
	for _, dev := range []string{"eth0", "tap-u"} {
		links[dev] = tcxLinkIDs(t, sb.NS.Path(), dev)
	}
	tap, _ := sb.NS.Link("tap-u")

	done := make(chan string, 1)
	go func() {
		out, _ := sb.Host.Exec("ping", "-n", "-q", "-c", "2000", "-i", "0.002", "-w", "30", addr)
		done <- out
	}()
	time.Sleep(time.Second) // the flood is under way
	// systemctl stop (KillMode=process): SIGTERM to the agent, wait for it to exit.
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("agent A exit on SIGTERM: %v\n%s", err, p.stderr)
	}
	// systemctl start with the new binary.
	t.Setenv("KDP_TEST_VERSION", "1.1.0-b")
	p = startAgentProcess(t, sb.Host, args...)
	waitAgent(t, sock, p)
	out := <-done
	m := pingSummary.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no ping summary: %q", out)
	}
	tx, _ := strconv.Atoi(m[1])
	rx, _ := strconv.Atoi(m[2])
	if tx != 2000 || rx != tx {
		t.Errorf("%d of %d echo replies across the upgrade", rx, tx)
	}
	if v, err := api.NewClient(sock).Version(context.Background()); err != nil || v != "1.1.0-b" {
		t.Errorf("agent after the upgrade: %q %v", v, err)
	}
	if got := a.cli(t, "", "kata-network", "list-ifaces", "6ec"); got != ifaces {
		t.Errorf("list-ifaces changed across the upgrade:\n%+v\n%+v", ifaces, got)
	}
	if got := a.cli(t, "", "kata-network", "list-routes", "6ec"); got != routes {
		t.Errorf("list-routes changed across the upgrade:\n%+v\n%+v", routes, got)
	}
	for dev, before := range links {
		if after := tcxLinkIDs(t, sb.NS.Path(), dev); len(before) != 1 || fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("%s: TCX links %v became %v: re-created", dev, before, after)
		}
	}
	if tap2, _ := sb.NS.Link("tap-u"); tap2.Index != tap.Index {
		t.Errorf("tap re-created (ifindex %d -> %d)", tap.Index, tap2.Index)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.cmd.Wait()
}
