package refprog

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
)

// Prog names one reference program.
type Prog int

// The reference programs.
const (
	Redirect    Prog = iota // tc: bpf_redirect to the peer set with SetPeer
	Drop                    // tc: drop everything
	XDPRedirect             // XDP: redirect through the devmap to the peer
	XDPDrop                 // XDP: count and drop
	XDPPass                 // XDP: pass
	Pass                    // tc: pass everything on (TCX_NEXT)
)

// Objects are the loaded reference programs and maps. Links made by the
// Attach methods are the caller's to close.
type Objects struct{ o refObjects }

// Load loads the reference collection.
func Load() (*Objects, error) {
	var o Objects
	if err := loadRefObjects(&o.o, nil); err != nil {
		return nil, fmt.Errorf("load reference programs: %w", err)
	}
	return &o, nil
}

// Close releases the programs and maps (attached links keep theirs).
func (o *Objects) Close() error { return o.o.Close() }

func (o *Objects) prog(p Prog) (*ebpf.Program, error) {
	switch p {
	case Redirect:
		return o.o.RefRedirect, nil
	case Drop:
		return o.o.RefDrop, nil
	case XDPRedirect:
		return o.o.RefXdpRedir, nil
	case XDPDrop:
		return o.o.RefXdpDrop, nil
	case XDPPass:
		return o.o.RefXdpPass, nil
	case Pass:
		return o.o.RefPass, nil
	}
	return nil, fmt.Errorf("reference program %d: unknown", p)
}

// SetPeer makes the redirect programs send what arrives on ifindex from to
// ifindex to, both in the netns at nsPath (the kernel resolves a devmap's
// ifindex in the netns of the thread that writes it).
func (o *Objects) SetPeer(nsPath string, from, to uint32) error {
	if err := o.o.RefPeers.Put(from, to); err != nil {
		return fmt.Errorf("set peer %d -> %d: %w", from, to, err)
	}
	err := netdev.InNetNS(nsPath, func() error { return o.o.RefDevmap.Put(from, to) })
	if err != nil {
		return fmt.Errorf("set devmap peer %d -> %d: %w", from, to, err)
	}
	return nil
}

// XDPDropped sums the XDPDrop program's counter over the CPUs.
func (o *Objects) XDPDropped() (uint64, error) {
	var per []uint64
	if err := o.o.RefCount.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read xdp drop counter: %w", err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

// Attach attaches p to device dev in the netns at nsPath: tc programs at
// TCX ingress, XDP programs in driver mode.
func (o *Objects) Attach(nsPath, dev string, p Prog) (link.Link, error) {
	return o.attach(nsPath, dev, p, ebpf.AttachTCXIngress)
}

// AttachEgress attaches the tc program p at TCX egress of device dev in the
// netns at nsPath.
func (o *Objects) AttachEgress(nsPath, dev string, p Prog) (link.Link, error) {
	return o.attach(nsPath, dev, p, ebpf.AttachTCXEgress)
}

func (o *Objects) attach(nsPath, dev string, p Prog, at ebpf.AttachType) (link.Link, error) {
	prog, err := o.prog(p)
	if err != nil {
		return nil, err
	}
	var l link.Link
	err = netdev.InNetNS(nsPath, func() error {
		nl, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		idx := nl.Attrs().Index
		if prog.Type() == ebpf.XDP {
			l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: idx, Flags: link.XDPDriverMode})
		} else {
			l, err = link.AttachTCX(link.TCXOptions{Program: prog, Interface: idx, Attach: at, Anchor: link.Tail()})
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("attach reference program %d to %s: %w", p, dev, err)
	}
	return l, nil
}
