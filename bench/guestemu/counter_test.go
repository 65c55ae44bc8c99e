package guestemu_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/netdev"
	"golang.org/x/sys/unix"
)

var (
	guestMAC = net.HardwareAddr{0x02, 0x6b, 0x64, 0x70, 0x00, 0x02}
	hostAP   = netip.MustParseAddrPort("10.196.0.1:4000")
	guestAP  = netip.MustParseAddrPort("10.196.0.2:5000")
)

// counterTopo makes a netns with an addressed tap and a started Counter on it.
func counterTopo(t *testing.T, o guestemu.CounterOptions) (*topo.NetNS, *guestemu.Counter) {
	t.Helper()
	host := topotest.MustNetNS(t, "kdptg-c")
	noIPv6(t, host)
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	if err := host.AddAddr("kdptap0", "10.196.0.1/24"); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(host.Path(), "kdptap0", 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	defer fds[0].Close()
	o.GuestMAC, o.GuestIP = guestMAC, guestAP.Addr()
	c, err := guestemu.NewCounter(fds, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return host, c
}

func waitStats(c *guestemu.Counter, done func(guestemu.Stats) bool) guestemu.Stats {
	deadline := time.Now().Add(3 * time.Second)
	for {
		s := c.Stats()
		if done(s) || time.Now().After(deadline) {
			return s
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCounterAndReflector(t *testing.T) {
	const n = 200
	for _, tc := range []struct {
		name    string
		reflect bool
		offload bool
	}{
		{"count", false, false},
		{"count-offload", false, true},
		{"reflect", true, false},
		{"reflect-offload", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, c := counterTopo(t, guestemu.CounterOptions{Reflect: tc.reflect, VerifyCsum: true, Offload: tc.offload})
			pc, err := host.ListenPacket("udp4", hostAP.String())
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			to := net.UDPAddrFromAddrPort(guestAP)
			// Resolve the guest first: packets queued behind an unresolved
			// neighbour may be reordered or dropped by the kernel.
			if _, err := pc.WriteTo([]byte("warm-up"), to); err != nil {
				t.Fatal(err)
			}
			warm := waitStats(c, func(s guestemu.Stats) bool {
				return s.CsumOK >= 1 && s.TxFrames >= s.ARPReplies+uint64(btoi(tc.reflect))
			})
			if warm.ARPReplies == 0 || warm.CsumOK != 1 {
				t.Fatalf("warm-up: %+v", warm)
			}
			if tc.reflect {
				pc.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, _, err := pc.ReadFrom(make([]byte, 100)); err != nil {
					t.Fatalf("reflected warm-up: %v", err)
				}
			}
			for i := 0; i < n; i++ {
				if _, err := pc.WriteTo([]byte(fmt.Sprintf("datagram %d", i)), to); err != nil {
					t.Fatal(err)
				}
			}
			if tc.reflect {
				pc.SetReadDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 100)
				seen := map[string]bool{}
				for i := 0; i < n; i++ {
					m, from, err := pc.ReadFrom(buf)
					if err != nil {
						t.Fatalf("reflected datagram %d: %v", i, err)
					}
					if from.String() != guestAP.String() {
						t.Errorf("reflected datagram from %s, want %s", from, guestAP)
					}
					if seen[string(buf[:m])] {
						t.Errorf("reflected %q twice", buf[:m])
					}
					seen[string(buf[:m])] = true
				}
				for i := 0; i < n; i++ {
					if d := fmt.Sprintf("datagram %d", i); !seen[d] {
						t.Errorf("%q not reflected", d)
					}
				}
			}
			wantTx := func(s guestemu.Stats) uint64 {
				if tc.reflect {
					return s.ARPReplies + n + 1
				}
				return s.ARPReplies
			}
			s := waitStats(c, func(s guestemu.Stats) bool { return s.CsumOK >= n+1 && s.TxFrames >= wantTx(s) })
			type view struct{ CsumOK, CsumBad, WriteErrors uint64 }
			if diff := cmp.Diff(view{n + 1, 0, 0}, view{s.CsumOK, s.CsumBad, s.WriteErrors}); diff != "" {
				t.Errorf("stats (-want +got):\n%s\n%+v", diff, s)
			}
			// n+1 datagrams plus the ARP request(s) the Counter answered.
			if s.ARPReplies == 0 || s.RxFrames != n+1+s.ARPReplies {
				t.Errorf("rx frames %d, arp replies %d; want %d datagrams + the ARP requests", s.RxFrames, s.ARPReplies, n+1)
			}
			if s.TxFrames != wantTx(s) {
				t.Errorf("tx frames %d, want %d", s.TxFrames, wantTx(s))
			}
			if tc.offload && s.CsumCompleted != n+1 {
				t.Errorf("completed %d partial checksums, want %d", s.CsumCompleted, n)
			}
			if !tc.offload && s.CsumCompleted != 0 {
				t.Errorf("completed %d partial checksums without offload", s.CsumCompleted)
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestCounterBadChecksumAndSend(t *testing.T) {
	host, c := counterTopo(t, guestemu.CounterOptions{VerifyCsum: true})
	tap, err := host.Link("kdptap0")
	if err != nil {
		t.Fatal(err)
	}
	// A frame with a broken UDP checksum, sent out of the tap raw.
	f := guestemu.UDPFrame(tap.MAC, guestMAC, hostAP, guestAP, []byte("broken"))
	f[len(f)-1] ^= 0xff
	err = host.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, f, 0, &unix.SockaddrLinklayer{Ifindex: tap.Index, Halen: 6})
	})
	if err != nil {
		t.Fatal(err)
	}
	s := waitStats(c, func(s guestemu.Stats) bool { return s.CsumBad > 0 })
	if s.CsumBad != 1 || s.CsumOK != 0 {
		t.Errorf("csum bad %d ok %d, want 1 and 0", s.CsumBad, s.CsumOK)
	}

	// Send: a frame from the guest reaches a socket on the host side.
	pc, err := host.ListenPacket("udp4", hostAP.String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := c.Send(0, guestemu.UDPFrame(guestMAC, tap.MAC, guestAP, hostAP, []byte("from the guest"))); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 100)
	m, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:m], []byte("from the guest")) || from.String() != guestAP.String() {
		t.Errorf("got %q from %s", buf[:m], from)
	}
	if err := c.Send(1, nil); err == nil {
		t.Error("Send on a missing queue succeeded")
	}
}

func TestCounterStopsWithContext(t *testing.T) {
	host := topotest.MustNetNS(t, "kdptg-x")
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{Queues: 2, VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(host.Path(), "kdptap0", 2, true, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fds {
		defer f.Close()
	}
	c, err := guestemu.NewCounter(fds, guestemu.CounterOptions{CPUs: []int{0, 1}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err == nil {
		t.Error("second Start succeeded")
	}
	cancel()
	done := make(chan struct{})
	go func() { c.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung")
	}
	c.Close()
	if err := c.Err(); err != nil {
		t.Errorf("worker error: %v", err)
	}
}

func TestCounterBadCPU(t *testing.T) {
	host := topotest.MustNetNS(t, "kdptg-p")
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(host.Path(), "kdptap0", 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	defer fds[0].Close()
	if _, err := guestemu.NewCounter(fds, guestemu.CounterOptions{CPUs: []int{-1}}); err == nil {
		t.Error("NewCounter with cpu -1 succeeded")
	}
	c, err := guestemu.NewCounter(fds, guestemu.CounterOptions{CPUs: []int{runtime.NumCPU() + 5}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Start(context.Background()); err == nil {
		t.Error("Start pinned to an offline CPU succeeded")
	}
}
