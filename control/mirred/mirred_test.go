package mirred_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/mirred"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
)

// guest builds a sandbox and a guest netns bridged to its tap, so the
// guest's kernel stack plays the VM.
func guest(t *testing.T) (*topo.Sandbox, *topo.NetNS) {
	t.Helper()
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-"})
	g := topotest.MustNetNS(t, "kdptb-g")
	fds, err := s.OpenTap()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	b, err := guestemu.NewBridge(fds, g.Path(), "eth0", guestemu.BridgeOptions{
		MAC:   s.GuestMAC,
		Addrs: []netip.Prefix{s.GuestAddr},
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
	return s, g
}

func TestTraffic(t *testing.T) {
	s, g := guest(t)
	ns, veth, tap := s.NS.Path(), s.Config.Veth, s.Config.Tap
	if err := s.Host.Ping(s.GuestAddr.Addr().String(), 1, time.Second); err == nil {
		t.Fatal("guest reachable before Join")
	}
	if err := mirred.Join(ns, veth, tap); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mirred.Unjoin(ns, veth, tap) })
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
	if err := mirred.Unjoin(ns, veth, tap); err != nil {
		t.Fatal(err)
	}
	if err := s.Host.Ping(s.GuestAddr.Addr().String(), 1, time.Second); err == nil {
		t.Fatal("guest reachable after Unjoin")
	}
}

// state is what tc shows on a device's ingress: qdisc kinds and the
// number of filters.
type state struct {
	Qdiscs  []string
	Filters int
}

func tcState(t *testing.T, nsPath, dev string) state {
	t.Helper()
	var st state
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		qs, err := netlink.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qs {
			if q.Type() == "ingress" || q.Type() == "clsact" {
				st.Qdiscs = append(st.Qdiscs, q.Type())
				fs, err := netlink.FilterList(l, netlink.MakeHandle(0xffff, 0))
				if err != nil {
					return err
				}
				st.Filters = len(fs)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestIdempotentAndCleanup(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-"})
	ns, veth, tap := s.NS.Path(), s.Config.Veth, s.Config.Tap
	for i := 0; i < 2; i++ {
		if err := mirred.Join(ns, veth, tap); err != nil {
			t.Fatalf("join %d: %v", i, err)
		}
	}
	want := state{Qdiscs: []string{"ingress"}, Filters: 1}
	for _, dev := range []string{veth, tap} {
		if diff := cmp.Diff(want, tcState(t, ns, dev)); diff != "" {
			t.Errorf("%s after two joins (-want +got):\n%s", dev, diff)
		}
	}
	if ok, err := mirred.Joined(ns, veth, tap); err != nil || !ok {
		t.Errorf("Joined = %v, %v; want true", ok, err)
	}
	for i := 0; i < 2; i++ {
		if err := mirred.Unjoin(ns, veth, tap); err != nil {
			t.Fatalf("unjoin %d: %v", i, err)
		}
	}
	for _, dev := range []string{veth, tap} {
		if diff := cmp.Diff(state{}, tcState(t, ns, dev)); diff != "" {
			t.Errorf("%s after unjoin (-want +got):\n%s", dev, diff)
		}
	}
	if ok, err := mirred.Joined(ns, veth, tap); err != nil || ok {
		t.Errorf("Joined = %v, %v; want false", ok, err)
	}
}

// TestKeepsOthers checks that Unjoin leaves a qdisc and filters it did not
// add.
func TestKeepsOthers(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-"})
	ns, veth, tap := s.NS.Path(), s.Config.Veth, s.Config.Tap
	// Someone else's ingress qdisc and a filter of theirs (a plain pass).
	if _, err := s.NS.Exec("tc", "qdisc", "add", "dev", veth, "ingress"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.NS.Exec("tc", "filter", "add", "dev", veth, "parent", "ffff:", "prio", "1", "protocol", "ip",
		"u32", "match", "u32", "0", "0", "classid", "1:1"); err != nil {
		t.Fatal(err)
	}
	if err := mirred.Join(ns, veth, tap); err != nil {
		t.Fatal(err)
	}
	if got := tcState(t, ns, veth); got.Filters != 2 {
		t.Errorf("%s after join: %+v, want 2 filters", veth, got)
	}
	if err := mirred.Unjoin(ns, veth, tap); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(state{Qdiscs: []string{"ingress"}, Filters: 1}, tcState(t, ns, veth)); diff != "" {
		t.Errorf("%s after unjoin (-want +got):\n%s", veth, diff)
	}
	if diff := cmp.Diff(state{}, tcState(t, ns, tap)); diff != "" {
		t.Errorf("%s after unjoin (-want +got):\n%s", tap, diff)
	}
}

func TestErrors(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptb-"})
	if err := mirred.Join(s.NS.Path(), s.Config.Veth, "nosuchdev"); err == nil {
		t.Error("join with a missing tap succeeded")
	}
	if diff := cmp.Diff(state{}, tcState(t, s.NS.Path(), s.Config.Veth)); diff != "" {
		t.Errorf("veth after failed join (-want +got):\n%s", diff)
	}
	if err := mirred.Join(s.NS.Path(), s.Config.Veth, s.Config.Veth); err == nil {
		t.Error("join of a device with itself succeeded")
	}
	if err := mirred.Unjoin(s.NS.Path(), "nosuchdev", "nosuchdev2"); err != nil {
		t.Errorf("unjoin of missing devices: %v", err)
	}
}
