package main

import (
	"context"
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/control/netdev"
)

// emulateGuest puts a guest emulator (bench/guestemu) behind tap in the sandbox netns sbNS:
// the tap's queue is bridged to a device named dev in guest's netns, configured as o says. It
// runs until the test ends.
func emulateGuest(t *testing.T, sbNS, tap string, guest *topo.NetNS, dev string, o guestemu.BridgeOptions) {
	t.Helper()
	fds, err := netdev.OpenTap(sbNS, tap, 1, true, true)
	if err != nil {
		t.Fatal(err)
	}
	emulateGuestFds(t, fds, guest, dev, o)
}

// emulateGuestFds puts a guest emulator behind the VM side's queues fds (a tap's, or a
// macvtap's character device): frames are bridged to a device named dev in guest's netns,
// configured as o says. It takes the fds and runs until the test ends.
func emulateGuestFds(t *testing.T, fds []*os.File, guest *topo.NetNS, dev string, o guestemu.BridgeOptions) {
	t.Helper()
	br, err := guestemu.NewBridge(fds, guest.Path(), dev, o)
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); br.Close() })
	if err := br.Start(ctx); err != nil {
		t.Fatal(err)
	}
}
