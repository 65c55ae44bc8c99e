package bpfdp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// Errors callers can test for.
var (
	// ErrNoSandbox is returned for an operation on a sandbox that was never ensured.
	ErrNoSandbox = errors.New("sandbox not loaded")
	// ErrMode is returned for a dataplane mode this implementation cannot run.
	ErrMode = errors.New("unsupported dataplane mode")
)

// Dataplane implements control.Dataplane with the BPF datapath.
type Dataplane struct {
	root string
	log  *slog.Logger

	mu        sync.Mutex
	sandboxes map[string]*sandbox
}

type sandbox struct {
	lsb   *loader.Sandbox
	netns string
	lb    *lbState                       // nil until the first SetLB/RestoreLB of this process
	rates map[maps.LBStatsKey]ipvs.Stats // set by the sweeper under Dataplane.mu
	modes map[uint32]*epMode             // by endpoint slot, under Dataplane.mu (modes.go)
}

var (
	_ control.Dataplane       = (*Dataplane)(nil)
	_ control.EndpointUpdater = (*Dataplane)(nil)
	_ control.Reconciler      = (*Dataplane)(nil)
)

// New returns a Dataplane pinning under root ("" = loader.DefaultRoot). It probes the kernel
// once and fails if the kernel cannot run tc BPF programs at all.
func New(root string) (*Dataplane, error) {
	if root == "" {
		root = loader.DefaultRoot
	}
	f, err := loader.Probe()
	if err != nil {
		return nil, fmt.Errorf("bpf dataplane: %w", err)
	}
	if !f.SchedCLS {
		return nil, fmt.Errorf("bpf dataplane: kernel cannot run tc BPF programs (%s)", f)
	}
	if !f.TCX {
		slog.Warn("kernel has no TCX: attaching with clsact + bpf filters", "features", f.String())
	}
	return &Dataplane{root: root, log: slog.Default(), sandboxes: map[string]*sandbox{}}, nil
}

// Root is where sandboxes are pinned.
func (d *Dataplane) Root() string { return d.root }

// EnsureSandbox loads the sandbox's collection, or re-adopts the one an earlier run pinned.
func (d *Dataplane) EnsureSandbox(ctx context.Context, id, netnsPath string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sb, ok := d.sandboxes[id]; ok {
		sb.netns = netnsPath
		return nil
	}
	lsb, err := loader.Open(d.root, id)
	if err != nil {
		return err
	}
	d.sandboxes[id] = &sandbox{lsb: lsb, netns: netnsPath}
	return nil
}

// RemoveSandbox detaches every program of the sandbox and deletes its pins.
func (d *Dataplane) RemoveSandbox(ctx context.Context, id string) error {
	d.mu.Lock()
	sb := d.sandboxes[id]
	delete(d.sandboxes, id)
	d.mu.Unlock()
	if sb != nil {
		sb.lsb.Close()
	}
	return loader.Remove(d.root, id)
}

// Close releases file descriptors; everything pinned keeps running.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, sb := range d.sandboxes {
		sb.lsb.Close()
		delete(d.sandboxes, id)
	}
	return nil
}

func (d *Dataplane) get(id string) (*sandbox, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	sb, ok := d.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoSandbox, id)
	}
	return sb, nil
}

// AddEndpoint joins the endpoint's tap to its uplink (when it has one) through the datapath.
func (d *Dataplane) AddEndpoint(ctx context.Context, ep control.Endpoint) error {
	if ep.Mode == control.ModeDirect {
		return d.AddDirect(ctx, ep, true)
	}
	if err := d.add(ep, true); err != nil {
		return fmt.Errorf("add endpoint %s: %w", ep.NIC, err)
	}
	return nil
}

// UpdateEndpoint rewrites the endpoint's map entries (e.g. a new guest address) in place.
func (d *Dataplane) UpdateEndpoint(ctx context.Context, ep control.Endpoint) error {
	if ep.Mode == control.ModeDirect {
		return d.AddDirect(ctx, ep, false)
	}
	if err := d.add(ep, false); err != nil {
		return fmt.Errorf("update endpoint %s: %w", ep.NIC, err)
	}
	return nil
}

// checkMode accepts the four modes ("" = tc); modes.go runs them.
func checkMode(ep control.Endpoint) error {
	switch normMode(ep.Mode) {
	case control.ModeTC, control.ModeXDP, control.ModeTCFilter, control.ModeMacvtap:
		return nil
	}
	return fmt.Errorf("%w %q", ErrMode, ep.Mode)
}

// add writes the entries, then attaches; on failure it undoes what it did. fresh resets the
// slot's counters (a new endpoint); reconciling keeps them.
func (d *Dataplane) add(ep control.Endpoint, fresh bool) (err error) {
	if err := checkMode(ep); err != nil {
		return err
	}
	if ep.Slot >= maps.MaxEndpoints {
		return fmt.Errorf("%w: %d", maps.ErrSlot, ep.Slot)
	}
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return err
	}
	switch normMode(ep.Mode) {
	case control.ModeTCFilter:
		return d.addTCFilter(sb, ep)
	case control.ModeMacvtap:
		return d.addMacvtap(sb, ep)
	}
	tap, err := netdev.LookupLink(ep.NetNS, ep.Tap)
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	var uplink netdev.LinkInfo
	if ep.Uplink != "" {
		if uplink, err = netdev.LookupLink(ep.NetNS, ep.Uplink); err != nil {
			return fmt.Errorf("uplink: %w", err)
		}
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
		if err := (maps.StatsMap{Map: m.Stats}).Reset(ep.Slot); err != nil {
			return err
		}
	}
	if err := eps.Put(uint32(tap.Index), tapEP); err != nil {
		return err
	}
	undo = append(undo, func() { eps.Remove(uint32(tap.Index)) })
	if ep.Uplink != "" {
		if err := eps.Put(uint32(uplink.Index), upEP); err != nil {
			return err
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
		return err
	}
	if tapErr != nil {
		if ep.Uplink != "" {
			undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Uplink) })
		}
		return tapErr
	}
	undo = append(undo, func() { sb.lsb.Detach(ep.NetNS, ep.Tap) })
	return d.finishBPF(sb, ep, tap, uplink)
}

// DelEndpoint detaches the endpoint's programs and removes its entries. Devices that are
// already gone are not an error.
func (d *Dataplane) DelEndpoint(ctx context.Context, ep control.Endpoint) error {
	if ep.Mode == control.ModeDirect {
		return d.DelDirect(ctx, ep)
	}
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return fmt.Errorf("del endpoint %s: %w", ep.NIC, err)
	}
	// Whatever mode the endpoint ran in (this process may not know, after a restart): XDP and
	// tc programs, then every entry of the slot (ifindexes may have changed if a device was
	// recreated), then mirred filters and the macvtap.
	if err := d.removeBPF(sb, ep); err != nil {
		return fmt.Errorf("del endpoint %s: %w", ep.NIC, err)
	}
	if err := d.removeNonBPF(ep); err != nil {
		return fmt.Errorf("del endpoint %s: %w", ep.NIC, err)
	}
	d.setModeOf(sb, ep.Slot, nil)
	return nil
}

// SetRoutes replaces the sandbox's route table in one step for the datapath.
func (d *Dataplane) SetRoutes(ctx context.Context, id string, routes []control.Route) error {
	sb, err := d.get(id)
	if err != nil {
		return fmt.Errorf("set routes: %w", err)
	}
	m := sb.lsb.Maps()
	rs := make([]maps.Route, 0, len(routes))
	for _, r := range routes {
		rs = append(rs, maps.Route{Slot: r.Slot, Dest: r.Dest, Gateway: r.Gateway})
	}
	if err := (maps.RouteTable{Routes: m.Routes, Config: m.Config}).Replace(rs); err != nil {
		return fmt.Errorf("set routes of %s: %w", id, err)
	}
	return nil
}

// Stats reads the endpoint's counters, summed over CPUs. Endpoints in tcfilter or macvtap mode
// have no BPF counters: their Stats are link counters, marked with NoBPFCounters.
func (d *Dataplane) Stats(ctx context.Context, ep control.Endpoint) (control.EndpointStats, error) {
	if ep.Mode == control.ModeDirect {
		return d.DirectStats(ctx, ep)
	}
	var out control.EndpointStats
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	if m := d.nonBPFMode(sb, ep); m != nil {
		return d.linkStats(ep, m)
	}
	sm := maps.StatsMap{Map: sb.lsb.Maps().Stats}
	for _, x := range []struct {
		d   maps.Direction
		out *control.DirStats
	}{{maps.FromGuest, &out.FromGuest}, {maps.ToGuest, &out.ToGuest}} {
		s, err := sm.Read(ep.Slot, x.d)
		if err != nil {
			return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
		}
		x.out.Packets, x.out.Bytes = s.Packets, s.Bytes
		x.out.Drops = map[string]uint64{}
		for _, r := range maps.DropReasons() {
			x.out.Drops[r.String()] = s.Drops[r]
		}
	}
	return out, nil
}

// Reconcile makes the pinned state match the saved one after an agent restart: entries are
// rewritten, links updated in place (never re-created when they exist), entries of endpoints
// that no longer exist removed, and the route table rewritten. Counters are kept.
func (d *Dataplane) Reconcile(ctx context.Context, s control.Sandbox, eps []control.Endpoint, routes []control.Route) error {
	sb, err := d.get(s.ID)
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", s.ID, err)
	}
	keep := map[uint32]bool{}
	for _, ep := range eps {
		keep[ep.Slot] = true
		add := func() error { return d.add(ep, false) }
		if ep.Mode == control.ModeDirect {
			add = func() error { return d.AddDirect(ctx, ep, false) }
		}
		if err := add(); err != nil {
			// A device that vanished while we were down is reported, not fatal: the rest
			// of the sandbox must keep working.
			d.log.Warn("reconcile endpoint", "sandbox", s.ID, "nic", ep.NIC, "err", err)
		}
	}
	em := maps.EndpointMap{Map: sb.lsb.Maps().Endpoints}
	all, err := em.All()
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", s.ID, err)
	}
	for ifindex, e := range all {
		if !keep[e.Slot] {
			em.Remove(ifindex)
		}
	}
	return d.SetRoutes(ctx, s.ID, routes)
}
