package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/monitor"
)

// TestMonitorE2E: `kata-dp monitor` against the real agent process and BPF datapath: spoofed
// frames from an emulated guest arrive as drop events with every field right, honest frames as
// traces when asked; a node-wide session started before the sandbox existed sees its drops; bad
// filters are refused with clear errors; a client that leaves mid-stream
// leaves the agent serving (and the datapath no longer reporting).
func TestMonitorE2E(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptm", NoTap: true})
	guest := topotest.MustNetNS(t, "kdptmg")
	guest.DisableIPv6()
	a, p := startTestAgent(t, sb.Host, sb.NS, "kdptm")
	// session runs `kata-dp monitor args...` until stop; its output comes line by line.
	session := func(args ...string) (lines chan string, stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		w := &lineWriter{lines: make(chan string, 1024)}
		var errb bytes.Buffer
		e := &env{ctx: ctx, stdin: strings.NewReader(""), stdout: w, stderr: &errb,
			args:   append([]string{"monitor"}, args...),
			getenv: func(k string) string { return map[string]string{"KATA_DP_SOCKET": a.sock}[k] }}
		done := make(chan int)
		go func() { done <- e.main() }()
		return w.lines, func() {
			cancel()
			if code := <-done; code != 0 {
				t.Errorf("monitor exit %d: %s", code, errb.String())
			}
		}
	}
	// A node-wide session started before any sandbox exists picks up the one added below.
	nodeLines, nodeStop := session("--reason", "spoof_ip", "-o", "json")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path()}, result{stdout: sandboxID + "\n"})
	const mac = "02:42:20:6f:a3:69"
	in := fmt.Sprintf(`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500}`,
		sb.GuestAddr.Addr(), mac)
	if r := a.cli(t, in, "kata-network", "add-iface", "6ec", "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v\n%s", r, p.stderr)
	}
	hw, _ := net.ParseMAC(mac)
	emulateGuest(t, sb.NS.Path(), "tap-test", guest, "eth0", guestemu.BridgeOptions{MAC: hw, Addrs: []netip.Prefix{sb.GuestAddr}})
	host := sb.HostAddr.Addr().String()
	guest.Exec("ip", "neigh", "replace", host, "lladdr", sb.HostVeth.MAC.String(), "dev", "eth0")
	spoofed := sb.GuestAddr.Addr().As4()
	spoofed[3] = 99
	spoof := netip.AddrFrom4(spoofed).String()
	guest.Exec("ip", "addr", "add", spoof+"/24", "dev", "eth0")
	deadline := time.Now().Add(10 * time.Second)
	for len(nodeLines) == 0 && time.Now().Before(deadline) {
		guest.Exec("ping", "-n", "-q", "-c", "1", "-W", "1", "-I", spoof, host)
	}
	select {
	case l := <-nodeLines:
		var ev monitor.Event
		if err := json.Unmarshal([]byte(l), &ev); err != nil || ev.Sandbox != sandboxID || ev.Reason != "spoof_ip" {
			t.Errorf("node-wide session's event %q (%v), want a spoof_ip drop of %s", l, err, sandboxID)
		}
	default:
		t.Errorf("the node-wide session started before the sandbox saw none of its drops\nagent:\n%s", p.stderr)
	}
	nodeStop()
	guest.Exec("ip", "addr", "del", spoof+"/24", "dev", "eth0")

	// Bad input: clear errors, exit 1.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"monitor", "--type", "drops"}, `monitor: event type "drops": want one of drop, trace, lb`},
		{[]string{"monitor", "--reason", "spoofed"}, `monitor: drop reason "spoofed": want one of spoof_mac,`},
		{[]string{"monitor", "--sandbox", "zzz"}, "monitor: no such container ID (zzz)"},
		{[]string{"monitor", "--sandbox", "6ec", "--nic", "eth9"}, `monitor: not found: NIC "eth9" in ` + sandboxID},
		{[]string{"monitor", "--type", "trace", "--reason", "spoof_ip"}, "monitor: --reason selects drops: add --type drop"},
		{[]string{"monitor", "-o", "yaml"}, `monitor: --output "yaml": want text or json`},
	} {
		if r := a.runIn("", tc.args...); r.code != 1 || !strings.HasPrefix(r.stderr, tc.want) {
			t.Errorf("%v: %+v, want an error starting %q", tc.args, r, tc.want)
		}
	}

	// A session: drops and traces of this sandbox, as JSON lines.
	lines, stop := session("--sandbox", "6ec", "--type", "drop,trace", "-o", "json")
	// The session is open once the datapath reports: ping until the first trace shows.
	next := func() monitor.Event {
		t.Helper()
		select {
		case l := <-lines:
			var ev monitor.Event
			if err := json.Unmarshal([]byte(l), &ev); err != nil {
				t.Fatalf("event %q: %v", l, err)
			}
			return ev
		case <-time.After(10 * time.Second):
			t.Fatalf("no event\nagent:\n%s", p.stderr)
		}
		return monitor.Event{}
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		guest.Exec("ping", "-n", "-q", "-c", "1", "-W", "1", host)
		if len(lines) > 0 || time.Now().After(deadline) {
			break
		}
	}
	ev := next()
	if ev.Type != "trace" || ev.Sandbox != sandboxID || ev.NIC != "eth-test" {
		t.Fatalf("first event %+v, want a trace of %s eth-test", ev, sandboxID)
	}
	for len(lines) > 0 { // the rest of the pings
		next()
	}
	guest.Exec("ip", "addr", "add", spoof+"/24", "dev", "eth0")
	guest.Exec("ping", "-n", "-q", "-c", "3", "-i", "0.05", "-W", "1", "-I", spoof, host)
	drops := 0
	deadline = time.Now().Add(20 * time.Second)
	for drops < 3 {
		var l string
		select {
		case l = <-lines:
		case <-time.After(2 * time.Second):
			// Another spoofed ping while fewer came: a frame lost on the way is no failure.
			if time.Now().After(deadline) {
				t.Fatalf("%d of 3 drops\nagent:\n%s", drops, p.stderr)
			}
			guest.Exec("ping", "-n", "-q", "-c", "1", "-W", "1", "-I", spoof, host)
			continue
		}
		var ev monitor.Event
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("event %q: %v", l, err)
		}
		if ev.Type == "trace" {
			continue // the host's own frames towards the guest, ARP
		}
		drops++
		want := monitor.Event{Time: ev.Time, Type: "drop", Sandbox: sandboxID, NIC: "eth-test", Direction: "from_guest",
			Reason: "spoof_ip", Ethertype: "0x0800", Proto: "icmp", Src: spoof, Dst: host, Len: 98}
		if ev != want {
			t.Errorf("drop event\n%+v, want\n%+v", ev, want)
		}
	}
	// The client leaves mid-stream: the agent goes on serving, and the datapath stops
	// reporting (its monitor flags are cleared when the last session ends).
	stop()
	if r := a.runIn("", "status", "-o", "json"); r.code != 0 {
		t.Errorf("status after the monitor client left: %+v", r)
	}
	// A second session sees new drops only (nothing queued from the first).
	lines, stop = session("--sandbox", sandboxID, "--reason", "spoof_ip")
	deadline = time.Now().Add(10 * time.Second)
	for len(lines) == 0 && time.Now().Before(deadline) {
		guest.Exec("ping", "-n", "-q", "-c", "1", "-W", "1", "-I", spoof, host)
	}
	select {
	case l := <-lines:
		if !strings.Contains(l, " drop spoof_ip "+sandboxID+" eth-test from_guest 0x0800 icmp "+spoof+" -> "+host+" len 98") {
			t.Errorf("text event %q", l)
		}
	default:
		t.Errorf("second session saw no drop\nagent:\n%s", p.stderr)
	}
	stop()
	guest.Exec("ip", "addr", "del", spoof+"/24", "dev", "eth0")
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
