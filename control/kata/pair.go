package kata

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/kata-dp/kata-dp/control/mirred"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNotAPair is returned (wrapped) for a pair kata-dp cannot identify as Kata's tcfilter
// plumbing: a device missing, not a veth and a tap, or not joined by u32 + mirred both ways.
var ErrNotAPair = errors.New("not a Kata tcfilter pair")

// Identity is what a pair's NIC is, as Kata gave it to the guest: in the tcfilter model the
// guest gets the veth's MAC, addresses and MTU, and the routes of the netns through it
// (kata-containers src/runtime/virtcontainers/network_linux.go, setupTCFiltering: the tap
// takes the veth's MTU and the guest the veth's MAC; the agent is sent the netns's addresses
// and routes).
type Identity struct {
	Iface  netspec.AddRequest // name: the veth's name; device: the tap; uplink: the veth
	Routes []netspec.Route    // the netns routes through the veth, other than its subnets'
}

// Check reports whether p is Kata's tcfilter plumbing in the netns at nsPath: p.Veth a veth,
// p.Tap a tap, joined both ways by u32 + mirred filters (what mirred.Joined recognises, the
// recipe Kata's addRedirectTCFilter uses). joined is false with a nil error when both devices
// are there but not joined (kata-dp already took the pair over, or another tool changed it).
func Check(nsPath string, p Pair) (joined bool, err error) {
	v, err := netdev.LookupLink(nsPath, p.Veth)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAPair, err)
	}
	if v.Type != "veth" && v.Type != "macvlan" && v.Type != "ipvlan" {
		return false, fmt.Errorf("%w: %s is a %s, not a veth", ErrNotAPair, p.Veth, v.Type)
	}
	t, err := netdev.LookupTap(nsPath, p.Tap)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAPair, err)
	}
	if t.Tun {
		return false, fmt.Errorf("%w: %s is a tun, not a tap", ErrNotAPair, p.Tap)
	}
	joined, err = mirred.Joined(nsPath, p.Veth, p.Tap)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAPair, err)
	}
	return joined, nil
}

// ReadIdentity reads the NIC identity of the pair from its veth in the netns at nsPath.
func ReadIdentity(nsPath string, p Pair) (Identity, error) {
	var id Identity
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(p.Veth)
		if err != nil {
			return fmt.Errorf("find %s: %w", p.Veth, err)
		}
		a := l.Attrs()
		mac := a.HardwareAddr
		if len(mac) != 6 {
			return fmt.Errorf("%s has no Ethernet address", p.Veth)
		}
		req := netspec.AddRequest{Uplink: p.Veth}
		req.Name = p.Veth
		req.Device = p.Tap
		req.HwAddr = mac.String()
		req.MTU = a.MTU
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", p.Veth, err)
		}
		var subnets []netip.Prefix
		for _, ad := range addrs {
			pfx, ok := prefixOf(ad.IPNet)
			if !ok || pfx.Addr().IsLinkLocalUnicast() {
				continue // the guest makes its own link-local addresses
			}
			fam := netlink.FAMILY_V4
			if pfx.Addr().Is6() {
				fam = netlink.FAMILY_V6
			}
			req.IPAddresses = append(req.IPAddresses, &netspec.IPAddress{Family: fam, Address: pfx.Addr().String(), Mask: strconv.Itoa(pfx.Bits())})
			subnets = append(subnets, pfx.Masked())
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("routes of %s: %w", p.Veth, err)
		}
		for _, r := range routes {
			if r.Protocol == unix.RTPROT_KERNEL || r.Table != unix.RT_TABLE_MAIN && r.Table != 0 {
				continue // the subnet routes come with the addresses
			}
			rt := netspec.Route{Device: p.Veth}
			if r.Dst == nil {
				rt.Dest = netspec.DefaultRouteDest
			} else {
				pfx, ok := prefixOf(r.Dst)
				if !ok || pfx.Addr().IsLinkLocalUnicast() || pfx.Addr().IsMulticast() {
					continue
				}
				if pfx.Bits() == 0 {
					rt.Dest = netspec.DefaultRouteDest
				} else {
					rt.Dest = pfx.String()
				}
			}
			if r.Gw != nil {
				gw, ok := netip.AddrFromSlice(r.Gw)
				if !ok {
					continue
				}
				rt.Gateway = gw.Unmap().String()
			} else if rt.Dest == netspec.DefaultRouteDest {
				continue // a default route without gateway cannot be expressed
			}
			id.Routes = append(id.Routes, rt)
		}
		id.Iface = req
		return nil
	})
	if err != nil {
		return Identity{}, fmt.Errorf("identity of %s/%s: %w", p.Veth, p.Tap, err)
	}
	if ti, err := netdev.LookupTap(nsPath, p.Tap); err == nil {
		id.Iface.Queues = max(ti.Queues, 1)
	}
	return id, nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	a = a.Unmap()
	if a.Is4() && ones > 32 {
		ones -= 96
	}
	return netip.PrefixFrom(a, ones), true
}
