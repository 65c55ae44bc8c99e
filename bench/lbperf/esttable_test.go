package lbperf

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
)

// estTableConns is how many connections BenchmarkEstablishedTable holds: half of the
// default table's 8192, two per bucket on average, so most lookups compare more than one
// slot and many find their entry in a bucket's second pair or later.
const estTableConns = 4096

// BenchmarkEstablishedTable is the established connection's frame where BenchmarkPerPacket's
// is not: one of many connections, so its bucket is one of many (the default table, 16384
// entries in 768 KiB) and not the one the previous frame read, and not always its first
// pair. A frame to no service and a frame of a random one of estTableConns connections
// (the guest's ports from 10000; those whose entry did not fit are left out) alternate.
// It compares the connection table's layouts by what a lookup reads: its direction's slots,
// up to the one that holds its key.
//
//	go test -run XXX -bench EstablishedTable -benchtime 20000x ./bench/lbperf/
func BenchmarkEstablishedTable(b *testing.B) {
	r := newRigCT(b, 5000, 0)
	other := netip.MustParseAddrPort("172.16.0.1:80")
	// Touch every page of the table once: this guest maps memory in on its first touch.
	ct := r.lb.CT
	for idx := uint32(0); idx < ct.MaxEntries(); idx += max(4096/ct.ValueSize(), 1) {
		if _, err := ct.LookupBytes(idx); err != nil {
			b.Fatal(err)
		}
	}
	ne32 := func(a netip.Addr) uint32 { x := a.As4(); return binary.NativeEndian.Uint32(x[:]) }
	ne16 := func(p uint16) uint16 {
		var x [2]byte
		binary.BigEndian.PutUint16(x[:], p)
		return binary.NativeEndian.Uint16(x[:])
	}
	var ports []uint16
	for i := range estTableConns {
		port := uint16(10000 + i)
		r.tapIn.Benchmark(tcpFrame(vip, port, 0x02), 1, nil)
		ports = append(ports, port)
	}
	// Only the connections that kept their entries: a frame of one evicted would make a new one.
	ports = slices.DeleteFunc(ports, func(port uint16) bool {
		k := loader.DatapathCtKey{Saddr: ne32(guestIP), Daddr: ne32(vip.Addr()), Sport: ne16(port), Dport: ne16(vip.Port()), Proto: unix.IPPROTO_TCP}
		_, err := r.lb.ConnEntry(k)
		return err != nil
	})
	rng := rand.New(rand.NewPCG(1, 2)) // the same frames for every build
	var none, est []time.Duration
	b.ResetTimer()
	for range b.N {
		none = append(none, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(other, 40000, 0x10) })...)
		port := ports[rng.IntN(len(ports))]
		est = append(est, measure(b, r.tapIn, 1, func(int) []byte { return tcpFrame(vip, port, 0x10) })...)
	}
	b.StopTimer()
	n := report(b, "no-service", none)
	e := report(b, "established", est)
	b.Logf("per packet (median): no service %v, a frame of one of %d established connections %v (+%v)", n, len(ports), e, e-n)
}
