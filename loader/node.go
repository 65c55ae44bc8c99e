package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/netdev"
)

// Direct mode's node programs (bpf/node.c), attached to a host uplink rather than to a
// sandbox's devices.
const (
	ProgDirectIn  Program = "kdp_direct_in"  // uplink TCX ingress: a guest's frames into its tap
	ProgDirectOut Program = "kdp_direct_out" // uplink TCX egress: local guests' frames into their taps
)

// NodeDir is the directory under the pin root that holds the node collections, one per
// uplink. A sandbox id cannot start with '_', so it never collides with a sandbox.
const NodeDir = "_node"

// Errors callers can test for.
var (
	// ErrNoTCX is returned when direct mode is asked of a kernel without TCX links: the node
	// programs need egress and ingress links that other tc users cannot displace.
	ErrNoTCX = errors.New("direct mode needs tcx (linux 6.6 or later)")
)

// Node is the loaded node collection of one uplink.
type Node struct {
	Uplink  string // device name in the netns
	NetNS   string // "" = the caller's
	Ifindex int
	dir     string
	objs    nodeCore
}

// nodeCore is what a node collection loads: its own maps and the two uplink programs. The
// object also holds kdp_direct_rnat and the sandbox maps it uses; naming only these here keeps
// them out of the node's load (they are loaded per sandbox, see AttachDirectRNAT).
type nodeCore struct {
	KdpArp       *ebpf.Map     `ebpf:"kdp_arp"`
	KdpFdb       *ebpf.Map     `ebpf:"kdp_fdb"`
	KdpNd        *ebpf.Map     `ebpf:"kdp_nd"`
	KdpNodeCfg   *ebpf.Map     `ebpf:"kdp_node_cfg"`
	KdpNodeCtrs  *ebpf.Map     `ebpf:"kdp_node_ctrs"`
	KdpNodeTaps  *ebpf.Map     `ebpf:"kdp_node_taps"`
	KdpDirectIn  *ebpf.Program `ebpf:"kdp_direct_in"`
	KdpDirectOut *ebpf.Program `ebpf:"kdp_direct_out"`
}

func (o *nodeCore) Close() error {
	return _NodeClose(o.KdpArp, o.KdpFdb, o.KdpNd, o.KdpNodeCfg, o.KdpNodeCtrs, o.KdpNodeTaps, o.KdpDirectIn, o.KdpDirectOut)
}

// Dir is the node's pin directory.
func (n *Node) Dir() string { return n.dir }

// NodeSpec returns the node object's collection spec.
func NodeSpec() (*ebpf.CollectionSpec, error) { return LoadNode() }

// nodeDir names an uplink's directory by its netns (inode) and name: the same name in two
// namespaces is two uplinks.
func nodeDir(root, nsPath, uplink string) (string, error) {
	if root == "" {
		root = DefaultRoot
	}
	p := nsPath
	if p == "" {
		p = "/proc/thread-self/ns/net"
	}
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return "", fmt.Errorf("netns %s: %w", p, err)
	}
	if uplink == "" || filepath.Base(uplink) != uplink || uplink == "." || uplink == ".." {
		return "", fmt.Errorf("bad uplink name %q", uplink)
	}
	return filepath.Join(root, NodeDir, fmt.Sprintf("%d-%s", st.Ino, pinDev(uplink))), nil
}

// OpenNode loads the node collection of uplink (in the netns at nsPath, "" = the caller's),
// reusing maps pinned by an earlier run and moving its pinned links onto the new programs in
// place. It does not attach anything new: see Attach.
func OpenNode(root, nsPath, uplink string) (*Node, error) {
	if root == "" {
		root = DefaultRoot
	}
	if err := ensureBPFFS(root); err != nil {
		return nil, fmt.Errorf("open node %s: %w", uplink, err)
	}
	dir, err := nodeDir(root, nsPath, uplink)
	if err != nil {
		return nil, fmt.Errorf("open node %s: %w", uplink, err)
	}
	if staleNode(dir) {
		// Every link pinned here is defunct: the device it served is gone, and perhaps the
		// whole netns, whose inode (the directory's key) a new netns may now have. Its maps
		// (guest MACs -> tap ifindexes of another netns) must not steer this one's frames.
		if err := os.RemoveAll(dir); err != nil {
			return nil, fmt.Errorf("open node %s: remove the stale %s: %w", uplink, dir, err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("open node %s: %w", uplink, err)
	}
	spec, err := LoadNode()
	if err != nil {
		return nil, fmt.Errorf("open node %s: load spec: %w", uplink, err)
	}
	if err := migratePinned(spec, dir); err != nil {
		return nil, fmt.Errorf("open node %s: %w", uplink, err)
	}
	n := &Node{Uplink: uplink, NetNS: nsPath, dir: dir}
	if err := spec.LoadAndAssign(&n.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}); err != nil {
		return nil, fmt.Errorf("open node %s: load collection: %w", uplink, err)
	}
	for _, p := range []Program{ProgDirectIn, ProgDirectOut} {
		if err := n.refresh(p); err != nil {
			n.Close()
			return nil, fmt.Errorf("open node %s: %w", uplink, err)
		}
	}
	return n, nil
}

// staleNode reports whether the node directory dir has pinned links and all of them are
// defunct (detached by the kernel when their device went away).
func staleNode(dir string) bool {
	pinned := 0
	for _, p := range []Program{ProgDirectIn, ProgDirectOut} {
		l, err := link.LoadPinnedLink(filepath.Join(dir, linksDir, string(p)), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		pinned++
		if err != nil {
			continue // unreadable: counts as defunct
		}
		info, err := l.Info()
		l.Close()
		if err == nil && info.TCX() != nil && info.TCX().Ifindex != 0 {
			return false
		}
	}
	return pinned > 0
}

// Close releases the node's file descriptors; pins stay and the programs keep running.
func (n *Node) Close() error { return n.objs.Close() }

// Program returns the loaded program p.
func (n *Node) Program(p Program) (*ebpf.Program, error) {
	switch p {
	case ProgDirectIn:
		return n.objs.KdpDirectIn, nil
	case ProgDirectOut:
		return n.objs.KdpDirectOut, nil
	}
	return nil, fmt.Errorf("%w %q", ErrUnknownProgram, p)
}

// NodeMapHandles are a node's maps, owned by the Node; maps.Node is their typed view.
type NodeMapHandles struct {
	FDB      *ebpf.Map // kdp_fdb: guest MAC -> tap
	ARP      *ebpf.Map // kdp_arp: guest IPv4 -> MAC
	ND       *ebpf.Map // kdp_nd: guest IPv6 (global, link-local) -> MAC
	Config   *ebpf.Map // kdp_node_cfg: the uplink (written by Attach)
	Taps     *ebpf.Map // kdp_node_taps: per-tap counters
	Counters *ebpf.Map // kdp_node_ctrs: node counters
}

// Maps returns the node's maps.
func (n *Node) Maps() NodeMapHandles {
	o := &n.objs
	return NodeMapHandles{FDB: o.KdpFdb, ARP: o.KdpArp, ND: o.KdpNd, Config: o.KdpNodeCfg, Taps: o.KdpNodeTaps, Counters: o.KdpNodeCtrs}
}

func (n *Node) linkPin(p Program) string { return filepath.Join(n.dir, linksDir, string(p)) }

// refresh moves a pinned link onto this load's program; a link whose device is gone is
// forgotten.
func (n *Node) refresh(p Program) error {
	prog, _ := n.Program(p)
	l, err := link.LoadPinnedLink(n.linkPin(p), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		os.Remove(n.linkPin(p))
		return nil
	}
	defer l.Close()
	if err := l.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) {
			return l.Unpin()
		}
		return fmt.Errorf("refresh %s: %w", p, err)
	}
	return nil
}

// Attach puts kdp_direct_in on the uplink's TCX ingress and kdp_direct_out on its TCX egress
// (after any programs already there, so other tc users see frames first) and records the
// uplink's MAC and ifindex for the programs. Links already pinned for this uplink are updated
// in place; a link left from an earlier device of the same name is replaced.
func (n *Node) Attach() error {
	feat, err := Probe()
	if err != nil {
		return fmt.Errorf("attach node %s: %w", n.Uplink, err)
	}
	if !feat.TCX {
		return fmt.Errorf("attach node %s: %w", n.Uplink, ErrNoTCX)
	}
	err = netdev.InNetNS(n.NetNS, func() error {
		l, err := netlink.LinkByName(n.Uplink)
		if err != nil {
			return fmt.Errorf("find device: %w", err)
		}
		n.Ifindex = l.Attrs().Index
		// The programs' parameters: which device they run on.
		cfg := NodeNodeCfg{Ifindex: uint32(n.Ifindex)}
		copy(cfg.Mac[:], l.Attrs().HardwareAddr)
		if err := n.objs.KdpNodeCfg.Put(uint32(0), cfg); err != nil {
			return fmt.Errorf("write node config: %w", err)
		}
		if err := n.attach(ProgDirectIn, ebpf.AttachTCXIngress); err != nil {
			return err
		}
		return n.attach(ProgDirectOut, ebpf.AttachTCXEgress)
	})
	if err != nil {
		return fmt.Errorf("attach node %s: %w", n.Uplink, err)
	}
	return nil
}

func (n *Node) attach(p Program, at ebpf.AttachType) error {
	prog, _ := n.Program(p)
	pin := n.linkPin(p)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == n.Ifindex {
			err := l.Update(prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("update %s link: %w", p, err)
			}
			return nil
		}
		l.Unpin() // an earlier device of this name, or defunct
		l.Close()
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: n.Ifindex, Program: prog, Attach: at, Anchor: link.Tail()})
	if err != nil {
		return fmt.Errorf("attach %s: %w", p, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		l.Detach()
		return fmt.Errorf("pin %s link: %w", p, err)
	}
	return nil
}

// Attached reports whether both node programs have a live pinned link.
func (n *Node) Attached() bool {
	for _, p := range []Program{ProgDirectIn, ProgDirectOut} {
		l, err := link.LoadPinnedLink(n.linkPin(p), nil)
		if err != nil {
			return false
		}
		info, err := l.Info()
		l.Close()
		if err != nil || info.TCX() == nil || info.TCX().Ifindex == 0 {
			return false
		}
	}
	return true
}

// RemoveNode detaches the node programs of uplink and deletes its pins. Idempotent.
func RemoveNode(root, nsPath, uplink string) error {
	dir, err := nodeDir(root, nsPath, uplink)
	if err != nil {
		return fmt.Errorf("remove node %s: %w", uplink, err)
	}
	for _, p := range []Program{ProgDirectIn, ProgDirectOut} {
		if err := detachPinned(filepath.Join(dir, linksDir, string(p))); err != nil {
			return fmt.Errorf("remove node %s: %w", uplink, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove node %s: %w", uplink, err)
	}
	return nil
}

// NodeDirOf is the pin directory of uplink's node collection (it may not exist).
func NodeDirOf(root, nsPath, uplink string) (string, error) {
	return nodeDir(root, nsPath, uplink)
}

// OpenNodeMaps opens only the pinned maps of uplink's node collection: no program is loaded
// and no link touched, for readers such as counters (kdp_nd is not opened: Maps().ND is nil).
// Program returns nil programs.
func OpenNodeMaps(root, nsPath, uplink string) (*Node, error) {
	dir, err := nodeDir(root, nsPath, uplink)
	if err != nil {
		return nil, fmt.Errorf("open node maps %s: %w", uplink, err)
	}
	n := &Node{Uplink: uplink, NetNS: nsPath, dir: dir}
	m := &n.objs
	for _, x := range []struct {
		name string
		m    **ebpf.Map
	}{{"kdp_fdb", &m.KdpFdb}, {"kdp_arp", &m.KdpArp}, {"kdp_node_cfg", &m.KdpNodeCfg}, {"kdp_node_taps", &m.KdpNodeTaps}, {"kdp_node_ctrs", &m.KdpNodeCtrs}} {
		if *x.m, err = ebpf.LoadPinnedMap(filepath.Join(dir, x.name), nil); err != nil {
			n.Close()
			return nil, fmt.Errorf("open node maps %s: %w", uplink, err)
		}
	}
	return n, nil
}

// ProgDirectRNAT is direct mode's per-sandbox program on the tap's TCX egress: the load
// balancer's reverse NAT for replies the node programs deliver (bpf/node.c).
const ProgDirectRNAT Program = "kdp_direct_rnat"

// DirectRNATProgram loads kdp_direct_rnat against the sandbox's own config and load-balancer
// maps. The caller owns the program.
func (s *Sandbox) DirectRNATProgram() (*ebpf.Program, error) {
	spec, err := LoadNode()
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", ProgDirectRNAT, err)
	}
	o := &s.objs
	repl := map[string]*ebpf.Map{
		"kdp_config": o.KdpConfig, "kdp_lb_svc": o.KdpLbSvc, "kdp_lb_hash": o.KdpLbHash, "kdp_lb_be": o.KdpLbBe, "kdp_lb_stats": o.KdpLbStats,
		"kdp_lb_conns": o.KdpLbConns, CTPin: o.KdpLbCt2, "kdp_lb_aff": o.KdpLbAff,
		"kdp_lb_svc6": o.KdpLbSvc6, "kdp_lb_be6": o.KdpLbBe6, "kdp_lb_ct6": o.KdpLbCt6, "kdp_lb_aff6": o.KdpLbAff6,
		"kdp_lb_vips": o.KdpLbVips, // the reverse NAT reads the real servers' prefilter bits
	}
	for name, m := range repl {
		ms, ok := spec.Maps[name]
		if !ok {
			delete(repl, name)
			continue
		}
		// A pinned map keeps the size it was created with (Options.CTSize).
		ms.MaxEntries = m.MaxEntries()
	}
	var p struct {
		Prog *ebpf.Program `ebpf:"kdp_direct_rnat"`
	}
	if err := spec.LoadAndAssign(&p, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return nil, fmt.Errorf("load %s: %w", ProgDirectRNAT, err)
	}
	return p.Prog, nil
}

// rnatPin is outside links/: Open refreshes the links there with the datapath's programs,
// which this one is not. Remove deletes the sandbox directory, and with it this pin and so
// the link.
func (s *Sandbox) rnatPin(tap string) string {
	return filepath.Join(s.dir, "direct", pinDev(tap)+"@"+string(ProgDirectRNAT))
}

// AttachDirectRNAT puts kdp_direct_rnat on the TCX egress of the sandbox's tap (in the netns
// at nsPath), or moves an existing link of it onto a fresh load in place.
func (s *Sandbox) AttachDirectRNAT(nsPath, tap string) error {
	feat, err := Probe()
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", ProgDirectRNAT, tap, err)
	}
	if !feat.TCX {
		return fmt.Errorf("attach %s to %s: %w", ProgDirectRNAT, tap, ErrNoTCX)
	}
	prog, err := s.DirectRNATProgram()
	if err != nil {
		return fmt.Errorf("attach to %s: %w", tap, err)
	}
	defer prog.Close()
	pin := s.rnatPin(tap)
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("attach %s to %s: %w", ProgDirectRNAT, tap, err)
	}
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(tap)
		if err != nil {
			return fmt.Errorf("find device: %w", err)
		}
		ifindex := l.Attrs().Index
		if old, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, ierr := old.Info()
			if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
				err := old.Update(prog)
				old.Close()
				return err
			}
			old.Unpin()
			old.Close()
		}
		nl, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress, Anchor: link.Tail()})
		if err != nil {
			return fmt.Errorf("attach tcx egress: %w", err)
		}
		defer nl.Close()
		if err := nl.Pin(pin); err != nil {
			nl.Detach()
			return fmt.Errorf("pin link: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", ProgDirectRNAT, tap, err)
	}
	return nil
}

// DetachDirectRNAT removes kdp_direct_rnat from the tap, if it is there.
func (s *Sandbox) DetachDirectRNAT(tap string) error {
	if err := detachPinned(s.rnatPin(tap)); err != nil {
		return fmt.Errorf("detach %s from %s: %w", ProgDirectRNAT, tap, err)
	}
	return nil
}
