package loader

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/netdev"
)

const linksDir = "links"

// progPrefix marks kata-dp's programs; the loader never removes a program without it.
const progPrefix = "kdp_"

// Attachment describes where a program was attached.
type Attachment struct {
	Ifindex int
	Legacy  bool // clsact + bpf filter instead of a TCX link
}

// Attach attaches program p at the tc ingress of device ifname in the network namespace at
// nsPath ("" = the caller's), with TCX, or with clsact + a bpf filter where the kernel has no
// TCX or the sandbox was opened with Options.LegacyTC. If kata-dp already attached a program there for this sandbox,
// the pinned link is updated in place, without a moment with no program.
func (s *Sandbox) Attach(nsPath, ifname string, p Program) (Attachment, error) {
	return s.attach(nsPath, ifname, p, false)
}

// AttachEgress is Attach at the device's tc egress: macvtap-bpf mode checks the guest's frames
// there, on the macvtap, whose transmit path (dev_queue_xmit) every frame the guest writes
// takes. A device has kata-dp's program on one side only: attaching at one side where a link
// of ours is pinned for the other replaces that link.
func (s *Sandbox) AttachEgress(nsPath, ifname string, p Program) (Attachment, error) {
	return s.attach(nsPath, ifname, p, true)
}

func (s *Sandbox) attach(nsPath, ifname string, p Program, egress bool) (Attachment, error) {
	prog, err := s.Program(p)
	if err != nil {
		return Attachment{}, fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	var a Attachment
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find device: %w", err)
		}
		a.Ifindex = l.Attrs().Index
		feat, err := Probe()
		if err != nil {
			return err
		}
		if !feat.TCX || s.legacy {
			a.Legacy = true
			return attachLegacy(a.Ifindex, prog, string(p), egress)
		}
		return s.attachTCX(a.Ifindex, ifname, prog, p, egress)
	})
	if err != nil {
		return Attachment{}, fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	return a, nil
}

func (s *Sandbox) attachTCX(ifindex int, ifname string, prog *ebpf.Program, p Program, egress bool) error {
	pin := s.linkPin(ifname, p)
	typ := ebpf.AttachTCXIngress
	if egress {
		typ = ebpf.AttachTCXEgress
	}
	// An existing link of ours on this device (for any of our programs) is updated in place.
	old, err := s.pinnedLinks(ifname)
	if err != nil {
		return err
	}
	for _, path := range old {
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			os.Remove(path)
			continue
		}
		info, ierr := l.Info()
		if ierr != nil || info.TCX() == nil || int(info.TCX().Ifindex) != ifindex {
			// Defunct (the device went away) or stale: forget it and attach afresh.
			l.Unpin()
			l.Close()
			continue
		}
		if ebpf.AttachType(info.TCX().AttachType) != typ {
			// Ours, on the other side of the device: take it away, attach afresh.
			if err := detachPinned(path); err != nil {
				l.Close()
				return err
			}
			l.Close()
			continue
		}
		if err := l.Update(prog); err != nil {
			l.Close()
			return fmt.Errorf("update link: %w", err)
		}
		if path != pin {
			if err := l.Unpin(); err == nil {
				err = l.Pin(pin)
			}
			if err != nil {
				l.Close()
				return fmt.Errorf("re-pin link: %w", err)
			}
		}
		return l.Close()
	}
	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    typ,
		Anchor:    link.Tail(),
	})
	if err != nil {
		return fmt.Errorf("attach tcx: %w", err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link: %w", err)
	}
	return nil
}

// Detach removes whatever kata-dp attached for this sandbox at device ifname: its pinned TCX
// link, and legacy bpf filters named kdp_*. A device that no longer exists is not an error.
func (s *Sandbox) Detach(nsPath, ifname string) error {
	paths, err := s.pinnedLinks(ifname)
	if err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	for _, path := range paths {
		if err := detachPinned(path); err != nil {
			return fmt.Errorf("detach %s: %w", ifname, err)
		}
	}
	err = netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return nil // gone: nothing of ours can be left on it
		}
		return detachLegacy(l.Attrs().Index)
	})
	if err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	return nil
}

func (s *Sandbox) linkPin(ifname string, p Program) string {
	return filepath.Join(s.dir, linksDir, pinDev(ifname)+"@"+string(p))
}

func (s *Sandbox) pinnedLinks(ifname string) ([]string, error) {
	return pinnedIn(s.dir, linksDir, ifname)
}

// LinkedDevices lists the devices that have a tc or XDP link of the sandbox pinned, sorted,
// each once: what reconciliation compares with the endpoints it keeps.
func (s *Sandbox) LinkedDevices() ([]string, error) {
	seen := map[string]bool{}
	for _, sub := range []string{linksDir, xdpLinksDir} {
		paths, err := pinnedIn(s.dir, sub, "*")
		if err != nil {
			return nil, fmt.Errorf("list pinned links: %w", err)
		}
		for _, p := range paths {
			if dev, _, ok := strings.Cut(filepath.Base(p), "@"); ok {
				seen[devOfPin(dev)] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(seen)), nil
}

// pinnedIn lists the links of kata-dp's programs pinned for device ifname ("*": any) in the
// sub-directory sub (tc or XDP links) of a sandbox's directory.
func pinnedIn(dir, sub, ifname string) ([]string, error) {
	return filepath.Glob(filepath.Join(dir, sub, pinDev(ifname)+"@"+progPrefix+"*"))
}

// refreshLinks moves every pinned link of the sandbox in sub onto the programs of this load.
func (s *Sandbox) refreshLinks(sub string) error {
	paths, err := pinnedIn(s.dir, sub, "*")
	if err != nil {
		return err
	}
	for _, path := range paths {
		name := filepath.Base(path)
		prog, err := s.Program(Program(name[strings.LastIndexByte(name, '@')+1:]))
		if err != nil {
			return fmt.Errorf("refresh %s: %w", name, err)
		}
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			os.Remove(path)
			continue
		}
		if err := l.Update(prog); err != nil {
			if errors.Is(err, unix.ENOLINK) {
				l.Unpin() // the device is gone
				l.Close()
				continue
			}
			l.Close()
			return fmt.Errorf("refresh %s: %w", name, err)
		}
		l.Close()
	}
	return nil
}

func detachPinned(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return os.Remove(path)
	}
	defer l.Close()
	if err := l.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach link %s: %w", filepath.Base(path), err)
	}
	return l.Unpin()
}

// detachAll detaches every link of kata-dp's pinned in the sub-directory sub of dir.
func detachAll(dir, sub string) error {
	paths, err := pinnedIn(dir, sub, "*")
	if err != nil {
		return err
	}
	for _, path := range paths {
		if err := detachPinned(path); err != nil {
			return err
		}
	}
	return nil
}

// attachLegacy is the pre-TCX way: a clsact qdisc (kept if it exists) and a direct-action bpf
// filter at ingress (or egress), replaced atomically when one of ours is already there. As
// with TCX links (AttachEgress), a device has kata-dp's program on one side only: a filter of
// ours on the other side is deleted once the new one is in place (a device that changed role,
// such as a tap whose endpoint moved to macvtap-bpf, would otherwise run both).
func attachLegacy(ifindex int, prog *ebpf.Program, name string, egress bool) error {
	parent, other := uint32(netlink.HANDLE_MIN_INGRESS), uint32(netlink.HANDLE_MIN_EGRESS)
	if egress {
		parent, other = other, parent
	}
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact: %w", err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Handle:    1,
			Protocol:  unix.ETH_P_ALL,
			Priority:  1,
		},
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("add bpf filter: %w", err)
	}
	if err := deleteLegacy(ifindex, other); err != nil {
		return fmt.Errorf("the other side: %w", err)
	}
	return nil
}

// detachLegacy deletes the ingress and egress bpf filters whose program is one of kata-dp's.
func detachLegacy(ifindex int) error {
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		if err := deleteLegacy(ifindex, parent); err != nil {
			return err
		}
	}
	return nil
}

// deleteLegacy deletes the bpf filters of kata-dp's programs at one side (the clsact parent)
// of a device; other users' filters stay. A device or clsact that is not there holds none.
func deleteLegacy(ifindex int, parent uint32) error {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil
	}
	filters, err := netlink.FilterList(l, parent)
	if err != nil {
		return nil // no clsact: nothing legacy was ever attached
	}
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || !strings.HasPrefix(bf.Name, progPrefix) {
			continue
		}
		if err := netlink.FilterDel(bf); err != nil {
			return fmt.Errorf("delete bpf filter %s: %w", bf.Name, err)
		}
	}
	return nil
}

// pinDev is a device's name as it appears in pin names: bpffs refuses names with a dot (they
// are kept for its own files), and a device name may have one ("eth0.100"). A dot becomes a
// colon, which no device name can hold, so the mapping is one to one (devOfPin reverses it);
// names without a dot, all pins made before it, are unchanged.
func pinDev(ifname string) string { return strings.ReplaceAll(ifname, ".", ":") }

// devOfPin reverses pinDev.
func devOfPin(s string) string { return strings.ReplaceAll(s, ":", ".") }
