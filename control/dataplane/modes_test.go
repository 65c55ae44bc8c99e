package dataplane_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
	"golang.org/x/sys/unix"
)

// modeRig is the standard sandbox topology with a guest behind the tap (or, in macvtap mode,
// behind the macvtap's /dev/tapN), the endpoint added in the given mode.
type modeRig struct {
	sb     *topo.Sandbox
	guest  *topo.NetNS
	bridge *guestemu.Bridge
	dp     *dataplane.Dataplane
	root   string
	ep     control.Endpoint
	ctx    context.Context
}

type rigOpts struct {
	mode    string
	offload bool
	peerGRO bool // GRO on the host end of the veth: frames XDP redirects into the veth arrive
	generic bool // XDP in generic (skb) mode, as where a driver refuses native XDP
}

func newModeRig(t *testing.T, id string, o rigOpts) *modeRig {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	r := &modeRig{root: topotest.BPFFS(t, "kdptx")}
	r.sb = topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptx-"})
	r.guest = topotest.MustNetNS(t, "kdptx-g")
	if o.peerGRO {
		if err := netdev.SetGRO(r.sb.Host.Path(), r.sb.HostVeth.Name, true); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r.ctx = ctx
	var err error
	if r.dp, err = dataplane.NewWithOptions(r.root, loader.Options{GenericXDP: o.generic}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.Close() })
	if err := r.dp.EnsureSandbox(ctx, id, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	r.ep = control.Endpoint{
		Sandbox: id, NetNS: r.sb.NS.Path(), Slot: 0, NIC: "eth0", Tap: r.sb.Tap.Name, Uplink: r.sb.Veth.Name,
		MAC: r.sb.GuestMAC, Addr: r.sb.GuestAddr, MTU: 1500, Mode: o.mode, AntiSpoof: true, StrictEgress: true,
	}
	if err := r.dp.AddEndpoint(ctx, r.ep); err != nil {
		t.Fatal(err)
	}
	// Registered after the sandbox's cleanups, so it runs before them: the macvtap and its
	// /dev node go while the namespaces are still there.
	t.Cleanup(func() {
		r.dp.DelEndpoint(context.Background(), r.ep)
		r.dp.RemoveSandbox(context.Background(), id)
	})
	r.startBridge(t, o.offload)
	return r
}

// startBridge (re)connects the guest to the device the endpoint's mode gives the VM.
func (r *modeRig) startBridge(t *testing.T, offload bool) {
	t.Helper()
	if r.bridge != nil {
		r.bridge.Close()
	}
	var fds []*os.File
	var err error
	mac := r.sb.GuestMAC
	if mv, ok := r.dp.Macvtap(r.ep); ok {
		fds, err = mv.Open(1, true)
		mac = mv.MAC
	} else {
		fds, err = netdev.OpenTap(r.sb.NS.Path(), r.sb.Tap.Name, 1, true, true)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	b, err := guestemu.NewBridge(fds, r.guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: mac, Addrs: []netip.Prefix{r.sb.GuestAddr}, Offload: offload,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.bridge = b
	t.Cleanup(func() { b.Close() })
	if err := b.Start(r.ctx); err != nil {
		t.Fatal(err)
	}
}

// csumErrors reads the IPv4 TCP and UDP InCsumErrors counters of a namespace.
func csumErrors(t *testing.T, n *topo.NetNS) (tcp, udp uint64) {
	t.Helper()
	out, err := n.Exec("cat", "/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out, "\n")
	for i := 0; i+1 < len(lines); i++ {
		h, v := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(h) == 0 || len(h) != len(v) || h[0] != v[0] || (h[0] != "Tcp:" && h[0] != "Udp:") {
			continue
		}
		for j, name := range h {
			if name == "InCsumErrors" {
				n, _ := strconv.ParseUint(v[j], 10, 64)
				if h[0] == "Tcp:" {
					tcp = n
				} else {
					udp = n
				}
			}
		}
	}
	return tcp, udp
}

// udpExchange sends datagrams of many sizes from client to server with ordinary sockets and
// returns how many arrived intact.
func udpExchange(t *testing.T, client, server *topo.NetNS, addr string, n int) int {
	t.Helper()
	pc, err := server.ListenPacket("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	// Room for every datagram (about 2 KiB of buffer each), so that a reader the loaded
	// machine does not schedule for a while loses none: the test is about the path.
	if err := forceRcvBuf(pc, 4<<20); err != nil {
		t.Fatal(err)
	}
	c, err := client.Dial("udp4", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make(chan int)
	go func() {
		buf := make([]byte, 2048)
		ok := 0
		for ok < n {
			// Bounded: a datagram that did not arrive within 5 s of the one before never will.
			pc.SetReadDeadline(time.Now().Add(5 * time.Second))
			k, _, err := pc.ReadFrom(buf)
			if err != nil {
				break
			}
			if k > 0 && bytes.Equal(buf[:k], payload(k, buf[0])) {
				ok++
			}
		}
		got <- ok
	}()
	for i := range n {
		size := 1 + (i*97)%1472
		c.Write(payload(size, byte(i)))
		time.Sleep(200 * time.Microsecond)
	}
	return <-got
}

// forceRcvBuf sets the socket's receive buffer to size bytes, above net.core.rmem_max
// (SO_RCVBUFFORCE: the tests run as root).
func forceRcvBuf(pc net.PacketConn, size int) error {
	rc, err := pc.(*net.UDPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	}); err != nil {
		return err
	}
	return serr
}

func payload(n int, seed byte) []byte {
	b := make([]byte, n)
	b[0] = seed
	for i := 1; i < n; i++ {
		b[i] = byte(int(seed) + i*31)
	}
	return b
}

// functional is the same test for every mode: ping and TCP both ways, UDP both ways with
// ordinary sockets and no checksum errors on either end, and counters where the mode has them.
func functional(t *testing.T, r *modeRig, wantMode string, offload bool) {
	t.Helper()
	host, guest := r.sb.Host, r.guest
	hostIP, guestIP := r.sb.HostAddr.Addr().String(), r.sb.GuestAddr.Addr().String()
	if mode, reason, err := r.dp.Mode(r.ep); err != nil || mode != wantMode {
		t.Fatalf("mode %q (%s, %v), want %q", mode, reason, err, wantMode)
	}
	ht0, hu0 := csumErrors(t, host)
	gt0, gu0 := csumErrors(t, guest)

	if tx, rx := pingAll(t, host, "-c", "5", "-i", "0.05", "-W", "2", guestIP); rx != tx {
		t.Fatalf("host->guest ping: %d/%d", rx, tx)
	}
	if tx, rx := pingAll(t, guest, "-c", "5", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("guest->host ping: %d/%d", rx, tx)
	}
	if err := topo.TCPTransfer(host, guest, guestIP+":5201", 4<<20, 20*time.Second); err != nil {
		t.Fatalf("tcp host->guest: %v", err)
	}
	if err := topo.TCPTransfer(guest, host, hostIP+":5202", 4<<20, 20*time.Second); err != nil {
		t.Fatalf("tcp guest->host: %v", err)
	}
	const n = 300
	if got := udpExchange(t, host, guest, guestIP+":5301", n); got != n {
		t.Errorf("udp host->guest: %d of %d datagrams arrived intact", got, n)
	}
	if got := udpExchange(t, guest, host, hostIP+":5302", n); got != n {
		t.Errorf("udp guest->host: %d of %d datagrams arrived intact", got, n)
	}
	ht1, hu1 := csumErrors(t, host)
	gt1, gu1 := csumErrors(t, guest)
	if ht1 != ht0 || hu1 != hu0 || gt1 != gt0 || gu1 != gu0 {
		t.Errorf("checksum errors: host tcp %d udp %d, guest tcp %d udp %d", ht1-ht0, hu1-hu0, gt1-gt0, gu1-gu0)
	}

	s, err := r.dp.Stats(r.ctx, r.ep)
	if err != nil {
		t.Fatal(err)
	}
	switch wantMode {
	case control.ModeTCFilter, control.ModeMacvtap:
		if s.FromGuest.Drops[dataplane.NoBPFCounters] != 1 || s.ToGuest.Drops[dataplane.NoBPFCounters] != 1 {
			t.Errorf("stats of a mode without BPF counters are not marked: %+v", s)
		}
		if s.FromGuest.Bytes < 4<<20 || s.ToGuest.Bytes < 4<<20 {
			t.Errorf("link counters too small for 4 MiB each way: %+v", s)
		}
	default:
		// Every frame the guest wrote crossed the tap's programs once. Without offloads the
		// tap cannot take GSO frames, so the kernel segments the super-frames the tc program
		// counted once after it: the guest reads more frames than were counted.
		var b guestemu.Stats
		toGuestOK := func() bool {
			if offload {
				return s.ToGuest.Packets == b.RxFrames
			}
			return s.ToGuest.Packets > 0 && s.ToGuest.Packets <= b.RxFrames
		}
		deadline := time.Now().Add(3 * time.Second)
		for {
			s, _ = r.dp.Stats(r.ctx, r.ep)
			b = r.bridge.Stats()
			if (s.FromGuest.Packets == b.TxFrames && toGuestOK()) || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if s.FromGuest.Packets != b.TxFrames || !toGuestOK() {
			t.Errorf("BPF counters from_guest=%d to_guest=%d, emulator wrote %d and read %d frames (offload %v)",
				s.FromGuest.Packets, s.ToGuest.Packets, b.TxFrames, b.RxFrames, offload)
		}
		for dir, d := range map[string]control.DirStats{"from_guest": s.FromGuest, "to_guest": s.ToGuest} {
			for reason, n := range d.Drops {
				if n != 0 {
					t.Errorf("%s: %d drops (%s) in honest traffic", dir, n, reason)
				}
			}
		}
	}
}

// TestModes: every mode passes the same functional tests, with the guest's offloads on (partial
// checksums and GSO frames from the guest, as virtio with offloads) and off.
func TestModes(t *testing.T) {
	cases := []struct {
		name string
		o    rigOpts
		want string
	}{
		{"tc", rigOpts{mode: control.ModeTC, offload: true}, control.ModeTC},
		{"tc-nooffload", rigOpts{mode: control.ModeTC}, control.ModeTC},
		{"xdp", rigOpts{mode: control.ModeXDP, offload: true}, control.ModeXDP},
		{"xdp-nooffload", rigOpts{mode: control.ModeXDP}, control.ModeXDP},
		{"xdp-peergro", rigOpts{mode: control.ModeXDP, offload: true, peerGRO: true}, control.ModeXDP},
		{"xdp-peergro-nooffload", rigOpts{mode: control.ModeXDP, peerGRO: true}, control.ModeXDP},
		{"xdp-generic-peergro", rigOpts{mode: control.ModeXDP, offload: true, peerGRO: true, generic: true}, control.ModeXDP},
		{"xdp-generic-peergro-nooffload", rigOpts{mode: control.ModeXDP, peerGRO: true, generic: true}, control.ModeXDP},
		{"tcfilter", rigOpts{mode: control.ModeTCFilter, offload: true}, control.ModeTCFilter},
		{"tcfilter-nooffload", rigOpts{mode: control.ModeTCFilter}, control.ModeTCFilter},
		{"macvtap", rigOpts{mode: control.ModeMacvtap, offload: true}, control.ModeMacvtap},
		{"macvtap-nooffload", rigOpts{mode: control.ModeMacvtap}, control.ModeMacvtap},
		{"macvtap-bpf", rigOpts{mode: control.ModeMacvtapBPF, offload: true}, control.ModeMacvtapBPF},
		{"macvtap-bpf-nooffload", rigOpts{mode: control.ModeMacvtapBPF}, control.ModeMacvtapBPF},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newModeRig(t, "m-"+c.name, c.o)
			functional(t, r, c.want, c.o.offload)
			checkPlumbing(t, r, c.want, c.o.peerGRO, c.o.generic)
		})
	}
}

// checkPlumbing checks what each mode installed, and only that.
func checkPlumbing(t *testing.T, r *modeRig, mode string, peerGRO, generic bool) {
	t.Helper()
	ns := r.sb.NS.Path()
	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		tcx := tcxPrograms(t, ns, dev)
		xdp, xmode, err := loader.XDPProgram(ns, dev)
		if err != nil {
			t.Fatal(err)
		}
		qd, _ := r.sb.NS.Exec("tc", "qdisc", "show", "dev", dev)
		hasIngress := strings.Contains(qd, "qdisc ingress")
		switch mode {
		case control.ModeTC:
			if len(tcx) != 1 || xdp != "" || hasIngress {
				t.Errorf("%s: tcx %v xdp %q ingress %v", dev, tcx, xdp, hasIngress)
			}
		case control.ModeXDP:
			wantMode := "driver"
			if generic {
				wantMode = "generic"
			}
			// XDP on the tap only: frames to the guest stay on tc (see xdpMode).
			if dev == r.ep.Uplink {
				if len(tcx) != 1 || xdp != "" || hasIngress {
					t.Errorf("%s: tcx %v xdp %q ingress %v", dev, tcx, xdp, hasIngress)
				}
			} else if len(tcx) != 1 || xdp != string(loader.ProgXDPTap) || xmode != wantMode || hasIngress {
				t.Errorf("%s: tcx %v xdp %q (%s) ingress %v", dev, tcx, xdp, xmode, hasIngress)
			}
		case control.ModeTCFilter:
			if len(tcx) != 0 || xdp != "" || !hasIngress {
				t.Errorf("%s: tcx %v xdp %q ingress %v", dev, tcx, xdp, hasIngress)
			}
		case control.ModeMacvtap:
			if len(tcx) != 0 || xdp != "" || hasIngress {
				t.Errorf("%s: tcx %v xdp %q ingress %v", dev, tcx, xdp, hasIngress)
			}
		case control.ModeMacvtapBPF:
			// The uplink's program at ingress; the VM's tap, unused, has none.
			want := map[bool]int{true: 1, false: 0}[dev == r.ep.Uplink]
			if in, out := topotest.TCXCount(t, r.sb.NS.Path(), dev); in != want || out != 0 || xdp != "" || hasIngress {
				t.Errorf("%s: tcx in %d out %d (want %d, 0) xdp %q ingress %v", dev, in, out, want, xdp, hasIngress)
			}
		}
	}
	if mode == control.ModeMacvtapBPF {
		// The guest's program at the macvtap's egress.
		if in, out := topotest.TCXCount(t, r.sb.NS.Path(), "kdpmv0"); in != 0 || out != 1 {
			t.Errorf("kdpmv0: tcx in %d out %d, want 0, 1", in, out)
		}
	}
	if mode == control.ModeXDP && peerGRO {
		// The XDP path really carries the guest's traffic: with the tc program gone from the
		// tap (the veth's peer takes XDP frames), ping still works.
		sb, err := loader.Open(r.root, r.ep.Sandbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sb.Close()
		if err := sb.Detach(ns, r.ep.Tap); err != nil {
			t.Fatal(err)
		}
		if tx, rx := pingAll(t, r.sb.Host, "-c", "5", "-i", "0.05", "-W", "2", r.sb.GuestAddr.Addr().String()); rx != tx {
			t.Errorf("ping over XDP alone (peer GRO %v): %d/%d", peerGRO, rx, tx)
		}
	}
}

// TestXDPFallback: where XDP cannot run (no uplink to redirect to) the endpoint runs in tc
// mode, and says why.
func TestXDPFallback(t *testing.T) {
	r := newModeRig(t, "xdpfb", rigOpts{mode: control.ModeTC, offload: true})
	ep := r.ep
	ep.Mode = control.ModeXDP
	ep.Uplink = ""
	if err := r.dp.UpdateEndpoint(r.ctx, ep); err != nil {
		t.Fatal(err)
	}
	mode, reason, err := r.dp.Mode(ep)
	if err != nil || mode != control.ModeTC || reason == "" {
		t.Errorf("mode %q reason %q err %v, want tc with a reason", mode, reason, err)
	}
	if xdp, _, _ := loader.XDPProgram(r.sb.NS.Path(), ep.Tap); xdp != "" {
		t.Errorf("xdp program %q left on the tap after the fallback", xdp)
	}
}

// TestSwitchModeUnderTraffic switches a live endpoint between tc, xdp and tcfilter (and into
// and out of macvtap, re-plugging the guest) during a ping flood; SwitchMode reports the frames
// it lost, and the flood's own loss agrees with it.
func TestSwitchModeUnderTraffic(t *testing.T) {
	r := newModeRig(t, "switch", rigOpts{mode: control.ModeTC, offload: true, peerGRO: true})
	guestIP := r.sb.GuestAddr.Addr().String()
	seq := []string{control.ModeXDP, control.ModeTCFilter, control.ModeTC, control.ModeTCFilter, control.ModeXDP, control.ModeTC}

	var (
		wg     sync.WaitGroup
		tx, rx int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tx, rx = ping(t, r.sb.Host, "-c", "3000", "-i", "0.001", "-W", "2", guestIP)
	}()
	time.Sleep(300 * time.Millisecond)
	var lost uint64
	for _, m := range seq {
		n, err := r.dp.SwitchMode(r.ctx, r.ep, m)
		if err != nil {
			t.Fatal(err)
		}
		if mode, reason, _ := r.dp.Mode(r.ep); mode != m {
			t.Fatalf("after switching to %s the endpoint runs %s (%s)", m, mode, reason)
		}
		t.Logf("switch to %-8s lost %d", m, n)
		lost += n
		time.Sleep(100 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("%d switches: ping %d/%d, SwitchMode reported %d lost", len(seq), rx, tx, lost)
	if tx == 0 {
		t.Fatal("no ping ran")
	}
	// Every lost echo request or reply is one lost exchange; SwitchMode counts frames, to
	// within the frames in flight at its first reading (at most one per switch here).
	if pingLost := int(tx - rx); pingLost > int(lost)+len(seq) || int(lost) > 2*pingLost+len(seq) {
		t.Errorf("ping lost %d exchanges, SwitchMode reported %d frames", pingLost, lost)
	}
	if lost > 0 {
		t.Logf("note: %d frames lost over %d switches between tc, xdp and tcfilter", lost, len(seq))
	}

	// macvtap: the VM moves to /dev/tapN, then back to the tap (a re-plug of its NIC), under a
	// flood too. Frames are lost while the VM has no device; the numbers are reported, not
	// judged.
	wg.Add(1)
	go func() {
		defer wg.Done()
		tx, rx = ping(t, r.sb.Host, "-c", "2000", "-i", "0.001", "-W", "1", guestIP)
	}()
	time.Sleep(300 * time.Millisecond)
	var mvLost uint64
	for _, m := range []string{control.ModeMacvtap, control.ModeTC} {
		n, err := r.dp.SwitchMode(r.ctx, r.ep, m)
		if err != nil {
			t.Fatal(err)
		}
		r.startBridge(t, true)
		mvLost += n
		t.Logf("switch to %s: SwitchMode counted %d lost (to %s after it)", m, n, dataplane.SwitchSettle)
		time.Sleep(300 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("into and out of macvtap: ping %d/%d, SwitchMode counted %d", rx, tx, mvLost)
	if tx, rx := pingAll(t, r.sb.Host, "-c", "5", "-i", "0.05", "-W", "2", guestIP); rx != tx {
		t.Errorf("after the macvtap round trip: ping %d/%d", rx, tx)
	}
}

// xdpOnly switches a rig's endpoint to xdp mode with GRO on the host end of the veth (so the
// guest's frames take XDP) and takes the tc program away from the tap, so that whatever the
// test sees of the guest's frames next was done by the tap's XDP program alone.
func xdpOnly(t *testing.T, r *rig) {
	t.Helper()
	if err := netdev.SetGRO(r.sb.Host.Path(), r.sb.HostVeth.Name, true); err != nil {
		t.Fatal(err)
	}
	if _, err := r.dp.SwitchMode(context.Background(), r.ep, control.ModeXDP); err != nil {
		t.Fatal(err)
	}
	r.ep.Mode = control.ModeXDP
	if mode, reason, _ := r.dp.Mode(r.ep); mode != control.ModeXDP {
		t.Fatalf("mode %s (%s), want xdp", mode, reason)
	}
	sb, err := loader.Open(r.root, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	// Frames to the guest stay on the uplink's tc program in xdp mode; the guest's frames
	// now meet XDP alone.
	if err := sb.Detach(r.sb.NS.Path(), r.ep.Tap); err != nil {
		t.Fatal(err)
	}
}

// TestXDPSpoofAndEgress: anti-spoofing and strict egress done by the XDP program alone, with
// the drops counted by reason.
func TestXDPSpoofAndEgress(t *testing.T) {
	r := newRig(t, "xdpspoof")
	xdpOnly(t, r)
	guest := r.guest
	hostIP := r.sb.HostAddr.Addr().String()
	if tx, rx := pingAll(t, guest, "-c", "3", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("honest ping over XDP: %d/%d", rx, tx)
	}
	if _, err := guest.Exec("ip", "addr", "add", "10.199.0.99/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, err := guest.Exec("ip", "neigh", "replace", hostIP, "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	before := r.stats(t)
	if _, rx := ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "-I", "10.199.0.99", hostIP); rx != 0 {
		t.Errorf("spoofed source IP got %d replies", rx)
	}
	if got := r.stats(t).FromGuest.Drops["spoof_ip"] - before.FromGuest.Drops["spoof_ip"]; got != 3 {
		t.Errorf("spoof_ip drops = %d, want 3", got)
	}
	if _, err := guest.Exec("ip", "route", "add", "10.200.0.0/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, err := guest.Exec("ip", "neigh", "replace", "10.200.0.1", "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	before = r.stats(t)
	ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "10.200.0.1")
	if got := r.stats(t).FromGuest.Drops["egress_no_route"] - before.FromGuest.Drops["egress_no_route"]; got != 3 {
		t.Errorf("egress_no_route drops = %d, want 3", got)
	}
}

// TestXDPLoadBalancer: the load balancer in the tap's XDP program alone (the reverse NAT of the
// answers in the uplink's tc program, which xdp mode leaves frames to the guest to): rr order
// over real TCP connections and UDP answers from the right real servers.
func TestXDPLoadBalancer(t *testing.T) {
	r := newLBRig(t, "xdplb")
	xdpOnly(t, r.rig)
	r.addRR(t, true)
	r.checkRR(t, true, " over XDP")
}

// TestXDPReloadUnderTraffic: reopening the sandbox (an agent restart) moves the pinned XDP
// links onto the new programs in place, under a ping flood over XDP, without losing a frame.
func TestXDPReloadUnderTraffic(t *testing.T) {
	r := newRig(t, "xdpreload")
	xdpOnly(t, r)
	reloads, tx, rx := reloadUnderFlood(t, r.sb.Host, r.root, "xdpreload", r.sb.GuestAddr.Addr().String())
	if name, mode, _ := loader.XDPProgram(r.sb.NS.Path(), r.ep.Tap); name != string(loader.ProgXDPTap) || mode != "driver" {
		t.Errorf("after reloads the tap runs %q (%s)", name, mode)
	}
	if tx == 0 || rx != tx {
		t.Errorf("ping during %d reloads: %d of %d replies", reloads, rx, tx)
	}
	t.Logf("%d reloads, %d/%d replies", reloads, rx, tx)
}

// TestModesTeardown: DelEndpoint leaves nothing of any mode behind: no XDP or tc program, no
// XDP port, no mirred filter or ingress qdisc, no macvtap (and the veth has its MAC back); the
// tap, which kata-dp did not create, stays.
func TestModesTeardown(t *testing.T) {
	for _, mode := range []string{control.ModeXDP, control.ModeTCFilter, control.ModeMacvtap, control.ModeMacvtapBPF} {
		t.Run(mode, func(t *testing.T) {
			r := newModeRig(t, "td-"+mode, rigOpts{mode: mode, offload: true, peerGRO: true})
			if tx, rx := pingAll(t, r.sb.Host, "-c", "2", "-i", "0.05", "-W", "2", r.sb.GuestAddr.Addr().String()); rx != tx {
				t.Fatalf("ping before teardown: %d/%d", rx, tx)
			}
			if err := r.dp.DelEndpoint(r.ctx, r.ep); err != nil {
				t.Fatal(err)
			}
			ns := r.sb.NS.Path()
			for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
				if got := tcxPrograms(t, ns, dev); len(got) != 0 {
					t.Errorf("tc programs left on %s: %v", dev, got)
				}
				if name, _, _ := loader.XDPProgram(ns, dev); name != "" {
					t.Errorf("xdp program left on %s: %s", dev, name)
				}
				if out, _ := r.sb.NS.Exec("tc", "qdisc", "show", "dev", dev); strings.Contains(out, "qdisc ingress") {
					t.Errorf("ingress qdisc left on %s", dev)
				}
			}
			if _, err := netdev.LookupLink(ns, "kdpmv0"); err == nil {
				t.Error("macvtap left")
			}
			if v, err := r.sb.NS.Link(r.ep.Uplink); err != nil || v.MAC.String() != r.sb.GuestMAC.String() {
				t.Errorf("veth MAC after teardown %v (%v), want %s", v.MAC, err, r.sb.GuestMAC)
			}
			if _, err := netdev.LookupLink(ns, r.ep.Tap); err != nil {
				t.Errorf("tap not created by kata-dp was touched: %v", err)
			}
			sb, err := loader.Open(r.root, r.ep.Sandbox)
			if err != nil {
				t.Fatal(err)
			}
			defer sb.Close()
			if ports, err := maps.ForSandbox(sb.Maps()).XDP.All(); err != nil || len(ports) != 0 {
				t.Errorf("xdp ports left: %v (%v)", ports, err)
			}
			if eps, err := maps.ForSandbox(sb.Maps()).Endpoints.All(); err != nil || len(eps) != 0 {
				t.Errorf("endpoint entries left: %v (%v)", eps, err)
			}
			if devs, err := sb.LinkedDevices(); err != nil || len(devs) != 0 {
				t.Errorf("pinned links left: %v (%v)", devs, err)
			}
			if _, rx := ping(t, r.sb.Host, "-c", "2", "-i", "0.1", "-W", "1", r.sb.GuestAddr.Addr().String()); rx != 0 {
				t.Errorf("guest still reachable after teardown (%d replies)", rx)
			}
		})
	}
}

// TestRecheckXDP: the guest's frames move to XDP when the veth's peer turns GRO on, and back
// to tc when it turns it off, at the next RecheckXDP; traffic flows throughout.
func TestRecheckXDP(t *testing.T) {
	r := newModeRig(t, "recheck", rigOpts{mode: control.ModeXDP, offload: true})
	hostIP := r.sb.HostAddr.Addr().String()
	check := func(want bool) {
		t.Helper()
		if err := r.dp.RecheckXDP(r.ctx); err != nil {
			t.Fatal(err)
		}
		if got := r.dp.XDPFromGuest(r.ep); got != want {
			t.Fatalf("guest frames over XDP: %v, want %v", got, want)
		}
		if tx, rx := pingAll(t, r.guest, "-c", "3", "-i", "0.05", "-W", "2", hostIP); rx != tx {
			t.Errorf("guest->host ping (xdp %v): %d/%d", want, rx, tx)
		}
		if err := topo.TCPTransfer(r.guest, r.sb.Host, hostIP+":5203", 1<<20, 10*time.Second); err != nil {
			t.Errorf("tcp guest->host (xdp %v): %v", want, err)
		}
	}
	check(false)
	if err := netdev.SetGRO(r.sb.Host.Path(), r.sb.HostVeth.Name, true); err != nil {
		t.Fatal(err)
	}
	check(true)
	if err := netdev.SetGRO(r.sb.Host.Path(), r.sb.HostVeth.Name, false); err != nil {
		t.Fatal(err)
	}
	check(false)
}
