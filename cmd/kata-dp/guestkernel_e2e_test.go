package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/internal/proctest"
	"github.com/kata-dp/kata-dp/loader"
)

// guestKernelDriverEnv, set to 1, runs TestGuestKernelTraffic: the init of the guest that
// TestTrafficOnGuestKernel boots sets it. Set by hand it runs the same checks on the running
// kernel (`KDP_GUEST_KERNEL_DRIVER=1 go test -run TestGuestKernelTraffic ./cmd/kata-dp`).
const guestKernelDriverEnv = "KDP_GUEST_KERNEL_DRIVER"

// guestKernelModes are the modes TestGuestKernelTraffic passes traffic through, in order; the
// BPF ones also drop a spoofed frame and load-balance a connection.
var guestKernelModes = []struct {
	mode string
	bpf  bool
}{
	{control.ModeTC, true},
	{control.ModeXDP, true},
	{control.ModeMacvtapBPF, true},
	{control.ModeDirect, true},
	{control.ModeTCFilter, false},
	{control.ModeMacvtap, false},
}

// TestTrafficOnGuestKernel boots the QEMU test guest's kernel (Debian 12's 6.1: no TCX, so
// kata-dp attaches with clsact + direct-action bpf filters) with this test binary, iproute2,
// iputils' ping and the libraries they link in its initramfs, and runs TestGuestKernelTraffic
// there: frames through kata-dp in every mode, a spoofed frame dropped and counted, a
// load-balanced connection, an agent restart, on the oldest kernel kata-dp supports. Everything stays inside
// the guest, which has no network device.
func TestTrafficOnGuestKernel(t *testing.T) {
	g := needGuestKernel(t)
	if raceBuild() {
		t.Skip("the race detector under TCG is too slow; this test is about the kernel, the plain run covers it")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"/kdp.test": self}
	bins := []string{self}
	for _, name := range []string{"ip", "ping"} {
		p, err := exec.LookPath(name)
		if err != nil {
			t.Skipf("%s not installed (hack/install-deps.sh installs it)", name)
		}
		files["/usr/local/sbin/"+name] = p
		bins = append(bins, p)
	}
	// The C library and the rest of what they link, at the same paths (this machine's
	// Debian userspace in the guest; busybox has no ip netns and a different ping).
	for _, b := range bins {
		out, err := exec.Command("ldd", b).Output()
		if err != nil {
			if b == self {
				continue // a static test binary
			}
			t.Fatalf("ldd %s: %v", b, err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			if i := slices.Index(f, "=>"); i >= 0 && i+1 < len(f) {
				f = f[i+1:]
			}
			if len(f) > 0 && strings.HasPrefix(f[0], "/") {
				files[f[0]] = f[0]
			}
		}
	}
	const init = `#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /sys/fs/bpf /tmp /run /var
ln -s /run /var/run
mount -t bpf bpf /sys/fs/bpf
for m in $(cat /lib/modules/net.order); do
	insmod "/lib/modules/$m.ko" || echo "KDP-GUEST-ERROR insmod $m"
done
ip link set lo up
echo KDP-DRIVER-BEGIN
KDP_GUEST_KERNEL_DRIVER=1 /kdp.test -test.run '^TestGuestKernelTraffic$' -test.v -test.count=1 -test.timeout 8m 2>&1
echo "KDP-DRIVER-EXIT $?"
poweroff -f
`
	start := time.Now()
	s := g.run(t, files, init, 2, 10*time.Minute)
	t.Logf("guest ran %v", time.Since(start).Round(time.Second))
	begin, end := strings.Index(s, "KDP-DRIVER-BEGIN"), strings.Index(s, "KDP-DRIVER-EXIT")
	if begin < 0 || end < begin {
		t.Fatalf("the driver did not run to its end in the guest:\n%s", s)
	}
	report := s[begin:]
	t.Logf("in the guest:\n%s", report)
	if strings.Contains(s, "KDP-GUEST-ERROR") {
		t.Errorf("the guest could not load a module")
	}
	if !strings.Contains(report, "KDP-DRIVER-EXIT 0\n") || !strings.Contains(report, "--- PASS: TestGuestKernelTraffic ") ||
		!strings.Contains(report, "kernel has TCX: false") {
		t.Fatal("TestGuestKernelTraffic did not pass on the guest's kernel (without TCX)")
	}
	for _, m := range guestKernelModes {
		if !strings.Contains(report, "--- PASS: TestGuestKernelTraffic/"+m.mode+" ") {
			t.Errorf("mode %s did not pass on the guest's kernel", m.mode)
		}
	}
}

// TestGuestKernelTraffic is the driver TestTrafficOnGuestKernel runs inside the QEMU test
// guest (Debian 12's 6.1 kernel: no TCX, so every tc program goes on clsact): one real agent
// process, and per mode a sandbox with an emulated guest behind its tap (or macvtap) that
// exchanges ping and TCP with the host side through kata-dp; in the BPF modes a spoofed frame
// from the guest is dropped and counted, a connection to a kata-ipvs VIP reaches its real
// server and the reply comes back, and where the kernel has no TCX the programs really sit in
// clsact bpf filters, gone again after sandbox del; in tc mode the agent is killed and
// started again in between. It runs only when guestKernelDriverEnv is
// set: on the build machine the ordinary tests cover this kernel.
func TestGuestKernelTraffic(t *testing.T) {
	if os.Getenv(guestKernelDriverEnv) != "1" {
		t.Skipf("the driver of TestTrafficOnGuestKernel (set %s=1 to run it on this kernel)", guestKernelDriverEnv)
	}
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	feat, err := loader.Probe()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel has TCX: %v", feat.TCX)
	ka := startKernelAgent(t, topotest.MustNetNS(t, "kdptka"))
	for i, m := range guestKernelModes {
		t.Run(m.mode, func(t *testing.T) {
			start := time.Now()
			guestKernelMode(t, ka, i, m.mode, m.bpf, !feat.TCX)
			t.Logf("%s: %v", m.mode, time.Since(start).Round(time.Millisecond))
		})
	}
}

// kernelRig is one sandbox of TestGuestKernelTraffic: peer is the namespace the guest talks to
// (the CNI side, or in direct mode a client behind the host's uplink), uplinkNS/uplink where
// kata-dp's program on the peer's side sits.
type kernelRig struct {
	peer             *topo.NetNS
	peerAddr, addr   netip.Prefix // the peer's and the guest's
	peerMAC          net.HardwareAddr
	uplinkNS, uplink string
}

// kernelAgent is the agent process of TestGuestKernelTraffic, which it kills and starts again.
type kernelAgent struct {
	*testAgent
	p    *agentProcess
	ns   *topo.NetNS
	args []string
	root *testing.T // the agent lives as long as this test, whichever subtest starts it
}

func startKernelAgent(t *testing.T, ns *topo.NetNS) *kernelAgent {
	sock, args := agentFiles(t, "kdptk")
	ka := &kernelAgent{testAgent: &testAgent{sock: sock, ns: ns}, ns: ns, root: t, args: args}
	ka.start(t)
	return ka
}

// kill9 kills the agent as a crash would, leaving its pins and attachments behind.
func (ka *kernelAgent) kill9(t *testing.T) {
	t.Helper()
	ka.p.cmd.Process.Kill()
	ka.p.cmd.Wait()
}

// start starts the agent (again, over the same state and pins) in its netns, as
// startAgentProcess does, but stopped when the whole test ends.
func (ka *kernelAgent) start(t *testing.T) {
	t.Helper()
	p := &agentProcess{stderr: &syncBuffer{}}
	p.cmd = exec.Command("nsenter", append([]string{"--net=" + ka.ns.Path(), os.Args[0], "agent"}, ka.args...)...)
	p.cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1")
	p.cmd.Stderr = p.stderr
	if err := proctest.Start(p.cmd); err != nil {
		t.Fatal(err)
	}
	ka.root.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			p.cmd.Wait()
		}
	})
	ka.p = p
	// Under TCG the agent's start (its trial load of both objects, then each sandbox's
	// collection loaded again) takes 10-20 s, more on a busy machine: waitAgent's 15 s is short.
	c := api.NewClient(ka.sock)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := c.Version(context.Background()); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent did not come up:\n%s", p.stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func guestKernelMode(t *testing.T, ka *kernelAgent, i int, mode string, bpf, legacy bool) {
	a := ka.testAgent
	id := "k61-" + mode + "-sb" // no id is a prefix of another
	last := time.Now()
	step := func(what string) { // where the time goes, under TCG
		t.Logf("%s: %v", what, time.Since(last).Round(time.Millisecond))
		last = time.Now()
	}
	guest := topotest.MustNetNS(t, "kdptkg")
	guest.DisableIPv6()
	mac, _ := net.ParseMAC(fmt.Sprintf("02:42:0a:4d:%02x:02", i))
	var r kernelRig
	add := []string{"sandbox", "add", id, "--mode", mode}
	if mode == control.ModeDirect {
		// Taps beside the host's uplink, which leads to a client: no sandbox netns.
		host, client := topotest.MustNetNS(t, "kdptkh"), topotest.MustNetNS(t, "kdptkc")
		host.DisableIPv6()
		client.DisableIPv6()
		if err := topo.VethPair(host, "up0", client, "cl0"); err != nil {
			t.Fatal(err)
		}
		r = kernelRig{peer: client, peerAddr: netip.MustParsePrefix("10.77.0.1/24"), addr: netip.MustParsePrefix("10.77.0.2/24"),
			uplinkNS: host.Path(), uplink: "up0"}
		if err := client.AddAddr("cl0", r.peerAddr.String()); err != nil {
			t.Fatal(err)
		}
		l, err := client.Link("cl0")
		if err != nil {
			t.Fatal(err)
		}
		r.peerMAC = l.MAC
		add = append(add, "--uplink", "up0", "--netns", host.Path())
	} else {
		sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptk", NoTap: true})
		r = kernelRig{peer: sb.Host, peerAddr: sb.HostAddr, addr: sb.GuestAddr, peerMAC: sb.HostVeth.MAC,
			uplinkNS: sb.NS.Path(), uplink: sb.Veth.Name}
		if mode == control.ModeMacvtap || mode == control.ModeMacvtapBPF {
			mac = sb.GuestMAC // the macvtap takes the veth's MAC, as Kata does
		}
		add = append(add, "--netns", sb.NS.Path())
	}
	step("topology")
	checkIn(t, a, "", add, result{stdout: id + "\n"})
	t.Cleanup(func() { a.runIn("", "sandbox", "del", id) })
	in := fmt.Sprintf(`{"device":"tapk%d","name":"eth0","IPAddresses":[{"address":"%s","mask":"%d"}],"hwAddr":"%s","mtu":1500}`,
		i, r.addr.Addr(), r.addr.Bits(), mac)
	res := a.runIn(in, "kata-network", "add-iface", id, "-")
	if mode == control.ModeDirect && legacy {
		// The node programs need TCX links (kata-dp version says direct cannot run): a clear
		// error, and nothing left on the uplink.
		if res.code != 1 || !strings.Contains(res.stderr, loader.ErrNoTCX.Error()) {
			t.Errorf("add-iface in direct mode without TCX: %+v, want the error %q", res, loader.ErrNoTCX)
		}
		if got := kdpFilters(t, r.uplinkNS, r.uplink); len(got) != 0 {
			t.Errorf("kata-dp's filters left on %s: %v", r.uplink, got)
		}
		return
	}
	if res.code != 0 {
		t.Fatalf("add-iface: %+v\nagent:\n%s", res, ka.p.stderr)
	}
	route := `{"dest":"default","gateway":"` + r.peerAddr.Addr().String() + `","device":"eth0"}`
	checkIn(t, a, route, []string{"kata-network", "add-route", id, "-"}, result{stdout: "[" + route + "]\n"})
	step("sandbox add, add-iface, add-route")

	ep := kernelEndpoint(t, a, id)
	if ep.RunningMode != mode {
		t.Fatalf("NIC runs %q (%s), want %s", ep.RunningMode, ep.ModeReason, mode)
	}
	// The VM's side: the tap, or the macvtap's character device, opened as QEMU does.
	var fds []*os.File
	if ep.MacvtapDev != "" {
		fd, err := unix.Open(ep.MacvtapDev, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open %s: %v", ep.MacvtapDev, err)
		}
		fds = []*os.File{os.NewFile(uintptr(fd), ep.MacvtapDev)}
	} else {
		tapNS := r.uplinkNS
		var err error
		if fds, err = netdev.OpenTap(tapNS, ep.Tap, 1, true, true); err != nil {
			t.Fatal(err)
		}
	}
	emulateGuestFds(t, fds, guest, "eth0", guestemu.BridgeOptions{MAC: mac, Addrs: []netip.Prefix{r.addr}, Gateway: r.peerAddr.Addr()})
	step("guest emulator")

	if mode == control.ModeXDP {
		// The tap's XDP program is on, whether or not it may redirect (before 6.3 the kernel
		// cannot say whether the veth takes XDP frames: the guest's frames then stay on tc).
		name, how, err := loader.XDPProgram(r.uplinkNS, ep.Tap)
		if err != nil || name != string(loader.ProgXDPTap) {
			t.Errorf("xdp program on %s: %q (%v), want %s", ep.Tap, name, err, loader.ProgXDPTap)
		}
		t.Logf("xdp on %s: %s, %s", ep.Tap, name, how)
	}
	if legacy && bpf {
		// No TCX: kata-dp's programs are bpf filters on clsact.
		if got := kdpFilters(t, r.uplinkNS, r.uplink); len(got) == 0 {
			t.Errorf("no kdp_ bpf filter on %s: %v", r.uplink, got)
		} else {
			t.Logf("clsact filters on %s: %v", r.uplink, got)
		}
	}

	peerIP, guestIP := r.peerAddr.Addr().String(), r.addr.Addr().String()
	if err := r.peer.Ping(guestIP, 3, 30*time.Second); err != nil {
		t.Fatalf("peer -> guest ping: %v\nagent:\n%s", err, ka.p.stderr)
	}
	if err := guest.Ping(peerIP, 3, 30*time.Second); err != nil {
		t.Fatalf("guest -> peer ping: %v", err)
	}
	step("ping both ways")
	const size = 256 << 10
	if err := topo.TCPTransfer(r.peer, guest, guestIP+":5201", size, 60*time.Second); err != nil {
		t.Errorf("tcp peer -> guest: %v", err)
	}
	if err := topo.TCPTransfer(guest, r.peer, peerIP+":5202", size, 60*time.Second); err != nil {
		t.Errorf("tcp guest -> peer: %v", err)
	}
	step("tcp both ways")
	if !bpf {
		return
	}
	s := kernelEndpoint(t, a, id).Stats
	if s == nil || s.FromGuest.Bytes < size || s.ToGuest.Bytes < size {
		t.Errorf("BPF counters below %d bytes each way: %+v", size, s)
	}

	// A spoofed source: dropped and counted as spoof_ip.
	spoofed := r.addr.Addr().As4()
	spoofed[3] = 99
	spoof := netip.AddrFrom4(spoofed).String()
	if _, err := guest.Exec("ip", "addr", "add", spoof+"/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := guest.AddNeigh("eth0", peerIP, r.peerMAC); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		guest.Exec("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", spoof, peerIP)
		s := kernelEndpoint(t, a, id).Stats
		if s != nil && s.FromGuest.Drops["spoof_ip"] >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spoofed pings not dropped as spoof_ip: %+v", s)
		}
	}
	guest.Exec("ip", "addr", "del", spoof+"/24", "dev", "eth0")
	step("spoofed pings dropped")

	// The load balancer: a kata-ipvs VIP whose real server is the peer; the reply comes back
	// through the reverse NAT.
	l, err := r.peer.Listen("tcp", peerIP+":8080")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go serveLine(l, func(c net.Conn) string { return "hello " + c.RemoteAddr().(*net.TCPAddr).IP.String() })
	const vip = "10.96.0.10"
	for _, params := range []string{"-A -t " + vip + ":80 -s rr -p 60", "-a -t " + vip + ":80 -r " + peerIP + ":8080 -m"} {
		if res := a.runIn("", "kata-ipvs", "ipvsadm", "--parameters", params, id); res.code != 0 {
			t.Fatalf("kata-ipvs %s: %+v", params, res)
		}
	}
	for range 2 {
		c, err := guest.Dial("tcp", vip+":80", 30*time.Second)
		if err != nil {
			t.Fatalf("connect to the VIP: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if want := "hello " + guestIP + "\n"; err != nil || line != want {
			t.Errorf("through the VIP: %q, %v; want %q", line, err, want)
		}
	}
	step("load-balanced connections")

	if mode == control.ModeTC {
		kernelAgentRestart(t, ka, id, r, guest, vip, legacy)
	}

	checkIn(t, a, "", []string{"sandbox", "del", id}, result{})
	if got := kdpFilters(t, r.uplinkNS, r.uplink); len(got) != 0 {
		t.Errorf("kata-dp's filters left on %s after sandbox del: %v", r.uplink, got)
	}
}

// kernelEndpoint returns the one NIC of sandbox id from `status -o json`.
func kernelEndpoint(t *testing.T, a *testAgent, id string) control.EndpointStatus {
	t.Helper()
	res := a.runIn("", "status", "-o", "json")
	var st []control.SandboxStatus
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil {
		t.Fatalf("status -o json: %v: %+v", err, res)
	}
	i := slices.IndexFunc(st, func(s control.SandboxStatus) bool { return s.ID == id })
	if i < 0 || len(st[i].Endpoints) != 1 {
		t.Fatalf("status of %s: %+v", id, st)
	}
	return st[i].Endpoints[0]
}

// kdpFilters lists the tc bpf filters named kdp_* on both sides of dev's clsact, as
// "ingress:name" and "egress:name".
func kdpFilters(t *testing.T, nsPath, dev string) []string {
	t.Helper()
	return slices.Sorted(maps.Keys(kdpFilterProgs(t, nsPath, dev)))
}

// checkIn runs a subcommand in-process (no process to start: the guest runs under TCG) and
// compares its result.
func checkIn(t *testing.T, a *testAgent, stdin string, args []string, want result) {
	t.Helper()
	if got := a.runIn(stdin, args...); got != want {
		t.Errorf("kata-dp %s: %+v, want %+v", strings.Join(args, " "), got, want)
	}
}

// kernelAgentRestart kills the agent with -9: the sandbox keeps forwarding; started again, it
// takes the sandbox back (re-attaching its programs from the new load: the clsact filters
// then run other programs than before) and serves new load-balanced connections.
func kernelAgentRestart(t *testing.T, ka *kernelAgent, id string, r kernelRig, guest *topo.NetNS, vip string, legacy bool) {
	t.Helper()
	ep := kernelEndpoint(t, ka.testAgent, id)
	before := kdpFilterProgs(t, r.uplinkNS, r.uplink)
	ka.kill9(t)
	guestIP := r.addr.Addr().String()
	if err := r.peer.Ping(guestIP, 3, 30*time.Second); err != nil {
		t.Errorf("peer -> guest ping with the agent down: %v", err)
	}
	ka.start(t)
	after := kernelEndpoint(t, ka.testAgent, id)
	if after.RunningMode != ep.RunningMode || after.Stats == nil || after.Stats.FromGuest.Packets < ep.Stats.FromGuest.Packets {
		t.Errorf("after the restart: %+v\nbefore: %+v", after, ep)
	}
	if err := r.peer.Ping(guestIP, 3, 30*time.Second); err != nil {
		t.Errorf("peer -> guest ping after the restart: %v\nagent:\n%s", err, ka.p.stderr)
	}
	c, err := guest.Dial("tcp", vip+":80", 30*time.Second)
	if err != nil {
		t.Fatalf("connect to the VIP after the restart: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if want := "hello " + guestIP + "\n"; err != nil || line != want {
		t.Errorf("through the VIP after the restart: %q, %v; want %q", line, err, want)
	}
	now := kdpFilterProgs(t, r.uplinkNS, r.uplink)
	t.Logf("programs on %s: %v before the restart, %v after", r.uplink, before, now)
	if legacy {
		if len(now) != len(before) {
			t.Errorf("filters on %s: %v after the restart, %v before", r.uplink, now, before)
		}
		for name, prog := range now {
			if before[name] == prog {
				t.Errorf("%s on %s still runs the program of the killed agent's load (id %d)", name, r.uplink, prog)
			}
		}
	}
}

// kdpFilterProgs maps kata-dp's bpf filters on dev ("ingress:kdp_uplink_in") to the ids of
// the programs they run.
func kdpFilterProgs(t *testing.T, nsPath, dev string) map[string]int {
	t.Helper()
	out := map[string]int{}
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		for side, parent := range map[string]uint32{"ingress": netlink.HANDLE_MIN_INGRESS, "egress": netlink.HANDLE_MIN_EGRESS} {
			fs, err := netlink.FilterList(l, parent)
			if err != nil {
				continue // no clsact
			}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok && strings.HasPrefix(bf.Name, "kdp_") {
					out[side+":"+bf.Name] = bf.Id
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("filters on %s: %v", dev, err)
	}
	return out
}
