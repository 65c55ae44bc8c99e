package netmon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"slices"
	"strconv"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// want is what netmon wants of one link: the NIC add-iface would be given for it, and its
// routes as add-route takes them.
type want struct {
	req    netspec.AddRequest
	routes []netspec.Route
}

// TapName is the tap netmon gives the link of ifindex idx in sandbox id, after Kata's
// "tapN_kata": within IFNAMSIZ, unique on the host (control reserves tap names host-wide, and
// every netns has its own ifindex 2), and recognisable as netmon's when an agent killed in the
// middle of a join left it behind. No '.' in it: the dataplane pins per device name and bpffs
// refuses names with a dot.
func TapName(id string, idx int) string {
	return fmt.Sprintf("nm%06x_%d", crc32.ChecksumIEEE([]byte(id))&0xffffff, idx)
}

// isNetmonTap reports whether name is a tap netmon names.
func isNetmonTap(name string) bool {
	var h uint32
	var idx int
	n, err := fmt.Sscanf(name, "nm%06x_%d", &h, &idx)
	return err == nil && n == 2 && len(name) > 9 && name[8] == '_' && fmt.Sprintf("nm%06x_%d", h, idx) == name
}

// skipKinds are link kinds netmon never takes: taps (kata-dp's and the VM's own), and the
// devices kata-dp makes itself (macvtap mode).
var skipKinds = []string{"tuntap", "tun", "macvtap", "ipvtap"}

// eligible says why netmon does not take l ("" when it does). taken are the names of links
// kata-dp already uses in the sandbox: the sandbox's uplink, and the taps and uplinks of the
// NICs netmon did not add.
func eligible(l link, taken map[string]string) string {
	switch {
	case l.Lo:
		return "loopback"
	case slices.Contains(skipKinds, l.Kind):
		return "a " + l.Kind + " link (taps and kata-dp's own devices are never joined)"
	case isNetmonTap(l.Name):
		return "a netmon tap"
	case len(l.MAC) != 6:
		return "no MAC address"
	case !l.Up:
		return "down"
	}
	if why, ok := taken[l.Name]; ok {
		return why
	}
	return ""
}

// desire builds the add-iface request and routes for l, exactly as a runtime would hand them
// to kata-network: the link's name is the NIC's name in the guest, its MAC and MTU, its first
// addresses, its routes.
func desire(id string, l link, acceptsPair func(netspec.Interface) bool) want {
	in := netspec.Interface{Name: l.Name, Device: TapName(id, l.Index), HwAddr: l.MAC.String(), MTU: l.MTU,
		IPAddresses: addresses(l, acceptsPair)}
	w := want{req: netspec.AddRequest{Interface: in, Uplink: l.Name}}
	for _, r := range l.Routes {
		nr := netspec.Route{Dest: r.Dest.String(), Device: l.Name}
		if r.Dest.Bits() == 0 {
			nr.Dest = netspec.DefaultRouteDest
		}
		if r.Gateway.IsValid() {
			nr.Gateway = r.Gateway.String()
		}
		w.routes = append(w.routes, nr)
	}
	return w
}

// addresses returns the link's first IPv4 and first IPv6 address as add-iface takes them: both
// when add-iface accepts the pair (acceptsPair asks its validation), else the first IPv4 one, else
// the IPv6 one.
func addresses(l link, acceptsPair func(netspec.Interface) bool) []*netspec.IPAddress {
	var v4, v6 *netspec.IPAddress
	for _, p := range l.Addrs {
		a := &netspec.IPAddress{Address: p.Addr().String(), Mask: strconv.Itoa(p.Bits())}
		switch {
		case p.Addr().Is4() && v4 == nil:
			v4 = a
		case p.Addr().Is6() && v6 == nil:
			v6 = a
		}
	}
	switch {
	case v4 != nil && v6 != nil:
		pair := []*netspec.IPAddress{v4, v6}
		if acceptsPair(netspec.Interface{Name: l.Name, IPAddresses: pair}) {
			return pair
		}
		return []*netspec.IPAddress{v4}
	case v4 != nil:
		return []*netspec.IPAddress{v4}
	case v6 != nil:
		return []*netspec.IPAddress{v6}
	}
	return nil
}

// acceptsPair asks update-iface's validation whether a NIC may carry both an IPv4 and an IPv6
// address; add-iface validates addresses the same way.
func acceptsPair(in netspec.Interface) bool {
	_, err := netspec.ValidateUpdate(in)
	return err == nil
}

func sameAddrs(a, b []*netspec.IPAddress) bool {
	return slices.EqualFunc(a, b, func(x, y *netspec.IPAddress) bool {
		if x == nil || y == nil {
			return x == y
		}
		px, _, ex := netspec.ParseIPAddress(x)
		py, _, ey := netspec.ParseIPAddress(y)
		return ex == nil && ey == nil && px == py
	})
}

func sameMAC(a, b string) bool {
	ma, ea := net.ParseMAC(a)
	mb, eb := net.ParseMAC(b)
	return ea == nil && eb == nil && bytes.Equal(ma, mb)
}

// routeKey identifies a route for comparison: its destination, gateway and device.
func routeKey(r netspec.Route) string {
	pr, err := netspec.ValidateRoute(r)
	if err != nil {
		return "invalid " + r.Dest + " " + r.Gateway + " " + r.Device
	}
	gw := ""
	if pr.Gateway.IsValid() {
		gw = pr.Gateway.String()
	}
	return pr.Dest.String() + " via " + gw + " dev " + r.Device
}

// skipErr reports whether err means the request itself is refused (bad or clashing input:
// log it and skip the link) rather than that the work failed (retry).
func skipErr(err error) bool {
	return errors.Is(err, control.ErrInvalid) || errors.Is(err, control.ErrExists) || errors.Is(err, control.ErrNoSlot) ||
		errors.Is(err, control.ErrNotTap)
}

// gone reports whether err means the sandbox is no longer there (deleted meanwhile).
func gone(err error) bool { return errors.Is(err, control.ErrNoSuchSandbox) }

// reconcile makes the sandbox's netmon NICs and their routes what the netns holds, through the
// controller's typed operations (the same validation and steps as kata-network), in order:
// first what went away (freeing names, slots and routes), then what changed, then what is new.
// A link the controller refuses is logged once with the reason and skipped; other failures are
// returned so that the watcher tries again.
func (w *watcher) reconcile(ctx context.Context) error {
	sb := w.sb
	nics, routes, err := w.m.ctrl.NICs(sb.ID)
	if err != nil {
		return err
	}
	links, err := scan(sb.NetNS)
	if err != nil {
		return err
	}
	taken := map[string]string{sb.Uplink: "the sandbox's uplink (its NIC comes from the runtime)"}
	mine := map[string]control.NIC{}
	others := map[string]bool{}
	for _, n := range nics {
		if n.Source == control.SourceNetmon {
			mine[n.Spec.Name] = n
			continue
		}
		others[n.Spec.Name] = true
		taken[n.Spec.Device] = "the tap of NIC " + n.Spec.Name
		if n.Uplink != "" {
			taken[n.Uplink] = "joined to NIC " + n.Spec.Name + " (" + n.Source + ")"
		}
	}
	wants := map[string]want{}
	var order []string // links by ifindex: NICs join in the order their links appeared
	for _, l := range links {
		why := eligible(l, taken)
		if _, ok := mine[l.Name]; ok && !l.Up && why == "down" {
			// Up is what a link needs to join, not to stay: a plugin that takes a joined
			// link down for a moment (to change its MAC, say) must not unplug it.
			why = ""
		}
		if why == "" && others[l.Name] {
			why = "a NIC of that name was added by another source"
		}
		if why != "" {
			w.skip(l.Name, why)
			continue
		}
		wants[l.Name] = desire(sb.ID, l, acceptsPair)
		order = append(order, l.Name)
	}
	ctx = control.WithExactID(ctx)
	var errs []error
	// 1. NICs whose link went away or changed what add-iface fixed (MAC, MTU, the tap, the
	// link): del-iface (their routes go with them); a changed one is added again below.
	for _, name := range sortedKeys(mine) {
		n := mine[name]
		wt, ok := wants[name]
		if ok && sameMAC(n.Spec.HwAddr, wt.req.HwAddr) && n.Spec.MTU == wt.req.MTU && n.Spec.Device == wt.req.Device && n.Uplink == wt.req.Uplink {
			continue
		}
		if err := w.m.ctrl.DelIface(ctx, sb.ID, netspec.Interface{Name: name}); err != nil {
			if gone(err) {
				return nil
			}
			errs = append(errs, fmt.Errorf("del-iface %s: %w", name, err))
			continue
		}
		w.m.log.Info("netmon: NIC left with its link", "sandbox", sb.ID, "nic", name, "stillThere", ok)
		delete(mine, name)
		routes = slices.DeleteFunc(routes, func(r netspec.Route) bool { return r.Device == name })
	}
	// 2. Addresses changed on a joined link: update-iface.
	for _, name := range sortedKeys(mine) {
		n, wt := mine[name], wants[name]
		if sameAddrs(n.Spec.IPAddresses, wt.req.IPAddresses) {
			continue
		}
		if _, err := w.m.ctrl.UpdateIface(ctx, sb.ID, netspec.Interface{Name: name, IPAddresses: wt.req.IPAddresses}); err != nil {
			if gone(err) {
				return nil
			}
			if skipErr(err) {
				w.skip(name, "update-iface refused: "+err.Error())
				continue
			}
			errs = append(errs, fmt.Errorf("update-iface %s: %w", name, err))
			continue
		}
		w.m.log.Info("netmon: NIC address changed", "sandbox", sb.ID, "nic", name, "addresses", addrStrings(wt.req.IPAddresses))
	}
	// 3. New links: add-iface.
	for _, name := range order {
		if _, ok := mine[name]; ok {
			continue
		}
		wt := wants[name]
		if err := w.leftoverTap(wt.req.Device); err != nil {
			errs = append(errs, err)
			continue
		}
		got, err := w.m.ctrl.AddIface(control.WithSource(ctx, control.SourceNetmon), sb.ID, wt.req)
		if err != nil {
			if gone(err) {
				return nil
			}
			if skipErr(err) {
				w.skip(name, "add-iface refused: "+err.Error())
				continue
			}
			errs = append(errs, fmt.Errorf("add-iface %s: %w", name, err))
			continue
		}
		w.joined(name)
		mine[name] = control.NIC{Spec: got, Uplink: wt.req.Uplink, Source: control.SourceNetmon}
		w.m.log.Info("netmon: link joined the VM", "sandbox", sb.ID, "nic", name, "mac", got.HwAddr, "mtu", got.MTU,
			"tap", got.Device, "pci", got.PCIAddr, "addresses", addrStrings(got.IPAddresses))
	}
	// 4. Routes through the netmon NICs follow the netns's.
	have := map[string]netspec.Route{}
	for _, r := range routes {
		if _, ok := mine[r.Device]; ok {
			have[routeKey(r)] = r
		}
	}
	wantR := map[string]netspec.Route{}
	for name := range mine {
		for _, r := range wants[name].routes {
			wantR[routeKey(r)] = r
		}
	}
	for _, k := range sortedKeys(have) {
		if _, ok := wantR[k]; ok {
			continue
		}
		r := have[k]
		if _, err := w.m.ctrl.DelRoute(ctx, sb.ID, r); err != nil && !errors.Is(err, control.ErrNotFound) {
			if gone(err) {
				return nil
			}
			errs = append(errs, fmt.Errorf("del-route %s: %w", k, err))
			continue
		}
		w.m.log.Info("netmon: route removed", "sandbox", sb.ID, "route", k)
	}
	for _, k := range sortedKeys(wantR) {
		if _, ok := have[k]; ok {
			continue
		}
		r := wantR[k]
		if _, err := w.m.ctrl.AddRoute(ctx, sb.ID, r); err != nil {
			if gone(err) {
				return nil
			}
			if skipErr(err) {
				w.skip("route "+k, "add-route refused: "+err.Error())
				continue
			}
			errs = append(errs, fmt.Errorf("add-route %s: %w", k, err))
			continue
		}
		w.m.log.Info("netmon: route added", "sandbox", sb.ID, "route", k)
	}
	return errors.Join(errs...)
}

func addrStrings(as []*netspec.IPAddress) []string {
	var out []string
	for _, a := range as {
		if p, _, err := netspec.ParseIPAddress(a); err == nil {
			out = append(out, p.String())
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
