package maps_test

import (
	"net/netip"
	"testing"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/maps"
)

// The datapath's hashes must be the rule engine's (and so the kernel's).
func TestHashesMatchIPVS(t *testing.T) {
	for _, s := range []string{"0.0.0.0", "10.0.0.1", "172.16.0.3", "192.168.255.254", "255.255.255.255"} {
		a := netip.MustParseAddr(s)
		if got, want := maps.SHHash(a), int(ipvs.SHHash(a)); got != want {
			t.Errorf("sh %s: %d, ipvs %d", s, got, want)
		}
		if got, want := maps.DHHash(a), int(ipvs.DHHash(a)); got != want {
			t.Errorf("dh %s: %d, ipvs %d", s, got, want)
		}
	}
}
