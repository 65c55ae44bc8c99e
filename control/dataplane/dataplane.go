package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
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
	opts loader.Options // for the sandboxes it opens
	log  *slog.Logger

	mu        sync.Mutex
	sandboxes map[string]*Sandbox
	monMu     sync.Mutex // guards the monitor's state (monitor.go): Sandbox.mon, monWant, the hubs
}

// Sandbox is one sandbox's loaded collection, as the modes see it. Its fields are the
// Dataplane's; a Mode only reaches them through the methods of this package.
type Sandbox struct {
	dp    *Dataplane
	lsb   *loader.Sandbox
	netns string
	lb    *lbState                       // nil until the first SetLB/RestoreLB of this process
	rates map[maps.LBStatsKey]ipvs.Stats // set by Sweep under Dataplane.mu
	swept lbSample                       // the counters Sweep last read, under Dataplane.mu
	modes map[uint32]*State              // by endpoint slot, under Dataplane.mu (mode.go)

	// The monitor (monitor.go), under Dataplane.monMu: the reader of the ring while a stream
	// watches, and how many open streams want each event type.
	mon     *monHub
	monWant map[maps.MonitorFlags]int

	// closing guards lsb against readers that do not hold the control plane's sandbox lock
	// (the metrics scrape, the listings, the sweep): they hold it for reading (Dataplane.read)
	// while they use the maps; RemoveSandbox and Close take it for writing before closing
	// lsb, so no reader ever uses a closed (or, worse, reused) map file descriptor.
	closing sync.RWMutex
	closed  bool // under closing

	// late is closed when the real servers the last restore writes after its switch are
	// written (lb.go, RestoreLB); nil when no restore deferred any. Under lateMu.
	lateMu sync.Mutex
	late   chan struct{}
}

var (
	_ control.Dataplane       = (*Dataplane)(nil)
	_ control.EndpointUpdater = (*Dataplane)(nil)
	_ control.Reconciler      = (*Dataplane)(nil)
)

// New returns a Dataplane pinning under root ("" = loader.DefaultRoot). It probes the kernel
// once and fails if the kernel cannot run tc BPF programs at all.
func New(root string) (*Dataplane, error) { return NewWithOptions(root, loader.Options{}) }

// NewWithOptions is New with the loader options of every sandbox it opens (for instance
// loader.Options.LegacyTC, to attach with clsact + bpf filters where TCX misbehaves).
func NewWithOptions(root string, o loader.Options) (*Dataplane, error) {
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
	return &Dataplane{root: root, opts: o, log: slog.Default(), sandboxes: map[string]*Sandbox{}}, nil
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
	lsb, err := loader.OpenWithOptions(d.root, id, d.opts)
	if err != nil {
		return err
	}
	d.sandboxes[id] = &Sandbox{dp: d, lsb: lsb, netns: netnsPath}
	return nil
}

// RemoveSandbox detaches every program of the sandbox and deletes its pins.
func (d *Dataplane) RemoveSandbox(ctx context.Context, id string) error {
	d.mu.Lock()
	sb := d.sandboxes[id]
	delete(d.sandboxes, id)
	d.mu.Unlock()
	if sb != nil {
		sb.close()
	}
	return loader.Remove(d.root, id)
}

// Close releases file descriptors; everything pinned keeps running.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, sb := range d.sandboxes {
		sb.close()
		delete(d.sandboxes, id)
	}
	return nil
}

// close closes the sandbox's collection once its readers are done (see Sandbox.closing).
func (sb *Sandbox) close() {
	sb.closing.Lock()
	defer sb.closing.Unlock()
	if !sb.closed {
		sb.closed = true
		sb.lsb.Close()
	}
}

// read runs fn on the sandbox id while its collection cannot be closed: for the readers that
// run beside the control plane's operations rather than under its sandbox lock.
func (d *Dataplane) read(id string, fn func(sb *Sandbox) error) error {
	sb, err := d.get(id)
	if err != nil {
		return err
	}
	sb.closing.RLock()
	defer sb.closing.RUnlock()
	if sb.closed {
		return fmt.Errorf("%w: %s", ErrNoSandbox, id)
	}
	return fn(sb)
}

func (d *Dataplane) get(id string) (*Sandbox, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	sb, ok := d.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoSandbox, id)
	}
	return sb, nil
}

// AddEndpoint joins the endpoint's tap to its uplink (when it has one) in the endpoint's mode.
func (d *Dataplane) AddEndpoint(ctx context.Context, ep control.Endpoint) error {
	if err := d.add(ctx, ep, true); err != nil {
		return fmt.Errorf("add endpoint %s: %w", ep.NIC, err)
	}
	return nil
}

// UpdateEndpoint rewrites the endpoint's map entries (e.g. a new guest address) in place.
func (d *Dataplane) UpdateEndpoint(ctx context.Context, ep control.Endpoint) error {
	if err := d.add(ctx, ep, false); err != nil {
		return fmt.Errorf("update endpoint %s: %w", ep.NIC, err)
	}
	return nil
}

// add installs the endpoint through its mode, then removes what the other modes of its family
// left (the new path is in place before the old one goes). fresh resets the slot's counters
// and undoes a failed add; reconciling and updating keep them.
func (d *Dataplane) add(ctx context.Context, ep control.Endpoint, fresh bool) error {
	m, err := Lookup(ep.Mode)
	if err != nil {
		return err
	}
	if ep.Slot >= maps.MaxEndpoints {
		return fmt.Errorf("%w: %d", maps.ErrSlot, ep.Slot)
	}
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return err
	}
	st, err := m.Add(ctx, sb, ep, fresh)
	if err != nil {
		return err
	}
	st.requested, st.ep = m.Name(), ep
	d.setState(sb, ep.Slot, st)
	return removeOthers(ctx, sb, ep, m)
}

// DelEndpoint takes the endpoint out of the datapath. This process may not know which mode the
// endpoint ran in (after a restart, or a switch that failed halfway), so it removes whatever
// every mode of its family may have left: programs, entries of its slot (ifindexes may have
// changed if a device was recreated), filters, devices. Devices that are already gone are not
// an error.
func (d *Dataplane) DelEndpoint(ctx context.Context, ep control.Endpoint) error {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return fmt.Errorf("del endpoint %s: %w", ep.NIC, err)
	}
	m := d.modeFor(sb, ep)
	for _, o := range registry {
		if o.Family() != m.Family() {
			continue
		}
		if err := o.Remove(ctx, sb, ep); err != nil {
			return fmt.Errorf("del endpoint %s: %w", ep.NIC, err)
		}
	}
	d.setState(sb, ep.Slot, nil)
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
	if err := (maps.RouteTable{Routes: m.Routes, Routes6: m.Routes6, Config: m.Config}).Replace(rs); err != nil {
		return fmt.Errorf("set routes of %s: %w", id, err)
	}
	return nil
}

// Stats reads the endpoint's counters through the mode it runs in (the mode this process
// installed, or, after a restart before Reconcile, the one ep names). Endpoints in tcfilter or
// macvtap mode have no BPF counters: their Stats are link counters, marked with NoBPFCounters.
//
// Stats runs beside the control plane's operations (metrics, status): a sandbox removed
// meanwhile is ErrNoSandbox, never a read of a closed map.
func (d *Dataplane) Stats(ctx context.Context, ep control.Endpoint) (control.EndpointStats, error) {
	var s control.EndpointStats
	err := d.read(ep.Sandbox, func(sb *Sandbox) error {
		var err error
		s, err = d.modeFor(sb, ep).Stats(ctx, sb, ep)
		return err
	})
	if err != nil {
		return s, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	return s, nil
}

// Reconcile makes the pinned state match the saved one after an agent restart: each endpoint
// is added again without resetting its counters (entries rewritten, links updated in place,
// never re-created when they exist), entries of endpoints that no longer exist removed, and
// the route table rewritten.
func (d *Dataplane) Reconcile(ctx context.Context, s control.Sandbox, eps []control.Endpoint, routes []control.Route) error {
	sb, err := d.get(s.ID)
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", s.ID, err)
	}
	keep := map[uint32]bool{}
	for _, ep := range eps {
		keep[ep.Slot] = true
		if err := d.add(ctx, ep, false); err != nil {
			// A device that vanished while we were down is reported, not fatal: the rest
			// of the sandbox must keep working.
			d.log.Warn("reconcile endpoint", "sandbox", s.ID, "nic", ep.NIC, "err", err)
		}
	}
	em := maps.ForSandbox(sb.lsb.Maps()).Endpoints
	all, err := em.All()
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", s.ID, err)
	}
	for ifindex, e := range all {
		if !keep[e.Slot] {
			em.Remove(ifindex)
		}
	}
	// The links of endpoints the state no longer has go with their map entries: a program
	// left on a device would keep acting on its frames with entries that are gone.
	used := map[string]bool{}
	for _, ep := range eps {
		used[ep.Tap], used[ep.Uplink] = true, true
		if ep.Mode == control.ModeMacvtapBPF {
			used[macvtapName(ep)] = true
		}
	}
	devs, err := sb.lsb.LinkedDevices()
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", s.ID, err)
	}
	for _, dev := range devs {
		if used[dev] {
			continue
		}
		d.log.Warn("reconcile: detaching the programs of a device no endpoint uses", "sandbox", s.ID, "device", dev)
		if err := sb.lsb.Detach(s.NetNS, dev); err != nil {
			return fmt.Errorf("reconcile %s: %w", s.ID, err)
		}
		if err := sb.lsb.DetachXDP(s.NetNS, dev); err != nil {
			return fmt.Errorf("reconcile %s: %w", s.ID, err)
		}
	}
	return d.SetRoutes(ctx, s.ID, routes)
}
