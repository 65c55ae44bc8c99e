package macvtap_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/macvtap"
)

func TestTraffic(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-", NoTap: true})
	g := topotest.MustNetNS(t, "kdptb-g")
	ns, veth := s.NS.Path(), s.Config.Veth
	m, err := macvtap.Create(ns, veth, "kdptbmv0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { macvtap.Delete(ns, veth, m.Name) })
	if diff := cmp.Diff(s.GuestMAC.String(), m.MAC.String()); diff != "" {
		t.Errorf("macvtap MAC (-want +got):\n%s", diff)
	}
	v, err := s.NS.Link(veth)
	if err != nil {
		t.Fatal(err)
	}
	if v.MAC.String() == m.MAC.String() {
		t.Errorf("veth kept its MAC %s", v.MAC)
	}

	fds, err := macvtap.Open(m, 1, true)
	if err != nil {
		t.Fatal(err)
	}
	b, err := guestemu.NewBridge(fds, g.Path(), "eth0", guestemu.BridgeOptions{
		MAC:   m.MAC,
		Addrs: []netip.Prefix{s.GuestAddr},
	})
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Host.Ping(s.GuestAddr.Addr().String(), 3, 5*time.Second); err != nil {
		t.Fatalf("host -> guest ping: %v", err)
	}
	if err := g.Ping(s.HostAddr.Addr().String(), 3, 5*time.Second); err != nil {
		t.Fatalf("guest -> host ping: %v", err)
	}
	if err := topo.TCPTransfer(s.Host, g, s.GuestAddr.Addr().String()+":5201", 4<<20, 20*time.Second); err != nil {
		t.Fatalf("tcp host -> guest: %v", err)
	}
	if err := topo.TCPTransfer(g, s.Host, s.HostAddr.Addr().String()+":5202", 4<<20, 20*time.Second); err != nil {
		t.Fatalf("tcp guest -> host: %v", err)
	}
	b.Close()

	if err := macvtap.Delete(ns, veth, m.Name); err != nil {
		t.Fatal(err)
	}
	if err := macvtap.Delete(ns, veth, m.Name); err != nil {
		t.Errorf("second delete: %v", err)
	}
	v, err = s.NS.Link(veth)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(s.GuestMAC.String(), v.MAC.String()); diff != "" {
		t.Errorf("veth MAC after delete (-want +got):\n%s", diff)
	}
	if _, err := os.Stat(m.DevPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s after delete: %v, want it gone", m.DevPath, err)
	}
}

func TestErrors(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-", NoTap: true})
	if _, err := macvtap.Create(s.NS.Path(), "nosuchdev", "kdptbmv0"); err == nil {
		t.Error("create on a missing veth succeeded")
	}
	if err := macvtap.Delete(s.NS.Path(), s.Config.Veth, s.Config.Veth); !errors.Is(err, macvtap.ErrNotMacvtap) {
		t.Errorf("delete of the veth: %v, want ErrNotMacvtap", err)
	}
	v, err := s.NS.Link(s.Config.Veth)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(s.GuestMAC.String(), v.MAC.String()); diff != "" {
		t.Errorf("veth MAC after failed calls (-want +got):\n%s", diff)
	}
}

// TestSameIfindex: macvtaps in two netns get the same ifindex, so their
// /dev/tapN would be one node; the second gets a node of its own.
func TestSameIfindex(t *testing.T) {
	var ms []macvtap.Macvtap
	for i := 0; i < 2; i++ {
		s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-", NoTap: true})
		m, err := macvtap.Create(s.NS.Path(), s.Config.Veth, "kdptbmv0")
		if err != nil {
			t.Fatal(err)
		}
		ns, veth := s.NS.Path(), s.Config.Veth
		t.Cleanup(func() { macvtap.Delete(ns, veth, m.Name) })
		ms = append(ms, m)
		fds, err := macvtap.Open(m, 1, true)
		if err != nil {
			t.Fatal(err)
		}
		fds[0].Close()
	}
	if ms[0].Ifindex != ms[1].Ifindex {
		t.Skipf("ifindexes differ (%d, %d): nothing to collide", ms[0].Ifindex, ms[1].Ifindex)
	}
	if ms[0].DevPath == ms[1].DevPath {
		t.Errorf("both macvtaps use %s", ms[0].DevPath)
	}
}
