// Package maps gives typed Go views of the datapath's BPF maps: one view per map (or per group
// of maps that change together), for the sandbox collection (EndpointMap, StatsMap,
// RouteTable, LB, XDPPorts; ForSandbox builds them all from loader.Sandbox.Maps) and for direct
// mode's node collection (Node, from loader.Node.Maps). The loader loads and pins the maps;
// everything that reads or writes an entry is here.
//
// Keys and values are the types bpf2go generates from the object's BTF (loader.Datapath*,
// loader.Node*), so a C struct and its Go side cannot drift apart. Counters are used as
// generated (Stats, LBStats, Config, ...). Entries that hold addresses have a view type with
// netip addresses (Endpoint, Route, Backend, ServiceSpec, Conn) that is encoded here, in one
// place (addr.go): the maps of this datapath hold IPv4 only, and an IPv6 address is refused
// with ErrFamily, never cut down. IPv6 gets maps of its own, beside these, so the v4 maps keep
// the layout of every earlier release and the pins of a running agent are re-adopted as they
// are.
//
// The views are thin: they hold no state of their own and are safe for concurrent use to the
// extent the underlying maps are (single-element updates are atomic).
package maps
