package topo_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
)

// The sandbox topology carries traffic end to end once a datapath joins
// eth0 and the tap; here Kata's own tcfilter plumbing does.
func TestSandboxGuestThroughTCFilter(t *testing.T) {
	for _, offload := range []bool{false, true} {
		t.Run(fmt.Sprintf("offload=%v", offload), func(t *testing.T) {
			s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptt-"})
			if err := s.InstallTCFilter(); err != nil {
				t.Fatal(err)
			}
			g := topotest.MustGuest(t, s, topo.GuestConfig{Offload: offload, Gateway: true})
			hostIP, guestIP := s.HostAddr.Addr().String(), s.GuestAddr.Addr().String()
			if err := s.Host.Ping(guestIP, 2, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := g.NS.Ping(hostIP, 2, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := topo.TCPTransfer(s.Host, g.NS, guestIP+":5301", 1<<20, 20*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := topo.TCPTransfer(g.NS, s.Host, hostIP+":5301", 1<<20, 20*time.Second); err != nil {
				t.Fatal(err)
			}
			// The bridge counts a frame after its write returns, so the receiver can have
			// read the last bytes before they are counted: wait for the counters.
			st := g.Bridge.Stats()
			for deadline := time.Now().Add(5 * time.Second); (st.RxBytes < 1<<20 || st.TxBytes < 1<<20) && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond)
				st = g.Bridge.Stats()
			}
			if st.WriteErrors != 0 || st.RxBytes < 1<<20 || st.TxBytes < 1<<20 {
				t.Errorf("bridge stats: %+v", st)
			}
			g2, err := g.NS.Link("eth0")
			if err != nil {
				t.Fatal(err)
			}
			if g2.MAC.String() != s.GuestMAC.String() {
				t.Errorf("guest MAC %s, want %s", g2.MAC, s.GuestMAC)
			}
			if err := s.RemoveTCFilter(); err != nil {
				t.Fatal(err)
			}
			if err := s.Host.CanDial(guestIP+":22", 300*time.Millisecond); err == nil {
				t.Error("guest reachable with the tcfilter removed")
			}
		})
	}
}

func TestSandboxCounter(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptt-", HostAddr: netip.MustParsePrefix("10.195.0.1/24"), GuestAddr: netip.MustParsePrefix("10.195.0.9/24")})
	if err := s.InstallTCFilter(); err != nil {
		t.Fatal(err)
	}
	c, err := s.StartCounter(guestemu.CounterOptions{VerifyCsum: true})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := s.Host.ListenPacket("udp4", "10.195.0.1:7000")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	to := &net.UDPAddr{IP: net.IPv4(10, 195, 0, 9), Port: 7001}
	const n = 50
	for i := 0; i < n; i++ {
		if _, err := pc.WriteTo([]byte("x"), to); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	deadline := time.Now().Add(3 * time.Second)
	for c.Stats().CsumOK < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	st := c.Stats()
	if st.CsumOK != n || st.CsumBad != 0 || st.ARPReplies == 0 {
		t.Errorf("counter stats: %+v, want %d good datagrams and an ARP reply", st, n)
	}
}

func TestSandboxesSharingAHost(t *testing.T) {
	node := topotest.MustNetNS(t, "kdptt-node")
	var sbs []*topo.Sandbox
	for i := 1; i <= 2; i++ {
		s := topotest.MustSandbox(t, topo.SandboxConfig{
			Prefix:    fmt.Sprintf("kdptt-%d", i),
			Host:      node,
			HostVeth:  fmt.Sprintf("veth%d", i),
			HostAddr:  netip.MustParsePrefix(fmt.Sprintf("10.193.%d.1/24", i)),
			GuestAddr: netip.MustParsePrefix(fmt.Sprintf("10.193.%d.2/24", i)),
		})
		if err := s.InstallTCFilter(); err != nil {
			t.Fatal(err)
		}
		topotest.MustGuest(t, s, topo.GuestConfig{Gateway: true})
		sbs = append(sbs, s)
	}
	for _, s := range sbs {
		if err := node.Ping(s.GuestAddr.Addr().String(), 1, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	st, err := node.Stats("veth1")
	if err != nil {
		t.Fatal(err)
	}
	if st.TxPackets == 0 || st.RxPackets == 0 {
		t.Errorf("veth1 counters %+v, want traffic", st)
	}
	if err := sbs[0].Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := node.Link("veth1"); err == nil {
		t.Error("veth1 still in the node after its sandbox closed")
	}
	if err := node.Ping(sbs[1].GuestAddr.Addr().String(), 1, 5*time.Second); err != nil {
		t.Errorf("the other sandbox broke: %v", err)
	}
}
