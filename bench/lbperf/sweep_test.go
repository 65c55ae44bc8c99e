package lbperf

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// fillCT writes conns connections (an original and a reply entry each, live at now) into the
// IPv4 connection table, spread over its buckets, with their real servers among 100 ids.
func fillCT(b *testing.B, l maps.LB, conns int, now uint64) {
	b.Helper()
	n := int(l.CT.MaxEntries())
	per := 2 * ((conns + n - 1) / n) // slots used per bucket: a connection's two entries, a pair
	left := 2 * conns
	for i := 0; i < n && left > 0; i++ {
		var bk loader.DatapathCtBucket
		for s := 0; s < per && s < loader.CTWays && left > 0; s++ {
			id := uint32(i*loader.CTWays + s)
			k := loader.DatapathCtKey{Saddr: 0x0300a8c0 + id<<24, Daddr: 0x0a00600a, Sport: uint16(id), Dport: 0x5000, Proto: unix.IPPROTO_TCP, Dir: uint8(s & 1)}
			bk.S[loader.CTSlot(k, s/2)] = loader.DatapathCtSlot{
				Key: k,
				E:   loader.DatapathCtEntry{LastSeen: now, Addr: 0x0a00000a, Port: 0x901f, State: maps.CTTCPEst, Backend: 1 + id%100, Svc: 1},
			}
			left--
		}
		if err := l.CT.Put(uint32(i), &bk); err != nil {
			b.Fatal(err)
		}
	}
}

func monoNow() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// BenchmarkSweep: the control plane's steady cost per sandbox with a load balancer: the
// sweeper (maps.LB.Sweep, once a second: expiry, connection counts) and the metrics' count of
// connection entries (maps.LB.ConnEntries, every scrape), on an IPv4 connection table of the
// default size (16384 entries) that is empty, holds 10 connections, or is full.
func BenchmarkSweep(b *testing.B) {
	// Full: the default table's 16384 entries, two per connection (2048 buckets of
	// loader.CTWays slots).
	for _, conns := range []int{0, 10, loader.CTWays * 2048 / 2} {
		r := newRig(b, 0)
		cfg := maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}
		now := monoNow()
		fillCT(b, r.lb, conns, now)
		b.Run(fmt.Sprintf("Sweep/conns=%d", conns), func(b *testing.B) {
			for b.Loop() {
				res, err := r.lb.Sweep(now, cfg, nil)
				if err != nil {
					b.Fatal(err)
				}
				if res.Live != conns {
					b.Fatalf("sweep found %d connections, want %d", res.Live, conns)
				}
			}
		})
		b.Run(fmt.Sprintf("ConnEntries/conns=%d", conns), func(b *testing.B) {
			for b.Loop() {
				n, err := r.lb.ConnEntries(now, cfg)
				if err != nil {
					b.Fatal(err)
				}
				if n != 2*conns {
					b.Fatalf("%d entries, want %d", n, 2*conns)
				}
			}
		})
	}
}
