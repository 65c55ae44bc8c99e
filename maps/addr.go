package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// ErrFamily is returned when an address of a family a map does not hold is handed to a view
// (an IPv6 address where a v4 map's field is, or to a view without its v6 map). The v4 maps keep
// the layout of every earlier release, so the pins of a running agent are re-adopted unchanged;
// IPv6 has maps of its own (kdp_endpoints6, kdp_routes6). A v6 address is refused rather than
// cut down to four bytes.
var ErrFamily = errors.New("address family not held by this map")

// This file is the one place that turns addresses into the bytes the v4 maps hold and back.
// The generated key and value types carry a __be32 as a uint32 whose bytes in memory are the
// address in network order, and a __be16 port likewise: NativeEndian keeps those bytes as they
// are on the wire, whatever the host's byte order.

// v4 encodes a, which must be an IPv4 address.
func v4(a netip.Addr) (uint32, error) {
	if !a.Is4() {
		if a.Is6() {
			return 0, fmt.Errorf("address %s: %w", a, ErrFamily)
		}
		return 0, fmt.Errorf("no address")
	}
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]), nil
}

// v4OrZero encodes a, with the zero Addr as 0.0.0.0 (no gateway, no address).
func v4OrZero(a netip.Addr) (uint32, error) {
	if !a.IsValid() {
		return 0, nil
	}
	return v4(a)
}

// addr4 decodes an address v4 encoded.
func addr4(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// be16 encodes a port in network order; it is its own inverse.
func be16(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// addrPort4 decodes an address and a port v4 and be16 encoded.
func addrPort4(a uint32, p uint16) netip.AddrPort { return netip.AddrPortFrom(addr4(a), be16(p)) }

// checkFamily refuses a prefix the v4 maps cannot hold; the zero Prefix (none) passes.
func checkFamily(p netip.Prefix) error {
	if p.IsValid() && !p.Addr().Is4() {
		return fmt.Errorf("prefix %s: %w", p, ErrFamily)
	}
	return nil
}

// LinkLocalOf is the modified EUI-64 link-local address of mac (RFC 4291 appendix A): the one a
// guest forms by default, and the one the datapath accepts when no link-local is configured.
func LinkLocalOf(mac [6]byte) netip.Addr {
	return netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 8: mac[0] ^ 2, 9: mac[1], 10: mac[2], 11: 0xff, 12: 0xfe, 13: mac[3], 14: mac[4], 15: mac[5]})
}

// v6 encodes a, which must be an IPv6 address (not an IPv4-mapped one), as the four __be32
// words of an in6_addr.
func v6(a netip.Addr) ([4]uint32, error) {
	var w [4]uint32
	if !a.Is6() || a.Is4In6() {
		return w, fmt.Errorf("address %s: want IPv6: %w", a, ErrFamily)
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w, nil
}

// v6OrZero encodes a, with the zero Addr as ::.
func v6OrZero(a netip.Addr) ([4]uint32, error) {
	if !a.IsValid() {
		return [4]uint32{}, nil
	}
	return v6(a)
}

// addr6 decodes an address v6 encoded.
func addr6(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b)
}
