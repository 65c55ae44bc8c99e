package dataplane

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

// directMode (docs/direct.md): the endpoint's tap and its uplink are in one netns (ep.NetNS, "" = the agent's), normally the host's. The sandbox's own collection
// runs kdp_tap_in on the tap exactly as in tc mode (anti-spoofing, load balancing, strict
// egress, counters) with the uplink as its redirect target; the uplink itself is never given
// a per-sandbox entry or program, because several sandboxes share it. The node collection of
// the uplink (control/direct) delivers the guest's frames into the tap, and kdp_direct_rnat
// on the tap's egress (loaded against the sandbox's maps) reverse-NATs the replies of load-
// balanced connections, which kdp_uplink_in does in tc mode. control/direct is a leaf package
// that only this file uses: it owns the node collections, which outlive any one sandbox.
type directMode struct{}

func (directMode) Name() string { return control.ModeDirect }

// Family: the uplink is shared, so no mode of the sandbox family may touch it.
func (directMode) Family() Family { return FamilyNode }

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
	if ep.Addr6.IsValid() {
		g.Addrs6 = append(g.Addrs6, ep.Addr6.Addr())
	}
	switch {
	case ep.LinkLocal.IsValid():
		g.Addrs6 = append(g.Addrs6, ep.LinkLocal)
	case len(ep.MAC) == 6:
		g.Addrs6 = append(g.Addrs6, maps.LinkLocalOf([6]byte(ep.MAC)))
	}
	return g
}

// Add adds (fresh) or rewrites an endpoint in direct mode: the guest's MAC and address in the
// uplink's node collection, then the tap's entry and programs in the sandbox's collection. On
// failure of a fresh add it undoes what it did.
func (m directMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (st *State, err error) {
	if ep.Uplink == "" {
		return nil, ErrNoUplink
	}
	tap, err := netdev.LookupLink(ep.NetNS, ep.Tap)
	if err != nil {
		return nil, fmt.Errorf("tap: %w", err)
	}
	uplink, err := netdev.LookupLink(ep.NetNS, ep.Uplink)
	if err != nil {
		return nil, fmt.Errorf("uplink: %w", err)
	}
	ms := sb.lsb.Maps()
	eps := maps.EndpointMap{Map: ms.Endpoints, V6: ms.Endpoints6}
	tapEP, err := tapEntry(ep, uplink.Index)
	if err != nil {
		return nil, err
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
		if err := (maps.StatsMap{Map: ms.Stats, Ext: ms.DropsExt}).Reset(ep.Slot); err != nil {
			return nil, err
		}
	}
	mgr := sb.dp.directMgr()
	// The guest is joined to the node first: if its MAC or address belongs to another live
	// tap the add stops here, before this sandbox's tap could send anything.
	if _, _, err := mgr.Join(guestOf(ep)); err != nil {
		return nil, err
	}
	undo = append(undo, func() { mgr.Leave(guestOf(ep)) })
	if err := eps.Put(uint32(tap.Index), tapEP); err != nil {
		return nil, err
	}
	undo = append(undo, func() { eps.Remove(uint32(tap.Index)) })
	if _, err := sb.lsb.Attach(ep.NetNS, ep.Tap, loader.ProgTapIn); err != nil {
		return nil, err
	}
	undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Tap) })
	// Replies to the guest come from the node programs straight into the tap: the load
	// balancer's reverse NAT runs on the tap's egress instead of on an uplink of its own.
	if err := sb.lsb.AttachDirectRNAT(ep.NetNS, ep.Tap); err != nil {
		return nil, err
	}
	return running(m), nil
}

// Remove removes a direct-mode endpoint: the guest leaves the node (the node programs are
// detached from the uplink when it was the last guest there), then the tap's programs and the
// slot's entries go. The uplink's own programs of other sandboxes are never touched. Devices
// already gone are not an error.
func (directMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	if ep.Uplink != "" {
		if err := sb.dp.directMgr().Leave(guestOf(ep)); err != nil {
			return err
		}
	}
	if err := sb.lsb.DetachDirectRNAT(ep.Tap); err != nil {
		return err
	}
	if err := sb.lsb.Detach(ep.NetNS, ep.Tap); err != nil {
		return err
	}
	return removeSlotEntries(sb, ep.Slot)
}

// Stats are, from the guest, tc mode's (the sandbox's tap program); to the guest, the node's
// per-tap counters (frames it delivered into the tap; the node program has no drop reasons of
// its own).
func (directMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	var out control.EndpointStats
	var err error
	if out.FromGuest, err = bpfDirStats(sb, ep.Slot, maps.FromGuest); err != nil {
		return out, err
	}
	ts, err := sb.dp.directMgr().ToGuest(guestOf(ep))
	if err != nil {
		return out, err
	}
	out.ToGuest = control.DirStats{Packets: ts.Packets, Bytes: ts.Bytes, Drops: map[string]uint64{}}
	return out, nil
}
