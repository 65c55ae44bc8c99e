package maps

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// Errors callers can test for.
var (
	// ErrSlot is returned for a NIC slot outside 0..MaxEndpoints-1.
	ErrSlot = errors.New("endpoint slot out of range")
	// ErrTooManyRoutes is returned when a table would not fit the route map.
	ErrTooManyRoutes = errors.New("too many routes")
)

// EndpointMap is kdp_endpoints: ifindex -> Endpoint, with kdp_endpoints6 (V6) holding the
// IPv6 side of the endpoints that have one. A view without V6 refuses IPv6 (ErrFamily).
type EndpointMap struct {
	*ebpf.Map
	V6 *ebpf.Map
}

// Put writes the endpoint entry of device ifindex. The IPv6 side goes first: the datapath
// finds an endpoint by its v4 entry, so it never sees one half written.
func (m EndpointMap) Put(ifindex uint32, e Endpoint) error {
	if e.Slot >= MaxEndpoints {
		return fmt.Errorf("put endpoint %d: %w: %d", ifindex, ErrSlot, e.Slot)
	}
	v, err := e.encode()
	if err != nil {
		return fmt.Errorf("put endpoint %d: %w", ifindex, err)
	}
	if e.hasV6() {
		if m.V6 == nil {
			return fmt.Errorf("put endpoint %d: IPv6 %s: %w", ifindex, e.Addr6, ErrFamily)
		}
		v6, err := e.encode6()
		if err != nil {
			return fmt.Errorf("put endpoint %d: %w", ifindex, err)
		}
		if err := m.V6.Update(ifindex, &v6, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("put endpoint %d: ipv6: %w", ifindex, err)
		}
	} else if err := m.remove6(ifindex); err != nil {
		return fmt.Errorf("put endpoint %d: %w", ifindex, err)
	}
	if err := m.Update(ifindex, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("put endpoint %d: %w", ifindex, err)
	}
	return nil
}

func (m EndpointMap) remove6(ifindex uint32) error {
	if m.V6 == nil {
		return nil
	}
	if err := m.V6.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ipv6 of endpoint %d: %w", ifindex, err)
	}
	return nil
}

// Get reads the endpoint entry of device ifindex.
func (m EndpointMap) Get(ifindex uint32) (Endpoint, error) {
	var v loader.DatapathEndpoint
	if err := m.Lookup(ifindex, &v); err != nil {
		return Endpoint{}, fmt.Errorf("get endpoint %d: %w", ifindex, err)
	}
	e := decodeEndpoint(v)
	if m.V6 != nil {
		var v6 loader.DatapathEndpoint6
		if err := m.V6.Lookup(ifindex, &v6); err == nil {
			decodeEndpoint6(&e, v6)
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Endpoint{}, fmt.Errorf("get endpoint %d: ipv6: %w", ifindex, err)
		}
	}
	return e, nil
}

// Remove deletes the entry of device ifindex; a missing entry is not an error.
func (m EndpointMap) Remove(ifindex uint32) error {
	if err := m.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %d: %w", ifindex, err)
	}
	return m.remove6(ifindex)
}

// All returns every entry, keyed by ifindex.
func (m EndpointMap) All() (map[uint32]Endpoint, error) {
	out := map[uint32]Endpoint{}
	var (
		k uint32
		v loader.DatapathEndpoint
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = decodeEndpoint(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	if m.V6 == nil {
		return out, nil
	}
	var v6 loader.DatapathEndpoint6
	it = m.V6.Iterate()
	for it.Next(&k, &v6) {
		if e, ok := out[k]; ok {
			decodeEndpoint6(&e, v6)
			out[k] = e
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: ipv6: %w", err)
	}
	return out, nil
}

// StatsMap is kdp_stats: per-CPU counters at index slot*2+direction, with kdp_drops_ext (Ext)
// holding the drop reasons beyond the first eight at the same index.
type StatsMap struct {
	*ebpf.Map
	Ext *ebpf.Map
}

func statsIndex(slot uint32, d Direction) uint32 { return slot*2 + uint32(d) }

// Read sums the per-CPU counters of one slot and direction.
func (m StatsMap) Read(slot uint32, d Direction) (Stats, error) {
	var sum Stats
	if slot >= MaxEndpoints {
		return sum, fmt.Errorf("read stats: %w: %d", ErrSlot, slot)
	}
	var per []loader.DatapathEpStats
	if err := m.Lookup(statsIndex(slot, d), &per); err != nil {
		return sum, fmt.Errorf("read stats of slot %d %s: %w", slot, d, err)
	}
	for _, s := range per {
		sum.Packets += s.Packets
		sum.Bytes += s.Bytes
		for i, n := range s.Drops {
			sum.Drops[i] += n
		}
	}
	if m.Ext == nil {
		return sum, nil
	}
	var ext []loader.DatapathEpDropsExt
	if err := m.Ext.Lookup(statsIndex(slot, d), &ext); err != nil {
		return sum, fmt.Errorf("read drops of slot %d %s: %w", slot, d, err)
	}
	for _, s := range ext {
		for i, n := range s.Drops {
			sum.Drops[numBaseDrops+i] += n
		}
	}
	return sum, nil
}

// Reset zeroes both directions of a slot, so a reused slot starts from nothing.
func (m StatsMap) Reset(slot uint32) error {
	if slot >= MaxEndpoints {
		return fmt.Errorf("reset stats: %w: %d", ErrSlot, slot)
	}
	zero := make([]loader.DatapathEpStats, ebpf.MustPossibleCPU())
	zeroExt := make([]loader.DatapathEpDropsExt, ebpf.MustPossibleCPU())
	for _, d := range []Direction{FromGuest, ToGuest} {
		if err := m.Update(statsIndex(slot, d), zero, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset stats of slot %d: %w", slot, err)
		}
		if m.Ext == nil {
			continue
		}
		if err := m.Ext.Update(statsIndex(slot, d), zeroExt, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset drops of slot %d: %w", slot, err)
		}
	}
	return nil
}

// Route is one route of a NIC as the datapath sees it.
type Route struct {
	Slot    uint32
	Dest    netip.Prefix // 0.0.0.0/0 is the default route
	Gateway netip.Addr   // zero when none
}

// The route tries' keys and values (struct route_key, struct route_val, and their IPv6 twins).
type (
	routeKey  = loader.DatapathRouteKey
	routeVal  = loader.DatapathRouteVal
	route6Key = loader.DatapathRoute6Key
	route6Val = loader.DatapathRoute6Val
)

// encode makes r's key (without its tag, which names the generation) and value; r must be an
// IPv4 route.
func (r Route) encode() (routeKey, routeVal, error) {
	var (
		k routeKey
		v routeVal
	)
	if !r.Dest.IsValid() {
		return k, v, fmt.Errorf("route without a destination")
	}
	a, err := v4(r.Dest.Masked().Addr())
	if err != nil {
		return k, v, fmt.Errorf("route %s: %w", r.Dest, err)
	}
	if v.Gateway, err = v4OrZero(r.Gateway); err != nil {
		return k, v, fmt.Errorf("route %s: gateway: %w", r.Dest, err)
	}
	k.Prefixlen, k.Addr = 32+uint32(r.Dest.Bits()), a
	return k, v, nil
}

// encode6 is encode for an IPv6 route.
func (r Route) encode6() (route6Key, route6Val, error) {
	var (
		k route6Key
		v route6Val
	)
	a, err := v6(r.Dest.Masked().Addr())
	if err != nil {
		return k, v, fmt.Errorf("route %s: %w", r.Dest, err)
	}
	if v.Gateway, err = v6OrZero(r.Gateway); err != nil {
		return k, v, fmt.Errorf("route %s: gateway: %w", r.Dest, err)
	}
	k.Prefixlen, k.Addr = 32+uint32(r.Dest.Bits()), a
	return k, v, nil
}

func decodeRoute(k routeKey, v routeVal) Route {
	r := Route{Slot: k.Tag & 0xffff, Dest: netip.PrefixFrom(addr4(k.Addr), int(k.Prefixlen)-32)}
	if v.Gateway != 0 {
		r.Gateway = addr4(v.Gateway)
	}
	return r
}

func decodeRoute6(k route6Key, v route6Val) Route {
	r := Route{Slot: k.Tag & 0xffff, Dest: netip.PrefixFrom(addr6(k.Addr), int(k.Prefixlen)-32)}
	if v.Gateway != ([4]uint32{}) {
		r.Gateway = addr6(v.Gateway)
	}
	return r
}

// RouteTable is kdp_routes and kdp_routes6 (IPv6 routes; a table without it refuses them with
// ErrFamily) together with kdp_config, which says which generation of the route tries is live.
type RouteTable struct {
	Routes  *ebpf.Map
	Routes6 *ebpf.Map
	Config  *ebpf.Map
}

// Replace installs routes as the whole table, atomically for the datapath: the new table is
// written under the next generation (both families), the generation is switched with one map
// write, and then the old generation's entries are deleted.
func (t RouteTable) Replace(routes []Route) error {
	if len(routes) > MaxRoutes {
		return fmt.Errorf("replace routes: %w: %d > %d", ErrTooManyRoutes, len(routes), MaxRoutes)
	}
	type entry struct {
		slot uint32
		k6   bool
		k    routeKey
		v    routeVal
		kk6  route6Key
		vv6  route6Val
	}
	entries := make([]entry, len(routes))
	for i, r := range routes {
		if r.Slot >= MaxEndpoints {
			return fmt.Errorf("replace routes: %w: %d", ErrSlot, r.Slot)
		}
		if !r.Dest.IsValid() {
			return fmt.Errorf("replace routes: route without a destination")
		}
		e := entry{slot: r.Slot, k6: r.Dest.Addr().Is6()}
		var err error
		if e.k6 {
			if t.Routes6 == nil {
				return fmt.Errorf("replace routes: route %s: %w", r.Dest, ErrFamily)
			}
			e.kk6, e.vv6, err = r.encode6()
		} else {
			e.k, e.v, err = r.encode()
		}
		if err != nil {
			return fmt.Errorf("replace routes: %w", err)
		}
		entries[i] = e
	}
	cfg, err := t.config()
	if err != nil {
		return err
	}
	// What an earlier switch could not clean up goes first (nothing live is touched), so the
	// new generation starts empty even after 65536 switches.
	if err := t.deleteOtherGenerations(cfg.RouteGen); err != nil {
		return err
	}
	next := (cfg.RouteGen + 1) & 0xffff
	var written []entry
	undo := func() {
		for _, e := range written {
			if e.k6 {
				t.Routes6.Delete(&e.kk6)
			} else {
				t.Routes.Delete(&e.k)
			}
		}
	}
	for i, e := range entries {
		if e.k6 {
			e.kk6.Tag = routeTag(next, e.slot)
			err = t.Routes6.Update(&e.kk6, &e.vv6, ebpf.UpdateAny)
		} else {
			e.k.Tag = routeTag(next, e.slot)
			err = t.Routes.Update(&e.k, &e.v, ebpf.UpdateAny)
		}
		if err != nil {
			undo()
			return fmt.Errorf("replace routes: write %s: %w", routes[i].Dest, err)
		}
		written = append(written, e)
	}
	cfg.RouteGen = next
	if err := t.Config.Update(uint32(0), &cfg, ebpf.UpdateAny); err != nil {
		undo()
		return fmt.Errorf("replace routes: switch generation: %w", err)
	}
	if err := t.deleteOtherGenerations(next); err != nil {
		// The switch happened: the new table is live, and reporting a failure would make the
		// caller believe (and record) the old one. The old generation's entries are never
		// read again; the next Replace removes them first.
		slog.Warn("replace routes: old generation left in the map until the next replace", "err", err)
	}
	return nil
}

// List returns the live table.
func (t RouteTable) List() ([]Route, error) {
	cfg, err := t.config()
	if err != nil {
		return nil, err
	}
	var (
		out []Route
		k   routeKey
		v   routeVal
	)
	it := t.Routes.Iterate()
	for it.Next(&k, &v) {
		if k.Tag>>16 != cfg.RouteGen {
			continue
		}
		out = append(out, decodeRoute(k, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	if t.Routes6 == nil {
		return out, nil
	}
	var (
		k6 route6Key
		v6 route6Val
	)
	it = t.Routes6.Iterate()
	for it.Next(&k6, &v6) {
		if k6.Tag>>16 != cfg.RouteGen {
			continue
		}
		out = append(out, decodeRoute6(k6, v6))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list routes: ipv6: %w", err)
	}
	return out, nil
}

func (t RouteTable) config() (Config, error) {
	var cfg Config
	if err := t.Config.Lookup(uint32(0), &cfg); err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	return cfg, nil
}

// deleteKey deletes key from m; a seam for the test of a failing cleanup.
var deleteKey = func(m *ebpf.Map, key any) error { return m.Delete(key) }

func (t RouteTable) deleteOtherGenerations(live uint32) error {
	var (
		stale []routeKey
		k     routeKey
		v     routeVal
	)
	it := t.Routes.Iterate()
	for it.Next(&k, &v) {
		if k.Tag>>16 != live {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("replace routes: list old: %w", err)
	}
	for _, k := range stale {
		if err := deleteKey(t.Routes, &k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("replace routes: delete old: %w", err)
		}
	}
	if t.Routes6 == nil {
		return nil
	}
	var (
		stale6 []route6Key
		k6     route6Key
		v6     route6Val
	)
	it = t.Routes6.Iterate()
	for it.Next(&k6, &v6) {
		if k6.Tag>>16 != live {
			stale6 = append(stale6, k6)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("replace routes: list old ipv6: %w", err)
	}
	for _, k := range stale6 {
		if err := deleteKey(t.Routes6, &k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("replace routes: delete old ipv6: %w", err)
		}
	}
	return nil
}

// Sandbox holds the views of one sandbox's maps (loader.Sandbox.Maps).
type Sandbox struct {
	Endpoints EndpointMap
	Stats     StatsMap
	Routes    RouteTable
	LB        LB
	XDP       XDPPorts
}

// ForSandbox returns the views of a sandbox's maps.
func ForSandbox(m loader.Maps) Sandbox {
	return Sandbox{
		Endpoints: EndpointMap{Map: m.Endpoints, V6: m.Endpoints6},
		Stats:     StatsMap{Map: m.Stats, Ext: m.DropsExt},
		Routes:    RouteTable{Routes: m.Routes, Routes6: m.Routes6, Config: m.Config},
		LB: LB{Svc6: m.LBSvc6, Backend6: m.LBBackend6, CT6: m.LBCT6, Aff6: m.LBAff6, Svc: m.LBSvc, Hash: m.LBHash, Backend: m.LBBackend, Stats: m.LBStats, Conns: m.LBConns, CT: m.LBCT, CTMem: m.LBCTMem,
			StatsMem: m.LBStatsMem, ConnsMem: m.LBConnsMem, Aff: m.LBAff, Config: m.Config, VIPs: m.LBVIPs},
		XDP: XDPPorts{Ports: m.XDPPorts, Tx: m.XDPTx},
	}
}

// Memory adds the kernel memory (memlock, in bytes) of each map of a sandbox to out, by the
// map's name in the object (kdp_*). Every *ebpf.Map field of loader.Maps is counted, so a map
// added there is counted without a change here.
func Memory(m loader.Maps, out map[string]uint64) error {
	v := reflect.ValueOf(m)
	for i := 0; i < v.NumField(); i++ {
		mp, ok := v.Field(i).Interface().(*ebpf.Map)
		if !ok || mp == nil {
			continue
		}
		info, err := mp.Info()
		if err != nil {
			return fmt.Errorf("map memory of %s: %w", v.Type().Field(i).Name, err)
		}
		if mem, ok := info.Memlock(); ok {
			out[info.Name] += mem
		}
	}
	return nil
}
