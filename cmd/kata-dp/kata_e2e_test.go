package main

import (
	"bufio"
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
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
	"github.com/kata-dp/kata-dp/control/kata"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

// podNet is a pod's network as the test needs it: the host side, the pod netns and what the
// CNI plugins gave the pod.
type podNet struct {
	Host, NS  *topo.NetNS
	HostAddr  netip.Prefix // the bridge's (gateway) address
	GuestAddr netip.Prefix // the pod's address
	GuestMAC  net.HardwareAddr
}

type cniPodNet struct{ podNet }

// cniPod makes a pod netns and its eth0 the way containerd does: the reference bridge and
// host-local plugins (go-installed, v1.9.1 as in go.mod) run through libcni, with the bridge
// in a throwaway host-side netns.
func cniPod(t *testing.T, id string) *cniPodNet {
	t.Helper()
	bin := t.TempDir()
	cmd := exec.Command("go", "install",
		"github.com/containernetworking/plugins/plugins/main/bridge@v1.9.1",
		"github.com/containernetworking/plugins/plugins/ipam/host-local@v1.9.1")
	cmd.Env = append(os.Environ(), "GOBIN="+bin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("reference CNI plugins unavailable: %v\n%s", err, out)
	}
	host := topotest.MustNetNS(t, "kdptkh")
	pod := topotest.MustNetNS(t, "kdptkp")
	for _, n := range []*topo.NetNS{host, pod} {
		if err := n.DisableIPv6(); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	conf, err := json.Marshal(map[string]any{
		"cniVersion": "1.1.0", "name": "kdptk-net",
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": "kdptk-br0", "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "subnet": "10.199.0.0/24", "dataDir": filepath.Join(dir, "ipam"),
				"routes": []any{map[string]any{"dst": "0.0.0.0/0"}}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		t.Fatal(err)
	}
	c := libcni.NewCNIConfigWithCacheDir([]string{bin}, filepath.Join(dir, "cache"), nil)
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: pod.Path(), IfName: "eth0"}
	var res *current.Result
	err = host.Do(func() error {
		r, err := c.AddNetworkList(context.Background(), list, rt)
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	t.Cleanup(func() { host.Do(func() error { return c.DelNetworkList(context.Background(), list, rt) }) })
	p := &cniPodNet{podNet{Host: host, NS: pod}}
	for _, ip := range res.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		ones, _ := ip.Address.Mask.Size()
		p.GuestAddr = netip.PrefixFrom(a.Unmap(), ones)
		gw, _ := netip.AddrFromSlice(ip.Gateway)
		p.HostAddr = netip.PrefixFrom(gw.Unmap(), ones)
	}
	li, err := netdev.LookupLink(pod.Path(), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	p.GuestMAC = li.MAC
	if !p.GuestAddr.IsValid() || !p.HostAddr.IsValid() {
		t.Fatalf("CNI result without an address and gateway: %+v", res)
	}
	return p
}

// TestE2EKata: a Kata-shaped node and the real agent with discovery. The pod netns and its
// veth are made by the real bridge + host-local CNI plugins (libcni, as containerd runs
// them); a real QEMU guest runs in it with Kata's
// command-line shape (-name sandbox-<id>, Kata's QMP held by a stand-in shim client, an extra
// monitor, the tap0_kata queue passed as an fd, vhost off); Kata's tcfilter plumbing joins
// veth and tap; persist.json is in Kata's schema. The agent takes the pair over under a ping
// flood, the guest is reachable through BPF, release hands it back to mirred under a flood,
// adopt takes it again, QEMU's death marks the sandbox unhealthy and removing Kata's
// directories collects it.
func TestE2EKata(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	const id = "kdptk0e2e5a1d"
	pn := cniPod(t, id)
	sb := &pn.podNet
	guestIP, hostIP := sb.GuestAddr.Addr().String(), sb.HostAddr.Addr().String()
	mac := sb.GuestMAC.String()
	// Kata's tap, its queue handed to QEMU as an fd.
	if err := netdev.CreateTap(sb.NS.Path(), "tap0_kata", netdev.TapOptions{Queues: 1, MTU: 1500, VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(sb.NS.Path(), "tap0_kata", 1, true, false)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kataDir := filepath.Join(dir, "vc")
	vmDir := filepath.Join(kataDir, "vm", id)
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	extra := filepath.Join(vmDir, "extra-monitor.sock")
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{mac: sb.GuestAddr.String()},
		Gateway: hostIP, ExtraFiles: fds, QEMUArgs: []string{
			"-name", "sandbox-" + id,
			"-qmp", "unix:" + extra + ",server=on,wait=off",
			"-netdev", "tap,id=network-0,vhost=off,fds=3",
			"-device", "virtio-net-pci,netdev=network-0,mac=" + mac + ",bus=rp1,mq=on,vectors=4",
		}})
	for _, f := range fds {
		f.Close() // QEMU has its own
	}
	// Kata's shim holds QEMU's main monitor for the VM's lifetime.
	if err := os.Symlink(g.QMPPath, filepath.Join(vmDir, "qmp.sock")); err != nil {
		t.Fatal(err)
	}
	shim, err := qmp.Dial(context.Background(), g.QMPPath)
	if err != nil {
		t.Fatal(err)
	}
	defer shim.Close()
	if _, err := qmp.Dial(context.Background(), filepath.Join(vmDir, "qmp.sock")); !errors.Is(err, qmp.ErrBusy) {
		t.Errorf("second client on Kata's qmp.sock: %v, want busy", err)
	}
	// Kata's tcfilter plumbing (network_linux.go, addRedirectTCFilter).
	for _, p := range [][2]string{{"eth0", "tap0_kata"}, {"tap0_kata", "eth0"}} {
		for _, cmd := range [][]string{
			{"tc", "qdisc", "add", "dev", p[0], "ingress"},
			{"tc", "filter", "add", "dev", p[0], "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
				"action", "mirred", "egress", "redirect", "dev", p[1]},
		} {
			if _, err := sb.NS.Exec(cmd...); err != nil {
				t.Fatal(err)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := g.WaitNICUp(ctx, 0, mac); err != nil {
		t.Fatalf("guest NIC: %v\n%s", err, g.Log())
	}
	if err := sb.Host.Ping(guestIP, 3, 20*time.Second); err != nil {
		t.Fatalf("guest not reachable through Kata's tcfilter: %v\n%s", err, g.Log())
	}
	// persist.json, as Kata's fs driver writes it.
	st := kata.SandboxState{PersistVersion: 2, State: "running", HypervisorState: kata.HypervisorState{Type: "qemu", Pid: g.Pid()},
		Network: kata.NetworkInfo{NetworkID: sb.NS.Path(), Endpoints: []kata.NetworkEndpoint{{Type: "virtual",
			Veth: &kata.PairEndpoint{NetPair: kata.NetworkInterfacePair{ID: "p0", Name: "br0_kata",
				TAPIface: kata.NetworkInterface{Name: "tap0_kata", HardAddr: mac}, VirtIface: kata.NetworkInterface{Name: "eth0", HardAddr: mac},
				NetInterworkingModel: 2}}}}}}
	b, _ := json.Marshal(st)
	if err := os.MkdirAll(filepath.Join(kataDir, "sbs", id), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(kataDir, "sbs", id, "persist.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}

	// The agent arrives on the node under a ping flood.
	sock := filepath.Join(dir, "kata-dp.sock")
	bpffs := topotest.BPFFS(t, "kdptk")
	flood := startFlood(t, sb.Host, guestIP)
	p := startAgentProcess(t, sb.Host, "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--bpffs-root", bpffs, "--kata-dir", kataDir)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: sb.NS}
	status := func() []control.SandboxStatus {
		r := a.cli(t, "", "status", "-o", "json")
		var out []control.SandboxStatus
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &out) != nil {
			t.Fatalf("status: %+v", r)
		}
		return out
	}
	until(t, "the takeover", func() bool { s := status(); return len(s) == 1 && len(s[0].Endpoints) == 1 })
	sent, lost := flood.stop(t)
	t.Logf("takeover under a ping flood: %d sent, %d lost", sent, lost)
	if lost != 0 {
		t.Errorf("takeover lost %d of %d pings, want 0", lost, sent)
	}
	s := status()[0]
	ep := s.Endpoints[0]
	if s.ID != id || s.Source != control.SourceDiscovery || s.QMP != extra || ep.Source != control.SourceDiscovery ||
		ep.Tap != "tap0_kata" || ep.Uplink != "eth0" || ep.MAC != mac || ep.Addr != sb.GuestAddr.String() || ep.Mode != control.ModeTC {
		t.Errorf("status: %+v", s)
	}
	if !strings.Contains(p.stderr.String(), "Kata pair taken over") {
		t.Errorf("no takeover log line:\n%s", p.stderr)
	}
	filters := func(dev string) string {
		out, _ := sb.NS.Exec("tc", "filter", "show", "dev", dev, "ingress")
		return strings.TrimSpace(out)
	}
	for _, dev := range []string{"eth0", "tap0_kata"} {
		if f := filters(dev); f != "" {
			t.Errorf("filters left on %s after takeover:\n%s", dev, f)
		}
	}
	// Traffic through BPF: ping and TCP both ways with the guest.
	if err := sb.Host.Ping(guestIP, 3, 10*time.Second); err != nil {
		t.Errorf("ping the guest: %v", err)
	}
	if err := guestTCP(sb.Host, guestIP); err != nil {
		t.Errorf("tcp with the guest: %v", err)
	}
	// Hot-plug works through the extra monitor while Kata's shim holds the main one.
	if _, err := a.cliOK(t, "", "kata-network", "list-ifaces", id); err != nil {
		t.Errorf("list-ifaces: %v", err)
	}

	// Release under a flood: Kata's mirred back, kata-dp gone.
	flood = startFlood(t, sb.Host, guestIP)
	if _, err := a.cliOK(t, "", "sandbox", "release", id); err != nil {
		t.Fatal(err)
	}
	sent, lost = flood.stop(t)
	t.Logf("release under a ping flood: %d sent, %d lost", sent, lost)
	if lost != 0 {
		t.Errorf("release lost %d of %d pings, want 0", lost, sent)
	}
	for _, dev := range []string{"eth0", "tap0_kata"} {
		if f := filters(dev); !strings.Contains(f, "mirred") {
			t.Errorf("no mirred filter on %s after release:\n%s", dev, f)
		}
	}
	if len(status()) != 0 {
		t.Errorf("released sandbox still in status: %+v", status())
	}
	if _, err := os.Stat(filepath.Join(bpffs, id)); !os.IsNotExist(err) {
		t.Errorf("pins after release: %v", err)
	}

	// Re-adoption.
	if _, err := a.cliOK(t, "", "sandbox", "adopt", id); err != nil {
		t.Fatal(err)
	}
	until(t, "re-adoption", func() bool { s := status(); return len(s) == 1 && len(s[0].Endpoints) == 1 })
	if err := sb.Host.Ping(guestIP, 3, 10*time.Second); err != nil {
		t.Errorf("ping the guest after re-adoption: %v", err)
	}

	// QEMU dies: unhealthy.
	g.Kill()
	until(t, "the sandbox unhealthy", func() bool { return strings.Contains(status()[0].Unhealthy, "hypervisor") })

	// Kata removes its directories: garbage collection leaves nothing of kata-dp.
	os.RemoveAll(filepath.Join(kataDir, "sbs", id))
	os.RemoveAll(vmDir)
	until(t, "garbage collection", func() bool { return len(status()) == 0 })
	if _, err := os.Stat(filepath.Join(bpffs, id)); !os.IsNotExist(err) {
		t.Errorf("pins after GC: %v", err)
	}
	for _, dev := range []string{"eth0", "tap0_kata"} {
		if f := filters(dev); f != "" {
			t.Errorf("filters on %s after GC:\n%s", dev, f)
		}
		if out, _ := sb.NS.Exec("tc", "qdisc", "show", "dev", dev); strings.Contains(out, "clsact") {
			t.Errorf("clsact on %s after GC", dev)
		}
	}
	if _, err := netdev.LookupLink(sb.NS.Path(), "tap0_kata"); err != nil {
		t.Errorf("Kata's tap is gone: %v", err)
	}
	if t.Failed() {
		t.Logf("agent:\n%s", p.stderr)
	}
}

// cliOK runs a CLI command and fails on a non-zero exit.
func (a *testAgent) cliOK(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	r := a.cli(t, stdin, args...)
	if r.code != 0 {
		return r.stdout, fmt.Errorf("kata-dp %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout, nil
}

// until waits (a 60 s hang guard, not a timing assertion) for cond.
func until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// guestTCP talks to the guest's echo port, then has it send 1 MiB and receive 1 MiB.
func guestTCP(host *topo.NetNS, ip string) error {
	c, err := host.Dial("tcp", fmt.Sprintf("%s:%d", ip, guesttest.EchoPort), 10*time.Second)
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	c.Write([]byte("kata\n"))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || line != "kata\n" {
		return fmt.Errorf("echo: %q, %v", line, err)
	}
	const size = 1 << 20
	if c, err = host.Dial("tcp", fmt.Sprintf("%s:%d", ip, guesttest.SendPort), 10*time.Second); err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "%d\n", size)
	n, err := io.Copy(io.Discard, c)
	c.Close()
	if err != nil || n != size {
		return fmt.Errorf("guest -> host: %d bytes of %d (%v)", n, size, err)
	}
	if c, err = host.Dial("tcp", fmt.Sprintf("%s:%d", ip, guesttest.SinkPort), 10*time.Second); err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	io.Copy(c, io.LimitReader(zeros{}, size))
	c.(*net.TCPConn).CloseWrite()
	line, _ = bufio.NewReader(c).ReadString('\n')
	c.Close()
	if got, _ := strconv.Atoi(strings.TrimSpace(line)); got != size {
		return fmt.Errorf("host -> guest: guest counted %q bytes, want %d", line, size)
	}
	return nil
}

var floodReply = regexp.MustCompile(`icmp_seq=(\d+) `)

type pingFlood struct {
	cmd *exec.Cmd
	out *syncBuffer
}

// startFlood pings ip from ns at 200/s until stop.
func startFlood(t *testing.T, ns *topo.NetNS, ip string) *pingFlood {
	t.Helper()
	f := &pingFlood{out: &syncBuffer{}}
	f.cmd = exec.Command("ip", "netns", "exec", ns.Name(), "ping", "-n", "-i", "0.005", ip)
	f.cmd.Stdout = f.out
	if err := proctest.Start(f.cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.cmd.Process.Kill(); f.cmd.Wait() })
	time.Sleep(300 * time.Millisecond)
	return f
}

// stop ends the flood and returns the pings sent up to the last answered one and how many of
// those got no answer (those in flight at the end do not count).
func (f *pingFlood) stop(t *testing.T) (sent, lost int) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	f.cmd.Process.Signal(os.Interrupt)
	f.cmd.Wait()
	seen := map[int]bool{}
	for _, m := range floodReply.FindAllStringSubmatch(f.out.String(), -1) {
		n, _ := strconv.Atoi(m[1])
		seen[n] = true
		sent = max(sent, n)
	}
	if sent == 0 {
		t.Fatalf("ping flood: no replies:\n%s", f.out)
	}
	for n := 1; n <= sent; n++ {
		if !seen[n] {
			lost++
		}
	}
	return sent, lost
}
