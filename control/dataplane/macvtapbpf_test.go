package dataplane_test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestMacvtapBPFSpoofAndEgress: in macvtap-bpf mode the guest's frames meet the checks at the
// macvtap's egress: a foreign source IP (and ARP claiming it) and a destination without a route
// are dropped and counted by reason; a route makes the destination reachable.
func TestMacvtapBPFSpoofAndEgress(t *testing.T) {
	r := newModeRig(t, "mvb-spoof", rigOpts{mode: control.ModeMacvtapBPF, offload: true})
	guest, hostIP := r.guest, r.sb.HostAddr.Addr().String()
	stats := func() control.EndpointStats {
		t.Helper()
		s, err := r.dp.Stats(r.ctx, r.ep)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if tx, rx := pingAll(t, guest, "-c", "3", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("honest ping: %d/%d", rx, tx)
	}
	mustExec(t, guest, "ip", "addr", "add", "10.199.0.99/24", "dev", "eth0")
	mustExec(t, guest, "ip", "neigh", "replace", hostIP, "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0")
	before := stats()
	if _, rx := ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "-I", "10.199.0.99", hostIP); rx != 0 {
		t.Errorf("spoofed source IP got %d replies", rx)
	}
	if got := stats().FromGuest.Drops["spoof_ip"] - before.FromGuest.Drops["spoof_ip"]; got != 3 {
		t.Errorf("spoof_ip drops = %d, want 3", got)
	}
	guest.Exec("ip", "neigh", "del", hostIP, "dev", "eth0")
	ping(t, guest, "-c", "1", "-W", "1", "-I", "10.199.0.99", hostIP)
	if got := stats().FromGuest.Drops["spoof_arp"]; got < 1 {
		t.Errorf("spoof_arp drops = %d, want >= 1", got)
	}
	mustExec(t, guest, "ip", "route", "add", "10.200.0.0/24", "dev", "eth0")
	mustExec(t, guest, "ip", "neigh", "replace", "10.200.0.1", "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0")
	before = stats()
	ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "10.200.0.1")
	if got := stats().FromGuest.Drops["egress_no_route"] - before.FromGuest.Drops["egress_no_route"]; got != 3 {
		t.Errorf("egress_no_route drops = %d, want 3", got)
	}
	if err := r.dp.SetRoutes(r.ctx, r.ep.Sandbox, []control.Route{{Slot: 0, Dest: netip.MustParsePrefix("10.200.0.0/24")}}); err != nil {
		t.Fatal(err)
	}
	before = stats()
	ping(t, guest, "-c", "3", "-i", "0.05", "-W", "1", "10.200.0.1")
	after := stats()
	if got := after.FromGuest.Drops["egress_no_route"] - before.FromGuest.Drops["egress_no_route"]; got != 0 {
		t.Errorf("egress_no_route drops with a route = %d, want 0", got)
	}
	if got := after.FromGuest.Packets - before.FromGuest.Packets; got < 3 {
		t.Errorf("forwarded with a route = %d, want >= 3", got)
	}
}

// TestMacvtapBPFNoBypass: macvlan in bridge mode delivers a macvtap's frames to a sibling
// macvlan on the same uplink without the uplink's transmit path. The guest's program runs at
// the macvtap's own egress, before that: a spoofed source, a router advertisement and a
// VLAN-tagged frame sent to a sibling's MAC never reach it and are counted by reason, while an
// honest frame does (the probe's positive control). Frames to the uplink's own MAC are the
// sandbox netns's: they are neither counted nor touched.
func TestMacvtapBPFNoBypass(t *testing.T) {
	r := newRig6(t, "mvb-bypass", rigOpts{mode: control.ModeMacvtapBPF, offload: true})
	const sib = "kdpsib0"
	err := r.sb.NS.Do(func() error {
		up, err := netlink.LinkByName(r.ep.Uplink)
		if err != nil {
			return err
		}
		la := netlink.NewLinkAttrs()
		la.Name, la.ParentIndex = sib, up.Attrs().Index
		if err := netlink.LinkAdd(&netlink.Macvlan{LinkAttrs: la, Mode: netlink.MACVLAN_MODE_BRIDGE}); err != nil {
			return err
		}
		l, err := netlink.LinkByName(sib)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netdev.DeleteLink(r.sb.NS.Path(), sib) })
	sl, err := r.sb.NS.Link(sib)
	if err != nil {
		t.Fatal(err)
	}
	ss := openRaw(t, r.sb.NS, sib)
	gs := openRaw(t, r.guest, "eth0")
	gmac := r.sb.GuestMAC
	before, err := r.dp.Stats(r.ctx, r.ep)
	if err != nil {
		t.Fatal(err)
	}
	ok := []byte("kdp-mvb-ok")
	gs.send(t, icmp6Raw(sl.MAC, gmac, eui64(gmac), netip.MustParseAddr("fe80::1"), 128, ok))
	if !ss.got(ok) {
		t.Fatal("an honest frame from the guest did not reach the sibling macvlan: the probe is blind")
	}
	spoof := []byte("kdp-mvb-spoof")
	gs.send(t, icmp6Raw(sl.MAC, gmac, netip.MustParseAddr("fd00:199::99"), host6.Addr(), 128, spoof))
	ra := []byte("kdp-mvb-ra")
	gs.send(t, icmp6Raw(sl.MAC, gmac, eui64(gmac), netip.MustParseAddr("ff02::1"), 134, ra))
	vlan := []byte("kdp-mvb-vlan")
	tagged := icmp6Raw(sl.MAC, gmac, eui64(gmac), netip.MustParseAddr("fe80::1"), 128, vlan)
	tagged = append(append(append([]byte{}, tagged[:12]...), 0x81, 0x00, 0x00, 0x05), tagged[12:]...)
	gs.send(t, tagged)
	macSpoof := []byte("kdp-mvb-mac")
	gs.send(t, icmp6Raw(sl.MAC, net.HardwareAddr{2, 0, 0, 0, 0, 0x99}, eui64(gmac), netip.MustParseAddr("fe80::1"), 128, macSpoof))
	for _, m := range [][]byte{spoof, ra, vlan, macSpoof} {
		if ss.got(m) {
			t.Errorf("frame %q from the guest reached the sibling macvlan", m)
		}
	}
	after, err := r.dp.Stats(r.ctx, r.ep)
	if err != nil {
		t.Fatal(err)
	}
	for _, reason := range []string{"spoof_ip6", "ra", "vlan", "spoof_mac"} {
		if d := after.FromGuest.Drops[reason] - before.FromGuest.Drops[reason]; d < 1 {
			t.Errorf("%s drops +%d, want at least 1 (%v)", reason, d, after.FromGuest.Drops)
		}
	}

	// Frames for the uplink's own MAC go to the sandbox netns's stack, not the guest: a
	// ping from the host to an address on the uplink answers and is not counted to the guest.
	mustExec(t, r.sb.NS, "ip", "addr", "add", "fd00:199::7/64", "dev", r.ep.Uplink, "nodad")
	if tx, rx := pingAll(t, r.sb.Host, "-6", "-c", "3", "-i", "0.05", "-W", "2", "fd00:199::7"); rx != tx {
		t.Fatalf("ping to the sandbox netns: %d/%d", rx, tx)
	}
	s0, _ := r.dp.Stats(r.ctx, r.ep)
	b0 := r.bridge.Stats()
	ping(t, r.sb.Host, "-6", "-c", "5", "-i", "0.05", "-W", "2", "fd00:199::7")
	s1, _ := r.dp.Stats(r.ctx, r.ep)
	b1 := r.bridge.Stats()
	// What the guest read meanwhile (multicast, say) is all that may be counted.
	if d, g := s1.ToGuest.Packets-s0.ToGuest.Packets, b1.RxFrames-b0.RxFrames; d > g {
		t.Errorf("to_guest counted %d frames while the guest read %d: frames for the sandbox netns counted", d, g)
	}
}

// TestMacvtapBPFLoadBalancer: the load balancer in macvtap-bpf mode: DNAT at the macvtap's
// egress, reverse NAT at the uplink's ingress, over real TCP connections (rr order) and UDP
// flows.
func TestMacvtapBPFLoadBalancer(t *testing.T) {
	r := newLBRig(t, "mvb-lb")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if _, err := r.dp.SwitchMode(ctx, r.ep, control.ModeMacvtapBPF); err != nil {
		t.Fatal(err)
	}
	r.ep.Mode = control.ModeMacvtapBPF
	r.rig.toMacvtap(t, ctx)
	mustExec(t, r.guest, "ip", "route", "replace", "default", "via", r.sb.HostAddr.Addr().String())

	r.addRR(t, true)
	r.checkRR(t, true, "")
	// A long transfer through the VIP: DNAT and reverse NAT on every segment.
	c, _ := r.dialTCP(t)
	defer c.Close()
	buf := make([]byte, 64<<10)
	for range 64 {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("write through the VIP: %v", err)
		}
	}
}

// TestMacvtapBPFSwitch switches a live endpoint tc -> macvtap-bpf -> macvtap -> macvtap-bpf ->
// tc. Between macvtap and macvtap-bpf the device stays, so the VM keeps its queues (no
// re-plug) while a ping flood runs; each step installs its own plumbing and takes the others'
// away, and traffic flows after each.
func TestMacvtapBPFSwitch(t *testing.T) {
	r := newModeRig(t, "mvb-switch", rigOpts{mode: control.ModeTC, offload: true})
	ns, guestIP := r.sb.NS.Path(), r.sb.GuestAddr.Addr().String()
	check := func(mode string) {
		t.Helper()
		if m, why, _ := r.dp.Mode(r.ep); m != mode {
			t.Fatalf("runs %s (%s), want %s", m, why, mode)
		}
		// Status shows the device the VM uses: the macvtap in the macvtap modes.
		name, dev, ok := r.dp.VMDevice(r.ep)
		if isMV := mode == control.ModeMacvtap || mode == control.ModeMacvtapBPF; ok != isMV ||
			(ok && (name != "kdpmv0" || dev == "")) {
			t.Errorf("%s: VM device %q %q %v", mode, name, dev, ok)
		}
		if tx, rx := pingAll(t, r.sb.Host, "-c", "3", "-i", "0.05", "-W", "2", guestIP); rx != tx {
			t.Errorf("%s: host->guest ping %d/%d", mode, rx, tx)
		}
		if tx, rx := pingAll(t, r.guest, "-c", "3", "-i", "0.05", "-W", "2", r.sb.HostAddr.Addr().String()); rx != tx {
			t.Errorf("%s: guest->host ping %d/%d", mode, rx, tx)
		}
		checkPlumbing(t, r, mode, false, false)
	}
	sw := func(mode string) {
		t.Helper()
		if _, err := r.dp.SwitchMode(r.ctx, r.ep, mode); err != nil {
			t.Fatal(err)
		}
		r.ep.Mode = mode
	}
	check(control.ModeTC)
	sw(control.ModeMacvtapBPF)
	r.startBridge(t, true)
	check(control.ModeMacvtapBPF)
	mv, _ := r.dp.Macvtap(r.ep)

	// macvtap <-> macvtap-bpf under a flood, with the VM on the same device throughout.
	var (
		wg     sync.WaitGroup
		tx, rx int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tx, rx = ping(t, r.sb.Host, "-c", "1500", "-i", "0.001", "-W", "2", guestIP)
	}()
	time.Sleep(200 * time.Millisecond)
	for _, m := range []string{control.ModeMacvtap, control.ModeMacvtapBPF} {
		sw(m)
		if now, ok := r.dp.Macvtap(r.ep); !ok || now.Ifindex != mv.Ifindex {
			t.Fatalf("%s: macvtap %+v, want the same device as before (%d)", m, now, mv.Ifindex)
		}
		time.Sleep(200 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("macvtap-bpf -> macvtap -> macvtap-bpf on one device: ping %d/%d", rx, tx)
	if tx == 0 || rx == 0 {
		t.Errorf("flood across the switches: %d/%d", rx, tx)
	}
	check(control.ModeMacvtapBPF)
	sw(control.ModeMacvtap)
	check(control.ModeMacvtap)
	if in, out := topotest.TCXCount(t, r.sb.NS.Path(), "kdpmv0"); in != 0 || out != 0 {
		t.Errorf("macvtap mode: kdpmv0 tcx in %d out %d", in, out)
	}
	sw(control.ModeMacvtapBPF)
	check(control.ModeMacvtapBPF)

	sw(control.ModeTC)
	r.startBridge(t, true)
	check(control.ModeTC)
	if _, err := netdev.LookupLink(ns, "kdpmv0"); err == nil {
		t.Error("macvtap left after the switch to tc")
	}
	sb, err := loader.Open(r.root, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	eps, err := maps.ForSandbox(sb.Maps()).Endpoints.All()
	if err != nil {
		t.Fatal(err)
	}
	for ifindex, e := range eps {
		if e.Flags&maps.FlagPass != 0 || (ifindex != uint32(r.sb.Tap.Index) && ifindex != uint32(r.sb.Veth.Index)) {
			t.Errorf("entry left from macvtap-bpf: %d %+v", ifindex, e)
		}
	}
	if devs, _ := sb.LinkedDevices(); len(devs) != 2 {
		t.Errorf("pinned links on %v, want the tap and the uplink", devs)
	}
}

// toMacvtap moves the rig's guest from the tap to the macvtap of its endpoint (after a switch
// into macvtap-bpf mode): what a VM's NIC re-plug does.
func (r *rig) toMacvtap(t *testing.T, ctx context.Context) {
	t.Helper()
	mv, ok := r.dp.Macvtap(r.ep)
	if !ok {
		t.Fatal("no macvtap in macvtap-bpf mode")
	}
	r.bridge.Close()
	fds, err := mv.Open(1, true)
	if err != nil {
		t.Fatal(err)
	}
	b, err := guestemu.NewBridge(fds, r.guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: mv.MAC, Addrs: []netip.Prefix{r.sb.GuestAddr}, Offload: true,
	})
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	r.bridge = b
}

// TestLegacyClsactMacvtapBPF: macvtap-bpf mode the pre-TCX way: the guest's program is a
// direct-action filter at the macvtap's clsact egress, the uplink's at its ingress; traffic
// flows both ways and is counted, and removing the endpoint deletes exactly kata-dp's filters.
func TestLegacyClsactMacvtapBPF(t *testing.T) {
	r := newRigWith(t, "legacy-mvb", loader.Options{LegacyTC: true})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if _, err := r.dp.SwitchMode(ctx, r.ep, control.ModeMacvtapBPF); err != nil {
		t.Fatal(err)
	}
	r.ep.Mode = control.ModeMacvtapBPF
	r.toMacvtap(t, ctx)
	guestIP, hostIP := r.sb.GuestAddr.Addr().String(), r.sb.HostAddr.Addr().String()
	if tx, rx := pingAll(t, r.sb.Host, "-c", "3", "-i", "0.05", "-W", "2", guestIP); rx != tx {
		t.Fatalf("host->guest ping: %d/%d", rx, tx)
	}
	if tx, rx := pingAll(t, r.guest, "-c", "3", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("guest->host ping: %d/%d", rx, tx)
	}
	for _, c := range []struct{ dev, dir string }{{r.ep.Uplink, "ingress"}, {"kdpmv0", "egress"}} {
		if in, out := topotest.TCXCount(t, r.sb.NS.Path(), c.dev); in != 0 || out != 0 {
			t.Errorf("TCX programs on %s in legacy mode: in %d out %d", c.dev, in, out)
		}
		out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", c.dev, c.dir)
		if !strings.Contains(out, "kdp_") || !strings.Contains(out, "direct-action") {
			t.Errorf("no kata-dp direct-action filter at %s %s: %s", c.dev, c.dir, out)
		}
	}
	if out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", r.ep.Tap, "ingress"); strings.Contains(out, "kdp_") {
		t.Errorf("tc mode's filter left on the unused tap: %s", out)
	}
	if s := r.stats(t); s.FromGuest.Packets == 0 || s.ToGuest.Packets == 0 {
		t.Errorf("counters did not move: %+v", s)
	}
	if err := r.dp.DelEndpoint(ctx, r.ep); err != nil {
		t.Fatal(err)
	}
	if out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", r.ep.Uplink, "ingress"); strings.Contains(out, "kdp_") {
		t.Errorf("kata-dp filter left on the uplink: %s", out)
	}
	if _, err := netdev.LookupLink(r.sb.NS.Path(), "kdpmv0"); err == nil {
		t.Error("macvtap left")
	}
}
