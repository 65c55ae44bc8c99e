package bpfdp

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/direct"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// Direct mode (see control/direct and docs/direct.md): the endpoint's tap and its uplink are in
// one netns (ep.NetNS, "" = the agent's), normally the host's. The sandbox's own collection
// runs kdp_tap_in on the tap exactly as in tc mode (anti-spoofing, load balancing, strict
// egress, counters) with the uplink as its redirect target; the uplink itself is never given
// a per-sandbox entry or program, because several sandboxes share it. The node collection of
// the uplink (control/direct) delivers the guest's frames into the tap, and kdp_direct_rnat
// on the tap's egress (loaded against the sandbox's maps) reverse-NATs the replies of load-
// balanced connections, which kdp_uplink_in does in tc mode.

// ErrNoUplink is returned for a direct-mode endpoint without an uplink to join.
var ErrNoUplink = errors.New("direct mode needs an uplink")

// directMgrs holds one direct.Manager per pin root: the manager serialises joins and leaves on
// an uplink across every sandbox of this process.
var directMgrs sync.Map // root -> *direct.Manager

func (d *Dataplane) directMgr() *direct.Manager {
	m, _ := directMgrs.LoadOrStore(d.root, direct.New(d.root))
	return m.(*direct.Manager)
}

func guestOf(ep control.Endpoint) direct.Guest {
	g := direct.Guest{NetNS: ep.NetNS, Uplink: ep.Uplink, Tap: ep.Tap, MAC: ep.MAC}
	if ep.Addr.IsValid() && ep.Addr.Addr().Is4() {
		g.Addr = ep.Addr.Addr()
	}
	return g
}

// AddDirect adds (fresh) or rewrites an endpoint in direct mode: the tap's entry and program in
// the sandbox's collection, then the guest's MAC and address in the uplink's node collection.
// On failure of a fresh add it undoes what it did.
func (d *Dataplane) AddDirect(ctx context.Context, ep control.Endpoint, fresh bool) (err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("add direct endpoint %s: %w", ep.NIC, err)
		}
	}()
	if ep.Uplink == "" {
		return ErrNoUplink
	}
	if ep.Slot >= maps.MaxEndpoints {
		return fmt.Errorf("%w: %d", maps.ErrSlot, ep.Slot)
	}
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return err
	}
	tap, err := netdev.LookupLink(ep.NetNS, ep.Tap)
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	uplink, err := netdev.LookupLink(ep.NetNS, ep.Uplink)
	if err != nil {
		return fmt.Errorf("uplink: %w", err)
	}
	m := sb.lsb.Maps()
	eps := maps.EndpointMap{Map: m.Endpoints}
	tapEP := maps.Endpoint{Slot: ep.Slot, Role: maps.RoleTap, PeerIfindex: uint32(uplink.Index)}
	if err := tapEP.SetMAC(ep.MAC); err != nil {
		return err
	}
	tapEP.SetIP(ep.Addr)
	if ep.AntiSpoof {
		tapEP.Flags |= maps.FlagAntiSpoof
	}
	if ep.StrictEgress {
		tapEP.Flags |= maps.FlagStrictEgress
	}

	var undo []func()
	defer func() {
		if err != nil && fresh {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	if fresh {
		if err := (maps.StatsMap{Map: m.Stats}).Reset(ep.Slot); err != nil {
			return err
		}
	}
	// The guest is joined to the node first: if its MAC or address belongs to another live
	// tap the add stops here, before this sandbox's tap could send anything.
	if _, _, err := d.directMgr().Join(guestOf(ep)); err != nil {
		return err
	}
	undo = append(undo, func() { d.directMgr().Leave(guestOf(ep)) })
	if err := eps.Put(uint32(tap.Index), tapEP); err != nil {
		return err
	}
	undo = append(undo, func() { eps.Remove(uint32(tap.Index)) })
	if _, err := sb.lsb.Attach(ep.NetNS, ep.Tap, loader.ProgTapIn); err != nil {
		return err
	}
	undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Tap) })
	// Replies to the guest come from the node programs straight into the tap: the load
	// balancer's reverse NAT runs on the tap's egress instead of on an uplink of its own.
	if err := sb.lsb.AttachDirectRNAT(ep.NetNS, ep.Tap); err != nil {
		return err
	}
	d.setModeOf(sb, ep.Slot, &epMode{requested: control.ModeDirect, mode: control.ModeDirect, ep: ep})
	return nil
}

// DelDirect removes a direct-mode endpoint: the guest leaves the node (the node programs are
// detached from the uplink when it was the last guest there), then the tap's program and the
// slot's entries go. The uplink's own programs of other sandboxes are never touched. Devices
// already gone are not an error.
func (d *Dataplane) DelDirect(ctx context.Context, ep control.Endpoint) error {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
	}
	if ep.Uplink != "" {
		if err := d.directMgr().Leave(guestOf(ep)); err != nil {
			return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
		}
	}
	if err := sb.lsb.DetachDirectRNAT(ep.Tap); err != nil {
		return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
	}
	if err := sb.lsb.Detach(ep.NetNS, ep.Tap); err != nil {
		return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
	}
	eps := maps.EndpointMap{Map: sb.lsb.Maps().Endpoints}
	all, err := eps.All()
	if err != nil {
		return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
	}
	for ifindex, e := range all {
		if e.Slot == ep.Slot {
			if err := eps.Remove(ifindex); err != nil {
				return fmt.Errorf("del direct endpoint %s: %w", ep.NIC, err)
			}
		}
	}
	d.setModeOf(sb, ep.Slot, nil)
	return nil
}

// DirectStats are a direct-mode endpoint's counters: from the guest as in tc mode (the
// sandbox's tap program), to the guest from the node's per-tap counters (frames it delivered
// into the tap; the node program has no drop reasons of its own).
func (d *Dataplane) DirectStats(ctx context.Context, ep control.Endpoint) (control.EndpointStats, error) {
	var out control.EndpointStats
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	s, err := (maps.StatsMap{Map: sb.lsb.Maps().Stats}).Read(ep.Slot, maps.FromGuest)
	if err != nil {
		return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	out.FromGuest = control.DirStats{Packets: s.Packets, Bytes: s.Bytes, Drops: map[string]uint64{}}
	for _, r := range maps.DropReasons() {
		out.FromGuest.Drops[r.String()] = s.Drops[r]
	}
	ts, err := d.directMgr().ToGuest(guestOf(ep))
	if err != nil {
		return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	out.ToGuest = control.DirStats{Packets: ts.Packets, Bytes: ts.Bytes, Drops: map[string]uint64{}}
	return out, nil
}
