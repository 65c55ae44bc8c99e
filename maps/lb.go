package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
)

// Scheduler is enum kdp_sched: the datapath numbers the schedulers from 1 in the order of
// ipvs.Schedulers, the rule engine's list, which is the one list of their names.
type Scheduler uint8

// Schedulers, numbered as the datapath knows them.
const (
	SchedRR    Scheduler = 1
	SchedWRR   Scheduler = 2
	SchedLC    Scheduler = 3
	SchedWLC   Scheduler = 4
	SchedLBLC  Scheduler = 5
	SchedLBLCR Scheduler = 6
	SchedDH    Scheduler = 7
	SchedSH    Scheduler = 8
	SchedSED   Scheduler = 9
	SchedNQ    Scheduler = 10
)

// ParseScheduler maps an ipvsadm scheduler name to the datapath's number.
func ParseScheduler(name string) (Scheduler, error) {
	if i := slices.Index(ipvs.Schedulers, name); i >= 0 {
		return Scheduler(i + 1), nil
	}
	return 0, fmt.Errorf("unknown scheduler %q", name)
}

func (s Scheduler) String() string {
	if s >= 1 && int(s) <= len(ipvs.Schedulers) {
		return ipvs.Schedulers[s-1]
	}
	return fmt.Sprintf("sched(%d)", uint8(s))
}

// HashBuckets is the size of the sh/dh bucket table (ipvs.SHHash and ipvs.DHHash index it).
const HashBuckets = 256

// Connection states (enum kdp_ct_state).
const (
	CTUDP    uint8 = 0
	CTTCPEst uint8 = 1
	CTTCPFin uint8 = 2
)

// LBStatsKey names the counters of a service (Kind StatsService) or a real server
// (StatsBackend): the owner an entry of the counter array names.
type LBStatsKey struct {
	Kind uint32
	Id   uint32
}

// LB stats kinds (enum kdp_lb_stats_kind).
const (
	StatsService uint32 = 1
	StatsBackend uint32 = 2
)

// The load balancer's keys and values as the generated types of the object: counters are
// used as they are; entries holding addresses are encoded from Backend, ServiceSpec and Conn.
type (
	// LBStats is struct lb_stats: the counters of a service or a real server.
	LBStats = loader.DatapathLbStats
	// LBConns is struct lb_conns: a real server's connection counts.
	LBConns = loader.DatapathLbConns

	lbCnt = loader.DatapathLbCnt // an entry of the counter array (kdp_lb_stats)
	lbCnc = loader.DatapathLbCnc // an entry of the connection count array (kdp_lb_conns)

	svcKey   = loader.DatapathLbSvcKey
	svc      = loader.DatapathLbSvc
	hashTab  = loader.DatapathLbHash
	svc6Key  = loader.DatapathLbSvc6Key
	be6      = loader.DatapathLbBackend6
	ct6Key   = loader.DatapathCt6Key
	ct6Ent   = loader.DatapathCt6Entry
	backend  = loader.DatapathLbBackend
	ctKey    = loader.DatapathCtKey
	ctEntry  = loader.DatapathCtEntry
	ctSlot   = loader.DatapathCtSlot
	ctBucket = loader.DatapathCtBucket
)

// Backend is a real server as the datapath holds it (struct lb_backend).
type Backend struct {
	Addr   netip.AddrPort
	Weight uint16
}

// encode returns the real server's kdp_lb_be entry (for an IPv6 one: address 0, the weight
// the schedulers read) and, for IPv6, its kdp_lb_be6 entry.
func (b Backend) encode() (backend, *be6, error) {
	if a := b.Addr.Addr(); a.Is6() && !a.Is4In6() {
		w, _ := v6(a) // IPv6, so it encodes
		return backend{Port: be16(b.Addr.Port()), Weight: b.Weight},
			&be6{Ip: w, Port: be16(b.Addr.Port()), Weight: b.Weight}, nil
	}
	a, err := v4(b.Addr.Addr())
	if err != nil {
		return backend{}, nil, fmt.Errorf("real server %s: %w", b.Addr, err)
	}
	return backend{Ip: a, Port: be16(b.Addr.Port()), Weight: b.Weight}, nil, nil
}

// LB is the load balancer's maps of one sandbox.
type LB struct {
	// IPv6 (see bpf/lib/lb.h): masters, real server addresses, connections, persistence.
	Svc6     *ebpf.Map
	Backend6 *ebpf.Map
	CT6      *ebpf.Map
	Aff6     *ebpf.Map

	Svc     *ebpf.Map
	Hash    *ebpf.Map // sh/dh bucket tables (struct lb_hash)
	Backend *ebpf.Map
	Stats   *ebpf.Map
	Conns   *ebpf.Map
	CT      *ebpf.Map
	Aff     *ebpf.Map
	Config  *ebpf.Map
	VIPs    *ebpf.Map // the VIP prefilter (lbvips.go); nil: none kept

	// CTMem is CT's memory mapping (loader.Maps.LBCTMem), through which the table is read
	// and written in place (ctmem.go); nil: CT is not mapped, and the batched paths are
	// taken. The loader's Sandbox owns it and unmaps it when it closes: like the maps' file
	// descriptors, an LB is used only while its Sandbox is open.
	CTMem []byte
	// StatsMem and ConnsMem are the counter arrays' (Stats', Conns') memory mappings
	// (loader.Maps.LBStatsMem, LBConnsMem), owned like CTMem: a restore claims its ids'
	// entries, and the sweeper and the listings read them, in place. nil: not mapped, the
	// arrays are read and written with system calls.
	StatsMem []byte
	ConnsMem []byte
}

// ReadConfig reads the sandbox's config entry.
func ReadConfig(m *ebpf.Map) (Config, error) {
	var c Config
	if err := m.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	return c, nil
}

// WriteConfig writes the sandbox's config entry (one atomic map update).
func WriteConfig(m *ebpf.Map, c Config) error {
	if err := m.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// ReadStats reads the counters of a service (StatsService) or real server (StatsBackend):
// zero when the id owns no entry (see ClaimCounters), or its half of the arrays is not there (a
// cluster id in a sandbox made without a cluster table).
func (l LB) ReadStats(kind, id uint32) (LBStats, error) {
	var c lbCnt
	err := l.Stats.Lookup(loader.CounterSlot(id), &c)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return LBStats{}, nil
	}
	if err != nil {
		return LBStats{}, fmt.Errorf("read counters of %d: %w", id, err)
	}
	if c.Id != id || c.Kind != kind {
		return LBStats{}, nil
	}
	return c.S, nil
}

// ReadConns reads the connection counts of real server id: zero when it owns no entry.
func (l LB) ReadConns(id uint32) (LBConns, error) {
	var c lbCnc
	err := l.Conns.Lookup(loader.CounterSlot(id), &c)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return LBConns{}, nil
	}
	if err != nil {
		return LBConns{}, fmt.Errorf("read connection counts of %d: %w", id, err)
	}
	if c.Id != id {
		return LBConns{}, nil
	}
	return c.C, nil
}

// SetConns writes the connection counts of real server id into its entry, claiming it (for
// tests and repairs; the sweeper's recount keeps them exact).
func (l LB) SetConns(id uint32, n LBConns) error {
	if err := l.Conns.Update(loader.CounterSlot(id), &lbCnc{Id: id, C: n}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write connection counts of %d: %w", id, err)
	}
	return nil
}

// The counters of services and real servers are arrays indexed by id (loader.CounterSlot),
// each entry naming the id that owns it; the datapath counts in an entry only for its owner
// (bpf/lib/lb.h, lb_cnt_slot, which says why arrays). Only the control plane claims entries:
// ClaimCounters, when a service or real server is installed. An entry its id owns already is
// left alone, so a service edited, a table pushed again with the same ids after an agent
// restart, and an upgrade's counters carried over from the hash maps (loader, convertCounters)
// count on; an entry of another id (deleted: live ids never share one) is rewritten with zero
// counters. Nothing is freed when a service or real server is deleted: its entry stays its
// own, its draining connections count on there unseen, until a new id claims it; a clear and
// a restore delete no counters.

// ClaimCounters makes the counter entries of services svcs and real servers bes theirs
// (their connection counts too for real servers), with zero counters where another id owned
// the entry. Few ids are looked up one by one; many (a restore) read both arrays once. fresh
// says every id is new (a restore into a table this process knows was empty: ids are never
// reused, so none owns its entry yet): the entries are written without reading them first.
func (l LB) ClaimCounters(svcs, bes []uint32, fresh bool) error {
	if len(svcs)+len(bes) <= claimDirectMax && !fresh {
		return l.claimEach(svcs, bes)
	}
	if stats, conns := l.statsMem(), l.connsMem(); stats != nil && conns != nil {
		for _, id := range svcs {
			claimMapped(stats, nil, StatsService, id, fresh)
		}
		for _, id := range bes {
			claimMapped(stats, conns, StatsBackend, id, fresh)
		}
		return nil
	}
	var stats []lbCnt
	var conns []lbCnc
	if !fresh {
		err := concurrently("", func() (err error) { stats, err = dumpArray[lbCnt](l.Stats); return err },
			func() (err error) { conns, err = dumpArray[lbCnc](l.Conns); return err })
		if err != nil {
			return fmt.Errorf("claim counters: %w", err)
		}
	}
	size := l.Stats.MaxEntries()
	var sk, ck []uint32
	var sv []lbCnt
	var cv []lbCnc
	claim := func(kind, id uint32) {
		i := loader.CounterSlot(id)
		if i >= size {
			return // a cluster id without the cluster half: never counted (ReadStats)
		}
		if fresh || stats[i].Id != id || stats[i].Kind != kind {
			sk, sv = append(sk, i), append(sv, lbCnt{Id: id, Kind: kind})
		}
		if kind == StatsBackend && (fresh || conns[i].Id != id) {
			ck, cv = append(ck, i), append(cv, lbCnc{Id: id})
		}
	}
	for _, id := range svcs {
		claim(StatsService, id)
	}
	for _, id := range bes {
		claim(StatsBackend, id)
	}
	return concurrently("claim counters", func() error { return batchUpdate(l.Stats, sk, sv) },
		func() error { return batchUpdate(l.Conns, ck, cv) })
}

// statsMem is the counter array's memory mapping as its entries, nil when it is not mapped.
func (l LB) statsMem() []lbCnt { return mapped[lbCnt](l.StatsMem, l.Stats) }

// connsMem is the connection count array's memory mapping as its entries, nil when not mapped.
func (l LB) connsMem() []lbCnc { return mapped[lbCnc](l.ConnsMem, l.Conns) }

// mapped views mem, the mapping of array m, as m's entries; nil when mem does not hold them
// all. The kernel lays entries out every round_up(value size, 8) bytes: both counter entries
// are multiples of 8.
func mapped[V any](mem []byte, m *ebpf.Map) []V {
	var v V
	n := int(m.MaxEntries())
	if n == 0 || unsafe.Sizeof(v)%8 != 0 || uintptr(m.ValueSize()) != unsafe.Sizeof(v) || len(mem) < n*int(unsafe.Sizeof(v)) {
		return nil
	}
	return unsafe.Slice((*V)(unsafe.Pointer(&mem[0])), n)
}

// claimMapped claims id's entry of kind in place in the mapped arrays (conns nil: no
// connection counts, a service), unless fresh is false and id owns it already. The owner goes
// to 0 first, so the datapath stops counting in the entry for the one before, then the
// counters are zeroed and the new owner written last: no frame counts for id in counters that
// are not yet zero.
func claimMapped(stats []lbCnt, conns []lbCnc, kind, id uint32, fresh bool) {
	i := loader.CounterSlot(id)
	if int(i) >= len(stats) || (conns != nil && int(i) >= len(conns)) {
		return // a cluster id without the cluster half: never counted (ReadStats)
	}
	if e := &stats[i]; fresh || atomic.LoadUint32(&e.Id) != id || atomic.LoadUint32(&e.Kind) != kind {
		// An entry owned by none was never claimed (claims end with an owner), so its
		// counters are zero: only the owner is written, which a restore into a new sandbox
		// does for nearly every id (a tenth of the cost of zeroing them again).
		if atomic.LoadUint32(&e.Id) != 0 {
			atomic.StoreUint32(&e.Id, 0)
			e.S = LBStats{} // the atomic stores order these between the two owners
		}
		e.Kind = kind
		atomic.StoreUint32(&e.Id, id)
	}
	if conns == nil {
		return
	}
	if e := &conns[i]; fresh || atomic.LoadUint32(&e.Id) != id {
		if atomic.LoadUint32(&e.Id) != 0 {
			atomic.StoreUint32(&e.Id, 0)
			e.C = LBConns{}
		}
		atomic.StoreUint32(&e.Id, id)
	}
}

// claimDirectMax is the most ids ClaimCounters looks up one by one (two lookups each) rather
// than reading both arrays (about 3 MiB).
const claimDirectMax = 64

// claimEach is ClaimCounters for a few ids.
func (l LB) claimEach(svcs, bes []uint32) error {
	one := func(kind, id uint32) error {
		i := loader.CounterSlot(id)
		if i >= l.Stats.MaxEntries() {
			return nil // a cluster id without the cluster half: never counted (ReadStats)
		}
		var c lbCnt
		if err := l.Stats.Lookup(i, &c); err != nil {
			return fmt.Errorf("claim counters of %d: %w", id, err)
		}
		if c.Id != id || c.Kind != kind {
			if err := l.Stats.Update(i, &lbCnt{Id: id, Kind: kind}, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("claim counters of %d: %w", id, err)
			}
		}
		if kind != StatsBackend {
			return nil
		}
		var n lbCnc
		if err := l.Conns.Lookup(i, &n); err != nil {
			return fmt.Errorf("claim connection counts of %d: %w", id, err)
		}
		if n.Id != id {
			if err := l.Conns.Update(i, &lbCnc{Id: id}, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("claim connection counts of %d: %w", id, err)
			}
		}
		return nil
	}
	for _, id := range svcs {
		if err := one(StatsService, id); err != nil {
			return err
		}
	}
	for _, id := range bes {
		if err := one(StatsBackend, id); err != nil {
			return err
		}
	}
	return nil
}

// AllStats reads the counters of every service and real server that owns an entry (deleted
// ones too, until their entry is claimed again: callers look up the ids they list).
func (l LB) AllStats() (map[LBStatsKey]LBStats, error) {
	all := l.statsMem()
	if all == nil {
		var err error
		if all, err = dumpArray[lbCnt](l.Stats); err != nil {
			return nil, fmt.Errorf("read counters: %w", err)
		}
	}
	out := map[LBStatsKey]LBStats{}
	for i := range all {
		if id := atomic.LoadUint32(&all[i].Id); id != 0 {
			out[LBStatsKey{Kind: all[i].Kind, Id: id}] = all[i].S
		}
	}
	return out, nil
}

// AllConns reads the connection counts of every real server that owns an entry.
func (l LB) AllConns() (map[uint32]LBConns, error) {
	all := l.connsMem()
	if all == nil {
		var err error
		if all, err = dumpArray[lbCnc](l.Conns); err != nil {
			return nil, fmt.Errorf("read connection counts: %w", err)
		}
	}
	out := map[uint32]LBConns{}
	for i := range all {
		if id := atomic.LoadUint32(&all[i].Id); id != 0 {
			out[id] = all[i].C
		}
	}
	return out, nil
}

// dumpArray reads every entry of an array map, in order, with batched lookups.
func dumpArray[V any](m *ebpf.Map) ([]V, error) {
	n := int(m.MaxEntries())
	out := make([]V, n)
	keys := make([]uint32, min(n, dumpBatchSize))
	var cursor ebpf.MapBatchCursor
	for at := 0; at < n; {
		got, err := m.BatchLookup(&cursor, keys, out[at:at+min(len(keys), n-at)], nil)
		at += got
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := at; i < n; i++ {
				if err := m.Lookup(uint32(i), &out[i]); err != nil {
					return nil, err
				}
			}
			break
		}
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ServiceSpec is what the datapath needs of one service. A service takes its master entry of
// the service map, which holds its first InlineSlots slots, and one slot block per further
// InlineSlots (Budget), and one bucket table for sh and dh: never more than one entry per rule
// it is made of, so the maps sized for 20000 rules hold any mix of schedulers.
type ServiceSpec struct {
	VIP     netip.AddrPort
	Proto   uint8
	ID      uint32
	Sched   Scheduler
	Persist uint32     // seconds, 0 = none
	PMask   netip.Addr // persistence netmask; zero = all ones
	// Slots are real server ids: for rr the pick sequence (its servers of weight > 0), for
	// the others but sh and dh the real servers in kernel order; none for sh and dh.
	Slots []uint32
	// Addrs, when not nil, are the slots' real servers' addresses (the ids' kdp_lb_be
	// entries): an IPv4 one is written into its slot, from which rr and wrr take it without
	// looking the real server up (struct lb_slot in bpf/lib/lb.h). A real server's address
	// never changes under its id.
	Addrs []netip.AddrPort
	// Weights (wrr): each slot's weight divided by the gcd of the weights (ipvs.WRRWeights),
	// which the datapath's wrr walk compares as the kernel's does.
	Weights []uint16
	// Buckets (sh, dh): the HashBuckets real server ids of the bucket table, 0 = no
	// destination; nil for a service without real servers.
	Buckets []uint32
}

// MaxSlots bounds the slots of one service (the slot block number is 16 bits).
const MaxSlots = 65535

// InlineSlots is KDP_LB_INLINE: the slots a master entry holds itself, and a slot block
// holds.
const InlineSlots = len(svc{}.S)

// slotBlocks is the number of slot blocks a service of n slots takes beside its master.
func slotBlocks(n int) int {
	if n <= InlineSlots {
		return 0
	}
	return (n - 1) / InlineSlots
}

// Budget counts entries of the load balancer's service map (IPv4 masters and the slot blocks
// of both families), bucket map (sh/dh tables) and IPv6 master map.
type Budget struct {
	Slots    int
	Buckets  int
	Masters6 int
}

// Add returns the sum of b and o.
func (b Budget) Add(o Budget) Budget {
	return Budget{b.Slots + o.Slots, b.Buckets + o.Buckets, b.Masters6 + o.Masters6}
}

// Fits reports whether need fits in b.
func (b Budget) Fits(need Budget) bool {
	return need.Slots <= b.Slots && need.Buckets <= b.Buckets && need.Masters6 <= b.Masters6
}

func (b Budget) String() string {
	return fmt.Sprintf("%d service entries, %d bucket tables and %d IPv6 masters", b.Slots, b.Buckets, b.Masters6)
}

// Budget returns the entries the service takes.
func (s ServiceSpec) Budget() Budget {
	b := Budget{Slots: 1 + slotBlocks(len(s.Slots))}
	if s.VIP.Addr().Is6() {
		b = Budget{Slots: slotBlocks(len(s.Slots)), Masters6: 1}
	}
	if s.Buckets != nil {
		b.Buckets = 1
	}
	return b
}

// ErrNoRoom: the load balancer's maps cannot take what a command needs. It is checked before
// anything is written.
var ErrNoRoom = errors.New("no room in the load balancer's maps")

// Capacity returns the size of the service and bucket maps.
func (l LB) Capacity() Budget {
	return Budget{Slots: int(l.Svc.MaxEntries()), Buckets: int(l.Hash.MaxEntries()), Masters6: int(l.Svc6.MaxEntries())}
}

// Usage counts the entries in the service and bucket maps (keys only: a few system calls per
// thousand entries).
func (l LB) Usage() (Budget, error) {
	var b Budget
	var err error
	if b.Slots, err = countKeys[svcKey](l.Svc); err != nil {
		return b, fmt.Errorf("count service entries: %w", err)
	}
	if b.Buckets, err = countKeys[svcKey](l.Hash); err != nil {
		return b, fmt.Errorf("count bucket tables: %w", err)
	}
	if b.Masters6, err = countKeys[svc6Key](l.Svc6); err != nil {
		return b, fmt.Errorf("count IPv6 services: %w", err)
	}
	return b, nil
}

func countKeys[K any](m *ebpf.Map) (int, error) {
	var k, next K
	n := 0
	var prev any
	for {
		if err := m.NextKey(prev, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		k = next
		prev = &k
	}
}

// CheckRoom returns ErrNoRoom (wrapped, with the numbers) unless need fits beside used.
func (l LB) CheckRoom(used, need Budget) error {
	c := l.Capacity()
	free := Budget{c.Slots - used.Slots, c.Buckets - used.Buckets, c.Masters6 - used.Masters6}
	if !free.Fits(need) {
		return fmt.Errorf("%w: need %s, %s free of %s", ErrNoRoom, need, free, c)
	}
	return nil
}

func masterKey(gen uint8, vip netip.AddrPort, proto uint8) (svcKey, error) {
	a, err := v4(vip.Addr())
	if err != nil {
		return svcKey{}, fmt.Errorf("service %s: %w", vip, err)
	}
	return svcKey{Vip: a, Vport: be16(vip.Port()), Proto: proto, Gen: gen}, nil
}

// v6SlotsProto marks the slot keys of an IPv6 service (KDP_LB_V6_SLOTS): vip = its id.
const v6SlotsProto = 0xff

// svcRef locates a service's master (kdp_lb_svc for IPv4, kdp_lb_svc6 for IPv6) and the base
// key of its slots and bucket table (the master key for IPv4; for IPv6 a key of its own made
// from the service id, which the master holds).
type svcRef struct {
	v6  bool
	k4  svcKey
	k6  svc6Key
	gen uint8
}

func serviceRef(gen uint8, vip netip.AddrPort, proto uint8) (svcRef, error) {
	if a := vip.Addr(); a.Is6() && !a.Is4In6() {
		w, _ := v6(a) // IPv6, so it encodes
		return svcRef{v6: true, k6: svc6Key{Vip: w, Vport: be16(vip.Port()), Proto: proto, Gen: gen}, gen: gen}, nil
	}
	k, err := masterKey(gen, vip, proto)
	return svcRef{k4: k, gen: gen}, err
}

// base is the key the slots of the service with id are written under.
func (r svcRef) base(id uint32) svcKey {
	if r.v6 {
		return svcKey{Vip: id, Proto: v6SlotsProto, Gen: r.gen}
	}
	return r.k4
}

func (r svcRef) lookup(l LB, m *svc) error {
	if r.v6 {
		return l.Svc6.Lookup(&r.k6, m)
	}
	return l.Svc.Lookup(&r.k4, m)
}

func (r svcRef) update(l LB, m *svc) error {
	if r.v6 {
		return l.Svc6.Update(&r.k6, m, ebpf.UpdateAny)
	}
	return l.Svc.Update(&r.k4, m, ebpf.UpdateAny)
}

func (r svcRef) delete(l LB) error {
	if r.v6 {
		return l.Svc6.Delete(&r.k6)
	}
	return l.Svc.Delete(&r.k4)
}

// blockKey is the key of slot block n (1-based) of revision rev of the service whose blocks
// are keyed under base (svcRef.base).
func blockKey(base svcKey, rev, n uint32) svcKey {
	k := base
	k.Slot = rev<<16 | n&0xffff
	return k
}

// master returns the service's master entry, with its first InlineSlots slots.
func (s ServiceSpec) master(rev uint32) (svc, error) {
	m := svc{Id: s.ID, Count: uint32(len(s.Slots)), Rev: rev, Persist: s.Persist, Sched: uint8(s.Sched), Pmask: 0xffffffff}
	for _, w := range s.Weights {
		m.Wmax = max(m.Wmax, w)
	}
	s.fillSlots(&m, 0)
	if s.VIP.Addr().Is6() {
		// IPv6: the datapath takes the persistence granularity as a prefix length.
		m.Pmask = 128
		if s.PMask.IsValid() {
			m.Pmask = uint32(ipvs.PrefixLen(s.PMask))
		}
		return m, nil
	}
	if s.PMask.IsValid() {
		var err error
		if m.Pmask, err = v4(s.PMask); err != nil {
			return m, fmt.Errorf("service %s: netmask: %w", s.VIP, err)
		}
	}
	return m, nil
}

func (s ServiceSpec) validate() error {
	if len(s.Slots) > MaxSlots {
		return fmt.Errorf("service %s: %d slots > %d", s.VIP, len(s.Slots), MaxSlots)
	}
	if s.Weights != nil && len(s.Weights) != len(s.Slots) {
		return fmt.Errorf("service %s: %d weights for %d slots", s.VIP, len(s.Weights), len(s.Slots))
	}
	if s.Addrs != nil && len(s.Addrs) != len(s.Slots) {
		return fmt.Errorf("service %s: %d addresses for %d slots", s.VIP, len(s.Addrs), len(s.Slots))
	}
	if s.Buckets != nil && len(s.Buckets) != HashBuckets {
		return fmt.Errorf("service %s: %d buckets, want %d", s.VIP, len(s.Buckets), HashBuckets)
	}
	return nil
}

// fillSlots writes slots from..from+InlineSlots-1 of s (those there are) into e's slots: a
// master's (from 0) or a slot block's.
func (s ServiceSpec) fillSlots(e *svc, from int) {
	for j := range e.S {
		i := from + j
		if i >= len(s.Slots) {
			return
		}
		sl := &e.S[j]
		sl.Id = s.Slots[i]
		if s.Weights != nil {
			sl.Weight = s.Weights[i]
		}
		if s.Addrs != nil {
			if a, err := v4(s.Addrs[i].Addr()); err == nil {
				sl.Addr, sl.Port = a, be16(s.Addrs[i].Port())
			}
		}
	}
}

// appendBlocks appends the keys and entries of the slot blocks of s, revision rev, keyed
// under base.
func (s ServiceSpec) appendBlocks(keys []svcKey, vals []svc, base svcKey, rev uint32) ([]svcKey, []svc) {
	nb := slotBlocks(len(s.Slots))
	n := len(vals)
	vals = slices.Grow(vals, nb)[:n+nb]
	clear(vals[n:])
	for b := range nb {
		keys = append(keys, blockKey(base, rev, uint32(b+1)))
		s.fillSlots(&vals[n+b], (b+1)*InlineSlots)
	}
	return keys, vals
}

func (s ServiceSpec) hashVal() *hashTab {
	var h hashTab
	copy(h.Be[:], s.Buckets)
	return &h
}

// PutService installs or changes a service of generation gen without a moment where the
// datapath could see half of it: the slot blocks and bucket table (when it has them) are
// written under the next revision beside the live ones, the master entry, with the first
// slots in it, is switched to that revision in one update (a hash map's update replaces the
// element whole for readers), and the old blocks are deleted afterwards.
func (l LB) PutService(gen uint8, s ServiceSpec) error {
	if err := s.validate(); err != nil {
		return fmt.Errorf("put service: %w", err)
	}
	ref, err := serviceRef(gen, s.VIP, s.Proto)
	if err != nil {
		return fmt.Errorf("put service: %w", err)
	}
	mk := ref.base(s.ID)
	m, err := s.master(1)
	if err != nil {
		return fmt.Errorf("put service: %w", err)
	}
	if err := l.markVIPs(ref.vipWord()); err != nil {
		return fmt.Errorf("put service %s: %w", s.VIP, err)
	}
	var old svc
	hadOld := ref.lookup(l, &old) == nil
	rev := uint32(1)
	if hadOld {
		rev = (old.Rev + 1) & 0xffff
		if rev == 0 {
			rev = 1
		}
	}
	if keys, vals := s.appendBlocks(nil, nil, mk, rev); len(keys) > 0 {
		if err := l.batchPut(keys, vals); err != nil {
			l.deleteSlots(mk, rev, uint32(len(s.Slots)))
			return fmt.Errorf("put service %s: slots: %w", s.VIP, err)
		}
	}
	if s.Buckets != nil {
		if err := l.Hash.Update(hashKey(mk, rev), s.hashVal(), ebpf.UpdateAny); err != nil {
			l.deleteSlots(mk, rev, uint32(len(s.Slots)))
			return fmt.Errorf("put service %s: buckets: %w", s.VIP, err)
		}
	}
	if err := l.ClaimCounters([]uint32{s.ID}, nil, false); err != nil {
		l.deleteSlots(mk, rev, uint32(len(s.Slots)))
		return fmt.Errorf("put service %s: %w", s.VIP, err)
	}
	m.Rev = rev
	if err := ref.update(l, &m); err != nil {
		l.deleteSlots(mk, rev, uint32(len(s.Slots)))
		return fmt.Errorf("put service %s: master: %w", s.VIP, err)
	}
	if hadOld {
		l.deleteSlots(ref.base(old.Id), old.Rev, old.Count)
	}
	return nil
}

// DeleteService removes a service: the master first (no new connection is scheduled), then
// its slots. Established connections keep their real servers until they end.
func (l LB) DeleteService(gen uint8, vip netip.AddrPort, proto uint8) error {
	ref, err := serviceRef(gen, vip, proto)
	if err != nil {
		return fmt.Errorf("delete service: %w", err)
	}
	var old svc
	if err := ref.lookup(l, &old); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("delete service %s: %w", vip, err)
	}
	if err := ref.delete(l); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s: %w", vip, err)
	}
	l.deleteSlots(ref.base(old.Id), old.Rev, old.Count)
	return nil
}

// deleteSlots removes the slot blocks and the bucket table of revision rev of a service of
// count slots.
func (l LB) deleteSlots(mk svcKey, rev, count uint32) {
	nb := slotBlocks(int(count))
	keys := make([]svcKey, 0, nb)
	for b := range nb {
		keys = append(keys, blockKey(mk, rev, uint32(b+1)))
	}
	l.batchDelete(l.Svc, keys)
	l.Hash.Delete(hashKey(mk, rev))
}

// hashKey is the key of a service's bucket table: its master key with slot = rev << 16 (block
// 0, which no block uses).
func hashKey(mk svcKey, rev uint32) *svcKey {
	k := blockKey(mk, rev, 0)
	return &k
}

// PutBackend installs or changes a real server.
func (l LB) PutBackend(id uint32, be Backend) error {
	b, b6, err := be.encode()
	if err != nil {
		return fmt.Errorf("put %w", err)
	}
	if err := l.markRealServers(rsWord(b, b6)); err != nil {
		return fmt.Errorf("put real server %s: %w", be.Addr, err)
	}
	if err := l.ClaimCounters(nil, []uint32{id}, false); err != nil {
		return fmt.Errorf("put real server %s: %w", be.Addr, err)
	}
	if b6 != nil {
		if err := l.Backend6.Update(id, b6, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("put real server %s: %w", be.Addr, err)
		}
	}
	if err := l.Backend.Update(id, &b, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("put real server %s: %w", be.Addr, err)
	}
	return nil
}

// DeleteBackend removes a real server. Connections to it drain: they hold its address in the
// connection table, and count on in its counters' entry until a new id claims it.
func (l LB) DeleteBackend(id uint32) error {
	if err := l.Backend.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete real server %d: %w", id, err)
	}
	l.Backend6.Delete(id)
	return nil
}

// DeleteGeneration removes every service entry and bucket table of generation gen (after a
// switch away from it, or when a restore into it failed). Its services' counters stay in their
// entries (see ClaimCounters): a table pushed again after an agent restart keeps its ids, and
// its counters go on.
func (l LB) DeleteGeneration(gen uint8) error {
	all, err := Dump[svcKey, svc](l.Svc)
	if err != nil {
		return fmt.Errorf("delete generation %d: %w", gen, err)
	}
	all6, err := Dump[svc6Key, svc](l.Svc6)
	if err != nil {
		return fmt.Errorf("delete generation %d: %w", gen, err)
	}
	var stale []svcKey
	for k := range all {
		if k.Gen == gen {
			stale = append(stale, k)
		}
	}
	var stale6 []svc6Key
	for k := range all6 {
		if k.Gen == gen {
			stale6 = append(stale6, k)
		}
	}
	l.batchDelete(l.Svc, stale)
	if len(stale6) > 0 {
		if _, err := l.Svc6.BatchDelete(stale6, nil); err != nil {
			for i := range stale6 {
				l.Svc6.Delete(&stale6[i])
			}
		}
	}
	stale = stale[:0]
	var k, next svcKey
	var prev any
	for l.Hash.NextKey(prev, &next) == nil {
		if next.Gen == gen {
			stale = append(stale, next)
		}
		k = next
		prev = &k
	}
	l.batchDelete(l.Hash, stale)
	return nil
}

func (l LB) batchPut(keys []svcKey, vals []svc) error {
	if len(keys) == 0 {
		return nil
	}
	if err := batchUpdate(l.Svc, keys, vals); err == nil {
		return nil
	} else if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	for i := range keys {
		if err := l.Svc.Update(&keys[i], &vals[i], ebpf.UpdateAny); err != nil {
			return err
		}
	}
	return nil
}

func (l LB) batchDelete(m *ebpf.Map, keys []svcKey) {
	if len(keys) == 0 {
		return
	}
	if _, err := m.BatchDelete(keys, nil); err == nil {
		return
	}
	for i := range keys {
		m.Delete(&keys[i])
	}
}

// Conn is one balanced connection as the control plane sees it (the original direction's
// entry of the connection table).
type Conn struct {
	Proto   uint8
	Client  netip.AddrPort // the guest's source
	Service netip.AddrPort // the virtual service it addressed
	Server  netip.AddrPort // the real server it was sent to
	State   uint8          // CTUDP, CTTCPEst, CTTCPFin
	Backend uint32         // real server id
	Svc     uint32         // service id
}

func decodeConn(k ctKey, e ctEntry) Conn {
	return Conn{Proto: k.Proto, Client: addrPort4(k.Saddr, k.Sport), Service: addrPort4(k.Daddr, k.Dport),
		Server: addrPort4(e.Addr, e.Port), State: e.State, Backend: e.Backend, Svc: e.Svc}
}

// SweepResult is what one sweep found.
type SweepResult struct {
	Expired int
	Live    int
	Conns   map[uint32]LBConns // per real server, recounted
}

// live counts a live connection of real server backend in state (active while established).
func (r *SweepResult) live(backend uint32, state uint8) {
	r.Live++
	n := r.Conns[backend]
	if state == CTTCPEst {
		n.Active++
	} else {
		n.Inactive++
	}
	r.Conns[backend] = n
}

func ctTimeout(c Config, state uint8) uint64 {
	s := c.UdpTimeout
	switch state {
	case CTTCPEst:
		s = c.TcpTimeout
	case CTTCPFin:
		s = c.TcpfinTimeout
	}
	return uint64(s) * 1e9
}

func replyKey(k ctKey, e ctEntry) ctKey { return loader.CTReplyKey(k, e) }

// connKeys are the original and reply keys of the connection that an entry e of key k (either
// direction) belongs to: the other key is made from k and e (an original entry holds the real
// server, a reply entry the VIP).
func connKeys(k ctKey, e ctEntry) (orig, reply ctKey) {
	if k.Dir == 0 {
		return k, replyKey(k, e)
	}
	return ctKey{Saddr: k.Daddr, Daddr: e.Addr, Sport: k.Dport, Dport: e.Port, Proto: k.Proto}, k
}

// ConnCapacity returns how many entries the connection table can hold (two per connection).
func (l LB) ConnCapacity() int { return int(l.CT.MaxEntries()) * loader.CTWays }

// ConnEntries returns the number of live entries in the IPv4 connection table (two per
// connection) at now (CLOCK_MONOTONIC in ns): the table keeps an expired entry until its slot
// is reused, so only those within their timeout are counted.
func (l LB) ConnEntries(now uint64, cfg Config) (int, error) {
	n := 0
	err := l.scanCT(func(_ ctKey, e ctEntry) {
		if !ctExpired(now, cfg, e.LastSeen, e.State) {
			n++
		}
	})
	if err != nil {
		return 0, fmt.Errorf("count connections: %w", err)
	}
	return n, nil
}

// ConnEntry returns the IPv4 connection table's entry of key k (ebpf.ErrKeyNotExist when
// there is none), whether expired or not: the datapath's ct_lookup takes an expired one for
// no connection, its slot stays until reused.
func (l LB) ConnEntry(k loader.DatapathCtKey) (loader.DatapathCtEntry, error) {
	var b ctBucket
	if err := l.CT.Lookup(loader.CTHash(k)%l.CT.MaxEntries(), &b); err != nil {
		return ctEntry{}, fmt.Errorf("read connection: %w", err)
	}
	for p := range loader.CTWays / 2 {
		s := b.S[loader.CTSlot(k, p)] // where the datapath looks for k
		if s.Seq&1 == 0 && s.E.LastSeen != 0 && s.Key == k {
			return s.E, nil
		}
	}
	return ctEntry{}, fmt.Errorf("read connection: %w", ebpf.ErrKeyNotExist)
}

// SetConnEntry writes entry e of key k into the IPv4 connection table, into the slot the
// datapath would give it: its direction's slot of the pair that ctPick chooses for its
// connection (the other key made from k and e, connKeys; now is CLOCK_MONOTONIC), so that
// writing both of a connection's entries puts them where the datapath looks for them. For
// tests and repairs. The slot is
// claimed and written in place in the table's memory mapping as the datapath writes one
// (ctSetMapped), so a connection the datapath inserts into another slot of the bucket
// meanwhile stays. A table that cannot be mapped (an older pinned table before its migration)
// has its whole bucket read and written back, which loses such a concurrent insert.
func (l LB) SetConnEntry(k loader.DatapathCtKey, e loader.DatapathCtEntry) error {
	cfg, err := ReadConfig(l.Config)
	if err != nil {
		return fmt.Errorf("write connection: %w", err)
	}
	i := loader.CTHash(k) % l.CT.MaxEntries()
	orig, reply := connKeys(k, e)
	mem, err := l.ctMem()
	if err == nil {
		if err := ctSetMapped(&mem[i], k, e, orig, reply, MonotonicNow(), cfg); err != nil {
			return fmt.Errorf("write connection into bucket %d: %w", i, err)
		}
		return nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("write connection: %w", err)
	}
	var b ctBucket
	if err := l.CT.Lookup(i, &b); err != nil {
		return fmt.Errorf("write connection: %w", err)
	}
	at := loader.CTSlot(k, ctPick(&b, orig, reply, MonotonicNow(), cfg))
	b.S[at] = ctSlot{Seq: (b.S[at].Seq + 2) &^ 1, Key: k, E: e}
	if err := l.CT.Update(i, &b, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("write connection: %w", err)
	}
	return nil
}

// ctPick is the datapath's ct_pick (bpf/lib/lb.h): the pair of slots of bucket b for a new
// connection of keys orig and reply at now: the pair holding either key (original in its slot
// of the bucket's first half, reply in its slot of the second, loader.CTSlot), else the first
// pair whose two slots are free or expired, else the pair whose newer entry is the oldest (a
// stamp tie: the first).
func ctPick(b *ctBucket, orig, reply ctKey, now uint64, cfg Config) int {
	spare, victim := -1, 0
	var oldest uint64
	for p := range loader.CTWays / 2 {
		so, sr := &b.S[loader.CTSlot(orig, p)], &b.S[loader.CTSlot(reply, p)]
		if (so.E.LastSeen != 0 && so.Key == orig) || (sr.E.LastSeen != 0 && sr.Key == reply) {
			return p
		}
		free := func(s *ctSlot) bool { return s.E.LastSeen == 0 || ctExpired(now, cfg, s.E.LastSeen, s.E.State) }
		if spare < 0 && free(so) && free(sr) {
			spare = p
		}
		newer := sr.E.LastSeen
		if int64(so.E.LastSeen-sr.E.LastSeen) > 0 {
			newer = so.E.LastSeen
		}
		if p == 0 || int64(newer-oldest) < 0 {
			victim, oldest = p, newer
		}
	}
	if spare >= 0 {
		return spare
	}
	return victim
}

// ctExpired says whether an entry last seen at seen, in state, is idle past its timeout at
// now (either family's entry).
func ctExpired(now uint64, cfg Config, seen uint64, state uint8) bool {
	return now > seen && now-seen > ctTimeout(cfg, state)
}

// Sweep counts the live connections (now is CLOCK_MONOTONIC in ns; the datapath stamps with
// its last tick, bpf_ktime_get_coarse_ns) and rewrites every real server's active/inactive
// counts from them. match, when not nil, selects live connections to delete (cleanup): both
// directions' entries are cleared and their number is returned in Expired. The IPv4 table
// needs no deletion of expired entries (the datapath reuses their slots, bpf/lib/lb.h); the
// IPv6 one (an LRU hash) has them deleted.
func (l LB) Sweep(now uint64, cfg Config, match func(Conn) bool) (SweepResult, error) {
	res := SweepResult{Conns: map[uint32]LBConns{}}
	var kill []ctKey
	err := l.scanCT(func(k ctKey, e ctEntry) {
		if k.Dir == 1 || ctExpired(now, cfg, e.LastSeen, e.State) {
			return
		}
		if match != nil && match(decodeConn(k, e)) {
			kill = append(kill, k, replyKey(k, e))
			res.Expired++
			return
		}
		res.live(e.Backend, e.State)
	})
	if err != nil {
		return res, fmt.Errorf("sweep connections: %w", err)
	}
	if err := l.clearConns(kill); err != nil {
		return res, fmt.Errorf("sweep connections: %w", err)
	}
	if err := l.sweep6(now, cfg, match, &res); err != nil {
		return res, err
	}
	if err := l.recount(res.Conns); err != nil {
		return res, fmt.Errorf("sweep: %w", err)
	}
	return res, nil
}

// clearConns clears the slots of keys in the IPv4 connection table, in place in its memory
// mapping with the datapath's writers' protocol (ctClearMapped: claim by compare-and-swap of
// seq, check the key, zero, publish with seq moved by two): only the slots asked for are
// written, so a new connection the datapath inserts into another slot of the same bucket at
// that moment keeps its entry. A slot that stays odd (being written) past a bounded number of
// looks is reported after the others are cleared; the next sweep finds it again if it still
// holds a connection to clean up.
//
// A table that cannot be mapped (pinned by an older agent before the loader migrated it)
// falls back to clearConnsBatch, which reads and writes whole buckets and so has a window in
// which such an insert is lost.
func (l LB) clearConns(keys []ctKey) error {
	if len(keys) == 0 {
		return nil
	}
	mem, err := l.ctMem()
	if errors.Is(err, ebpf.ErrNotSupported) {
		return l.clearConnsBatch(keys)
	}
	if err != nil {
		return fmt.Errorf("map the connection table: %w", err)
	}
	var busy []error
	for i, ks := range l.ctByBucket(keys) {
		if err := ctClearMapped(&mem[i], ks); err != nil {
			busy = append(busy, fmt.Errorf("clear bucket %d: %w", i, err))
		}
	}
	return errors.Join(busy...)
}

// ctByBucket groups keys by their bucket of the IPv4 connection table.
func (l LB) ctByBucket(keys []ctKey) map[uint32][]ctKey {
	n := l.CT.MaxEntries()
	byBucket := map[uint32][]ctKey{}
	for _, k := range keys {
		i := loader.CTHash(k) % n
		byBucket[i] = append(byBucket[i], k)
	}
	return byBucket
}

// clearConnsBatch is clearConns for a table that is not memory-mapped. A bucket is read again
// right before it is written (an array entry is written whole), and a slot a CPU is writing
// (odd seq) is left alone; seq goes up by two, so a reader that copied the slot before sees
// that it changed. A new connection's entry the datapath writes into another slot of the same
// bucket between that read and the write is lost (its next frame is scheduled again): the
// window is a few microseconds of a cleanup, which is rare (a real server removed), and only
// tables of an older agent not yet migrated have it.
func (l LB) clearConnsBatch(keys []ctKey) error {
	for i, ks := range l.ctByBucket(keys) {
		var b ctBucket
		if err := l.CT.Lookup(i, &b); err != nil {
			return fmt.Errorf("read bucket %d: %w", i, err)
		}
		changed := false
		for s := range b.S {
			if b.S[s].Seq&1 == 0 && b.S[s].E.LastSeen != 0 && slices.Contains(ks, b.S[s].Key) {
				b.S[s] = ctSlot{Seq: b.S[s].Seq + 2}
				changed = true
			}
		}
		if changed {
			if err := l.CT.Update(i, &b, ebpf.UpdateExist); err != nil {
				return fmt.Errorf("write bucket %d: %w", i, err)
			}
		}
	}
	return nil
}

// recount makes the connection counts of every real server that owns its entry those of the
// connection table (counts, by real server id): only the entries whose counts differ are
// written, so a sweep of a sandbox whose connections did not change writes nothing. Only the
// entries of real servers that are live after the entries were read are written: a deleted
// one's entry (its connections drain, uncounted) may be claimed by a new id at any time, and
// writing its old owner back would take the entry from the new one. (A real server deleted
// and its entry claimed again in the microseconds between the read of the real servers and
// the write is the one case left; a live real server always owns its entry, as PutBackend and
// the restore claim it before any slot names it.)
func (l LB) recount(counts map[uint32]LBConns) error {
	if mem := l.connsMem(); mem != nil {
		return l.recountMapped(mem, counts)
	}
	all, err := dumpArray[lbCnc](l.Conns)
	if err != nil {
		return fmt.Errorf("read connection counts: %w", err)
	}
	bes, err := Dump[uint32, backend](l.Backend)
	if err != nil {
		return fmt.Errorf("read real servers: %w", err)
	}
	var slots []uint32
	var vals []lbCnc
	for i, c := range all {
		if _, live := bes[c.Id]; c.Id == 0 || !live {
			continue
		}
		if n := counts[c.Id]; n != c.C && loader.CounterSlot(c.Id) == uint32(i) {
			slots, vals = append(slots, uint32(i)), append(vals, lbCnc{Id: c.Id, C: n})
		}
	}
	if len(slots) > 0 {
		if _, err := l.Conns.BatchUpdate(slots, vals, nil); err != nil {
			return fmt.Errorf("write connection counts: %w", err)
		}
	}
	return nil
}

// recountMapped is recount in the mapped array (mem): the entries' owners are read before the
// live real servers, and a count is stored only while its entry's owner is still the one read,
// which leaves a claim's window at the nanoseconds between that check and the store.
func (l LB) recountMapped(mem []lbCnc, counts map[uint32]LBConns) error {
	owners := map[uint32]uint32{} // slot -> owner, of the entries whose counts differ
	for i := range mem {
		id := atomic.LoadUint32(&mem[i].Id)
		if id == 0 || loader.CounterSlot(id) != uint32(i) {
			continue
		}
		cur := LBConns{Active: atomic.LoadInt64(&mem[i].C.Active), Inactive: atomic.LoadInt64(&mem[i].C.Inactive)}
		if counts[id] != cur {
			owners[uint32(i)] = id
		}
	}
	if len(owners) == 0 {
		return nil
	}
	bes, err := Dump[uint32, backend](l.Backend)
	if err != nil {
		return fmt.Errorf("read real servers: %w", err)
	}
	for i, id := range owners {
		if _, live := bes[id]; !live {
			continue
		}
		e := &mem[i]
		n := counts[id]
		if atomic.LoadUint32(&e.Id) == id {
			atomic.StoreInt64(&e.C.Active, n.Active)
			atomic.StoreInt64(&e.C.Inactive, n.Inactive)
		}
	}
	return nil
}

// sweep6 is Sweep's pass over the IPv6 connection table, adding to res.
func (l LB) sweep6(now uint64, cfg Config, match func(Conn) bool, res *SweepResult) error {
	all, err := Dump[ct6Key, ct6Ent](l.CT6)
	if err != nil {
		return fmt.Errorf("sweep IPv6 connections: %w", err)
	}
	replyKey6 := func(k ct6Key, e ct6Ent) ct6Key {
		return ct6Key{Saddr: e.Addr, Daddr: k.Saddr, Sport: e.Port, Dport: k.Sport, Proto: k.Proto, Dir: 1}
	}
	replies := map[ct6Key]ct6Ent{}
	for k, e := range all {
		if k.Dir == 1 {
			replies[k] = e
		}
	}
	var dead []ct6Key
	for k, e := range all {
		if k.Dir == 1 {
			continue
		}
		c := Conn{Proto: k.Proto, Client: netip.AddrPortFrom(addr6(k.Saddr), be16(k.Sport)),
			Service: netip.AddrPortFrom(addr6(k.Daddr), be16(k.Dport)),
			Server:  netip.AddrPortFrom(addr6(e.Addr), be16(e.Port)), State: e.State, Backend: e.Backend, Svc: e.Svc}
		if ctExpired(now, cfg, e.LastSeen, e.State) || (match != nil && match(c)) {
			dead = append(dead, k, replyKey6(k, e))
			res.Expired++
			continue
		}
		delete(replies, replyKey6(k, e))
		res.live(e.Backend, e.State)
	}
	for rk, re := range replies {
		if ctExpired(now, cfg, re.LastSeen, re.State) {
			dead = append(dead, rk)
		}
	}
	if len(dead) > 0 {
		if _, err := l.CT6.BatchDelete(dead, nil); err != nil {
			for i := range dead {
				l.CT6.Delete(&dead[i])
			}
		}
	}
	return nil
}

// PutServices writes many services of a generation that is not live yet (a restore), with
// batched map updates: masters and slot blocks together, as nothing reads the generation until
// the caller switches to it. The maps are written at once (see concurrently): their order does
// not matter before the switch. A service of up to InlineSlots real servers is one entry.
func (l LB) PutServices(gen uint8, specs []ServiceSpec) error {
	// The batches are made at their final size (grown by appends, they were copied about 20
	// times at 20000 rules).
	n, nHash := len(specs), 0
	for _, s := range specs {
		n += slotBlocks(len(s.Slots))
		if s.Buckets != nil {
			nHash++
		}
	}
	var (
		keys  = make([]svcKey, 0, n)
		vals  = make([]svc, 0, n)
		hkeys = make([]svcKey, 0, nHash)
		hvals = make([]hashTab, 0, nHash)
		keys6 []svc6Key
		vals6 []svc
		vips  = make([]uint32, 0, len(specs))
	)
	for _, s := range specs {
		if err := s.validate(); err != nil {
			return fmt.Errorf("put services: %w", err)
		}
		ref, err := serviceRef(gen, s.VIP, s.Proto)
		if err != nil {
			return fmt.Errorf("put services: %w", err)
		}
		vips = append(vips, ref.vipWord())
		mk := ref.base(s.ID)
		m, err := s.master(1)
		if err != nil {
			return fmt.Errorf("put services: %w", err)
		}
		keys, vals = s.appendBlocks(keys, vals, mk, 1)
		if ref.v6 {
			keys6 = append(keys6, ref.k6)
			vals6 = append(vals6, m)
		} else {
			keys = append(keys, mk)
			vals = append(vals, m)
		}
		if s.Buckets != nil {
			hkeys = append(hkeys, *hashKey(mk, 1))
			hvals = append(hvals, *s.hashVal())
		}
	}
	return concurrently("put services",
		named("VIP prefilter", func() error { return l.markVIPs(vips...) }),
		named("bucket tables", func() error { return batchUpdate(l.Hash, hkeys, hvals) }),
		named("service entries", func() error { return l.batchPut(keys, vals) }),
		named("IPv6 masters", func() error { return batchUpdate(l.Svc6, keys6, vals6) }))
}

// batchUpdate writes keys and vals to m in batches (BPF_MAP_UPDATE_BATCH), a large set in two
// halves at once: the kernel's cost of a hash map entry (its allocation and bucket insert)
// then runs on two CPUs.
func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V) error {
	const split = 4096
	if len(keys) == 0 {
		return nil
	}
	if len(keys) < split {
		_, err := m.BatchUpdate(keys, vals, nil)
		return err
	}
	h := len(keys) / 2
	return concurrently("",
		func() error { _, err := m.BatchUpdate(keys[:h], vals[:h], nil); return err },
		func() error { _, err := m.BatchUpdate(keys[h:], vals[h:], nil); return err })
}

// named prefixes fn's error with what it writes.
func named(what string, fn func() error) func() error {
	return func() error {
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
}

// concurrently runs fns at once and returns their errors joined (prefixed with what). A
// restore writes about 100000 entries into several maps; the maps are independent and a hash
// map takes concurrent updates (per-bucket locks), so writing them in parallel divides the
// kernel's part of a restore by the CPUs free. Callers only use it for writes that nothing
// reads yet (a generation before its switch, real servers no live slot names).
func concurrently(what string, fns ...func() error) error {
	errs := make([]error, len(fns))
	var wg sync.WaitGroup
	for i, fn := range fns[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i+1] = fn()
		}()
	}
	errs[0] = fns[0]()
	wg.Wait()
	err := errors.Join(errs...)
	if err != nil && what != "" {
		return fmt.Errorf("%s: %w", what, err)
	}
	return err
}

// BackendIDs returns the ids of the real servers in the maps.
func (l LB) BackendIDs() (map[uint32]bool, error) {
	all, err := Dump[uint32, backend](l.Backend)
	if err != nil {
		return nil, fmt.Errorf("read real servers: %w", err)
	}
	ids := make(map[uint32]bool, len(all))
	for id := range all {
		ids[id] = true
	}
	return ids, nil
}

// DeleteBackendsExcept removes every real server not in keep (their counters stay, see
// ClaimCounters).
func (l LB) DeleteBackendsExcept(keep map[uint32]Backend) error {
	all, err := Dump[uint32, backend](l.Backend)
	if err != nil {
		return fmt.Errorf("delete real servers: %w", err)
	}
	var stale []uint32
	for id := range all {
		if _, ok := keep[id]; !ok {
			stale = append(stale, id)
		}
	}
	if len(stale) == 0 {
		return nil
	}
	if _, err := l.Backend.BatchDelete(stale, nil); err != nil {
		for _, id := range stale {
			if err := l.DeleteBackend(id); err != nil {
				return err
			}
		}
		return nil
	}
	// Few real servers are IPv6: delete the addresses that are there (one batched read)
	// instead of trying every id.
	if six, err := Dump[uint32, be6](l.Backend6); err == nil && len(six) > 0 {
		var del []uint32
		for _, id := range stale {
			if _, ok := six[id]; ok {
				del = append(del, id)
			}
		}
		deleteKeys(l.Backend6, del)
	} else if err != nil {
		for _, id := range stale {
			l.Backend6.Delete(id)
		}
	}
	return nil
}

// deleteKeys removes keys from m with batched deletes. The kernel stops a batch at a key that
// is not there: that key is skipped and the batch goes on after it.
func deleteKeys[K any](m *ebpf.Map, keys []K) {
	for len(keys) > 0 {
		n, err := m.BatchDelete(keys, nil)
		if err == nil {
			return
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := range keys {
				m.Delete(&keys[i])
			}
			return
		}
		if n >= len(keys) {
			return
		}
		keys = keys[n+1:]
	}
}

// How many entries one BPF_MAP_LOOKUP_BATCH call of Dump reads: the first call few, so that
// dumping a map that is empty or nearly so (the sweeper dumps five of them every second per
// sandbox) allocates and clears a few KiB instead of 4096 entries' worth, each further call of
// a large map four times as many as the one before, up to dumpBatchSize.
const (
	dumpFirstBatch = 128
	dumpBatchSize  = 4096
)

// Dump reads every entry of a hash map with batched lookups (a few system calls for tens of
// thousands of entries, where iterating costs two per entry), falling back to iteration on
// kernels without batch operations.
func Dump[K comparable, V any](m *ebpf.Map) (map[K]V, error) {
	out := map[K]V{}
	size := min(dumpFirstBatch, max(int(m.MaxEntries()), 1))
	keys := make([]K, size)
	vals := make([]V, size)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		if errors.Is(err, unix.ENOSPC) && len(keys) < dumpBatchSize {
			n, err = 0, nil // a hash bucket holds more entries than the batch: again, larger
		}
		for i := 0; i < n; i++ {
			out[keys[i]] = vals[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			break
		}
		if err != nil {
			return nil, err
		}
		if n == 0 || n == len(keys) {
			if size = min(4*len(keys), dumpBatchSize); size > len(keys) {
				keys, vals = make([]K, size), make([]V, size)
			}
		}
	}
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}

// MarkRealServers sets the prefilter's real-server bits of bes without writing their entries:
// for real servers whose kdp_lb_be entries a restore writes after its switch (control/dataplane,
// RestoreLB), whose replies must pass the prefilter from the switch on.
func (l LB) MarkRealServers(bes map[uint32]Backend) error {
	if len(bes) == 0 {
		return nil
	}
	rss := make([]uint32, 0, len(bes))
	for _, be := range bes {
		b, b6, err := be.encode()
		if err != nil {
			return fmt.Errorf("mark real servers: %w", err)
		}
		rss = append(rss, rsWord(b, b6))
	}
	if err := l.markRealServers(rss...); err != nil {
		return fmt.Errorf("mark real servers: %w", err)
	}
	return nil
}

// PutLateBackends installs real servers that no live slot needs the entries of yet (a
// restore's, written after its switch: control/dataplane), with one writer: it runs beside the
// restore's answer (the save, the reply, the client's exit), which needs the other CPU. Their
// prefilter bits are not set here: the restore set them before its switch (MarkRealServers),
// as their replies pass the prefilter from then on. The entries are written in one batch per
// map, IPv6 addresses first.
func (l LB) PutLateBackends(bes map[uint32]Backend) error {
	enc, err := encodeBackends(bes)
	if err != nil {
		return fmt.Errorf("put real servers: %w", err)
	}
	if len(enc.ids6) > 0 {
		if _, err := l.Backend6.BatchUpdate(enc.ids6, enc.vals6, nil); err != nil {
			return fmt.Errorf("put real servers: IPv6 addresses: %w", err)
		}
	}
	if len(enc.ids) > 0 {
		if _, err := l.Backend.BatchUpdate(enc.ids, enc.vals, nil); err != nil {
			return fmt.Errorf("put real servers: %w", err)
		}
	}
	return nil
}

// encodedBackends are real servers as the maps hold them: kdp_lb_be's ids and entries, the
// IPv6 ones' addresses for kdp_lb_be6, and every one's prefilter word.
type encodedBackends struct {
	ids   []uint32
	vals  []backend
	ids6  []uint32
	vals6 []be6
	rss   []uint32
}

// encodeBackends encodes bes for the maps (PutBackends, PutLateBackends).
func encodeBackends(bes map[uint32]Backend) (encodedBackends, error) {
	enc := encodedBackends{ids: make([]uint32, 0, len(bes)), vals: make([]backend, 0, len(bes)),
		rss: make([]uint32, 0, len(bes))}
	for id, be := range bes {
		b, b6, err := be.encode()
		if err != nil {
			return encodedBackends{}, err
		}
		enc.ids, enc.vals, enc.rss = append(enc.ids, id), append(enc.vals, b), append(enc.rss, rsWord(b, b6))
		if b6 != nil {
			enc.ids6, enc.vals6 = append(enc.ids6, id), append(enc.vals6, *b6)
		}
	}
	return enc, nil
}

// PutBackends installs many real servers at once. fresh says the ids are new (a restore into
// an empty table): both address maps are written at once (no live slot names a new id, so the
// order does not matter); otherwise an IPv6 address is written before the entry the
// schedulers read. Their counters' entries are not claimed here: the restore claims every
// id's at once (ClaimCounters).
func (l LB) PutBackends(bes map[uint32]Backend, fresh bool) error {
	if len(bes) == 0 {
		return nil
	}
	enc, err := encodeBackends(bes)
	if err != nil {
		return fmt.Errorf("put real servers: %w", err)
	}
	if err := l.markRealServers(enc.rss...); err != nil {
		return fmt.Errorf("put real servers: %w", err)
	}
	if fresh {
		return concurrently("put real servers",
			named("IPv6 addresses", func() error { return batchUpdate(l.Backend6, enc.ids6, enc.vals6) }),
			func() error { return batchUpdate(l.Backend, enc.ids, enc.vals) })
	}
	if err := batchUpdate(l.Backend6, enc.ids6, enc.vals6); err != nil {
		return fmt.Errorf("put real servers: IPv6 addresses: %w", err)
	}
	if err := batchUpdate(l.Backend, enc.ids, enc.vals); err != nil {
		return fmt.Errorf("put real servers: %w", err)
	}
	return nil
}
