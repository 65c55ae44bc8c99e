package guestemu

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var (
	macA = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xa}
	macB = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xb}
	ipA  = netip.MustParseAddrPort("10.0.0.1:1000")
	ipB  = netip.MustParseAddrPort("10.0.0.2:2000")
)

// tcpFrame builds an Ethernet/IPv4/TCP frame with correct checksums.
func tcpFrame(payload []byte) []byte {
	f := make([]byte, 14+20+20+len(payload))
	copy(f[0:6], macB)
	copy(f[6:12], macA)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(ip[2:], uint16(40+len(payload)))
	copy(ip[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	binary.BigEndian.PutUint16(ip[10:], ^csumFold(csumAdd(0, ip[:20])))
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], 1000)
	binary.BigEndian.PutUint16(tcp[2:], 2000)
	tcp[12] = 5 << 4
	copy(tcp[20:], payload)
	sum := csumAdd(0, ip[12:20]) + 6 + uint32(len(tcp))
	binary.BigEndian.PutUint16(tcp[16:], ^csumFold(csumAdd(sum, tcp)))
	return f
}

func TestVerifyCsum(t *testing.T) {
	udp := UDPFrame(macA, macB, ipA, ipB, []byte("hello, odd"))
	tcp := tcpFrame([]byte("hello"))
	badIP := UDPFrame(macA, macB, ipA, ipB, []byte("x"))
	badIP[14+10] ^= 1
	badUDP := UDPFrame(macA, macB, ipA, ipB, []byte("x"))
	badUDP[len(badUDP)-1] ^= 0x40
	badTCP := tcpFrame([]byte("hello"))
	badTCP[len(badTCP)-1] ^= 1
	noUDPCsum := UDPFrame(macA, macB, ipA, ipB, []byte("x"))
	binary.BigEndian.PutUint16(noUDPCsum[14+20+6:], 0)
	arp := make([]byte, 42)
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	truncated := UDPFrame(macA, macB, ipA, ipB, []byte("abcdef"))[:40]

	got := map[string]int{}
	for name, f := range map[string][]byte{
		"udp": udp, "tcp": tcp, "bad ip": badIP, "bad udp": badUDP, "bad tcp": badTCP,
		"udp no csum": noUDPCsum, "arp": arp, "truncated": truncated,
	} {
		got[name] = verifyCsum(f)
	}
	want := map[string]int{
		"udp": csumOK, "tcp": csumOK, "bad ip": csumBad, "bad udp": csumBad, "bad tcp": csumBad,
		"udp no csum": csumOK, "arp": csumNone, "truncated": csumBad,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("verifyCsum (-want +got):\n%s", diff)
	}
}

func TestCompleteCsum(t *testing.T) {
	for name, f := range map[string][]byte{
		"udp": UDPFrame(macA, macB, ipA, ipB, []byte("partial checksum!")),
		"tcp": tcpFrame([]byte("partial")),
	} {
		want := append([]byte(nil), f...)
		// Replace the full checksum by the pseudo-header sum, as a sender
		// with checksum offload leaves it.
		ip := f[14:]
		l4 := ip[20:]
		field := 6
		if ip[9] == 6 {
			field = 16
		}
		binary.BigEndian.PutUint16(l4[field:], csumFold(csumAdd(0, ip[12:20])+uint32(ip[9])+uint32(len(l4))))
		if verifyCsum(f) != csumBad {
			t.Errorf("%s: partial checksum verified as good", name)
		}
		h := VnetHdr{Flags: 1, CsumStart: 34, CsumOffset: uint16(field)}
		if !completeCsum(f, h) {
			t.Fatalf("%s: completeCsum failed", name)
		}
		if diff := cmp.Diff(want, f); diff != "" {
			t.Errorf("%s: completed frame (-want +got):\n%s", name, diff)
		}
	}
	if completeCsum(make([]byte, 20), VnetHdr{CsumStart: 34, CsumOffset: 6}) {
		t.Error("completeCsum out of range succeeded")
	}
}

func TestReflect(t *testing.T) {
	f := UDPFrame(macA, macB, ipA, ipB, []byte("ping"))
	reflect(f)
	want := UDPFrame(macB, macA, ipB, ipA, []byte("ping"))
	if diff := cmp.Diff(want, f); diff != "" {
		t.Errorf("reflected frame (-want +got):\n%s", diff)
	}
	if verifyCsum(f) != csumOK {
		t.Error("reflected frame has bad checksums")
	}
	tcp := tcpFrame(nil)
	reflect(tcp)
	if diff := cmp.Diff([]byte(macA), tcp[0:6]); diff != "" {
		t.Errorf("reflected tcp dst mac (-want +got):\n%s", diff)
	}
}

func TestARPReply(t *testing.T) {
	req := make([]byte, 42)
	copy(req[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(req[6:12], macA)
	binary.BigEndian.PutUint16(req[12:], 0x0806)
	a := req[14:]
	binary.BigEndian.PutUint16(a[0:], 1)
	binary.BigEndian.PutUint16(a[2:], 0x0800)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:], 1)
	copy(a[8:14], macA)
	copy(a[14:18], []byte{10, 0, 0, 1})
	copy(a[24:28], []byte{10, 0, 0, 2})

	other := append([]byte(nil), req...)
	if arpReply(other, macB, [4]byte{10, 0, 0, 3}) {
		t.Error("answered an ARP request for another address")
	}
	if !arpReply(req, macB, [4]byte{10, 0, 0, 2}) {
		t.Fatal("did not answer an ARP request for the guest")
	}
	want := make([]byte, 42)
	copy(want[0:6], macA)
	copy(want[6:12], macB)
	binary.BigEndian.PutUint16(want[12:], 0x0806)
	w := want[14:]
	binary.BigEndian.PutUint16(w[0:], 1)
	binary.BigEndian.PutUint16(w[2:], 0x0800)
	w[4], w[5] = 6, 4
	binary.BigEndian.PutUint16(w[6:], 2)
	copy(w[8:14], macB)
	copy(w[14:18], []byte{10, 0, 0, 2})
	copy(w[18:24], macA)
	copy(w[24:28], []byte{10, 0, 0, 1})
	if diff := cmp.Diff(want, req); diff != "" {
		t.Errorf("ARP reply (-want +got):\n%s", diff)
	}
}

func TestParseVnetHdr(t *testing.T) {
	b := []byte{1, 0x81, 54, 0, 0xa8, 5, 34, 0, 16, 0, 1, 0}
	want := VnetHdr{Flags: 1, GSOType: 0x81, HdrLen: 54, GSOSize: 1448, CsumStart: 34, CsumOffset: 16, NumBuffers: 1}
	h := ParseVnetHdr(b)
	if diff := cmp.Diff(want, h); diff != "" {
		t.Errorf("ParseVnetHdr (-want +got):\n%s", diff)
	}
	if !h.NeedsCsum() || !h.GSO() {
		t.Errorf("NeedsCsum %v GSO %v, want both", h.NeedsCsum(), h.GSO())
	}
}
