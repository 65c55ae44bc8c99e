package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/maps"
)

// lbState is what this process last wrote into a sandbox's load balancer, so an edit writes
// only what changed. It is nil after a start: the first sync rebuilds the whole table under a
// new generation, which is also how the pinned state is reconciled after an agent restart.
type lbState struct {
	services map[ipvs.ServiceKey]ipvs.Service
	budgets  map[ipvs.ServiceKey]maps.Budget // map entries each service takes
	used     maps.Budget                     // map entries of the live generation
	backends map[uint32]maps.Backend
	timeouts ipvs.Timeouts
}

// putService writes one service of the live generation after checking that the maps have room
// for it beside everything live (PutService writes the new revision before it frees the old).
func (st *lbState) putService(lb maps.LB, gen uint8, s ipvs.Service) error {
	spec, err := serviceSpec(s)
	if err != nil {
		return err
	}
	if err := lb.CheckRoom(st.used, spec.Budget()); err != nil {
		return fmt.Errorf("service %s: %w", s.ServiceKey, err)
	}
	if err := lb.PutService(gen, spec); err != nil {
		return err
	}
	st.used = st.used.Add(spec.Budget()).Add(neg(st.budgets[s.ServiceKey]))
	st.services[s.ServiceKey] = s
	st.budgets[s.ServiceKey] = spec.Budget()
	return nil
}

func (st *lbState) deleteService(lb maps.LB, gen uint8, k ipvs.ServiceKey) error {
	if err := lb.DeleteService(gen, k.Addr, uint8(k.Proto)); err != nil {
		return err
	}
	st.used = st.used.Add(neg(st.budgets[k]))
	delete(st.services, k)
	delete(st.budgets, k)
	return nil
}

func neg(b maps.Budget) maps.Budget { return maps.Budget{Slots: -b.Slots, Buckets: -b.Buckets} }

func (sb *Sandbox) lbMaps() maps.LB { return maps.ForSandbox(sb.lsb.Maps()).LB }

// serviceSpec translates a service of the rule table into what the datapath needs: the pick
// sequence for rr, the buckets for sh/dh, the real servers in kernel order for the others
// (with their reduced weights for wrr). No scheduler takes more map entries than the service
// has rules (maps.ServiceSpec).
func serviceSpec(s ipvs.Service) (maps.ServiceSpec, error) {
	sched, err := maps.ParseScheduler(s.Scheduler)
	if err != nil {
		return maps.ServiceSpec{}, err
	}
	spec := maps.ServiceSpec{VIP: s.Addr, Proto: uint8(s.Proto), ID: s.ID, Sched: sched, Persist: s.Persistent, PMask: s.Netmask}
	ids := func(idx []int) []uint32 {
		out := make([]uint32, len(idx))
		for i, x := range idx {
			if x >= 0 {
				out[i] = s.Servers[x].ID
			}
		}
		return out
	}
	// rr, sh and dh get their tables from the rule engine; wrr and the load-based ones walk
	// the real servers in kernel order. A slot also carries its real server's address, which
	// rr and wrr then need not look up.
	switch t := s.Tables(); {
	case sched == maps.SchedRR:
		spec.Slots = ids(t.Sequence)
		spec.Addrs = make([]netip.AddrPort, len(t.Sequence))
		for i, x := range t.Sequence {
			if x >= 0 {
				spec.Addrs[i] = s.Servers[x].Addr
			}
		}
	case t.Buckets != nil:
		if len(s.Servers) > 0 {
			spec.Buckets = ids(t.Buckets[:])
		}
	default:
		spec.Slots = make([]uint32, len(s.Servers))
		spec.Addrs = make([]netip.AddrPort, len(s.Servers))
		for i, d := range s.Servers {
			spec.Slots[i] = d.ID
			spec.Addrs[i] = d.Addr
		}
		if sched == maps.SchedWRR {
			w, _ := ipvs.WRRWeights(s.Weights())
			spec.Weights = make([]uint16, len(w))
			for i, x := range w {
				spec.Weights[i] = uint16(x)
			}
		}
	}
	return spec, nil
}

func backendOf(d ipvs.Server) maps.Backend {
	return maps.Backend{Addr: d.Addr, Weight: uint16(d.Weight)}
}

// backendsOf is every real server of t by id, in a map made at its final size (RestoreLB
// says why).
func backendsOf(t *ipvs.Table) map[uint32]maps.Backend {
	n := 0
	for _, s := range t.Services {
		n += len(s.Servers)
	}
	out := make(map[uint32]maps.Backend, n)
	for _, s := range t.Services {
		for _, dst := range s.Servers {
			out[dst.ID] = backendOf(dst)
		}
	}
	return out
}

func sameService(a, b ipvs.Service) bool {
	return a.ID == b.ID && a.Scheduler == b.Scheduler && a.Persistent == b.Persistent && a.Netmask == b.Netmask &&
		slices.Equal(a.Servers, b.Servers)
}

// SetLB makes the sandbox's load balancer match table t, writing only what changed since the
// last call. Established connections keep their real servers.
func (d *Dataplane) SetLB(ctx context.Context, id string, t *ipvs.Table) error {
	sb, err := d.get(id)
	if err != nil {
		return fmt.Errorf("set lb: %w", err)
	}
	sb.waitLate()
	if sb.lb == nil {
		return d.RestoreLB(ctx, id, t)
	}
	lb := sb.lbMaps()
	cfg, err := maps.ReadConfig(lb.Config)
	if err != nil {
		return fmt.Errorf("set lb of %s: %w", id, err)
	}
	gen := uint8(cfg.LbGen)
	want := map[ipvs.ServiceKey]ipvs.Service{}
	for _, s := range t.Services {
		want[s.ServiceKey] = *s
	}
	wantBE := backendsOf(t)
	// Real servers first, so every slot written next points at an existing one.
	for beID, b := range wantBE {
		if old, ok := sb.lb.backends[beID]; ok && old == b {
			continue
		}
		if err := lb.PutBackend(beID, b); err != nil {
			return fmt.Errorf("set lb of %s: %w", id, err)
		}
		sb.lb.backends[beID] = b
	}
	// Removed services first, so their entries make room for the changed ones.
	for k := range sb.lb.services {
		if _, ok := want[k]; !ok {
			if err := sb.lb.deleteService(lb, gen, k); err != nil {
				return fmt.Errorf("set lb of %s: %w", id, err)
			}
		}
	}
	for k, s := range want {
		if old, ok := sb.lb.services[k]; ok && sameService(old, s) {
			continue
		}
		if err := sb.lb.putService(lb, gen, s); err != nil {
			return fmt.Errorf("set lb of %s: %w", id, err)
		}
	}
	for beID := range sb.lb.backends {
		if _, ok := wantBE[beID]; !ok {
			if err := lb.DeleteBackend(beID); err != nil {
				return fmt.Errorf("set lb of %s: %w", id, err)
			}
			delete(sb.lb.backends, beID)
		}
	}
	if to := t.Timeouts(); to != sb.lb.timeouts || (len(want) > 0) != (cfg.Flags&maps.ConfigLB != 0) {
		applyTimeouts(&cfg, to)
		if len(want) > 0 {
			cfg.Flags |= maps.ConfigLB
		}
		if err := maps.WriteConfig(lb.Config, cfg); err != nil {
			return fmt.Errorf("set lb of %s: %w", id, err)
		}
		sb.lb.timeouts = to
	}
	return nil
}

func applyTimeouts(cfg *maps.Config, to ipvs.Timeouts) {
	cfg.TcpTimeout, cfg.TcpfinTimeout, cfg.UdpTimeout = to.TCP, to.TCPFin, to.UDP
}

// RestoreLB installs table t as a whole: every service is written under the next generation
// beside the live one and the datapath is switched to it with one write, so it sees either
// none of the new rules or all of them. It is how a restore, a clear and the first sync
// after a start are applied. It returns once the datapath serves t: the real servers the
// datapath does not read for t (those of IPv4 rr and wrr services without persistence, see
// splitLate) are written after the switch, and whatever reads them waits for that (writeLate,
// WaitLB).
func (d *Dataplane) RestoreLB(ctx context.Context, id string, t *ipvs.Table) error {
	sb, err := d.get(id)
	if err != nil {
		return fmt.Errorf("restore lb: %w", err)
	}
	sb.waitLate()
	lb := sb.lbMaps()
	cfg, err := maps.ReadConfig(lb.Config)
	if err != nil {
		return fmt.Errorf("restore lb of %s: %w", id, err)
	}
	oldGen := uint8(cfg.LbGen)
	gen := oldGen + 1
	// The maps are made at their final size: grown from empty, their rehashing took 3-4 ms of
	// CPU per 20000-rule restore before the first entry was written (bench/ctlperf,
	// BenchmarkRestorePush).
	st := &lbState{services: make(map[ipvs.ServiceKey]ipvs.Service, len(t.Services)),
		budgets:  make(map[ipvs.ServiceKey]maps.Budget, len(t.Services)),
		backends: backendsOf(t), timeouts: t.Timeouts()}
	now, late := splitLate(t, st.backends)
	specs := make([]maps.ServiceSpec, 0, len(t.Services))
	for _, s := range t.Services {
		spec, err := serviceSpec(*s)
		if err != nil {
			return fmt.Errorf("restore lb of %s: %w", id, err)
		}
		specs = append(specs, spec)
		st.services[s.ServiceKey] = *s
		st.budgets[s.ServiceKey] = spec.Budget()
		st.used = st.used.Add(spec.Budget())
	}
	// The new generation is written beside the live one: check that both fit before writing
	// anything. After a start this process does not know what the live one takes: count it.
	var live maps.Budget
	if sb.lb != nil {
		live = sb.lb.used
	} else if live, err = lb.Usage(); err != nil {
		return fmt.Errorf("restore lb of %s: %w", id, err)
	}
	if err := lb.CheckRoom(live, st.used); err != nil {
		return fmt.Errorf("restore lb of %s: %w", id, err)
	}
	// Fresh: this process knows the table was empty, so every id is new and nothing old is
	// left to free. After a start (sb.lb nil) the pinned table may hold anything.
	fresh := sb.lb != nil && len(sb.lb.services) == 0 && len(sb.lb.backends) == 0
	var oldBE map[uint32]bool
	if !fresh {
		if oldBE, err = lb.BackendIDs(); err != nil {
			return fmt.Errorf("restore lb of %s: %w", id, err)
		}
	}
	// undo removes what a failed restore wrote: the new generation and the real servers it
	// added, so nothing of it is left.
	undo := func() {
		lb.DeleteGeneration(gen)
		for beID := range st.backends {
			if !oldBE[beID] {
				lb.DeleteBackend(beID)
			}
		}
	}
	// The real servers and the new generation's services go into different maps, and nothing
	// live reads what either writes (the generation is not switched to yet; a live slot names
	// no new real server): write them at once, on both CPUs. The real servers the new
	// generation does not read (splitLate) are written after the switch; their prefilter bits
	// are set now, as replies from them pass the prefilter from the switch on.
	// The counters' entries of every id are claimed before the switch too (maps.LB.ClaimCounters:
	// the datapath counts only in entries its ids own), the late real servers' as well.
	svcIDs, beIDs := make([]uint32, 0, len(specs)), make([]uint32, 0, len(st.backends))
	for _, s := range specs {
		svcIDs = append(svcIDs, s.ID)
	}
	for beID := range st.backends {
		beIDs = append(beIDs, beID)
	}
	beErr, claimErr := make(chan error, 1), make(chan error, 1)
	go func() {
		beErr <- errors.Join(lb.PutBackends(now, fresh), lb.MarkRealServers(late))
	}()
	go func() { claimErr <- lb.ClaimCounters(svcIDs, beIDs, fresh) }()
	svcErr := lb.PutServices(gen, specs)
	if err := errors.Join(<-beErr, <-claimErr, svcErr); err != nil {
		undo()
		return fmt.Errorf("restore lb of %s: %w", id, err)
	}
	cfg.LbGen = uint32(gen)
	applyTimeouts(&cfg, st.timeouts)
	if len(specs) > 0 {
		cfg.Flags |= maps.ConfigLB
	}
	if err := maps.WriteConfig(lb.Config, cfg); err != nil {
		undo()
		return fmt.Errorf("restore lb of %s: %w", id, err)
	}
	// The switch is done; what follows only frees what the datapath no longer reads. When
	// this process knows the old table was empty there is nothing to free.
	if !fresh {
		if err := lb.DeleteGeneration(oldGen); err != nil {
			d.log.Warn("restore lb: old generation not freed", "sandbox", id, "err", err)
		}
		lb.DeleteBackendsExcept(st.backends)
	}
	sb.lb = st
	d.writeLate(sb, id, late)
	return nil
}

// splitLate splits the real servers of table t (all, by id) into those the datapath may read
// from the switch to t's generation on (now) and those it does not read for that generation
// (late), which a restore writes after the switch (writeLate), so that the answer waits for
// fewer map inserts (15000 of 35000 at 20000 rr rules).
//
// A real server is late when every service naming it has an IPv4 VIP, is rr or wrr, and has
// no persistence, and its own address is IPv4: such a service's slots carry their real
// server's address and port (maps.ServiceSpec.Addrs, struct lb_slot in bpf/lib/lb.h), and its
// new connections take them from the slot. Every other reader of kdp_lb_be in the datapath is
// on a path such a service never takes: the lc family's scan (lc, wlc, sed, nq, and lblc and
// lblcr, which also check their locality's real server), persistence (its template's real
// server must exist), sh and dh (bucket tables of ids), IPv6 services (addresses in
// kdp_lb_be6, and pick without an address), and a slot without an address (one an older
// agent wrote, converted by the loader's migration; never one written from t).
func splitLate(t *ipvs.Table, all map[uint32]maps.Backend) (now, late map[uint32]maps.Backend) {
	// The real servers the datapath reads: usually none (a restore of rr services), and then
	// late is all itself. A map of its own (15000 entries, 1.8 MB, one by one with a lookup in
	// all and in need each) cost the restore as much CPU as the writes of its 5000 service
	// entries, mostly the page faults of its fresh memory (perf record of BenchmarkRestoreCLI's
	// agent). Sharing all is safe: the late write only reads it, and whatever changes the
	// table's real servers (SetLB, SetLBService, the next RestoreLB) waits for that write first.
	var need []uint32
	for _, s := range t.Services {
		ok := s.Addr.Addr().Is4() && (s.Scheduler == "rr" || s.Scheduler == "wrr") && s.Persistent == 0
		for _, dst := range s.Servers {
			if !ok || !dst.Addr.Addr().Is4() {
				need = append(need, dst.ID)
			}
		}
	}
	now = make(map[uint32]maps.Backend, len(need))
	if len(need) == 0 {
		return now, all
	}
	late = make(map[uint32]maps.Backend, len(all)-len(need))
	for _, id := range need {
		now[id] = all[id]
	}
	for id, be := range all {
		if _, ok := now[id]; !ok {
			late[id] = be
		}
	}
	return now, late
}

// lateWriteHook, when set (tests), runs in the late write before anything is written; an
// error it returns fails the write.
var lateWriteHook func(sandbox string) error

// writeLate writes the real servers late after a restore's switch, on a goroutine of its own,
// so that the restore answers without them. Nothing is wrong meanwhile: the datapath does not
// read them for the live generation (splitLate) and their prefilter bits are set; what the
// control plane does that reads kdp_lb_be waits for the write first (waitLate): the next
// edit, restore or clear (SetLB, SetLBService, RestoreLB), the sweeper's recount (which
// deletes the counters of real servers it does not find), the listings' and the metrics'
// counters (they sweep first), and the sandbox's removal and the agent's close (the write
// holds the sandbox's closing lock for reading, so its maps stay open until it is done).
//
// A write that fails (it should not: nothing else writes kdp_lb_be meanwhile, and the
// restore's real servers fit) is logged and forgets what this process wrote (sb.lb nil):
// the next change rebuilds the whole table under a new generation, as the first sync after a
// start does, and an agent killed before the write ended does the same at its start.
func (d *Dataplane) writeLate(sb *Sandbox, id string, late map[uint32]maps.Backend) {
	if len(late) == 0 {
		return
	}
	sb.closing.RLock()
	if sb.closed {
		sb.closing.RUnlock()
		return
	}
	hook := lateWriteHook
	done := make(chan struct{})
	sb.lateMu.Lock()
	sb.late = done
	sb.lateMu.Unlock()
	lb := sb.lbMaps()
	st := sb.lb
	go func() {
		defer close(done)
		defer sb.closing.RUnlock()
		var err error
		if hook != nil {
			err = hook(id)
		}
		if err == nil {
			err = lb.PutLateBackends(late)
		}
		if err != nil {
			d.log.Error("restore lb: real servers not written after the switch; the next change rewrites the whole table",
				"sandbox", id, "servers", len(late), "err", err)
			if sb.lb == st {
				sb.lb = nil
			}
		}
	}()
}

// WaitLB waits until every entry of the sandbox's load-balancer table is written: a restore
// answers once the datapath serves its table, and writes the real servers the datapath does
// not read for it after that (RestoreLB, writeLate). For what times or checks the whole write
// (benchmarks, tests); every operation that needs those entries waits for them itself.
func (d *Dataplane) WaitLB(ctx context.Context, id string) error {
	sb, err := d.get(id)
	if err != nil {
		return fmt.Errorf("wait lb: %w", err)
	}
	sb.lateMu.Lock()
	done := sb.late
	sb.lateMu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitLate waits until the real servers of the sandbox's last restore are written (writeLate).
func (sb *Sandbox) waitLate() {
	sb.lateMu.Lock()
	done := sb.late
	sb.lateMu.Unlock()
	if done != nil {
		<-done
	}
}

// SetLBService is SetLB for a change confined to one service (the common kata-ipvs command):
// only that service and its real servers are compared and written, so an edit costs the same
// whatever the size of the table. t is the whole new table; k names the service that changed.
func (d *Dataplane) SetLBService(ctx context.Context, id string, t *ipvs.Table, k ipvs.ServiceKey) error {
	sb, err := d.get(id)
	if err != nil {
		return fmt.Errorf("set lb: %w", err)
	}
	sb.waitLate()
	if sb.lb == nil || t.Timeouts() != sb.lb.timeouts {
		return d.SetLB(ctx, id, t)
	}
	lb := sb.lbMaps()
	cfg, err := maps.ReadConfig(lb.Config)
	if err != nil {
		return fmt.Errorf("set lb of %s: %w", id, err)
	}
	gen := uint8(cfg.LbGen)
	old, hadOld := sb.lb.services[k]
	svc, ok := t.Service(k)
	if ok {
		for _, dst := range svc.Servers {
			b := backendOf(dst)
			if cur, ok := sb.lb.backends[dst.ID]; ok && cur == b {
				continue
			}
			if err := lb.PutBackend(dst.ID, b); err != nil {
				return fmt.Errorf("set lb of %s: %w", id, err)
			}
			sb.lb.backends[dst.ID] = b
		}
		if !hadOld || !sameService(old, svc) {
			if err := sb.lb.putService(lb, gen, svc); err != nil {
				return fmt.Errorf("set lb of %s: %w", id, err)
			}
		}
	} else if hadOld {
		if err := sb.lb.deleteService(lb, gen, k); err != nil {
			return fmt.Errorf("set lb of %s: %w", id, err)
		}
	}
	if hadOld {
		keep := map[uint32]bool{}
		for _, dst := range svc.Servers {
			keep[dst.ID] = true
		}
		for _, dst := range old.Servers {
			if !keep[dst.ID] {
				if err := lb.DeleteBackend(dst.ID); err != nil {
					return fmt.Errorf("set lb of %s: %w", id, err)
				}
				delete(sb.lb.backends, dst.ID)
			}
		}
	}
	if want := len(sb.lb.services) > 0; want != (cfg.Flags&maps.ConfigLB != 0) {
		if want {
			cfg.Flags |= maps.ConfigLB
		}
		if err := maps.WriteConfig(lb.Config, cfg); err != nil {
			return fmt.Errorf("set lb of %s: %w", id, err)
		}
	}
	return nil
}

// lbCounters is a snapshot of a sandbox's load-balancer counters, for the listings.
type lbCounters struct {
	stats map[maps.LBStatsKey]maps.LBStats
	conns map[uint32]maps.LBConns
	rates map[maps.LBStatsKey]ipvs.Stats
}

func (c *lbCounters) stats2(kind, id uint32) ipvs.Stats {
	s := c.stats[maps.LBStatsKey{Kind: kind, Id: id}]
	r := c.rates[maps.LBStatsKey{Kind: kind, Id: id}]
	return ipvs.Stats{Conns: s.Conns, InPkts: s.Inpkts, OutPkts: s.Outpkts, InBytes: s.Inbytes, OutBytes: s.Outbytes,
		CPS: r.CPS, InPPS: r.InPPS, OutPPS: r.OutPPS, InBPS: r.InBPS, OutBPS: r.OutBPS}
}

func (c *lbCounters) Service(id uint32) ipvs.ServiceCounters {
	return ipvs.ServiceCounters{Stats: c.stats2(maps.StatsService, id)}
}

func (c *lbCounters) Server(id uint32) ipvs.ServerCounters {
	n := c.conns[id]
	return ipvs.ServerCounters{ActiveConn: uint32(max(n.Active, 0)), InActConn: uint32(max(n.Inactive, 0)), Stats: c.stats2(maps.StatsBackend, id)}
}

// LBCounters returns the live counters of the sandbox's load balancer. Connection counts are
// recounted from the connection table first, so they are exact at the time of the call.
func (d *Dataplane) LBCounters(ctx context.Context, id string) (ipvs.Counters, error) {
	c := &lbCounters{}
	err := d.read(id, func(sb *Sandbox) error {
		lb := sb.lbMaps()
		if _, err := d.sweep(sb, nil); err != nil {
			return err
		}
		var err error
		if c.stats, err = lb.AllStats(); err != nil {
			return fmt.Errorf("lb counters of %s: %w", id, err)
		}
		if c.conns, err = lb.AllConns(); err != nil {
			return fmt.Errorf("lb counters of %s: %w", id, err)
		}
		d.mu.Lock()
		c.rates = sb.rates
		d.mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lb counters: %w", err)
	}
	return c, nil
}

// ConnTable returns how many live entries the sandbox's IPv4 connection table holds and how
// many it can hold (two entries per connection: the original direction and the reply). When
// a bucket of the table is full, a new connection takes the slot of its oldest entry, which
// resets that connection.
func (d *Dataplane) ConnTable(ctx context.Context, id string) (entries, capacity int, err error) {
	err = d.read(id, func(sb *Sandbox) error {
		lb := sb.lbMaps()
		capacity = lb.ConnCapacity()
		cfg, err := maps.ReadConfig(lb.Config)
		if err != nil {
			return err
		}
		entries, err = lb.ConnEntries(maps.MonotonicNow(), cfg)
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("connection table of %s: %w", id, err)
	}
	return entries, capacity, nil
}

// MapMemory returns the kernel memory (memlock) of each of the sandbox's BPF maps, by map
// name.
func (d *Dataplane) MapMemory(ctx context.Context, id string) (map[string]uint64, error) {
	out := map[string]uint64{}
	err := d.read(id, func(sb *Sandbox) error {
		return maps.Memory(sb.lsb.Maps(), out)
	})
	if err != nil {
		return nil, fmt.Errorf("map memory of %s: %w", id, err)
	}
	return out, nil
}

// CleanupConns deletes the connection entries whose original destination (the virtual
// service the guest addressed, or the real server it was sent to) is dst, for protocol proto,
// so that the next packet of those flows is scheduled afresh. It returns how many it deleted.
//
// It runs under Dataplane.read, as the sweeper does: its callers (kata-ipvs' cleanup, the
// cluster tables) hold locks of their own, not the one a sandbox's removal takes, and the
// clears write into the connection table's mapping, which closing the sandbox unmaps.
func (d *Dataplane) CleanupConns(ctx context.Context, id string, dst netip.Addr, proto uint8) (int, error) {
	var res maps.SweepResult
	err := d.read(id, func(sb *Sandbox) error {
		var err error
		res, err = d.sweep(sb, func(c maps.Conn) bool {
			return c.Proto == proto && (c.Service.Addr() == dst || c.Server.Addr() == dst)
		})
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("cleanup of %s: %w", id, err)
	}
	return res.Expired, nil
}

func (d *Dataplane) sweep(sb *Sandbox, match func(maps.Conn) bool) (maps.SweepResult, error) {
	sb.waitLate() // the recount deletes the counters of real servers it does not find
	lb := sb.lbMaps()
	cfg, err := maps.ReadConfig(lb.Config)
	if err != nil {
		return maps.SweepResult{}, err
	}
	if cfg.Flags&maps.ConfigLB == 0 && match == nil {
		return maps.SweepResult{}, nil
	}
	return lb.Sweep(maps.MonotonicNow(), cfg, match)
}

// lbSample is the load balancer's counters as read at one time.
type lbSample struct {
	at    time.Time
	stats map[maps.LBStatsKey]maps.LBStats
}

// Sweep expires the idle connections of every sandbox's load balancer, keeps the real
// servers' connection counts exact, and updates the rate estimates (ipvsadm --rate) from the
// counters' change since the previous Sweep. The agent runs it every second (control/watch).
// A sandbox that fails is reported in the error and does not stop the others.
func (d *Dataplane) Sweep(ctx context.Context) error {
	d.mu.Lock()
	sbs := make(map[string]*Sandbox, len(d.sandboxes))
	for id, sb := range d.sandboxes {
		sbs[id] = sb
	}
	d.mu.Unlock()
	var errs []error
	for id, sb := range sbs {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var cur map[maps.LBStatsKey]maps.LBStats
		now := time.Now()
		err := d.read(id, func(sb *Sandbox) error {
			if _, err := d.sweep(sb, nil); err != nil {
				return fmt.Errorf("sweep connections of %s: %w", id, err)
			}
			now = time.Now()
			lb := sb.lbMaps()
			cfg, err := maps.ReadConfig(lb.Config)
			if err != nil {
				return fmt.Errorf("read lb config of %s: %w", id, err)
			}
			if cfg.Flags&maps.ConfigLB == 0 {
				return nil // no services: no counter moves, and the arrays are not read
			}
			if cur, err = lb.AllStats(); err != nil {
				return fmt.Errorf("read lb counters of %s: %w", id, err)
			}
			return nil
		})
		if errors.Is(err, ErrNoSandbox) {
			continue // removed since the list was taken
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		d.mu.Lock()
		prev := sb.swept
		rates := map[maps.LBStatsKey]ipvs.Stats{}
		if dt := now.Sub(prev.at).Seconds(); prev.stats != nil && dt > 0 {
			for k, c := range cur {
				o := prev.stats[k]
				r := func(a, b uint64) uint64 {
					if a < b {
						return 0
					}
					return uint64(float64(a-b) / dt)
				}
				rates[k] = ipvs.Stats{CPS: r(c.Conns, o.Conns), InPPS: r(c.Inpkts, o.Inpkts), OutPPS: r(c.Outpkts, o.Outpkts),
					InBPS: r(c.Inbytes, o.Inbytes), OutBPS: r(c.Outbytes, o.Outbytes)}
			}
		}
		sb.swept = lbSample{at: now, stats: cur}
		sb.rates = rates
		d.mu.Unlock()
	}
	return errors.Join(errs...)
}
