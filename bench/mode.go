package bench

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"
	"github.com/kata-dp/kata-dp/bench/refprog"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/control/direct"
	"github.com/kata-dp/kata-dp/control/macvtap"
	"github.com/kata-dp/kata-dp/control/mirred"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
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
	// noTap: the mode brings its own guest device (macvtap).
	noTap bool
	// h2gOnly: there is no guest->host path to measure.
	h2gOnly bool
	// noLatency: frames never come back.
	noLatency bool
	sink      sink
	setup     func(e *env) error
}

// modes are all modes the harness knows, in report order.
var modes = []modeDef{
	{name: "tcfilter", desc: "Kata's u32 + mirred on ingress qdiscs (baseline)", setup: setupTcfilter},
	{name: "tc", desc: "kata-dp tc datapath, all features on (anti-spoof, strict egress, counters)", setup: setupTC},
	{name: "macvtap", desc: "Kata's macvtap in bridge mode on the veth", noTap: true, setup: setupMacvtap},
	{name: "cni-tcfilter", desc: "standard CNI path: bridge (FDB pre-learned) + veth pair + tcfilter (reference for direct mode)", ref: true, setup: setupCNI},
	{name: "direct", desc: "kata-dp direct mode: node programs on the uplink steer by guest MAC into the tap, the sandbox's tap program (anti-spoof, strict egress, reverse NAT) on the way out; no bridge, no veth pair", setup: setupDirect},
	{name: "xdp", desc: "kata-dp xdp mode: XDP redirect through a DEVMAP both ways in front of the tc datapath, all features on (host veth GRO on)", setup: setupXDP},
	{name: "ref-redirect", desc: "reference: bare cls_bpf bpf_redirect, no features", ref: true, setup: setupRefRedirect},
	{name: "ref-drop", desc: "reference: drop at veth (h2g) / tap (g2h) ingress: the ceiling", ref: true, noLatency: true, sink: sinkIngress, setup: setupRefDrop},
	{name: "ref-xdp", desc: "reference: XDP veth->veth redirect into an XDP drop", ref: true, h2gOnly: true, noLatency: true, sink: sinkXDPPeer, setup: setupRefXDP},
}

// errSkipMode marks a mode that cannot run on this build or kernel.
var errSkipMode = errors.New("mode not available")

func modeByName(name string) (modeDef, bool) {
	for _, m := range modes {
		if m.name == name {
			return m, true
		}
	}
	return modeDef{}, false
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
	sb      *loader.Sandbox
	links   []link.Link
	undo    []func() error
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

func setupTcfilter(e *env) error {
	ns, veth, tap := e.s.NS.Path(), e.s.Config.Veth, e.s.Config.Tap
	if err := mirred.Join(ns, veth, tap); err != nil {
		return err
	}
	e.undo = append(e.undo, func() error { return mirred.Unjoin(ns, veth, tap) })
	return e.openTap()
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
// one-way tests do not flood. The sandbox side is Kata's tcfilter.
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
	return setupTcfilter(e)
}

// setupDirect builds direct mode as control/bpfdp does (AddDirect): the
// sandbox netns plays the node's netns, its eth0 the uplink toward the
// client in the host netns, and the tap sits beside it. The guest gets a MAC
// of its own (the uplink keeps its MAC: in direct mode the host's uplink is
// no guest's device).
func setupDirect(e *env) error {
	ns, uplink, tap := e.s.NS.Path(), e.s.Config.Veth, e.s.Config.Tap
	root := filepath.Join("/sys/fs/bpf", topo.UniqueName("kdptb-", 8))
	const id = "bench"
	sb, err := loader.Open(root, id)
	if err != nil {
		os.Remove(root)
		return err
	}
	e.sb = sb
	mac := net.HardwareAddr{0x02, 0x6b, 0x64, 0x70, 0x00, 0x02}
	g := direct.Guest{NetNS: ns, Uplink: uplink, Tap: tap, MAC: mac, Addr: e.s.GuestAddr.Addr()}
	mgr := direct.New(root)
	e.undo = append(e.undo, func() error {
		err := errors.Join(mgr.Leave(g), loader.RemoveNode(root, ns, uplink), sb.Close(), loader.Remove(root, id))
		os.RemoveAll(root)
		return err
	})
	if _, _, err := mgr.Join(g); err != nil {
		return err
	}
	ep := maps.Endpoint{PeerIfindex: uint32(e.s.Veth.Index), Slot: 0, Role: maps.RoleTap, Flags: maps.FlagAntiSpoof | maps.FlagStrictEgress}
	if err := ep.SetMAC(mac); err != nil {
		return err
	}
	ep.SetIP(e.s.GuestAddr)
	if err := (maps.EndpointMap{Map: sb.Maps().Endpoints}).Put(uint32(e.s.Tap.Index), ep); err != nil {
		return err
	}
	if _, err := sb.Attach(ns, tap, loader.ProgTapIn); err != nil {
		return err
	}
	if err := sb.AttachDirectRNAT(ns, tap); err != nil {
		return err
	}
	if err := e.openTap(); err != nil {
		return err
	}
	e.guestMAC = mac
	return nil
}

func setupTC(e *env) error {
	ns, veth, tap := e.s.NS.Path(), e.s.Config.Veth, e.s.Config.Tap
	root := filepath.Join("/sys/fs/bpf", topo.UniqueName("kdptb-", 8))
	const id = "bench"
	sb, err := loader.Open(root, id)
	if err != nil {
		os.Remove(root)
		return err
	}
	e.undo = append(e.undo, func() error {
		err := errors.Join(sb.Close(), loader.Remove(root, id))
		os.Remove(root)
		return err
	})
	e.sb = sb
	if _, err := sb.Attach(ns, veth, loader.ProgUplinkIn); err != nil {
		return err
	}
	if _, err := sb.Attach(ns, tap, loader.ProgTapIn); err != nil {
		return err
	}
	eps := maps.EndpointMap{Map: sb.Maps().Endpoints}
	v, t := uint32(e.s.Veth.Index), uint32(e.s.Tap.Index)
	if err := eps.Put(v, maps.Endpoint{PeerIfindex: t, Slot: 0, Role: maps.RoleUplink}); err != nil {
		return err
	}
	ep := maps.Endpoint{PeerIfindex: v, Slot: 0, Role: maps.RoleTap, Flags: maps.FlagAntiSpoof | maps.FlagStrictEgress}
	if err := ep.SetMAC(e.s.GuestMAC); err != nil {
		return err
	}
	ep.SetIP(e.s.GuestAddr)
	if err := eps.Put(t, ep); err != nil {
		return err
	}
	return e.openTap()
}

func setupMacvtap(e *env) error {
	ns, veth := e.s.NS.Path(), e.s.Config.Veth
	const name = "kdpmvtap0"
	m, err := macvtap.Create(ns, veth, name)
	if err != nil {
		return err
	}
	e.undo = append(e.undo, func() error { return macvtap.Delete(ns, veth, name) })
	fds, err := macvtap.Open(m, 1, true)
	if err != nil {
		return err
	}
	e.guest, e.guestDev, e.guestMAC = fds, name, m.MAC
	return nil
}

// setupXDP is kata-dp's xdp mode as control/bpfdp sets it up: the tc
// datapath with the XDP programs in front. The host side turns GRO on at
// its veth, as an operator or CNI would, so that the veth takes the frames
// XDP redirects into it and the guest's frames take XDP too.
func setupXDP(e *env) error {
	if err := setupTC(e); err != nil {
		return err
	}
	ns, veth, tap := e.s.NS.Path(), e.s.Config.Veth, e.s.Config.Tap
	if err := netdev.SetGRO(e.s.Host.Path(), e.s.Config.HostVeth, true); err != nil {
		return err
	}
	if _, err := e.sb.AttachXDP(ns, veth, loader.ProgXDPUplink); err != nil {
		return fmt.Errorf("%w: %w", errSkipMode, err)
	}
	if _, err := e.sb.AttachXDP(ns, tap, loader.ProgXDPTap); err != nil {
		return fmt.Errorf("%w: %w", errSkipMode, err)
	}
	v, t := uint32(e.s.Veth.Index), uint32(e.s.Tap.Index)
	if err := e.sb.SetXDPPort(ns, v, t, loader.XDPPort{MaxLen: uint32(e.s.Config.MTU) + 18, Flags: loader.XDPFlagCsum}); err != nil {
		return err
	}
	ok, err := loader.XDPRedirectTarget(ns, veth)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s takes no XDP frames although its peer has GRO on", veth)
	}
	return e.sb.SetXDPPort(ns, t, v, loader.XDPPort{MaxLen: uint32(e.s.Config.MTU) + 18, Flags: loader.XDPFlagCsum})
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
