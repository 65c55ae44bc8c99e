package dataplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/macvtap"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// macvtapBPFMode is macvtap mode's plumbing with kata-dp's features: the VM uses the macvtap
// (the same device macvtap mode makes, kdpmv<slot>, with Kata's MAC swap), and kata-dp's two
// programs run where macvtap's own path passes anyway, each passing the frame on after its
// work (the endpoint flag maps.FlagPass) instead of redirecting it:
//
//   - to the guest: kdp_uplink_in at the uplink's TCX ingress (reverse NAT, counters), then
//     macvlan's rx handler queues the frame on the macvtap. Frames to the uplink's own MAC
//     are the sandbox netns's and go on untouched.
//   - from the guest: kdp_tap_in at the macvtap's TCX egress (anti-spoofing, DNAT, strict
//     egress, counters, drops with their reason), then macvlan transmits it on the uplink.
//     Every frame the VM writes to a macvtap is transmitted by the macvtap (tap_get_user ->
//     dev_queue_xmit), and the egress hook runs before macvlan delivers it anywhere, to the
//     uplink or (bridge mode) to a sibling macvlan, so none bypasses the checks.
//
// Why: a bpf_redirect into the tap pays the tap's dev_queue_xmit per frame, which macvtap
// does not (docs/benchmarks.md); this mode keeps macvtap's path and costs only the programs.
//
// The mode runs on tc's uplink program and pin and on macvtap mode's device, so switching
// between the three keeps what they share; switching between macvtap and macvtap-bpf keeps
// the device, so the VM keeps its queues. Switching to or from tc, xdp or tcfilter changes
// the device the VM must use, as macvtap mode does. The VM's tap is not used: its program
// and entry are taken away.
type macvtapBPFMode struct{}

func (macvtapBPFMode) Name() string   { return control.ModeMacvtapBPF }
func (macvtapBPFMode) Family() Family { return FamilySandbox }

// under: the uplink's link and entry are tc's (updated in place), the device is macvtap's.
func (macvtapBPFMode) under() []string { return []string{control.ModeTC, control.ModeMacvtap} }

// Add makes (or adopts) the macvtap, writes the entries of the macvtap and the uplink, then
// attaches the programs; a fresh add that fails undoes what it did. Last, the VM's tap loses
// tc mode's program and entry.
func (m macvtapBPFMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (st *State, err error) {
	if ep.Uplink == "" {
		return nil, errors.New("macvtap-bpf mode needs an uplink")
	}
	uplink, err := netdev.LookupLink(ep.NetNS, ep.Uplink)
	if err != nil {
		return nil, fmt.Errorf("uplink: %w", err)
	}
	var undo []func()
	defer func() {
		if err != nil && fresh {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	name := macvtapName(ep)
	mv, err := adoptMacvtap(ep.NetNS, name)
	if err != nil {
		if mv, err = macvtap.Create(ep.NetNS, ep.Uplink, name); err != nil {
			return nil, err
		}
		undo = append(undo, func() { macvtap.Delete(ep.NetNS, ep.Uplink, name) })
	}
	// macvlan hands a macvtap only the group frames in its filter, which holds the device's
	// own multicast list, not the guest's: the IPv6 neighbour solicitations for the guest's
	// addresses (solicited-node multicast) would never arrive. The guest gets every group
	// frame, as on a tap, and the datapath sees and counts them.
	if err := netdev.InNetNS(ep.NetNS, func() error {
		l, err := netlink.LinkByIndex(mv.Ifindex)
		if err == nil {
			err = netlink.LinkSetAllmulticastOn(l)
		}
		return err
	}); err != nil {
		return nil, fmt.Errorf("macvtap %s: all-multicast: %w", name, err)
	}
	if ep.MAC != nil && !sameMAC(ep.MAC, mv.MAC) {
		sb.dp.log.Warn("macvtap-bpf mode: the guest must use the macvtap's MAC (the uplink's); anti-spoofing holds it to that",
			"sandbox", ep.Sandbox, "nic", ep.NIC, "mac", ep.MAC.String(), "macvtap_mac", mv.MAC.String())
	}
	// The guest's side: its frames are checked at the macvtap (role tap), held to the MAC
	// macvlan gives it.
	guestEP, err := tapEntry(ep, uplink.Index)
	if err != nil {
		return nil, err
	}
	if err := guestEP.SetMAC(mv.MAC); err != nil {
		return nil, err
	}
	guestEP.Flags |= maps.FlagPass
	upEP := guestEP
	upEP.Role, upEP.PeerIfindex = maps.RoleUplink, uint32(mv.Ifindex)

	m2 := sb.lsb.Maps()
	eps := maps.EndpointMap{Map: m2.Endpoints, V6: m2.Endpoints6}
	if fresh {
		if err := (maps.StatsMap{Map: m2.Stats, Ext: m2.DropsExt}).Reset(ep.Slot); err != nil {
			return nil, err
		}
	}
	if err := eps.Put(uint32(mv.Ifindex), guestEP); err != nil {
		return nil, err
	}
	undo = append(undo, func() { eps.Remove(uint32(mv.Ifindex)) })
	if err := eps.Put(uint32(uplink.Index), upEP); err != nil {
		return nil, err
	}
	undo = append(undo, func() { eps.Remove(uint32(uplink.Index)) })
	// The two attachments are independent and each waits for an RCU grace period.
	upErr := make(chan error, 1)
	go func() {
		_, err := sb.lsb.Attach(ep.NetNS, ep.Uplink, loader.ProgUplinkIn)
		upErr <- err
	}()
	_, mvErr := sb.lsb.AttachEgress(ep.NetNS, name, loader.ProgTapIn)
	if mvErr == nil {
		undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, name) })
	}
	if err := <-upErr; err != nil {
		return nil, err
	}
	undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Uplink) })
	if mvErr != nil {
		return nil, mvErr
	}
	if err := removeTapSide(sb, ep); err != nil {
		return nil, err
	}
	st = running(m)
	st.mv = mv
	return st, nil
}

// removeTapSide takes tc mode's program and entry off the VM's tap, which macvtap-bpf does
// not use. A tap that does not exist (any more) is not an error.
func removeTapSide(sb *Sandbox, ep control.Endpoint) error {
	if ep.Tap == "" {
		return nil
	}
	if err := sb.lsb.Detach(ep.NetNS, ep.Tap); err != nil {
		return err
	}
	tap, err := netdev.LookupLink(ep.NetNS, ep.Tap)
	if err != nil {
		return nil
	}
	eps := maps.ForSandbox(sb.lsb.Maps()).Endpoints
	if e, err := eps.Get(uint32(tap.Index)); err == nil && e.Slot == ep.Slot {
		return eps.Remove(uint32(tap.Index))
	}
	return nil
}

// Remove detaches the macvtap's program and removes the slot's entries of devices other than
// the tap and the uplink (the macvtap's, also when it is gone already). The uplink's program
// and entry are tc's Remove's to take; the device is macvtap's Remove's.
func (macvtapBPFMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	if err := sb.lsb.Detach(ep.NetNS, macvtapName(ep)); err != nil {
		return err
	}
	own := map[uint32]bool{}
	for _, dev := range []string{ep.Tap, ep.Uplink} {
		if dev == "" {
			continue
		}
		if li, err := netdev.LookupLink(ep.NetNS, dev); err == nil {
			own[uint32(li.Index)] = true
		}
	}
	eps := maps.ForSandbox(sb.lsb.Maps()).Endpoints
	all, err := eps.All()
	if err != nil {
		return err
	}
	for ifindex, e := range all {
		if e.Slot == ep.Slot && !own[ifindex] {
			if err := eps.Remove(ifindex); err != nil {
				return err
			}
		}
	}
	return nil
}

// Stats are the slot's BPF counters, as in tc mode.
func (macvtapBPFMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	return tcMode{}.Stats(ctx, sb, ep)
}
