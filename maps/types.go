package maps

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/kata-dp/kata-dp/loader"
)

// Limits of one sandbox's datapath (bpf/lib/common.h).
const (
	MaxEndpoints = 64   // NIC slots per sandbox
	MaxRoutes    = 1024 // routes per sandbox, all NICs together
	NumDrops     = 16   // drop reason counters per endpoint and direction (kdp_stats + kdp_drops_ext)
	numBaseDrops = 8    // of which kdp_stats holds the first
)

// Role says which side of a NIC an endpoint entry describes.
type Role uint8

// Roles (enum kdp_role).
const (
	RoleTap    Role = 1 // the VM's tap: frames from the guest
	RoleUplink Role = 2 // the device joined to the tap: frames for the guest
)

func (r Role) String() string {
	switch r {
	case RoleTap:
		return "tap"
	case RoleUplink:
		return "uplink"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

// Flags switch per-endpoint features (enum kdp_ep_flags).
type Flags uint32

// Endpoint flags.
const (
	FlagAntiSpoof    Flags = 1 << 0
	FlagStrictEgress Flags = 1 << 1
	FlagHasIP        Flags = 1 << 2
	// FlagPass: check and count, then pass the frame on instead of redirecting it to the
	// peer (macvtap-bpf mode: macvlan moves the frames).
	FlagPass Flags = 1 << 3
)

func (f Flags) String() string {
	var s []string
	for _, x := range []struct {
		f    Flags
		name string
	}{{FlagAntiSpoof, "anti-spoof"}, {FlagStrictEgress, "strict-egress"}, {FlagHasIP, "has-ip"}, {FlagPass, "pass"}} {
		if f&x.f != 0 {
			s = append(s, x.name)
		}
	}
	return strings.Join(s, "|")
}

// Direction of traffic relative to the guest.
type Direction uint32

// Directions (enum kdp_dir).
const (
	FromGuest Direction = 0
	ToGuest   Direction = 1
)

func (d Direction) String() string {
	if d == FromGuest {
		return "from_guest"
	}
	return "to_guest"
}

// DropReason indexes Stats.Drops (enum kdp_drop).
type DropReason int

// Drop reasons.
const (
	DropSpoofMAC       DropReason = 0
	DropSpoofIP        DropReason = 1
	DropSpoofARP       DropReason = 2
	DropEgressNoRoute  DropReason = 3
	DropMalformed      DropReason = 4
	DropLBNoBackend    DropReason = 5
	DropLBRewrite      DropReason = 6
	DropSpoofIP6       DropReason = 7  // IPv6 source not the NIC's address or link-local
	DropNDP            DropReason = 8  // NS/NA with a foreign target or link-layer address
	DropRA             DropReason = 9  // router advertisement or redirect from a guest
	DropVLAN           DropReason = 10 // 802.1Q/802.1ad tagged frame
	DropEthertype      DropReason = 11 // neither IPv4, IPv6 nor ARP
	DropNoAddr         DropReason = 12 // a family the NIC has no address of
	numDropReasonsUsed            = 13 // 13..15 are reserved
)

var dropNames = [NumDrops]string{"spoof_mac", "spoof_ip", "spoof_arp", "egress_no_route", "malformed", "lb_no_backend", "lb_rewrite",
	"spoof_ip6", "ndp", "ra", "vlan", "ethertype", "no_addr", "reserved13", "reserved14", "reserved15"}

func (r DropReason) String() string {
	if r >= 0 && int(r) < len(dropNames) {
		return dropNames[r]
	}
	return fmt.Sprintf("drop(%d)", int(r))
}

// DropReasons lists the reasons in use, in counter order.
func DropReasons() []DropReason {
	out := make([]DropReason, numDropReasonsUsed)
	for i := range out {
		out[i] = DropReason(i)
	}
	return out
}

// Endpoint is one side of a guest NIC (struct endpoint), keyed by the ifindex of the device
// the program runs on. Put encodes it into the generated DatapathEndpoint.
type Endpoint struct {
	PeerIfindex uint32       // redirect target; 0 = not joined
	Slot        uint32       // NIC slot in the sandbox
	Addr        netip.Prefix // guest IPv4 address and subnet; zero = none (FlagHasIP follows it)
	Addr6       netip.Prefix // guest IPv6 address and on-link prefix; zero = none
	LinkLocal   netip.Addr   // guest link-local address; zero = the EUI-64 address of MAC
	MAC         [6]byte      // guest MAC
	Role        Role
	Flags       Flags // FlagHasIP is set by Put from Addr, whatever this says
}

// SetMAC stores the guest's MAC; it must be 6 bytes long.
func (e *Endpoint) SetMAC(mac net.HardwareAddr) error {
	if len(mac) != 6 {
		return fmt.Errorf("mac %q: want 6 bytes", mac)
	}
	copy(e.MAC[:], mac)
	return nil
}

func (e Endpoint) String() string {
	ip := "-"
	if e.Addr.IsValid() {
		ip = e.Addr.String()
	}
	if e.Addr6.IsValid() {
		ip += "," + e.Addr6.String()
	}
	if e.LinkLocal.IsValid() {
		ip += ",ll=" + e.LinkLocal.String()
	}
	return fmt.Sprintf("slot=%d role=%s mac=%s ip=%s peer=%d flags=%s",
		e.Slot, e.Role, net.HardwareAddr(e.MAC[:]), ip, e.PeerIfindex, e.Flags)
}

func (e Endpoint) encode() (loader.DatapathEndpoint, error) {
	v := loader.DatapathEndpoint{PeerIfindex: e.PeerIfindex, Slot: e.Slot, Mac: e.MAC, Role: uint8(e.Role), Flags: uint32(e.Flags &^ FlagHasIP)}
	if err := checkFamily(e.Addr); err != nil {
		return v, err
	}
	if e.Addr.IsValid() {
		v.Ip, _ = v4(e.Addr.Addr())
		v.Prefixlen = uint8(e.Addr.Bits())
		v.Flags |= uint32(FlagHasIP)
	}
	return v, nil
}

// hasV6 says whether e has an IPv6 side for kdp_endpoints6.
func (e Endpoint) hasV6() bool { return e.Addr6.IsValid() || e.LinkLocal.IsValid() }

// encode6 makes e's kdp_endpoints6 entry (struct endpoint6).
func (e Endpoint) encode6() (loader.DatapathEndpoint6, error) {
	var v loader.DatapathEndpoint6
	if e.Addr6.IsValid() {
		a, err := v6(e.Addr6.Addr())
		if err != nil {
			return v, err
		}
		v.Addr, v.Prefixlen, v.Flags = a, uint8(e.Addr6.Bits()), v.Flags|flag6Addr
	}
	if e.LinkLocal.IsValid() {
		if !e.LinkLocal.Is6() || !e.LinkLocal.IsLinkLocalUnicast() {
			return v, fmt.Errorf("link-local %s: not an IPv6 link-local address", e.LinkLocal)
		}
		v.Ll, _ = v6(e.LinkLocal)
		v.Flags |= flag6LL
	}
	return v, nil
}

// enum kdp_ep6_flags
const (
	flag6Addr = 1 << 0
	flag6LL   = 1 << 1
)

func decodeEndpoint6(e *Endpoint, v loader.DatapathEndpoint6) {
	if v.Flags&flag6Addr != 0 {
		e.Addr6 = netip.PrefixFrom(addr6(v.Addr), int(v.Prefixlen))
	}
	if v.Flags&flag6LL != 0 {
		e.LinkLocal = addr6(v.Ll)
	}
}

func decodeEndpoint(v loader.DatapathEndpoint) Endpoint {
	e := Endpoint{PeerIfindex: v.PeerIfindex, Slot: v.Slot, MAC: v.Mac, Role: Role(v.Role), Flags: Flags(v.Flags)}
	if e.Flags&FlagHasIP != 0 {
		e.Addr = netip.PrefixFrom(addr4(v.Ip), int(v.Prefixlen))
	}
	return e
}

// Stats are the counters of one endpoint in one direction: struct ep_stats (packets, bytes and
// the first eight drop reasons) and struct ep_drops_ext (the rest).
type Stats struct {
	Packets uint64
	Bytes   uint64
	Drops   [NumDrops]uint64
}

// Add accumulates o into s.
func (s *Stats) Add(o Stats) {
	s.Packets += o.Packets
	s.Bytes += o.Bytes
	for i := range s.Drops {
		s.Drops[i] += o.Drops[i]
	}
}

// TotalDrops is the sum over all reasons.
func (s Stats) TotalDrops() uint64 {
	var n uint64
	for _, d := range s.Drops {
		n += d
	}
	return n
}

func (s Stats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "packets=%d bytes=%d", s.Packets, s.Bytes)
	for _, r := range DropReasons() {
		if s.Drops[r] != 0 {
			fmt.Fprintf(&b, " %s=%d", r, s.Drops[r])
		}
	}
	return b.String()
}

// Config flags (enum kdp_cfg_flags), in Config.Flags.
const (
	ConfigLB uint32 = 1 << 0 // the load balancer has services or live connections
)

// Config is struct config: sandbox-wide settings (timeouts in seconds).
type Config = loader.DatapathConfig

func routeTag(gen, slot uint32) uint32 { return gen<<16 | slot&0xffff }
