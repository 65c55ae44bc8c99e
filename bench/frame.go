package bench

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// udpFrame builds an Ethernet + IPv4 + UDP frame with payload bytes of
// payload and correct IPv4 and UDP checksums, as an ordinary sender's
// kernel would put on the wire.
func udpFrame(dst, src net.HardwareAddr, sip, dip netip.Addr, sport, dport uint16, payload int) []byte {
	f := make([]byte, 14+20+8+payload)
	copy(f[0:6], dst)
	copy(f[6:12], src)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+payload))
	ip[6] = 0x40 // DF
	ip[8] = 64
	ip[9] = 17
	s4, d4 := sip.As4(), dip.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum(0, ip)))
	udp := f[34:]
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+payload))
	for i := range payload {
		udp[8+i] = byte(i)
	}
	ps := sum(0, ip[12:20]) + 17 + uint32(8+payload)
	c := ^fold(sum(ps, udp))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], c)
	return f
}

func sum(s uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}
