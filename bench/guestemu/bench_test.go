package guestemu_test

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/netdev"
)

// benchTopo makes a netns with an addressed tap, a permanent neighbour
// entry for the guest (no ARP) and a started Counter pinned to the last CPU.
func benchTopo(b testing.TB) (*topo.NetNS, *guestemu.Counter, netdev.LinkInfo) {
	b.Helper()
	host := topotest.MustNetNS(b, "kdptg-b")
	if err := host.DisableIPv6(); err != nil {
		b.Fatal(err)
	}
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{VnetHdr: true}); err != nil {
		b.Fatal(err)
	}
	if err := host.AddAddr("kdptap0", "10.194.0.1/24"); err != nil {
		b.Fatal(err)
	}
	if err := host.AddNeigh("kdptap0", "10.194.0.2", guestMAC); err != nil {
		b.Fatal(err)
	}
	fds, err := netdev.OpenTap(host.Path(), "kdptap0", 1, true, true)
	if err != nil {
		b.Fatal(err)
	}
	defer fds[0].Close()
	c, err := guestemu.NewCounter(fds, guestemu.CounterOptions{CPUs: []int{runtime.NumCPU() - 1}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	if err := c.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	tap, err := host.Link("kdptap0")
	if err != nil {
		b.Fatal(err)
	}
	return host, c, tap
}

// BenchmarkCounterRx: UDP datagrams (60-byte frames) from a socket on the
// host side, read by the Counter. Reports what arrived and the emulator's
// CPU time per frame.
func BenchmarkCounterRx(b *testing.B) {
	host, c, _ := benchTopo(b)
	pc, err := host.ListenPacket("udp4", "10.194.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer pc.Close()
	to := &net.UDPAddr{IP: net.IPv4(10, 194, 0, 2), Port: 9}
	payload := make([]byte, 18)
	cpu0 := c.CPUTime()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		pc.WriteTo(payload, to)
	}
	// Let the reader drain.
	last, deadline := uint64(0), time.Now().Add(2*time.Second)
	for time.Now().Before(deadline) {
		s := c.Stats().RxFrames
		if s >= uint64(b.N) || (s == last && s > 0) {
			break
		}
		last = s
		time.Sleep(5 * time.Millisecond)
	}
	b.StopTimer()
	s := c.Stats()
	b.ReportMetric(float64(s.RxFrames)/b.Elapsed().Seconds(), "frames/s")
	if s.RxFrames > 0 {
		b.ReportMetric(float64((c.CPUTime()-cpu0).Nanoseconds())/float64(s.RxFrames), "emu-ns/frame")
	}
	b.ReportMetric(100*(1-float64(s.RxFrames)/float64(b.N)), "lost-%")
}

// BenchmarkFlood: frames written into the tap towards the host (dropped
// there as not addressed to it), one write each.
func BenchmarkFlood(b *testing.B) {
	_, c, tap := benchTopo(b)
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	f := guestemu.UDPFrame(guestMAC, other, netip.MustParseAddrPort("10.194.0.2:9"), netip.MustParseAddrPort("10.194.0.3:9"), make([]byte, 18))
	_ = tap
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ResetTimer()
	n, err := c.Flood(context.Background(), 0, f, b.N)
	b.StopTimer()
	if err != nil || n != b.N {
		b.Fatalf("flood wrote %d of %d: %v", n, b.N, err)
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "frames/s")
}

func TestFloodReachesHost(t *testing.T) {
	host, c, _ := benchTopo(t)
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	f := guestemu.UDPFrame(guestMAC, other, netip.MustParseAddrPort("10.194.0.2:9"), netip.MustParseAddrPort("10.194.0.3:9"), nil)
	n, err := c.Flood(context.Background(), 0, f, 1000)
	if err != nil || n != 1000 {
		t.Fatalf("flood wrote %d of 1000: %v", n, err)
	}
	rx, _ := linkStats(t, host, "kdptap0")
	if rx != 1000 {
		t.Errorf("tap rx_packets %d, want 1000", rx)
	}
	if s := c.Stats(); s.TxFrames != 1000 || s.TxBytes != uint64(1000*len(f)) {
		t.Errorf("stats %+v, want 1000 frames of %d bytes", s, len(f))
	}
	if c.CPUTime() <= 0 {
		t.Error("no CPU time accounted to the worker")
	}
}
