package dataplane

import (
	"context"
	"fmt"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// tcMode is the default mode: kdp_tap_in at the tap's TCX ingress and kdp_uplink_in at the
// uplink's, each bpf_redirecting to the other's egress, with the checks, load balancing and
// counters on the way. An endpoint not joined to an uplink gets only the tap's program.
type tcMode struct{}

func (tcMode) Name() string   { return control.ModeTC }
func (tcMode) Family() Family { return FamilySandbox }

func (tcMode) programsOnBoth() bool { return true }

func (m tcMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	if _, _, err := addTC(sb, ep, fresh); err != nil {
		return nil, err
	}
	return running(m), nil
}

// addTC writes the entries, then attaches the tc programs; on failure of a fresh add it undoes
// what it did. It returns the devices, for xdp mode to build on.
func addTC(sb *Sandbox, ep control.Endpoint, fresh bool) (tap, uplink netdev.LinkInfo, err error) {
	tap, err = netdev.LookupLink(ep.NetNS, ep.Tap)
	if err != nil {
		return tap, uplink, fmt.Errorf("tap: %w", err)
	}
	if ep.Uplink != "" {
		if uplink, err = netdev.LookupLink(ep.NetNS, ep.Uplink); err != nil {
			return tap, uplink, fmt.Errorf("uplink: %w", err)
		}
	}
	m := sb.lsb.Maps()
	eps := maps.EndpointMap{Map: m.Endpoints, V6: m.Endpoints6}
	tapEP, err := tapEntry(ep, uplink.Index)
	if err != nil {
		return tap, uplink, err
	}
	upEP := tapEP
	upEP.Role, upEP.PeerIfindex = maps.RoleUplink, uint32(tap.Index)

	var undo []func()
	defer func() {
		if err != nil && fresh {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	if fresh {
		if err := (maps.StatsMap{Map: m.Stats, Ext: m.DropsExt}).Reset(ep.Slot); err != nil {
			return tap, uplink, err
		}
	}
	if err := eps.Put(uint32(tap.Index), tapEP); err != nil {
		return tap, uplink, err
	}
	undo = append(undo, func() { eps.Remove(uint32(tap.Index)) })
	if ep.Uplink != "" {
		if err := eps.Put(uint32(uplink.Index), upEP); err != nil {
			return tap, uplink, err
		}
		undo = append(undo, func() { eps.Remove(uint32(uplink.Index)) })
	}
	// The two attachments are independent and each waits for the kernel's RCU grace period
	// (several ms on a busy host): make them at once.
	upErr := make(chan error, 1)
	if ep.Uplink != "" {
		go func() {
			_, err := sb.lsb.Attach(ep.NetNS, ep.Uplink, loader.ProgUplinkIn)
			upErr <- err
		}()
	} else {
		upErr <- nil
	}
	_, tapErr := sb.lsb.Attach(ep.NetNS, ep.Tap, loader.ProgTapIn)
	if err := <-upErr; err != nil {
		if tapErr == nil {
			undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Tap) })
		}
		return tap, uplink, err
	}
	if tapErr != nil {
		if ep.Uplink != "" {
			undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Uplink) })
		}
		return tap, uplink, tapErr
	}
	return tap, uplink, nil
}

// Remove takes the endpoint out of the BPF datapath: XDP ports and programs, tc programs,
// then its entries (a program without an entry passes frames on).
func (tcMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	removeXDP(sb, ep)
	for _, dev := range []string{ep.Uplink, ep.Tap} {
		if dev == "" {
			continue
		}
		if err := sb.lsb.Detach(ep.NetNS, dev); err != nil {
			return err
		}
	}
	return removeSlotEntries(sb, ep.Slot)
}

// Stats are the slot's BPF counters, both directions.
func (tcMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	var out control.EndpointStats
	var err error
	if out.FromGuest, err = bpfDirStats(sb, ep.Slot, maps.FromGuest); err != nil {
		return out, err
	}
	out.ToGuest, err = bpfDirStats(sb, ep.Slot, maps.ToGuest)
	return out, err
}
