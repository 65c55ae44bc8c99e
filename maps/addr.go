package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// ErrFamily is returned when an address of a family the datapath's maps do not hold yet is
// handed to a view. The v4 maps keep the layout of every earlier release, so the pins of a
// running agent are re-adopted unchanged; IPv6 gets maps of its own. Until they exist a v6
// address is refused here rather than cut down to four bytes.
var ErrFamily = errors.New("IPv6 not supported by this datapath yet")

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
