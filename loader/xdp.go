package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/netdev"
)

// xdpLinksDir holds the pinned XDP links, apart from the tc ones: a device in xdp mode has
// both, and the tc attach code treats every link in links/ as a TCX link of that device.
const xdpLinksDir = "xdp"

// XDPAttachment describes where an XDP program was attached.
type XDPAttachment struct {
	Ifindex int
	// Mode is "driver" (native) or "generic" (skb mode, used when the driver refused).
	Mode string
	// Netlink is set when the kernel has no XDP links and the program was set through
	// netlink (not pinned: re-attached by the next Attach).
	Netlink bool
}

// AttachXDP attaches XDP program p (ProgXDPTap or ProgXDPUplink) to device ifname in the
// netns at nsPath, in driver mode, falling back to generic mode (logged) where the driver
// refuses or the sandbox was opened with Options.GenericXDP. A link this sandbox pinned there before is updated in place.
func (s *Sandbox) AttachXDP(nsPath, ifname string, p Program) (XDPAttachment, error) {
	prog, err := s.Program(p)
	if err != nil {
		return XDPAttachment{}, fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	if prog.Type() != ebpf.XDP {
		return XDPAttachment{}, fmt.Errorf("attach %s to %s: not an xdp program: %w", p, ifname, ErrUnknownProgram)
	}
	var a XDPAttachment
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find device: %w", err)
		}
		a.Ifindex = l.Attrs().Index
		if done, mode, err := s.updateXDP(ifname, a.Ifindex, prog, p); err != nil || done {
			a.Mode = mode
			return err
		}
		a.Mode, a.Netlink, err = s.attachXDP(l, ifname, prog, p)
		return err
	})
	if err != nil {
		return XDPAttachment{}, fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	return a, nil
}

// updateXDP moves an XDP link this sandbox pinned for ifname onto prog. done reports whether
// there was one on this very device.
func (s *Sandbox) updateXDP(ifname string, ifindex int, prog *ebpf.Program, p Program) (done bool, mode string, err error) {
	paths, err := s.pinnedXDPLinks(ifname)
	if err != nil {
		return false, "", err
	}
	for _, path := range paths {
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			os.Remove(path)
			continue
		}
		info, ierr := l.Info()
		if ierr != nil || info.XDP() == nil || int(info.XDP().Ifindex) != ifindex {
			l.Unpin() // the device went away (or was recreated): attach afresh
			l.Close()
			continue
		}
		if err := l.Update(prog); err != nil {
			l.Close()
			return false, "", fmt.Errorf("update xdp link: %w", err)
		}
		l.Close()
		if pin := filepath.Join(s.dir, xdpLinksDir, pinDev(ifname)+"@"+string(p)); pin != path {
			if err := os.Rename(path, pin); err != nil {
				return false, "", fmt.Errorf("re-pin xdp link: %w", err)
			}
		}
		return true, xdpMode(ifindex), nil
	}
	return false, "", nil
}

func (s *Sandbox) attachXDP(l netlink.Link, ifname string, prog *ebpf.Program, p Program) (mode string, viaNetlink bool, err error) {
	ifindex := l.Attrs().Index
	if err := os.MkdirAll(filepath.Join(s.dir, xdpLinksDir), 0o700); err != nil {
		return "", false, err
	}
	try := func(flags link.XDPAttachFlags) (link.Link, error) {
		return link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: flags})
	}
	mode = "driver"
	var lk link.Link
	var derr error
	if !s.genericXDP {
		lk, derr = try(link.XDPDriverMode)
	}
	if lk == nil {
		mode = "generic"
		var gerr error
		lk, gerr = try(link.XDPGenericMode)
		if gerr != nil {
			if errors.Is(gerr, link.ErrNotSupported) || errors.Is(derr, link.ErrNotSupported) {
				return s.attachXDPNetlink(l, prog)
			}
			return "", false, fmt.Errorf("attach xdp: driver mode: %v; generic mode: %w", derr, gerr)
		}
		if derr != nil {
			slog.Warn("xdp driver mode refused: using generic mode", "dev", ifname, "prog", p, "err", derr)
		}
	}
	defer lk.Close()
	if err := lk.Pin(filepath.Join(s.dir, xdpLinksDir, pinDev(ifname)+"@"+string(p))); err != nil {
		return "", false, fmt.Errorf("pin xdp link: %w", err)
	}
	return mode, false, nil
}

// attachXDPNetlink is the fallback for kernels without XDP links (before 5.9): the program
// is set on the device through netlink, driver mode first.
func (s *Sandbox) attachXDPNetlink(l netlink.Link, prog *ebpf.Program) (string, bool, error) {
	if cur := l.Attrs().Xdp; cur != nil && cur.Attached && !ourProgram(cur.ProgId) {
		return "", true, fmt.Errorf("attach xdp: device has another program (id %d)", cur.ProgId)
	}
	err := netlink.LinkSetXdpFdWithFlags(l, prog.FD(), unix.XDP_FLAGS_DRV_MODE)
	if err == nil {
		return "driver", true, nil
	}
	if gerr := netlink.LinkSetXdpFdWithFlags(l, prog.FD(), unix.XDP_FLAGS_SKB_MODE); gerr != nil {
		return "", true, fmt.Errorf("attach xdp via netlink: driver mode: %v; generic mode: %w", err, gerr)
	}
	slog.Warn("xdp driver mode refused: using generic mode", "dev", l.Attrs().Name, "err", err)
	return "generic", true, nil
}

func ourProgram(id uint32) bool {
	p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
	if err != nil {
		return false
	}
	defer p.Close()
	info, err := p.Info()
	return err == nil && strings.HasPrefix(info.Name, progPrefix)
}

// xdpMode reads the attach mode of the XDP program on ifindex (in the caller's netns).
func xdpMode(ifindex int) string {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil || l.Attrs().Xdp == nil {
		return ""
	}
	switch l.Attrs().Xdp.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		return "driver"
	case nl.XDP_ATTACHED_SKB:
		return "generic"
	}
	return ""
}

// DetachXDP removes the XDP program kata-dp attached for this sandbox at ifname (a pinned link,
// or one of its programs set through netlink). A device that is gone is not an error.
func (s *Sandbox) DetachXDP(nsPath, ifname string) error {
	paths, err := s.pinnedXDPLinks(ifname)
	if err != nil {
		return fmt.Errorf("detach xdp from %s: %w", ifname, err)
	}
	for _, path := range paths {
		if err := detachPinned(path); err != nil {
			return fmt.Errorf("detach xdp from %s: %w", ifname, err)
		}
	}
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return nil
		}
		if x := l.Attrs().Xdp; x != nil && x.Attached && ourProgram(x.ProgId) && len(paths) == 0 {
			return netlink.LinkSetXdpFd(l, -1)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("detach xdp from %s: %w", ifname, err)
	}
	return nil
}

// XDPProgram returns the name of the XDP program on ifname ("" = none) and its attach mode.
func XDPProgram(nsPath, ifname string) (name, mode string, err error) {
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		x := l.Attrs().Xdp
		if x == nil || !x.Attached || x.ProgId == 0 {
			return nil
		}
		p, err := ebpf.NewProgramFromID(ebpf.ProgramID(x.ProgId))
		if err != nil {
			return err
		}
		defer p.Close()
		info, err := p.Info()
		if err != nil {
			return err
		}
		name, mode = info.Name, xdpMode(l.Attrs().Index)
		return nil
	})
	if err != nil {
		return "", "", fmt.Errorf("xdp program of %s: %w", ifname, err)
	}
	return name, mode, nil
}

// netdev generic netlink family (include/uapi/linux/netdev.h).
const (
	netdevCmdDevGet       = 1
	netdevADevIfindex     = 1
	netdevADevXDPFeatures = 3
	netdevXDPActNDOXmit   = 1 << 2
)

// XDPRedirectTarget reports whether ifname (in the netns at nsPath) accepts frames redirected
// by XDP (NETDEV_XDP_ACT_NDO_XMIT). A tap always does; a veth only while its peer runs XDP or
// has GRO on, and otherwise the kernel drops what XDP redirects into it. The check reads the
// device's xdp_features, so it never touches the peer, which kata-dp does not own. Kernels
// before 6.3 have no xdp_features (no netdev generic netlink family): there it reports false,
// and xdp mode keeps the guest's frames on tc, since a redirect into a veth whose peer cannot
// take it drops them silently.
func XDPRedirectTarget(nsPath, ifname string) (bool, error) {
	var ok bool
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find device: %w", err)
		}
		fam, err := netlink.GenlFamilyGet("netdev")
		if errors.Is(err, unix.ENOENT) {
			return nil // before 6.3: the kernel cannot say
		}
		if err != nil {
			return fmt.Errorf("netdev genetlink family: %w", err)
		}
		req := nl.NewNetlinkRequest(int(fam.ID), 0)
		req.AddData(genlHdr{cmd: netdevCmdDevGet, version: 1})
		req.AddData(nl.NewRtAttr(netdevADevIfindex, nl.Uint32Attr(uint32(l.Attrs().Index))))
		msgs, err := req.Execute(unix.NETLINK_GENERIC, 0)
		if err != nil {
			return fmt.Errorf("netdev dev-get: %w", err)
		}
		for _, m := range msgs {
			if len(m) < nl.SizeofGenlmsg {
				continue
			}
			attrs, err := nl.ParseRouteAttr(m[nl.SizeofGenlmsg:])
			if err != nil {
				return fmt.Errorf("netdev dev-get: %w", err)
			}
			for _, a := range attrs {
				if a.Attr.Type == netdevADevXDPFeatures && len(a.Value) >= 8 {
					ok = binary.NativeEndian.Uint64(a.Value)&netdevXDPActNDOXmit != 0
				}
			}
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("xdp redirect target %s: %w", ifname, err)
	}
	return ok, nil
}

// haveXDPFeatures says whether the kernel has the netdev generic netlink family, which reports
// xdp_features (Linux 6.3+).
func haveXDPFeatures() bool {
	_, err := netlink.GenlFamilyGet("netdev")
	return err == nil
}

// genlHdr is struct genlmsghdr with its reserved field zeroed (nl.Genlmsg serializes stray
// bytes there, which strictly validated families refuse).
type genlHdr struct{ cmd, version uint8 }

func (h genlHdr) Len() int          { return 4 }
func (h genlHdr) Serialize() []byte { return []byte{h.cmd, h.version, 0, 0} }

func (s *Sandbox) pinnedXDPLinks(ifname string) ([]string, error) {
	return pinnedIn(s.dir, xdpLinksDir, ifname)
}
