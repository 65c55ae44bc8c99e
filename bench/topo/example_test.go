package topo_test

import (
	"log"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
)

// A typical integration test: build the sandbox, install the datapath under
// test between s.Veth and s.Tap (here Kata's tcfilter baseline), start an
// emulated guest, and check traffic both ways.
func Example() {
	var t testing.TB // the test's *testing.T

	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptx-"})
	// s.NS.Path() is the sandbox netns, s.Veth.Index / s.Tap.Index the
	// ifindexes to attach to, s.GuestMAC / s.GuestAddr the guest's identity.
	if err := s.InstallTCFilter(); err != nil {
		t.Fatal(err)
	}
	g := topotest.MustGuest(t, s, topo.GuestConfig{})
	if err := s.Host.Ping(s.GuestAddr.Addr().String(), 2, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := topo.TCPTransfer(g.NS, s.Host, s.HostAddr.Addr().String()+":8080", 1<<20, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	log.Printf("bridge counters: %+v", g.Bridge.Stats())
}
