package guestemu_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
)

// noIPv6 keeps router solicitations and MLD reports out of the counters.
func noIPv6(t *testing.T, n *topo.NetNS) {
	t.Helper()
	if _, err := n.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
		t.Fatal(err)
	}
}

// linkStats returns the kernel's packet counters of dev in n.
func linkStats(t *testing.T, n *topo.NetNS, dev string) (rx, tx uint64) {
	t.Helper()
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		s := l.Attrs().Statistics
		rx, tx = s.RxPackets, s.TxPackets
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return rx, tx
}

func TestBridge(t *testing.T) {
	for _, tc := range []struct {
		name    string
		queues  int
		offload bool
		vnet    bool
	}{
		{"vnet", 1, false, true},
		{"vnet-offload", 1, true, true},
		{"multiqueue-offload", 2, true, true},
		{"plain", 1, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host := topotest.MustNetNS(t, "kdptg-h")
			guest := topotest.MustNetNS(t, "kdptg-g")
			noIPv6(t, host)
			noIPv6(t, guest)
			if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{Queues: tc.queues, VnetHdr: tc.vnet}); err != nil {
				t.Fatal(err)
			}
			if err := host.AddAddr("kdptap0", "10.197.0.1/24"); err != nil {
				t.Fatal(err)
			}
			fds, err := netdev.OpenTap(host.Path(), "kdptap0", tc.queues, tc.vnet, true)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				for _, f := range fds {
					f.Close()
				}
			})
			b, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{
				Addrs:   []netip.Prefix{netip.MustParsePrefix("10.197.0.2/24")},
				Offload: tc.offload,
				CPUs:    []int{0},
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			if err := b.Start(ctx); err != nil {
				t.Fatal(err)
			}

			if err := host.Ping("10.197.0.2", 3, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := guest.Ping("10.197.0.1", 3, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := topo.TCPTransfer(host, guest, "10.197.0.2:5201", 1<<20, 20*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := topo.TCPTransfer(guest, host, "10.197.0.1:5201", 1<<20, 20*time.Second); err != nil {
				t.Fatal(err)
			}

			// Every frame the kernel handed to one tap was written into the
			// other, and the emulator's counters agree with the kernel's.
			type counts struct{ HostTapTx, HostTapRx, GuestTapTx, GuestTapRx, WriteErrors uint64 }
			// The kernel keeps sending (late ACKs, neighbour probes): a frame the emulator has
			// read but not yet written is in flight, not lost. Wait for one snapshot in which
			// everything has landed, and judge that snapshot.
			var want, got counts
			var s guestemu.Stats
			deadline := time.Now().Add(3 * time.Second)
			for {
				s = b.Stats()
				got = counts{s.RxFrames, s.TxFrames, s.GuestTxFrames, s.GuestRxFrames, s.WriteErrors}
				htRx, htTx := linkStats(t, host, "kdptap0")
				gtRx, gtTx := linkStats(t, guest, "eth0")
				want = counts{htTx, htRx, gtTx, gtRx, 0}
				settled := s.RxFrames == s.GuestRxFrames && s.GuestTxFrames == s.TxFrames
				if (want == got && settled) || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("emulator counters vs kernel's (-want +got):\n%s", diff)
			}
			if s.RxFrames != s.GuestRxFrames || s.GuestTxFrames != s.TxFrames {
				t.Errorf("frames lost in the emulator: %+v", s)
			}
			if s.RxBytes < 1<<20 || s.TxBytes < 1<<20 {
				t.Errorf("too few bytes for 1 MiB each way: %+v", s)
			}
			if tc.offload && s.GSOFrames == 0 {
				t.Errorf("offload on but no GSO frame seen: %+v", s)
			}
			t.Logf("%+v", s)
			if err := b.Err(); err != nil {
				t.Errorf("worker error: %v", err)
			}
			if err := b.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := netdev.LookupLink(guest.Path(), "eth0"); err == nil {
				t.Error("guest tap still there after Close")
			}
		})
	}
}

func TestBridgeInvalid(t *testing.T) {
	if _, err := guestemu.NewBridge(nil, "/run/netns/x", "eth0", guestemu.BridgeOptions{}); err == nil {
		t.Error("NewBridge with no fds succeeded")
	}
	topotest.RequireRoot(t, "creates taps")
	host := topotest.MustNetNS(t, "kdptg-h")
	guest := topotest.MustNetNS(t, "kdptg-g")
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(host.Path(), "kdptap0", 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	defer fds[0].Close()
	// The guest tap name is taken: nothing may be left behind.
	if err := netdev.CreateTap(guest.Path(), "eth0", netdev.TapOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{}); err == nil {
		t.Error("NewBridge onto an existing guest tap succeeded")
	}
	if _, err := netdev.LookupLink(guest.Path(), "eth0"); err != nil {
		t.Errorf("the pre-existing guest tap was removed: %v", err)
	}
	// A bad address rolls back the created tap.
	_, err = guestemu.NewBridge(fds, guest.Path(), "eth1", guestemu.BridgeOptions{Gateway: netip.MustParseAddr("192.0.2.1")})
	if err == nil {
		t.Error("NewBridge with an unreachable gateway succeeded")
	}
	if _, err := netdev.LookupLink(guest.Path(), "eth1"); err == nil {
		t.Error("guest tap left behind after a failed NewBridge")
	}
}
