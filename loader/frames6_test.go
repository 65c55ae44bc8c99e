package loader_test

import (
	"encoding/binary"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// IPv6 frames for the tests: an IPv6 header, a chain of extension headers and an upper layer,
// with correct payload lengths and upper-layer checksums (the programs do not check them, the
// kernels on real devices do).

// ext6 is one extension header: its protocol number and its body after the next-header byte
// (padded to the header's unit by ip6Frame).
type ext6 struct {
	proto uint8
	body  []byte
}

var (
	hopByHop = ext6{unix.IPPROTO_HOPOPTS, nil}
	dstOpts  = ext6{unix.IPPROTO_DSTOPTS, nil}
	routing  = ext6{unix.IPPROTO_ROUTING, nil}
)

// fragment6 is a fragment header with the given offset (in 8-byte units) and more flag.
func fragment6(offset uint16, more bool) ext6 {
	b := make([]byte, 7)
	v := offset << 3
	if more {
		v |= 1
	}
	binary.BigEndian.PutUint16(b[1:], v)
	return ext6{unix.IPPROTO_FRAGMENT, b}
}

// ip6Frame builds Ethernet + IPv6 + exts + an upper layer of protocol proto.
func ip6Frame(dst, src net.HardwareAddr, sip, dip netip.Addr, exts []ext6, proto uint8, upper []byte) []byte {
	var chain []byte
	for i, e := range exts {
		next := proto
		if i+1 < len(exts) {
			next = exts[i+1].proto
		}
		h := append([]byte{next, 0}, e.body...)
		switch e.proto {
		case unix.IPPROTO_FRAGMENT:
			h = h[:8]
			h[1] = 0
		case unix.IPPROTO_AH:
			for len(h) < 12 || len(h)%4 != 0 {
				h = append(h, 0)
			}
			h[1] = byte(len(h)/4 - 2)
		default:
			for len(h)%8 != 0 {
				h = append(h, 0)
			}
			h[1] = byte(len(h)/8 - 1)
		}
		chain = append(chain, h...)
	}
	first := proto
	if len(exts) > 0 {
		first = exts[0].proto
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(chain)+len(upper)))
	ip[6] = first
	ip[7] = 64
	s, d := sip.As16(), dip.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	up := append([]byte(nil), upper...)
	if off := csumOffset(proto); off >= 0 && len(up) >= off+2 {
		binary.BigEndian.PutUint16(up[off:], 0)
		binary.BigEndian.PutUint16(up[off:], l4Checksum6(s, d, proto, up))
	}
	b := append(ethHdr(dst, src, unix.ETH_P_IPV6), ip...)
	b = append(b, chain...)
	return append(b, up...)
}

func csumOffset(proto uint8) int {
	switch proto {
	case unix.IPPROTO_TCP:
		return 16
	case unix.IPPROTO_UDP:
		return 6
	case unix.IPPROTO_ICMPV6:
		return 2
	}
	return -1
}

func l4Checksum6(s, d [16]byte, proto uint8, up []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i < len(b); i += 2 {
			if i+1 < len(b) {
				sum += uint32(binary.BigEndian.Uint16(b[i:]))
			} else {
				sum += uint32(b[i]) << 8
			}
		}
	}
	add(s[:])
	add(d[:])
	var ph [8]byte
	binary.BigEndian.PutUint32(ph[:], uint32(len(up)))
	ph[7] = proto
	add(ph[:])
	add(up)
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	c := ^uint16(sum)
	if c == 0 && proto == unix.IPPROTO_UDP {
		c = 0xffff
	}
	return c
}

// udp6 is a UDP header (40000 -> 5000) and payload bytes of zeros.
func udp6(payload int) []byte {
	b := make([]byte, 8+payload)
	binary.BigEndian.PutUint16(b[0:], 40000)
	binary.BigEndian.PutUint16(b[2:], 5000)
	binary.BigEndian.PutUint16(b[4:], uint16(8+payload))
	return b
}

// udp6Frame is a plain IPv6 UDP frame from src to a unicast MAC.
func udp6Frame(src net.HardwareAddr, sip, dip netip.Addr, payload int) []byte {
	return ip6Frame(net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}, src, sip, dip, nil, unix.IPPROTO_UDP, udp6(payload))
}

// icmp6 is an ICMPv6 message of type typ whose body follows the 4-byte header.
func icmp6(typ uint8, body []byte) []byte {
	return append([]byte{typ, 0, 0, 0}, body...)
}
