package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

// TestE2EQEMU is the whole path with a real VM: a QEMU guest (TCG) runs in the sandbox netns,
// the real agent hot-plugs the user guide's NIC into it over QMP through the real CLI, and
// ping and TCP cross kata-dp's BPF datapath between the host-side peer and the guest in both
// directions; then a second NIC, del-iface, and QEMU dying under the agent.
func TestE2EQEMU(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdpte", NoTap: true})
	const mac1, mac2 = "02:42:20:6f:a3:69", "02:42:20:6f:a3:70"
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{
		mac1: "10.199.0.2/24", mac2: "10.197.0.2/24",
	}})

	a, p := startTestAgent(t, sb.Host, sb.NS, "kdpte")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--qmp", g.QMPPath}, result{stdout: sandboxID + "\n"})

	// The user guide's NIC (its MAC, MTU and 5 queues), on the sandbox's subnet.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	start := time.Now()
	in := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"10.199.0.2","mask":"24"}],"hwAddr":"` + mac1 + `","mtu":1500,"queues":5}`
	r := a.cli(t, in, "kata-network", "add-iface", "6ec7a98", "-")
	if r.code != 0 {
		t.Fatalf("add-iface: %+v\nagent:\n%s", r, p.stderr)
	}
	var iface struct {
		PCIAddr string `json:"pciAddr"`
		Queues  int    `json:"queues"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &iface); err != nil || iface.PCIAddr == "" || iface.Queues != 5 {
		t.Fatalf("add-iface output %q: %v", r.stdout, err)
	}
	want := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"10.199.0.2","Mask":"24"}],"mtu":1500,"hwAddr":"` + mac1 + `","pciAddr":"` + iface.PCIAddr + `","queues":5}` + "\n"
	if r.stdout != want {
		t.Errorf("add-iface stdout\n%q, want\n%q", r.stdout, want)
	}
	ifname, err := g.WaitNICUp(ctx, from, mac1)
	if err != nil {
		t.Fatalf("guest never saw the NIC: %v\n%s", err, g.Log())
	}
	t.Logf("add-iface returned, guest NIC %s up %v after the call", ifname, time.Since(start))

	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: `[{"name":"eth-test","mac":"` + mac1 + `","ip":["10.199.0.2/24"],"mtu":1500}]` + "\n"})
	a.check(t, `{"dest":"default","gateway":"10.199.0.1","device":"eth-test"}`, []string{"kata-network", "add-route", "6ec7a98", "-"},
		result{stdout: `[{"dest":"default","gateway":"10.199.0.1","device":"eth-test"}]` + "\n"})
	a.check(t, "", []string{"kata-network", "list-routes", "6ec7a98"}, result{stdout: `[{"dest":"default","gateway":"10.199.0.1","device":"eth-test"}]` + "\n"})

	// Traffic through the BPF path: ping, and TCP both ways (guest sends / guest receives).
	if err := sb.Host.Ping("10.199.0.2", 3, 10*time.Second); err != nil {
		t.Fatalf("ping the guest: %v\n%s", err, g.Log())
	}
	const size = 1 << 20
	guestTCPBothWays(t, sb.Host, "10.199.0.2", size)

	// Counters: every frame the host side received from the guest went through the tap's
	// program, every frame it sent to the guest through the uplink's.
	var st []control.SandboxStatus
	deadline := time.Now().Add(3 * time.Second)
	for {
		out := a.cli(t, "", "status", "-o", "json")
		if err := json.Unmarshal([]byte(out.stdout), &st); err != nil {
			t.Fatalf("status -o json: %v: %q", err, out.stdout)
		}
		rx, tx := linkCounters(t, sb.Host, "veth0")
		s := st[0].Endpoints[0].Stats
		if s == nil {
			t.Fatalf("no stats in status: %+v", st[0].Endpoints[0])
		}
		if (s.FromGuest.Packets == rx && s.ToGuest.Packets == tx) || time.Now().After(deadline) {
			if s.FromGuest.Packets != rx || s.ToGuest.Packets != tx {
				t.Errorf("BPF counters from_guest=%d to_guest=%d, host veth rx=%d tx=%d", s.FromGuest.Packets, s.ToGuest.Packets, rx, tx)
			}
			if s.FromGuest.Bytes < size || s.ToGuest.Bytes < size {
				t.Errorf("byte counters too small for 1 MiB each way: %+v", s)
			}
			break
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A second NIC (single queue; not joined: the uplink is taken), then del-iface of the first.
	from = g.Lines()
	in2 := `{"device":"tap-two","name":"eth-two","IPAddresses":[{"address":"10.197.0.2","mask":"24"}],"hwAddr":"` + mac2 + `","mtu":1400}`
	if r := a.cli(t, in2, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 0 || !strings.Contains(r.stdout, `"pciAddr"`) {
		t.Fatalf("second add-iface: %+v", r)
	}
	if _, err := g.WaitNICUp(ctx, from, mac2); err != nil {
		t.Fatalf("guest never saw the second NIC: %v", err)
	}
	from = g.Lines()
	a.check(t, in, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{stdout: "null\n"})
	if err := g.WaitNICGone(ctx, from, mac1); err != nil {
		t.Errorf("guest still has the NIC: %v", err)
	}
	if _, err := sb.NS.Link("tap-test"); err == nil {
		t.Error("tap-test (created by kata-dp) survived del-iface")
	}
	if ids := tcxLinkIDs(t, sb.NS.Path(), "eth0"); len(ids) != 0 {
		t.Errorf("programs left on the uplink after del-iface: %v", ids)
	}
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: `[{"name":"eth-two","mac":"` + mac2 + `","ip":["10.197.0.2/24"],"mtu":1400}]` + "\n"})

	// QEMU dies: the next operation fails clearly (null on stdout), and nothing is left half
	// done: no tap of the failed add, the state unchanged once asked again.
	g.Kill()
	<-g.Exited()
	in3 := `{"device":"tap-three","name":"eth-three","hwAddr":"02:42:20:6f:a3:71","mtu":1500}`
	r = a.cli(t, in3, "kata-network", "add-iface", "6ec7a98", "-")
	if r.code != 1 || r.stdout != "null\n" || !strings.Contains(r.stderr, "not healthy") {
		t.Errorf("add-iface with QEMU gone: %+v", r)
	}
	if _, err := sb.NS.Link("tap-three"); err == nil {
		t.Error("tap of the failed add-iface left behind")
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
	if _, err := sb.NS.Link("tap-two"); err == nil {
		t.Error("tap-two survived sandbox del")
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}

func linkCounters(t *testing.T, n *topo.NetNS, dev string) (rx, tx uint64) {
	t.Helper()
	read := func(what string) uint64 {
		out, err := n.Exec("cat", "/sys/class/net/"+dev+"/statistics/"+what)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
		return v
	}
	return read("rx_packets"), read("tx_packets")
}

// guestTCPBothWays moves size bytes over TCP from the test guest at addr (IPv4 or IPv6) to
// netns from (the guest's send port, 9000) and size bytes from it to the guest (the sink port,
// 9001, which answers the count), reporting a short transfer either way.
func guestTCPBothWays(t *testing.T, from *topo.NetNS, addr string, size int64) {
	t.Helper()
	c, err := from.Dial("tcp", net.JoinHostPort(addr, "9000"), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "%d\n", size)
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	n, err := io.Copy(io.Discard, c)
	c.Close()
	if err != nil || n != size {
		t.Errorf("guest %s -> %s: %d bytes of %d (%v)", addr, from, n, size, err)
	}
	c, err = from.Dial("tcp", net.JoinHostPort(addr, "9001"), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(c, io.LimitReader(zeros{}, size))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if got, _ := strconv.ParseInt(strings.TrimSpace(line), 10, 64); got != size {
		t.Errorf("%s -> guest %s: the guest counted %q bytes, want %d", from, addr, line, size)
	}
}

// TestE2EQEMUMacvtapBPF is TestE2EQEMU's path in macvtap-bpf mode: the agent makes the macvtap
// on the uplink (Kata's MAC swap: the macvtap, so the guest, takes the veth's MAC, which is
// what the guest's address table is keyed by), QEMU gets the macvtap's queues at hot-plug, and
// ping and TCP cross macvtap's plumbing with kata-dp's programs at the uplink's ingress and the
// macvtap's egress, counted by them; status names the macvtap the VM uses.
func TestE2EQEMUMacvtapBPF(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptm", NoTap: true})
	guestIP := sb.GuestAddr.Addr().String()
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{
		sb.GuestMAC.String(): sb.GuestAddr.String(),
	}})

	a, p := startTestAgent(t, sb.Host, sb.NS, "kdptm")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--qmp", g.QMPPath, "--mode", control.ModeMacvtapBPF},
		result{stdout: sandboxID + "\n"})

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	from := g.Lines()
	in := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"` + guestIP + `","mask":"24"}],"hwAddr":"` + sb.GuestMAC.String() + `","mtu":1500}`
	if r := a.cli(t, in, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v\nagent:\n%s", r, p.stderr)
	}
	if _, err := g.WaitNICUp(ctx, from, sb.GuestMAC.String()); err != nil {
		t.Fatalf("guest never saw the NIC with the veth's MAC: %v\n%s", err, g.Log())
	}
	if err := sb.Host.Ping(guestIP, 3, 10*time.Second); err != nil {
		t.Fatalf("ping the guest: %v\n%s", err, g.Log())
	}
	guestTCPBothWays(t, sb.Host, guestIP, 1<<20)

	var st []control.SandboxStatus
	out := a.cli(t, "", "status", "-o", "json")
	if err := json.Unmarshal([]byte(out.stdout), &st); err != nil || len(st) != 1 || len(st[0].Endpoints) != 1 {
		t.Fatalf("status -o json: %v: %q", err, out.stdout)
	}
	ep := st[0].Endpoints[0]
	if ep.RunningMode != control.ModeMacvtapBPF || ep.Macvtap == "" || ep.MacvtapDev == "" {
		t.Errorf("status of the NIC: %+v", ep)
	}
	// The guest's frames are counted by the program at the macvtap's egress, the host's by
	// the one at the uplink's ingress.
	if s := ep.Stats; s == nil || s.FromGuest.Bytes < 1<<20 || s.ToGuest.Bytes < 1<<20 {
		t.Errorf("BPF counters below 1 MiB each way: %+v", s)
	}
	a.check(t, in, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{stdout: "null\n"})
	if _, err := sb.NS.Link(ep.Macvtap); err == nil {
		t.Errorf("macvtap %s survived del-iface", ep.Macvtap)
	}
	if ids := tcxLinkIDs(t, sb.NS.Path(), "eth0"); len(ids) != 0 {
		t.Errorf("programs left on the uplink after del-iface: %v", ids)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
