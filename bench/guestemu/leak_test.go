package guestemu_test

import (
	"context"
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/netdev"
)

func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Close releases every fd and thread resource the emulators took, whether
// they ran or not.
func TestNoFdLeak(t *testing.T) {
	host := topotest.MustNetNS(t, "kdptg-l")
	guest := topotest.MustNetNS(t, "kdptg-m")
	if err := netdev.CreateTap(host.Path(), "kdptap0", netdev.TapOptions{Queues: 2, VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	round := func(start bool) {
		fds, err := netdev.OpenTap(host.Path(), "kdptap0", 2, true, true)
		if err != nil {
			t.Fatal(err)
		}
		c, err := guestemu.NewCounter(fds, guestemu.CounterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		b, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fds {
			f.Close()
		}
		if start {
			c.Start(context.Background())
			b.Start(context.Background())
		}
		c.Close()
		b.Close()
	}
	round(true) // warm up the runtime's own fds (netpoller)
	before := openFds(t)
	for i := 0; i < 3; i++ {
		round(i%2 == 0)
	}
	if after := openFds(t); after != before {
		t.Errorf("%d fds open after 3 rounds, %d before", after, before)
	}
}
