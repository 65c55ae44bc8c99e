// Package mirred joins a sandbox's veth and tap the way Kata Containers'
// "tcfilter" network model does: an ingress qdisc on both devices, and on
// each a u32 match-all filter whose action is "mirred egress redirect" to the
// other device, with the verdict "stolen". It is kata-dp's baseline mode
// (and the fallback for kernels without BPF), built through netlink so that
// no tc binary is needed.
//
// The recipe matches Kata's runtime (virtcontainers/network_linux.go,
// addQdiscIngress + addRedirectTCFilter) so that benchmarks compare kata-dp
// against what Kata really installs. Join reuses an ingress (or clsact) qdisc
// that is already there; Unjoin removes only the filters Join added and the
// qdisc only when it is left with no filters at all.
//
// The functions switch the calling goroutine's thread into the namespace;
// they may be called concurrently for different devices.
package mirred

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Handles of the ingress qdisc and its filters' parent. A clsact qdisc has
// the same handle; its ingress hook is the minor TC_H_MIN_INGRESS.
var (
	ingressHandle  = netlink.MakeHandle(0xffff, 0)
	clsactIngress  = netlink.MakeHandle(0xffff, 0xfff2)
	errWrongDevice = errors.New("not a usable device")
)

// Join installs the redirect in both directions between veth and tap in the
// network namespace at nsPath ("" = the caller's). It is idempotent: a
// direction that already has its redirect is left alone. On failure it
// undoes what it added.
func Join(nsPath, veth, tap string) error {
	err := netdev.InNetNS(nsPath, func() error {
		v, t, err := links(veth, tap)
		if err != nil {
			return err
		}
		if err := redirect(v, t); err != nil {
			return err
		}
		if err := redirect(t, v); err != nil {
			_ = unredirect(v, t)
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("mirred join %s and %s: %w", veth, tap, err)
	}
	return nil
}

// Unjoin removes the redirect filters Join added between veth and tap, and
// each device's ingress qdisc when no other filter is left on it. A device
// that is gone is not an error.
func Unjoin(nsPath, veth, tap string) error {
	err := netdev.InNetNS(nsPath, func() error {
		v, verr := netlink.LinkByName(veth)
		t, terr := netlink.LinkByName(tap)
		var errs []error
		if verr == nil && terr == nil {
			errs = append(errs, unredirect(v, t), unredirect(t, v))
		} else {
			// With one device gone its filters went with it; the other's
			// redirect points at a missing ifindex and is ours to remove too.
			for _, l := range []netlink.Link{v, t} {
				if l != nil && l.Attrs() != nil {
					errs = append(errs, unredirectAny(l))
				}
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		return fmt.Errorf("mirred unjoin %s and %s: %w", veth, tap, err)
	}
	return nil
}

// Joined reports whether both directions' redirects are in place.
func Joined(nsPath, veth, tap string) (bool, error) {
	var ok bool
	err := netdev.InNetNS(nsPath, func() error {
		v, t, err := links(veth, tap)
		if err != nil {
			return err
		}
		a, err := ours(v, t.Attrs().Index)
		if err != nil {
			return err
		}
		b, err := ours(t, v.Attrs().Index)
		if err != nil {
			return err
		}
		ok = len(a) > 0 && len(b) > 0
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("mirred joined %s and %s: %w", veth, tap, err)
	}
	return ok, nil
}

func links(veth, tap string) (netlink.Link, netlink.Link, error) {
	v, err := netlink.LinkByName(veth)
	if err != nil {
		return nil, nil, fmt.Errorf("find %s: %w", veth, err)
	}
	t, err := netlink.LinkByName(tap)
	if err != nil {
		return nil, nil, fmt.Errorf("find %s: %w", tap, err)
	}
	if v.Attrs().Index == t.Attrs().Index {
		return nil, nil, fmt.Errorf("%s and %s are the same device: %w", veth, tap, errWrongDevice)
	}
	return v, t, nil
}

// ingressParent returns the parent handle for ingress filters on l, adding
// an ingress qdisc when l has neither ingress nor clsact.
func ingressParent(l netlink.Link) (uint32, error) {
	qs, err := netlink.QdiscList(l)
	if err != nil {
		return 0, fmt.Errorf("list qdiscs of %s: %w", l.Attrs().Name, err)
	}
	for _, q := range qs {
		switch q.Type() {
		case "ingress":
			return ingressHandle, nil
		case "clsact":
			return clsactIngress, nil
		}
	}
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: l.Attrs().Index,
		Handle:    ingressHandle,
		Parent:    netlink.HANDLE_INGRESS,
	}}
	if err := netlink.QdiscAdd(q); err != nil {
		return 0, fmt.Errorf("add ingress qdisc to %s: %w", l.Attrs().Name, err)
	}
	return ingressHandle, nil
}

// redirect adds from's u32 match-all filter that redirects every frame to
// to's egress, unless it is there already.
func redirect(from, to netlink.Link) error {
	have, err := ours(from, to.Attrs().Index)
	if err != nil {
		return err
	}
	if len(have) > 0 {
		return nil
	}
	parent, err := ingressParent(from)
	if err != nil {
		return err
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index,
			Parent:    parent,
			Protocol:  unix.ETH_P_ALL,
		},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      to.Attrs().Index,
		}},
	}
	if err := netlink.FilterAdd(f); err != nil {
		_ = dropEmptyIngress(from)
		return fmt.Errorf("add redirect filter %s -> %s: %w", from.Attrs().Name, to.Attrs().Name, err)
	}
	return nil
}

// unredirect removes from's redirect filters to to, then its ingress qdisc
// if that is left empty.
func unredirect(from, to netlink.Link) error {
	fs, err := ours(from, to.Attrs().Index)
	if err != nil {
		return err
	}
	return deleteFilters(from, fs)
}

// unredirectAny removes from's mirred redirects to devices that no longer
// exist.
func unredirectAny(from netlink.Link) error {
	fs, err := ours(from, -1)
	if err != nil {
		return err
	}
	var dead []netlink.Filter
	for _, f := range fs {
		idx := mirredTarget(f)
		if _, err := netlink.LinkByIndex(idx); err != nil {
			dead = append(dead, f)
		}
	}
	return deleteFilters(from, dead)
}

func deleteFilters(from netlink.Link, fs []netlink.Filter) error {
	for _, f := range fs {
		if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete filter on %s: %w", from.Attrs().Name, err)
		}
	}
	return dropEmptyIngress(from)
}

// dropEmptyIngress deletes l's ingress qdisc (never a clsact) when it has no
// filters left and no TCX program runs on l's ingress.
//
// Adding or deleting an ingress qdisc deactivates the device's transmit queues
// for an RCU grace period (the kernel's qdisc_graft calls dev_deactivate for
// ingress qdiscs too): frames sent through the device meanwhile are dropped,
// measured here as 5 consecutive pings lost (25 ms) at 200/s. When a BPF mode
// took over from mirred, BPF redirects frames into this device while the qdisc
// would go, so the empty qdisc is left in place: it costs nothing, and giving
// the pair back to mirred (Join) then adds only filters, with no gap either.
func dropEmptyIngress(l netlink.Link) error {
	if n, err := tcxIngress(l.Attrs().Index); err == nil && n > 0 {
		return nil
	}
	qs, err := netlink.QdiscList(l)
	if err != nil {
		return fmt.Errorf("list qdiscs of %s: %w", l.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Type() != "ingress" {
			continue
		}
		fs, err := netlink.FilterList(l, ingressHandle)
		if err != nil {
			return fmt.Errorf("list filters of %s: %w", l.Attrs().Name, err)
		}
		if len(fs) > 0 {
			return nil
		}
		if err := netlink.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("delete ingress qdisc of %s: %w", l.Attrs().Name, err)
		}
	}
	return nil
}

// ours lists from's ingress u32 filters whose only action is a stolen
// mirred egress redirect to ifindex (any target when ifindex < 0): the
// filters Join adds.
func ours(from netlink.Link, ifindex int) ([]netlink.Filter, error) {
	var out []netlink.Filter
	for _, parent := range []uint32{ingressHandle, clsactIngress} {
		fs, err := netlink.FilterList(from, parent)
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
				continue // no such qdisc or hook
			}
			return nil, fmt.Errorf("list filters of %s: %w", from.Attrs().Name, err)
		}
		for _, f := range fs {
			t := mirredTarget(f)
			if t > 0 && (ifindex < 0 || t == ifindex) {
				out = append(out, f)
			}
		}
	}
	return out, nil
}

// mirredTarget returns the redirect target of a Join-style filter, or 0.
func mirredTarget(f netlink.Filter) int {
	u, ok := f.(*netlink.U32)
	if !ok || len(u.Actions) != 1 {
		return 0
	}
	m, ok := u.Actions[0].(*netlink.MirredAction)
	if !ok || m.MirredAction != netlink.TCA_EGRESS_REDIR || m.Attrs().Action != netlink.TC_ACT_STOLEN {
		return 0
	}
	return m.Ifindex
}

// tcxIngress counts the TCX programs on the ingress of the device ifindex.
func tcxIngress(ifindex int) (int, error) {
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return 0, err
	}
	return len(res.Programs), nil
}
