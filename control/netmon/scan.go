package netmon

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// link is one link of a sandbox's netns as netmon sees it.
type link struct {
	Index  int
	Name   string
	Kind   string // netlink's link type: "veth", "macvlan", "tuntap", ...
	MAC    net.HardwareAddr
	MTU    int
	Up     bool // administratively up
	Lo     bool // loopback
	Addrs  []netip.Prefix
	Routes []route
}

// route is one main-table unicast route through a link, as add-route takes it.
type route struct {
	Dest    netip.Prefix // 0.0.0.0/0 (or ::/0) for a default route
	Gateway netip.Addr
}

// scan lists the links of the netns with their addresses and the main table's routes through
// them. Routes the kernel adds by itself (a subnet route beside an address, IPv6 link-local and
// multicast) are left out: the NIC's address implies them.
func scan(path string) ([]link, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", path, err)
	}
	defer h.Close()
	lls, err := retryDump(func() ([]netlink.Link, error) { return h.LinkList() })
	if err != nil {
		return nil, fmt.Errorf("list links in %s: %w", path, err)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list addresses in %s: %w", path, err)
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes in %s: %w", path, err)
	}
	byIndex := map[int]*link{}
	out := make([]link, 0, len(lls))
	for _, l := range lls {
		a := l.Attrs()
		out = append(out, link{Index: a.Index, Name: a.Name, Kind: l.Type(), MAC: a.HardwareAddr, MTU: a.MTU,
			Up: a.Flags&net.FlagUp != 0, Lo: a.Flags&net.FlagLoopback != 0})
	}
	for i := range out {
		byIndex[out[i].Index] = &out[i]
	}
	for _, a := range addrs {
		l := byIndex[a.LinkIndex]
		if l == nil || a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || ip.IsLoopback() {
			continue
		}
		bits, _ := a.Mask.Size()
		l.Addrs = append(l.Addrs, netip.PrefixFrom(ip, bits))
	}
	for _, r := range routes {
		l := byIndex[r.LinkIndex]
		if l == nil || r.Type != unix.RTN_UNICAST || r.Protocol == unix.RTPROT_KERNEL || len(r.MultiPath) > 0 {
			continue
		}
		rt, ok := toRoute(r)
		if !ok {
			continue
		}
		l.Routes = append(l.Routes, rt)
	}
	return out, nil
}

func toRoute(r netlink.Route) (route, bool) {
	var rt route
	if r.Dst != nil {
		ip, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			return route{}, false
		}
		bits, _ := r.Dst.Mask.Size()
		rt.Dest = netip.PrefixFrom(ip.Unmap(), bits)
	} else if r.Family == unix.AF_INET6 {
		rt.Dest = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	} else {
		rt.Dest = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	if r.Gw != nil {
		gw, ok := netip.AddrFromSlice(r.Gw)
		if !ok {
			return route{}, false
		}
		rt.Gateway = gw.Unmap()
	}
	if rt.Dest.Addr().IsLinkLocalUnicast() || rt.Dest.Addr().IsMulticast() {
		return route{}, false
	}
	return rt, true
}

// retryDump repeats a netlink dump the kernel interrupted (the table changed under it: the
// very bursts netmon watches), a few times, like the CNI plugins' netlinksafe.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range 10 {
		var out []T
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return slices.Clip(out), err
		}
	}
	return nil, err
}
