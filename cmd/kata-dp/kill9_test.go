package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
)

// pingSummary reads ping's summary. The floods that assert no echo is lost run ping with a
// deadline (-w), which makes it wait until every request is answered (or the deadline): with
// -W alone, once replies have come ping waits only two round trips for the last ones, so on a
// loaded machine a late reply to the last request was counted as lost (seen once in a full
// run: 1999 of 2000).
var pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// tcxLinkIDs returns the ids of the TCX links on dev: the same ids after an agent restart mean
// nothing was detached and re-attached.
func tcxLinkIDs(t *testing.T, nsPath, dev string) []link.ID {
	t.Helper()
	var ids []link.ID
	for _, p := range topotest.TCX(t, nsPath, dev, ebpf.AttachTCXIngress) {
		if p.Link != 0 {
			ids = append(ids, p.Link)
		}
	}
	return ids
}

// TestKill9UnderTraffic: with ping floods running through two NICs of a sandbox (the real
// agent process, the real BPF dataplane, a guest emulator behind each tap), the agent is
// killed with SIGKILL and restarted. Not a frame is lost while it is down, and afterwards the
// interfaces and routes are the same and nothing was re-created (same taps, same links).
func TestKill9UnderTraffic(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptk", NoTap: true})
	if err := topo.VethPair(sb.Host, "veth1", sb.NS, "eth1"); err != nil {
		t.Fatal(err)
	}
	if err := sb.Host.AddAddr("veth1", "10.198.0.1/24"); err != nil {
		t.Fatal(err)
	}
	guest := topotest.MustNetNS(t, "kdptkg")
	guest.DisableIPv6()

	dir := t.TempDir()
	sock := filepath.Join(dir, "kata-dp.sock")
	bpffs := topotest.BPFFS(t, "kdptk")
	args := []string{"--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--bpffs-root", bpffs}
	p := startAgentProcess(t, sb.Host, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: sb.NS}

	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path()}, result{stdout: sandboxID + "\n"})
	nics := []struct{ tap, name, mac, addr, uplink, host string }{
		{"tap-a", "eth0", "02:42:0a:c7:00:02", "10.199.0.2", "eth0", "10.199.0.1"},
		{"tap-b", "eth1", "02:42:0a:c6:00:02", "10.198.0.2", "eth1", "10.198.0.1"},
	}
	for _, n := range nics {
		in := fmt.Sprintf(`{"device":"%s","name":"%s","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500,"uplink":"%s"}`,
			n.tap, n.name, n.addr, n.mac, n.uplink)
		if r := a.cli(t, in, "kata-network", "add-iface", "6ec", "-"); r.code != 0 {
			t.Fatalf("add-iface %s: %+v", n.name, r)
		}
		mac, _ := net.ParseMAC(n.mac)
		emulateGuest(t, sb.NS.Path(), n.tap, guest, n.name, guestemu.BridgeOptions{MAC: mac, Addrs: []netip.Prefix{netip.MustParsePrefix(n.addr + "/24")}})
		if err := sb.Host.Ping(n.addr, 1, 5*time.Second); err != nil {
			t.Fatalf("%s not reachable before the test: %v", n.name, err)
		}
	}
	route := `{"dest":"10.200.0.0/16","gateway":"10.199.0.1","device":"eth0"}`
	a.check(t, route, []string{"kata-network", "add-route", "6ec", "-"}, result{stdout: "[" + route + "]\n"})
	ifaces := a.cli(t, "", "kata-network", "list-ifaces", "6ec")
	routes := a.cli(t, "", "kata-network", "list-routes", "6ec")
	linksBefore := map[string][]link.ID{}
	for _, dev := range []string{"eth0", "eth1", "tap-a", "tap-b"} {
		linksBefore[dev] = tcxLinkIDs(t, sb.NS.Path(), dev)
		if len(linksBefore[dev]) != 1 {
			t.Fatalf("%s: %d TCX links, want 1", dev, len(linksBefore[dev]))
		}
	}
	tapA, _ := sb.NS.Link("tap-a")

	// Floods through both NICs while the agent is killed and restarted.
	var wg sync.WaitGroup
	results := make([]string, len(nics))
	for i, n := range nics {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _ := sb.Host.Exec("ping", "-n", "-q", "-c", "2000", "-i", "0.002", "-w", "30", n.addr)
			results[i] = out
		}()
	}
	time.Sleep(time.Second)
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	time.Sleep(1500 * time.Millisecond) // the agent is down: the datapath alone forwards
	p = startAgentProcess(t, sb.Host, args...)
	waitAgent(t, sock, p)
	wg.Wait()
	for i, out := range results {
		m := pingSummary.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("%s: no ping summary: %q", nics[i].name, out)
		}
		tx, _ := strconv.Atoi(m[1])
		rx, _ := strconv.Atoi(m[2])
		if tx != 2000 || rx != tx {
			// The datapath counts every frame it drops, by reason: the status says whether a
			// lost echo died in kata-dp's programs (and why) or outside them (the emulator,
			// ping's own timeout under load).
			st := a.cli(t, "", "status", sandboxID)
			t.Errorf("%s: %d of %d echo replies across the agent's kill -9 and restart\nping: %s\nstatus after the restart:\n%s%s",
				nics[i].name, rx, tx, out, st.stdout, st.stderr)
		}
	}

	if got := a.cli(t, "", "kata-network", "list-ifaces", "6ec"); got != ifaces {
		t.Errorf("list-ifaces changed across restart:\n%+v\n%+v", ifaces, got)
	}
	if got := a.cli(t, "", "kata-network", "list-routes", "6ec"); got != routes {
		t.Errorf("list-routes changed across restart:\n%+v\n%+v", routes, got)
	}
	for dev, before := range linksBefore {
		if after := tcxLinkIDs(t, sb.NS.Path(), dev); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("%s: TCX links %v became %v: re-created", dev, before, after)
		}
	}
	if tap, _ := sb.NS.Link("tap-a"); tap.Index != tapA.Index {
		t.Errorf("tap-a re-created (ifindex %d -> %d)", tapA.Index, tap.Index)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
	for _, dev := range []string{"eth0", "eth1"} {
		if ids := tcxLinkIDs(t, sb.NS.Path(), dev); len(ids) != 0 {
			t.Errorf("%s: links left after sandbox del: %v", dev, ids)
		}
	}
	if entries, _ := os.ReadDir(bpffs); len(entries) != 0 {
		t.Errorf("pins left after sandbox del: %v", entries)
	}
}
