package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf/link"
	"github.com/kata-dp/kata-dp/bench/refprog"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/maps"
	"github.com/vishvananda/netlink"
)

// sink says where the frames a case delivers are counted.
type sink int

const (
	// sinkGuest: the guest emulator (host->guest) or the host end
	// (guest->host).
	sinkGuest sink = iota
	// sinkIngress: the drop at the first device's ingress: eth0's rx
	// counter (host->guest) or the tap's (guest->host).
	sinkIngress
	// sinkXDPPeer: the XDP drop program on the second veth (ref-xdp).
	sinkXDPPeer
)

// modeDef is one way of joining the sandbox's veth to the guest.
type modeDef struct {
	name string
	desc string
	// ref marks reference rows (not a kata-dp mode).
	ref bool
	// slow: left out of --quick.
	slow bool
	// h2gOnly: there is no guest->host path to measure.
	h2gOnly bool
	// noLatency: frames never come back.
	noLatency bool
	sink      sink
	setup     func(e *env) error
	// svc is the number of load-balancer services loaded (a +svc row, bench/services.go),
	// base the kata-dp mode it runs.
	svc  int
	base string
}

// runs says whether case c is measured in rows of m.
func (m modeDef) runs(c caseDef) bool {
	switch {
	case c.dir == g2h && m.h2gOnly, c.dir == rr && m.noLatency:
		return false
	case c.vip:
		return m.svc > 0 || m.ref
	}
	return true
}

// modes returns all modes the harness knows, in report order: every mode of the dataplane's
// registry, installed through the dataplane itself (setupKataDP), its variants (a monitor
// listening, services loaded), then the reference rows, which are the harness's own. Made on
// first use, not at package init: every kata-dp process links this package, and only
// `kata-dp bench` needs the list.
var modes = sync.OnceValue(func() []modeDef {
	return append(append(append(kataModes(), monitorModes...), svcModes()...), refModes...)
})

// monitorModes measure what `kata-dp monitor` costs: the tc row again, with a monitor client
// listening for drops and new load-balanced connections (the datapath's monitor flags on, its
// events read and thrown away), in the same run as the plain tc row (the monitor off).
var monitorModes = []modeDef{
	{name: "tc+monitor", desc: "kata-dp tc datapath as the tc row, with a kata-dp monitor client listening (drops and new LB connections reported)", base: control.ModeTC,
		setup: func(e *env) error { return setupKataDPMonitored(e, control.ModeTC, maps.MonitorDrop|maps.MonitorLB) }},
}

// kataDesc says what each kata-dp mode's row measures; a mode added to the registry without a
// line here still runs, with a generic description.
var kataDesc = map[string]string{
	control.ModeTCFilter: "Kata's u32 + mirred on ingress qdiscs (baseline)",
	control.ModeTC:       "kata-dp tc datapath, all features on (anti-spoof, strict egress, counters)",
	control.ModeMacvtap:  "Kata's macvtap in bridge mode on the veth",
	control.ModeDirect:   "kata-dp direct mode: node programs on the uplink steer by guest MAC into the tap, the sandbox's tap program (anti-spoof, strict egress, reverse NAT) on the way out; no bridge, no veth pair",
	control.ModeXDP:      "kata-dp xdp mode: the tap's XDP program redirects the guest's frames through a DEVMAP, frames to the guest on the tc datapath, all features on (host veth GRO on)",

	control.ModeMacvtapBPF: "kata-dp macvtap-bpf mode: Kata's macvtap plumbing, the uplink's program at veth ingress and the guest's at macvtap egress passing frames on, all features on",
}

func kataModes() []modeDef {
	var out []modeDef
	for _, name := range dataplane.Modes() {
		desc, ok := kataDesc[name]
		if !ok {
			desc = "kata-dp " + name + " mode"
		}
		m, _ := dataplane.Lookup(name)
		out = append(out, modeDef{name: name, desc: desc,
			// Modes of the node family are compared with the CNI path (cni-tcfilter),
			// which --quick leaves out.
			slow:  m.Family() == dataplane.FamilyNode,
			setup: func(e *env) error { return setupKataDP(e, name) }})
	}
	return out
}

var refModes = []modeDef{
	{name: "cni-tcfilter", desc: "standard CNI path: bridge (FDB pre-learned) + veth pair + tcfilter (reference for direct mode)", ref: true, slow: true, setup: setupCNI},
	{name: "ref-redirect", desc: "reference: bare cls_bpf bpf_redirect, no features", ref: true, setup: setupRefRedirect},
	{name: "ref-macvtap-pass", desc: "reference: the macvtap row with an empty program at eth0's TCX ingress and the macvtap's TCX egress (what the hooks cost)", ref: true, setup: setupRefMacvtapPass},
	{name: "ref-drop", desc: "reference: drop at veth (h2g) / tap (g2h) ingress: the ceiling", ref: true, noLatency: true, sink: sinkIngress, setup: setupRefDrop},
	{name: "ref-xdp", desc: "reference: XDP veth->veth redirect into an XDP drop", ref: true, h2gOnly: true, noLatency: true, sink: sinkXDPPeer, setup: setupRefXDP},
}

// errSkipMode marks a mode that cannot run on this build or kernel.
var errSkipMode = errors.New("mode not available")

func modeByName(name string) (modeDef, bool) {
	for _, m := range modes() {
		if m.name == name {
			return m, true
		}
	}
	return parseSvcMode(name)
}

// env is one run's topology with a mode installed.
type env struct {
	s *topo.Sandbox
	// guest holds the guest-side fds (tap or macvtap queues).
	guest []*os.File
	// guestDev is the guest-side device in the sandbox netns.
	guestDev string
	guestMAC net.HardwareAddr
	// hostDev is where the host side sends from and receives on: the host
	// veth, or in the CNI topology the client's veth behind the bridge.
	hostDev string
	hostMAC net.HardwareAddr
	vnetHdr int
	ref     *refprog.Objects
	// vipStats reads the packet counters of the vip cases' service (a +svc row; nil otherwise).
	vipStats func() (in, out uint64, err error)
	links    []link.Link
	undo     []func() error
}

func (e *env) close() error {
	var errs []error
	for _, l := range e.links {
		errs = append(errs, l.Close())
	}
	for _, f := range e.guest {
		f.Close()
	}
	for i := len(e.undo) - 1; i >= 0; i-- {
		errs = append(errs, e.undo[i]())
	}
	if e.ref != nil {
		e.ref.Close()
	}
	return errors.Join(errs...)
}

func (e *env) openTap() error {
	fds, err := e.s.OpenTap()
	if err != nil {
		return err
	}
	e.guest, e.guestDev, e.guestMAC = fds, e.s.Config.Tap, e.s.GuestMAC
	return nil
}

// nodeGuestMAC is the guest's MAC in a mode of the node family (direct): there the uplink
// stays the host's device, so the guest cannot take its MAC as it does in the sandbox modes.
var nodeGuestMAC = net.HardwareAddr{0x02, 0x6b, 0x64, 0x70, 0x00, 0x02}

// setupKataDP installs a kata-dp mode exactly as the agent does: a Dataplane pinning under a
// throwaway root, the sandbox's collection, and the endpoint of the topology's tap joined to
// its veth (the sandbox's uplink; in the node family the sandbox netns plays the node's netns
// and its eth0 the host uplink toward the client in the host netns). A mode that falls back
// to another one (xdp where XDP cannot run) is skipped with the dataplane's reason.
func setupKataDP(e *env, mode string) error { return setupKataDPMonitored(e, mode, 0) }

// setupKataDPMonitored is setupKataDP with a monitor stream open for the events of mon (none
// when 0), drained by a goroutine until the row is torn down.
func setupKataDPMonitored(e *env, mode string, mon maps.MonitorFlags) error {
	return setupKataDPWith(e, mode, mon, 0)
}

// setupKataDPWith is setupKataDPMonitored with services load-balancer services loaded into
// the sandbox once its endpoint is in (none when 0; bench/services.go), as the agent does when
// `kata-ipvs --restore` comes after the network.
func setupKataDPWith(e *env, mode string, mon maps.MonitorFlags, services int) error {
	m, err := dataplane.Lookup(mode)
	if err != nil {
		return err
	}
	ctx := context.Background()
	name, err := topo.OwnedName(sweepPrefix + "-dp")
	if err != nil {
		return err
	}
	root := filepath.Join(topo.BPFFSDir, name)
	dp, err := dataplane.New(root)
	if err != nil {
		return err
	}
	const id = "bench"
	ep := control.Endpoint{
		Sandbox: id, NetNS: e.s.NS.Path(), NIC: "eth0", Tap: e.s.Config.Tap, Uplink: e.s.Config.Veth,
		MAC: e.s.GuestMAC, Addr: e.s.GuestAddr, Addr6: guest6, MTU: e.s.Config.MTU, Queues: 1, Mode: mode,
		AntiSpoof: true, StrictEgress: true,
	}
	if m.Family() == dataplane.FamilyNode {
		ep.MAC = nodeGuestMAC
	}
	e.undo = append(e.undo, func() error {
		err := errors.Join(dp.DelEndpoint(ctx, ep), dp.RemoveSandbox(ctx, id), dp.Close())
		os.RemoveAll(root)
		return err
	})
	if mode == control.ModeXDP {
		// The host side turns GRO on at its veth, as an operator or CNI would, so that the
		// veth takes the frames XDP redirects into it and the guest's frames take XDP too.
		if err := netdev.SetGRO(e.s.Host.Path(), e.s.Config.HostVeth, true); err != nil {
			return err
		}
	}
	if err := dp.EnsureSandbox(ctx, id, ep.NetNS); err != nil {
		return err
	}
	if err := dp.AddEndpoint(ctx, ep); err != nil {
		return err
	}
	if services > 0 {
		if e.vipStats, err = loadServices(ctx, dp, id, services, vipServer(e.s.HostAddr.Addr())); err != nil {
			return err
		}
	}
	if mon != 0 {
		s, err := dp.Monitor(ctx, id, mon)
		if err != nil {
			return err
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				if _, err := s.Read(); err != nil {
					return // closed
				}
			}
		}()
		e.undo = append(e.undo, func() error { // runs before the sandbox is removed
			err := s.Close()
			<-done
			return err
		})
	}
	if got, why, err := dp.Mode(ep); err != nil {
		return err
	} else if got != mode {
		return fmt.Errorf("%w: runs %s: %s", errSkipMode, got, why)
	}
	if mv, ok := dp.Macvtap(ep); ok {
		fds, err := mv.Open(1, true)
		if err != nil {
			return err
		}
		e.guest, e.guestDev, e.guestMAC = fds, mv.Name, mv.MAC
		return nil
	}
	if err := e.openTap(); err != nil {
		return err
	}
	e.guestMAC = ep.MAC
	return nil
}

// The CNI topology's client side: a veth pair in the host netns whose one
// end is a bridge port, like a pod or uplink behind the node's bridge.
const (
	cniBridge = "kdpbr0"
	cniClient = "kdpcl0"
	cniPort   = "kdpcl1"
)

// setupCNI rebuilds the host side as a CNI bridge plugin leaves it: the
// host veth becomes a port of a bridge, and the traffic comes from a client
// veth on another port; the bridge's FDB is pre-learned (static entries) so
// one-way tests do not flood. The sandbox side is Kata's tcfilter, installed
// by the dataplane's tcfilter mode.
func setupCNI(e *env) error {
	h := e.s.Host
	hv := e.s.Config.HostVeth
	steps := [][]string{
		{"ip", "link", "add", cniBridge, "type", "bridge"},
		{"ip", "link", "add", cniClient, "type", "veth", "peer", "name", cniPort},
		{"ip", "link", "set", cniPort, "master", cniBridge},
		{"ip", "link", "set", hv, "master", cniBridge},
		{"ip", "addr", "flush", "dev", hv},
		{"ip", "addr", "add", e.s.HostAddr.String(), "dev", cniClient},
		{"ip", "link", "set", cniBridge, "up"},
		{"ip", "link", "set", cniPort, "up"},
		{"ip", "link", "set", cniClient, "up"},
		{"bridge", "fdb", "replace", e.s.GuestMAC.String(), "dev", hv, "master", "static"},
	}
	for _, st := range steps {
		if _, err := h.Exec(st...); err != nil {
			return err
		}
	}
	cl, err := h.Link(cniClient)
	if err != nil {
		return err
	}
	if _, err := h.Exec("bridge", "fdb", "replace", cl.MAC.String(), "dev", cniPort, "master", "static"); err != nil {
		return err
	}
	e.hostDev, e.hostMAC = cniClient, cl.MAC
	return setupKataDP(e, control.ModeTCFilter)
}

func (e *env) attachRef(dev string, p refprog.Prog) error {
	l, err := e.ref.Attach(e.s.NS.Path(), dev, p)
	if err != nil {
		return err
	}
	e.links = append(e.links, l)
	return nil
}

func setupRefRedirect(e *env) error {
	v, t := uint32(e.s.Veth.Index), uint32(e.s.Tap.Index)
	if err := e.ref.SetPeer(e.s.NS.Path(), v, t); err != nil {
		return err
	}
	if err := e.ref.SetPeer(e.s.NS.Path(), t, v); err != nil {
		return err
	}
	if err := e.attachRef(e.s.Config.Veth, refprog.Redirect); err != nil {
		return err
	}
	if err := e.attachRef(e.s.Config.Tap, refprog.Redirect); err != nil {
		return err
	}
	return e.openTap()
}

func setupRefDrop(e *env) error {
	if err := e.attachRef(e.s.Config.Veth, refprog.Drop); err != nil {
		return err
	}
	if err := e.attachRef(e.s.Config.Tap, refprog.Drop); err != nil {
		return err
	}
	return e.openTap()
}

// setupRefMacvtapPass is Kata's macvtap model with a program that passes every frame on at
// the two hooks macvtap-bpf mode uses: what is left of macvtap-bpf's cost above macvtap's once
// the hooks are paid is kata-dp's programs.
func setupRefMacvtapPass(e *env) error {
	if err := setupKataDP(e, control.ModeMacvtap); err != nil {
		return err
	}
	if err := e.attachRef(e.s.Config.Veth, refprog.Pass); err != nil {
		return err
	}
	l, err := e.ref.AttachEgress(e.s.NS.Path(), e.guestDev, refprog.Pass)
	if err != nil {
		return err
	}
	e.links = append(e.links, l)
	return nil
}

// xdpPeer names the second veth pair of the ref-xdp row: XDP on the
// sandbox veth redirects into xdpOut, whose peer xdpIn drops in XDP.
const (
	xdpOut = "kdpx0"
	xdpIn  = "kdpx1"
)

func setupRefXDP(e *env) error {
	ns := e.s.NS
	if err := topo.VethPair(ns, xdpOut, ns, xdpIn); err != nil {
		return err
	}
	out, err := ns.Link(xdpOut)
	if err != nil {
		return err
	}
	// XDP_REDIRECT into a veth needs an XDP program on its peer.
	if err := e.attachRef(xdpIn, refprog.XDPDrop); err != nil {
		return err
	}
	if err := e.ref.SetPeer(e.s.NS.Path(), uint32(e.s.Veth.Index), uint32(out.Index)); err != nil {
		return err
	}
	if err := e.attachRef(e.s.Config.Veth, refprog.XDPRedirect); err != nil {
		return err
	}
	return e.openTap()
}

// linkStats returns the kernel's counters of every link in the netns.
func linkStats(nsPath string) (map[string]netlink.LinkStatistics, error) {
	out := map[string]netlink.LinkStatistics{}
	err := netdev.InNetNS(nsPath, func() error {
		ls, err := netlink.LinkList()
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
		for _, l := range ls {
			if st := l.Attrs().Statistics; st != nil && l.Attrs().Name != "lo" {
				out[l.Attrs().Name] = *st
			}
		}
		return nil
	})
	return out, err
}
