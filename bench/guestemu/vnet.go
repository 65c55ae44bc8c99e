package guestemu

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// VnetHdrLen is the virtio_net_hdr size the emulator sets on every tap
// (struct virtio_net_hdr_mrg_rxbuf, like QEMU).
const VnetHdrLen = 12

// VnetHdr is a decoded virtio_net_hdr (little endian, as a modern
// virtio/tun device uses on x86).
type VnetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
	NumBuffers uint16
}

// ParseVnetHdr decodes the first VnetHdrLen bytes of b.
func ParseVnetHdr(b []byte) VnetHdr {
	_ = b[VnetHdrLen-1]
	return VnetHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
		NumBuffers: binary.LittleEndian.Uint16(b[10:]),
	}
}

// NeedsCsum reports whether the frame carries a partial checksum.
func (h VnetHdr) NeedsCsum() bool { return h.Flags&unix.VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 }

// GSO reports whether the frame is a GSO super-frame.
func (h VnetHdr) GSO() bool {
	return h.GSOType&^unix.VIRTIO_NET_HDR_GSO_ECN != unix.VIRTIO_NET_HDR_GSO_NONE
}

// Checksum results.
const (
	csumNone = iota // not an IPv4 frame, a fragment, or a GSO frame
	csumOK
	csumBad
)

// csumAdd adds b to a one's-complement running sum.
func csumAdd(sum uint32, b []byte) uint32 {
	n := len(b)
	i := 0
	for ; i+1 < n; i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if i < n {
		sum += uint32(b[i]) << 8
	}
	return sum
}

func csumFold(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// l3 returns the offset of the network header and the ethertype, skipping
// one 802.1Q tag.
func l3(frame []byte) (int, uint16) {
	if len(frame) < 14 {
		return 0, 0
	}
	et := binary.BigEndian.Uint16(frame[12:])
	off := 14
	if et == 0x8100 && len(frame) >= 18 {
		et = binary.BigEndian.Uint16(frame[16:])
		off = 18
	}
	return off, et
}

// completeCsum finishes a partial checksum as the virtio header describes:
// the one's-complement sum from CsumStart to the end of the frame is stored
// at CsumStart+CsumOffset. It reports false when the offsets are out of
// range.
func completeCsum(frame []byte, h VnetHdr) bool {
	start, field := int(h.CsumStart), int(h.CsumStart)+int(h.CsumOffset)
	if start >= len(frame) || field+2 > len(frame) {
		return false
	}
	s := ^csumFold(csumAdd(0, frame[start:]))
	binary.BigEndian.PutUint16(frame[field:], s)
	return true
}

// verifyCsum checks the IPv4 header checksum and the TCP or UDP checksum of
// frame.
func verifyCsum(frame []byte) int {
	off, et := l3(frame)
	if et != 0x0800 || len(frame) < off+20 {
		return csumNone
	}
	ip := frame[off:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ip[0]>>4 != 4 || ihl < 20 || total < ihl || total > len(ip) {
		return csumBad
	}
	if csumFold(csumAdd(0, ip[:ihl])) != 0xffff {
		return csumBad
	}
	if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or fragment offset
		return csumOK
	}
	proto := ip[9]
	l4 := ip[ihl:total]
	switch proto {
	case unix.IPPROTO_TCP:
		if len(l4) < 20 {
			return csumBad
		}
	case unix.IPPROTO_UDP:
		if len(l4) < 8 {
			return csumBad
		}
		if binary.BigEndian.Uint16(l4[6:]) == 0 { // no checksum
			return csumOK
		}
	default:
		return csumOK
	}
	sum := csumAdd(0, ip[12:20]) // addresses
	sum += uint32(proto) + uint32(len(l4))
	sum = csumAdd(sum, l4)
	if csumFold(sum) != 0xffff {
		return csumBad
	}
	return csumOK
}

// reflect turns frame around in place: MACs swapped, and for IPv4 UDP the
// addresses and ports swapped too. The IPv4 and UDP checksums stay valid:
// a one's-complement sum does not depend on the order of its terms.
func reflect(frame []byte) {
	if len(frame) < 14 {
		return
	}
	var mac [6]byte
	copy(mac[:], frame[0:6])
	copy(frame[0:6], frame[6:12])
	copy(frame[6:12], mac[:])
	off, et := l3(frame)
	if et != 0x0800 || len(frame) < off+20 {
		return
	}
	ip := frame[off:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != unix.IPPROTO_UDP || ihl < 20 || len(ip) < ihl+8 {
		return
	}
	var a [4]byte
	copy(a[:], ip[12:16])
	copy(ip[12:16], ip[16:20])
	copy(ip[16:20], a[:])
	udp := ip[ihl:]
	udp[0], udp[1], udp[2], udp[3] = udp[2], udp[3], udp[0], udp[1]
}

// arpReply turns an ARP request for ip into the reply from mac, in place.
// It reports whether frame was such a request.
func arpReply(frame []byte, mac []byte, ip [4]byte) bool {
	// Ethernet(14) + ARP for IPv4 over Ethernet (28).
	if len(frame) < 42 || binary.BigEndian.Uint16(frame[12:]) != 0x0806 {
		return false
	}
	a := frame[14:]
	if binary.BigEndian.Uint16(a[0:]) != 1 || binary.BigEndian.Uint16(a[2:]) != 0x0800 ||
		a[4] != 6 || a[5] != 4 || binary.BigEndian.Uint16(a[6:]) != 1 {
		return false
	}
	if [4]byte(a[24:28]) != ip {
		return false
	}
	copy(frame[0:6], a[8:14]) // to the requester
	copy(frame[6:12], mac)
	binary.BigEndian.PutUint16(a[6:], 2)
	copy(a[18:28], a[8:18]) // target = old sender
	copy(a[8:14], mac)
	copy(a[14:18], ip[:])
	return true
}
