package netmon

import (
	"net"
	"net/netip"
	"testing"

	"github.com/kata-dp/kata-dp/control/netspec"
)

func TestTapName(t *testing.T) {
	for _, idx := range []int{1, 7, 99999} {
		n := TapName("6ec7a98f3b2c", idx)
		if len(n) > 15 || !isNetmonTap(n) {
			t.Errorf("TapName(%d) = %q: too long or not recognised", idx, n)
		}
		if err := netspec.ValidName("device", n); err != nil {
			t.Errorf("TapName(%d) = %q: %v", idx, n, err)
		}
	}
	if TapName("a", 2) == TapName("b", 2) {
		t.Errorf("two sandboxes' links of ifindex 2 get the same tap %q", TapName("a", 2))
	}
	for _, n := range []string{"eth0", "tap0_kata", "nm12345_", "nmzzzzzz_1", "nm123456_1x", "nm123456x1"} {
		if isNetmonTap(n) {
			t.Errorf("isNetmonTap(%q) = true", n)
		}
	}
}

// TestEligible: which links netmon takes, and the reason it gives for the others.
func TestEligible(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	taken := map[string]string{"eth0": "the sandbox's uplink"}
	for _, tc := range []struct {
		l    link
		want string
	}{
		{link{Name: "net1", Kind: "veth", MAC: mac, Up: true}, ""},
		{link{Name: "mv0", Kind: "macvlan", MAC: mac, Up: true}, ""},
		{link{Name: "lo", Kind: "device", Lo: true, Up: true}, "loopback"},
		{link{Name: "tap0_kata", Kind: "tuntap", MAC: mac, Up: true}, "a tuntap link (taps and kata-dp's own devices are never joined)"},
		{link{Name: "mvt0", Kind: "macvtap", MAC: mac, Up: true}, "a macvtap link (taps and kata-dp's own devices are never joined)"},
		{link{Name: "wg0", Kind: "wireguard", Up: true}, "no MAC address"},
		{link{Name: "net2", Kind: "veth", MAC: mac}, "down"},
		{link{Name: "eth0", Kind: "veth", MAC: mac, Up: true}, "the sandbox's uplink"},
		{link{Name: TapName("x", 3), Kind: "veth", MAC: mac, Up: true}, "a netmon tap"},
	} {
		if got := eligible(tc.l, taken); got != tc.want {
			t.Errorf("eligible(%s) = %q, want %q", tc.l.Name, got, tc.want)
		}
	}
}

// TestDesire: the add-iface request and routes netmon builds for a link: its name, MAC, MTU,
// first IPv4 address (and IPv6 when add-iface takes both), routes with "default" for 0/0.
func TestDesire(t *testing.T) {
	l := link{Index: 4, Name: "net1", Kind: "veth", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}, MTU: 1450, Up: true,
		Addrs: []netip.Prefix{netip.MustParsePrefix("fd00::5/64"), netip.MustParsePrefix("10.9.0.5/24"), netip.MustParsePrefix("10.9.0.6/24")},
		Routes: []route{{Dest: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("10.9.0.1")},
			{Dest: netip.MustParsePrefix("10.10.0.0/16")}}}
	for _, pair := range []bool{false, true} {
		w := desire("sb", l, func(netspec.Interface) bool { return pair })
		in := w.req.Interface
		if in.Name != "net1" || in.HwAddr != "02:00:00:00:00:09" || in.MTU != 1450 || in.Device != TapName("sb", 4) || w.req.Uplink != "net1" {
			t.Errorf("request %+v uplink %q", in, w.req.Uplink)
		}
		want := []string{"10.9.0.5/24"}
		if pair {
			want = append(want, "fd00::5/64")
		}
		if got := addrStrings(in.IPAddresses); len(got) != len(want) || got[0] != want[0] || (pair && got[1] != want[1]) {
			t.Errorf("pair accepted %v: addresses %v, want %v", pair, got, want)
		}
		if len(w.routes) != 2 || w.routes[0] != (netspec.Route{Dest: "default", Gateway: "10.9.0.1", Device: "net1"}) ||
			w.routes[1] != (netspec.Route{Dest: "10.10.0.0/16", Device: "net1"}) {
			t.Errorf("routes %+v", w.routes)
		}
	}
	// An IPv6-only link passes its IPv6 address.
	l.Addrs = l.Addrs[:1]
	if got := addrStrings(desire("sb", l, acceptsPair).req.IPAddresses); len(got) != 1 || got[0] != "fd00::5/64" {
		t.Errorf("IPv6-only link: addresses %v", got)
	}
}
