package maps

import (
	"errors"
	"fmt"
	"net/netip"

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

// EndpointMap is kdp_endpoints: ifindex -> Endpoint.
type EndpointMap struct{ *ebpf.Map }

// Put writes the endpoint entry of device ifindex.
func (m EndpointMap) Put(ifindex uint32, e Endpoint) error {
	if e.Slot >= MaxEndpoints {
		return fmt.Errorf("put endpoint %d: %w: %d", ifindex, ErrSlot, e.Slot)
	}
	v, err := e.encode()
	if err != nil {
		return fmt.Errorf("put endpoint %d: %w", ifindex, err)
	}
	if err := m.Update(ifindex, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("put endpoint %d: %w", ifindex, err)
	}
	return nil
}

// Get reads the endpoint entry of device ifindex.
func (m EndpointMap) Get(ifindex uint32) (Endpoint, error) {
	var v loader.DatapathEndpoint
	if err := m.Lookup(ifindex, &v); err != nil {
		return Endpoint{}, fmt.Errorf("get endpoint %d: %w", ifindex, err)
	}
	return decodeEndpoint(v), nil
}

// Remove deletes the entry of device ifindex; a missing entry is not an error.
func (m EndpointMap) Remove(ifindex uint32) error {
	if err := m.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %d: %w", ifindex, err)
	}
	return nil
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
	return out, nil
}

// StatsMap is kdp_stats: per-CPU counters at index slot*2+direction.
type StatsMap struct{ *ebpf.Map }

func statsIndex(slot uint32, d Direction) uint32 { return slot*2 + uint32(d) }

// Read sums the per-CPU counters of one slot and direction.
func (m StatsMap) Read(slot uint32, d Direction) (Stats, error) {
	var sum Stats
	if slot >= MaxEndpoints {
		return sum, fmt.Errorf("read stats: %w: %d", ErrSlot, slot)
	}
	var per []Stats
	if err := m.Lookup(statsIndex(slot, d), &per); err != nil {
		return sum, fmt.Errorf("read stats of slot %d %s: %w", slot, d, err)
	}
	for _, s := range per {
		sum.Add(s)
	}
	return sum, nil
}

// Reset zeroes both directions of a slot, so a reused slot starts from nothing.
func (m StatsMap) Reset(slot uint32) error {
	if slot >= MaxEndpoints {
		return fmt.Errorf("reset stats: %w: %d", ErrSlot, slot)
	}
	zero := make([]Stats, ebpf.MustPossibleCPU())
	for _, d := range []Direction{FromGuest, ToGuest} {
		if err := m.Update(statsIndex(slot, d), zero, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset stats of slot %d: %w", slot, err)
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

// The route trie's key and value (struct route_key, struct route_val).
type (
	routeKey = loader.DatapathRouteKey
	routeVal = loader.DatapathRouteVal
)

// encode makes r's key (without its tag, which names the generation) and value.
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

func decodeRoute(k routeKey, v routeVal) Route {
	r := Route{Slot: k.Tag & 0xffff, Dest: netip.PrefixFrom(addr4(k.Addr), int(k.Prefixlen)-32)}
	if v.Gateway != 0 {
		r.Gateway = addr4(v.Gateway)
	}
	return r
}

// RouteTable is kdp_routes together with kdp_config, which says which generation of the
// route trie is live.
type RouteTable struct {
	Routes *ebpf.Map
	Config *ebpf.Map
}

// Replace installs routes as the whole table, atomically for the datapath: the new table is
// written under the next generation, the generation is switched with one map write, and then
// the old generation's entries are deleted.
func (t RouteTable) Replace(routes []Route) error {
	if len(routes) > MaxRoutes {
		return fmt.Errorf("replace routes: %w: %d > %d", ErrTooManyRoutes, len(routes), MaxRoutes)
	}
	keys := make([]routeKey, len(routes))
	vals := make([]routeVal, len(routes))
	for i, r := range routes {
		if r.Slot >= MaxEndpoints {
			return fmt.Errorf("replace routes: %w: %d", ErrSlot, r.Slot)
		}
		var err error
		if keys[i], vals[i], err = r.encode(); err != nil {
			return fmt.Errorf("replace routes: %w", err)
		}
	}
	cfg, err := t.config()
	if err != nil {
		return err
	}
	next := (cfg.RouteGen + 1) & 0xffff
	var written []routeKey
	undo := func() {
		for _, k := range written {
			t.Routes.Delete(&k)
		}
	}
	for i, r := range routes {
		k := keys[i]
		k.Tag = routeTag(next, r.Slot)
		if err := t.Routes.Update(&k, &vals[i], ebpf.UpdateAny); err != nil {
			undo()
			return fmt.Errorf("replace routes: write %s: %w", r.Dest, err)
		}
		written = append(written, k)
	}
	cfg.RouteGen = next
	if err := t.Config.Update(uint32(0), &cfg, ebpf.UpdateAny); err != nil {
		undo()
		return fmt.Errorf("replace routes: switch generation: %w", err)
	}
	return t.deleteOtherGenerations(next)
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
	return out, nil
}

func (t RouteTable) config() (Config, error) {
	var cfg Config
	if err := t.Config.Lookup(uint32(0), &cfg); err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	return cfg, nil
}

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
		if err := t.Routes.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("replace routes: delete old: %w", err)
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
		Endpoints: EndpointMap{m.Endpoints},
		Stats:     StatsMap{m.Stats},
		Routes:    RouteTable{Routes: m.Routes, Config: m.Config},
		LB:        LB{Svc: m.LBSvc, Backend: m.LBBackend, Stats: m.LBStats, Conns: m.LBConns, CT: m.LBCT, Aff: m.LBAff, Config: m.Config},
		XDP:       XDPPorts{Ports: m.XDPPorts, Tx: m.XDPTx},
	}
}
