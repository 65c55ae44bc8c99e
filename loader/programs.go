package loader

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control/netdev"
)

// Programs returns the names of kata-dp's programs (kdp_*) attached to ifname in the netns at
// nsPath, wherever the loader may have put them: TCX ingress (the normal case), XDP, or a
// legacy clsact ingress filter (the fallback on kernels without TCX). Other users' programs
// are not listed. It reads only: callers that check a datapath (kata-dp-cni's CHECK) use it.
func Programs(nsPath, ifname string) ([]string, error) {
	var names []string
	add := func(id ebpf.ProgramID) error {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			return fmt.Errorf("open program %d: %w", id, err)
		}
		defer p.Close()
		info, err := p.Info()
		if err != nil {
			return fmt.Errorf("program %d info: %w", id, err)
		}
		if strings.HasPrefix(info.Name, progPrefix) {
			names = append(names, info.Name)
		}
		return nil
	}
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find %s: %w", ifname, err)
		}
		idx := l.Attrs().Index
		res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: ebpf.AttachTCXIngress})
		switch {
		case errors.Is(err, ebpf.ErrNotSupported):
		case err != nil:
			return fmt.Errorf("query tcx programs of %s: %w", ifname, err)
		default:
			for _, p := range res.Programs {
				if err := add(p.ID); err != nil {
					return err
				}
			}
		}
		if x := l.Attrs().Xdp; x != nil && x.Attached && x.ProgId != 0 {
			if err := add(ebpf.ProgramID(x.ProgId)); err != nil {
				return err
			}
		}
		filters, err := netlink.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return nil // no clsact qdisc: no legacy filters
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Id != 0 {
				if err := add(ebpf.ProgramID(bf.Id)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	return names, err
}
