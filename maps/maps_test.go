package maps

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
)

// The datapath numbers its schedulers (enum kdp_sched, bpf/lib/lb.h) in the order of the rule
// engine's list of names; a scheduler out of order would misroute connections.
func TestSchedulersMatchIPVS(t *testing.T) {
	all := []Scheduler{SchedRR, SchedWRR, SchedLC, SchedWLC, SchedLBLC, SchedLBLCR, SchedDH, SchedSH, SchedSED, SchedNQ}
	if len(all) != len(ipvs.Schedulers) {
		t.Fatalf("%d datapath schedulers, %d in ipvs.Schedulers", len(all), len(ipvs.Schedulers))
	}
	for i, s := range all {
		name := ipvs.Schedulers[i]
		if p, err := ParseScheduler(name); err != nil || p != s || s.String() != name {
			t.Errorf("scheduler %d: %s parses to %d (%v), prints %s", s, name, p, err, s)
		}
	}
	if _, err := ParseScheduler("fo"); err == nil {
		t.Error("unknown scheduler accepted")
	}
}

// A v6 address handed to a view is refused by name before any map is touched (the views
// here have no maps at all), never cut down to four bytes.
func TestV6Refused(t *testing.T) {
	v6 := netip.MustParseAddr("fd00::1")
	for name, err := range map[string]error{
		"endpoint": EndpointMap{}.Put(1, Endpoint{Addr: netip.PrefixFrom(v6, 64)}),
		"routes":   RouteTable{}.Replace([]Route{{Dest: netip.MustParsePrefix("fd00::/64")}}),
		"gateway":  RouteTable{}.Replace([]Route{{Dest: netip.MustParsePrefix("10.0.0.0/8"), Gateway: v6}}),
		"netmask":  LB{}.PutService(0, ServiceSpec{VIP: netip.MustParseAddrPort("10.0.0.1:80"), PMask: v6}),
		"guest":    Node{}.PutGuest([]byte{2, 0, 0, 0, 0, 1}, v6, 1),
	} {
		if !errors.Is(err, ErrFamily) {
			t.Errorf("%s: %v, want ErrFamily", name, err)
		}
	}
}

// The encodings are the wire's byte order, and decode what they encode.
func TestEncodeRoundTrip(t *testing.T) {
	a := netip.MustParseAddr("10.1.2.3")
	v, err := v4(a)
	if err != nil {
		t.Fatal(err)
	}
	if b := (*[4]byte)(unsafe.Pointer(&v)); *b != a.As4() {
		t.Errorf("v4(%s) in memory %v, want network order", a, *b)
	}
	if got := addr4(v); got != a {
		t.Errorf("addr4(v4(%s)) = %s", a, got)
	}
	p := be16(8080)
	if b := (*[2]byte)(unsafe.Pointer(&p)); *b != [2]byte{0x1f, 0x90} {
		t.Errorf("be16(8080) in memory %v", *b)
	}
	e := Endpoint{PeerIfindex: 4, Slot: 3, Addr: netip.MustParsePrefix("172.16.0.3/16"), MAC: [6]byte{2, 0, 0, 0, 0, 9}, Role: RoleTap, Flags: FlagAntiSpoof}
	raw, err := e.encode()
	if err != nil {
		t.Fatal(err)
	}
	want := e
	want.Flags |= FlagHasIP
	if got := decodeEndpoint(raw); got != want {
		t.Errorf("endpoint round trip: %v, want %v", got, want)
	}
	r := Route{Slot: 2, Dest: netip.MustParsePrefix("192.168.0.0/16"), Gateway: netip.MustParseAddr("172.16.0.1")}
	k, rv, err := r.encode()
	if err != nil {
		t.Fatal(err)
	}
	k.Tag = routeTag(0, r.Slot)
	if got := decodeRoute(k, rv); got != r {
		t.Errorf("route round trip: %v, want %v", got, r)
	}
	e6 := e
	e6.Addr6 = netip.MustParsePrefix("fd00:5::3/64")
	e6.LinkLocal = netip.MustParseAddr("fe80::1234")
	raw6, err := e6.encode6()
	if err != nil {
		t.Fatal(err)
	}
	got6 := Endpoint{}
	decodeEndpoint6(&got6, raw6)
	if got6.Addr6 != e6.Addr6 || got6.LinkLocal != e6.LinkLocal {
		t.Errorf("endpoint6 round trip: %v %v, want %v %v", got6.Addr6, got6.LinkLocal, e6.Addr6, e6.LinkLocal)
	}
	if b := (*[16]byte)(unsafe.Pointer(&raw6.Addr)); *b != e6.Addr6.Addr().As16() {
		t.Errorf("v6 in memory %v, want network order", *b)
	}
	if _, err := (Endpoint{LinkLocal: netip.MustParseAddr("fd00::1")}).encode6(); err == nil {
		t.Error("a link-local that is not link-local accepted")
	}
	r6 := Route{Slot: 2, Dest: netip.MustParsePrefix("2001:db8::/32"), Gateway: netip.MustParseAddr("fe80::1")}
	k6, v6r, err := r6.encode6()
	if err != nil {
		t.Fatal(err)
	}
	k6.Tag = routeTag(0, r6.Slot)
	if got := decodeRoute6(k6, v6r); got != r6 {
		t.Errorf("route6 round trip: %v, want %v", got, r6)
	}
}

// TestRouteSwitchCleanupFailure: once the new generation is switched in, Replace succeeds even
// when removing the old one fails (the caller must record the table that is live); the
// leftovers are never listed and the next Replace removes them first.
func TestRouteSwitchCleanupFailure(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates BPF maps")
	}
	spec, err := loader.Spec()
	if err != nil {
		t.Fatal(err)
	}
	newMap := func(name string) *ebpf.Map {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	rt := RouteTable{Routes: newMap("kdp_routes"), Routes6: newMap("kdp_routes6"), Config: newMap("kdp_config")}
	r1 := []Route{{Slot: 1, Dest: netip.MustParsePrefix("10.1.0.0/16")}, {Slot: 1, Dest: netip.MustParsePrefix("fd00:1::/64")}}
	r2 := []Route{{Slot: 2, Dest: netip.MustParsePrefix("10.2.0.0/16")}, {Slot: 2, Dest: netip.MustParsePrefix("fd00:2::/64")}}
	if err := rt.Replace(r1); err != nil {
		t.Fatal(err)
	}
	deleteKey = func(*ebpf.Map, any) error { return errors.New("injected") }
	err = rt.Replace(r2)
	deleteKey = func(m *ebpf.Map, key any) error { return m.Delete(key) }
	if err != nil {
		t.Fatalf("replace with a failing cleanup: %v, want nil (the new table is live)", err)
	}
	if got, err := rt.List(); err != nil || len(got) != 2 || got[0].Slot != 2 || got[1].Slot != 2 {
		t.Errorf("live table %v (%v), want r2", got, err)
	}
	count := func() int {
		n := 0
		var k routeKey
		var v routeVal
		for it := rt.Routes.Iterate(); it.Next(&k, &v); {
			n++
		}
		var k6 route6Key
		var v6 route6Val
		for it := rt.Routes6.Iterate(); it.Next(&k6, &v6); {
			n++
		}
		return n
	}
	if n := count(); n != 4 {
		t.Fatalf("%d entries after the failed cleanup, want 4 (both generations)", n)
	}
	if err := rt.Replace(r1); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 2 {
		t.Errorf("%d entries after the next replace, want 2 (the leftovers removed)", n)
	}
}
