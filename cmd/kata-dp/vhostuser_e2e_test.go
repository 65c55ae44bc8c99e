package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
	"github.com/kata-dp/kata-dp/control/qmp"
)

// TestE2EVhostUser is the user guide's vhost-user NIC through the real CLI and agent: a real
// dpdk-testpmd serves the vhost-user sockets (as OVS-DPDK would), a real QEMU guest with shared
// memory runs in the sandbox netns, and `kata-network add-iface` with vhostUserSocket plugs the
// NIC: QEMU connects to the socket, no tap is created, no BPF is attached, status shows mode
// vhost-user; list-ifaces, update-iface and del-iface treat it like any NIC, and del-iface
// takes chardev, netdev and device out. Refused with nothing left behind: a second NIC on the
// socket, a socket that does not exist. Debian's QEMU 7.2 segfaults under TCG once a guest
// driver starts a vhost-user-net device, so the guest does not load virtio_net: the check
// stops at the device (traffic: control/hotplug's TestE2EVhostUserTraffic, KVM only).
func TestE2EVhostUser(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU, dpdk-testpmd and the agent in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptu", NoTap: true})
	dir, err := os.MkdirTemp("", "kdptu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	pmd := guesttest.StartTestpmd(t, dir, 1, 5)
	// A second monitor for the test: the agent holds the first (QEMU serves one client each).
	mon := filepath.Join(dir, "mon.sock")
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), SharedMemory: true,
		KernelArgs: []string{"module_blacklist=virtio_net"},
		QEMUArgs:   []string{"-qmp", "unix:" + mon + ",server=on,wait=off"}})
	qc := qmp.New(mon)
	defer qc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	infoNetwork := func() string {
		ret, err := qc.Execute(ctx, "human-monitor-command", map[string]string{"command-line": "info network"})
		if err != nil {
			t.Fatalf("info network: %v", err)
		}
		var s string
		json.Unmarshal(ret, &s)
		return s
	}

	sock := filepath.Join(dir, "agent.sock")
	bpffs := topotest.BPFFS(t, "kdptu")
	p := startAgentProcess(t, sb.Host, "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--bpffs-root", bpffs)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: sb.NS}
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--qmp", g.QMPPath}, result{stdout: sandboxID + "\n"})

	// The user guide's shape: a device name, 5 queues, and the vhost-user socket.
	const mac = "02:42:20:6f:a3:69"
	in := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"` + mac +
		`","mtu":1500,"queues":5,"vhostUserSocket":"` + pmd.Sockets[0] + `"}`
	from := pmd.Lines()
	r := a.cli(t, in, "kata-network", "add-iface", "6ec7a98", "-")
	if r.code != 0 {
		t.Fatalf("add-iface: %+v\nagent:\n%s", r, p.stderr)
	}
	var iface struct {
		PCIAddr string `json:"pciAddr"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &iface); err != nil || iface.PCIAddr == "" {
		t.Fatalf("add-iface output %q: %v", r.stdout, err)
	}
	want := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"` + mac +
		`","pciAddr":"` + iface.PCIAddr + `","vhostUserSocket":"` + pmd.Sockets[0] + `","queues":5}` + "\n"
	if r.stdout != want {
		t.Errorf("add-iface stdout\n%q, want\n%q", r.stdout, want)
	}
	if _, err := pmd.WaitFor(ctx, from, "("+pmd.Sockets[0]+") new device"); err != nil {
		t.Errorf("testpmd never saw QEMU connect: %v", err)
	}
	if info := infoNetwork(); !strings.Contains(info, "type=vhost-user") || !strings.Contains(info, "macaddr="+mac) {
		t.Errorf("info network:\n%s", info)
	}
	if _, err := sb.NS.Link("tap-test"); err == nil {
		t.Error("a tap was created for a vhost-user NIC")
	}
	if ids := tcxLinkIDs(t, sb.NS.Path(), "eth0"); len(ids) != 0 {
		t.Errorf("programs attached to the uplink for a vhost-user NIC: %v", ids)
	}

	// Status: mode vhost-user, the socket, no counters of kata-dp's.
	var st []control.SandboxStatus
	out := a.cli(t, "", "status", "-o", "json")
	if err := json.Unmarshal([]byte(out.stdout), &st); err != nil || len(st) != 1 || len(st[0].Endpoints) != 1 {
		t.Fatalf("status -o json: %v: %q", err, out.stdout)
	}
	ep := st[0].Endpoints[0]
	if ep.Mode != control.ModeVhostUser || ep.RunningMode != control.ModeVhostUser || ep.VhostUserSocket != pmd.Sockets[0] ||
		ep.Stats != nil || !strings.Contains(ep.StatsError, "vhost-user switch") || ep.Vhost != "" {
		t.Errorf("status endpoint: %+v", ep)
	}
	if tbl := a.cli(t, "", "status"); !strings.Contains(tbl.stdout, "vhost-user") {
		t.Errorf("status table lacks the mode:\n%s", tbl.stdout)
	}

	// Like any NIC: list-ifaces, update-iface.
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: `[{"name":"eth-test","mac":"` + mac + `","ip":["172.16.0.3/16"],"mtu":1500}]` + "\n"})
	r = a.cli(t, `{"name":"eth-test","IPAddresses":[{"address":"172.16.0.4","mask":"16"}]}`, "kata-network", "update-iface", "6ec7a98", "-")
	if r.code != 0 || !strings.Contains(r.stdout, `"Address":"172.16.0.4"`) {
		t.Errorf("update-iface: %+v", r)
	}

	// Refused, nothing left behind: a second NIC on the socket; a socket that does not exist.
	before := infoNetwork()
	in2 := `{"device":"tap-two","name":"eth-two","hwAddr":"02:42:20:6f:a3:6a","mtu":1500,"vhostUserSocket":"` + pmd.Sockets[0] + `"}`
	if r := a.cli(t, in2, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 1 || r.stdout != "null\n" {
		t.Errorf("second NIC on the socket: %+v", r)
	} else {
		t.Logf("second NIC on the socket: %s", strings.TrimSpace(r.stderr))
	}
	in3 := `{"device":"tap-two","name":"eth-two","hwAddr":"02:42:20:6f:a3:6a","mtu":1500,"vhostUserSocket":"` + dir + `/vhost-missing"}`
	if r := a.cli(t, in3, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 1 || r.stdout != "null\n" {
		t.Errorf("missing socket: %+v", r)
	} else {
		t.Logf("missing socket: %s", strings.TrimSpace(r.stderr))
	}
	if after := infoNetwork(); after != before {
		t.Errorf("refused add-iface changed the VM:\n%s\nwas:\n%s", after, before)
	}

	// del-iface: device, netdev and chardev gone; the switch sees QEMU leave.
	from = pmd.Lines()
	a.check(t, in, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{stdout: "null\n"})
	if _, err := pmd.WaitFor(ctx, from, "("+pmd.Sockets[0]+") vhost peer closed"); err != nil {
		t.Errorf("testpmd: %v", err)
	}
	if info := infoNetwork(); strings.Contains(info, "eth-test") {
		t.Errorf("QEMU still has the NIC:\n%s", info)
	}
	ret, err := qc.Execute(ctx, "query-chardev", nil)
	if err != nil || strings.Contains(string(ret), "kdp-eth-test-chardev") {
		t.Errorf("query-chardev after del-iface: %s %v", ret, err)
	}
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: "null\n"})
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
