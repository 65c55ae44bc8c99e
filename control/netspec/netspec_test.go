package netspec

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseDest(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"default", "0.0.0.0/0", ""},
		{"10.0.0.1", "10.0.0.1/32", ""},
		{"10.0.0.0/8", "10.0.0.0/8", ""},
		{"0.0.0.0/0", "0.0.0.0/0", ""},
		{"fd00::/64", "fd00::/64", ""},
		{"fd00::1", "fd00::1/128", ""},
		{"::ffff:10.0.0.0/104", "10.0.0.0/8", ""},
		{"", "", "route dest is required"},
		{"Default", "", `route dest "Default" is not "default", an IP address or a prefix`},
		{"10.0.0.1/8", "", `route dest "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)`},
		{"10.0.0.0/", "", `route dest "10.0.0.0/" is not "default", an IP address or a prefix`},
		{"fe80::1%eth0", "", `route dest "fe80::1%eth0" is not "default", an IP address or a prefix`},
	} {
		p, err := ParseDest(tc.in)
		got, gotErr := "", ""
		if err != nil {
			gotErr = Message(err)
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseDest(%q): error %v is not ErrInvalid", tc.in, err)
			}
		} else {
			got = p.String()
		}
		if got != tc.want || gotErr != tc.err {
			t.Errorf("ParseDest(%q) = %q, %q; want %q, %q", tc.in, got, gotErr, tc.want, tc.err)
		}
	}
}

func TestRouteFilter(t *testing.T) {
	routes := []Route{
		{Dest: "10.0.0.0/8", Device: "eth0", Gateway: "10.0.0.1"},
		{Dest: "default", Device: "eth1", Gateway: "172.16.0.1"},
		{Dest: "10.1.1.1", Device: "eth0"},
	}
	for _, tc := range []struct {
		filter Route
		want   []int
	}{
		{Route{Dest: "10.0.0.0/8"}, []int{0}},
		{Route{Dest: "10.0.0.0/8", Device: "eth0"}, []int{0}},
		{Route{Dest: "10.0.0.0/8", Device: "eth1"}, nil},
		{Route{Dest: "10.0.0.0/8", Gateway: "10.0.0.2"}, nil},
		{Route{Dest: "default"}, []int{1}},
		{Route{Dest: "0.0.0.0/0", Gateway: "172.16.0.1"}, []int{1}},
		{Route{Dest: "10.1.1.1/32"}, []int{2}},
	} {
		f, err := ValidateRouteFilter(tc.filter)
		if err != nil {
			t.Fatal(err)
		}
		var got []int
		for i, r := range routes {
			pr, err := ValidateRoute(r)
			if err != nil {
				t.Fatal(err)
			}
			if f.Match(pr) {
				got = append(got, i)
			}
		}
		if d := cmp.Diff(tc.want, got); d != "" {
			t.Errorf("filter %+v (-want +got):\n%s", tc.filter, d)
		}
	}
}

func TestListForms(t *testing.T) {
	pr, err := ValidateRoute(Route{Dest: "10.1.1.1", Device: "eth0"})
	if err != nil {
		t.Fatal(err)
	}
	info, ok := ListRoute(pr)
	if !ok || info != (RouteInfo{Dest: "10.1.1.1/32", Device: "eth0"}) {
		t.Errorf("ListRoute = %+v, %v", info, ok)
	}
	pr6, _ := ValidateRoute(Route{Dest: "fd00::/64", Device: "eth0"})
	if _, ok := ListRoute(pr6); ok {
		t.Error("IPv6 route listed")
	}
	got := string(Encode([]IfaceInfo{ListIface(Interface{Name: "e", HwAddr: "02:00:00:00:00:01", MTU: 1500})}))
	if want := `[{"name":"e","mac":"02:00:00:00:00:01","ip":[],"mtu":1500}]` + "\n"; got != want {
		t.Errorf("list-ifaces without IP = %q, want %q", got, want)
	}
	// Output escapes as Kata's json.Encoder does.
	if got := string(Encode(Route{Dest: "<x>&"})); got != `{"dest":"\u003cx\u003e\u0026"}`+"\n" {
		t.Errorf("Encode = %q", got)
	}
}

func TestDecodeCaseInsensitive(t *testing.T) {
	var req AddRequest
	if err := Decode([]byte(`{"DEVICE":"tap0","Name":"eth0","ipaddresses":[{"address":"10.0.0.2","MASK":"8"}],"HwAddr":"02:00:00:00:00:01","MTU":1500,"Uplink":"veth1"} trailing`), &req); err != nil {
		t.Fatal(err)
	}
	v, err := ValidateAdd(req, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Interface{Device: "tap0", Name: "eth0", IPAddresses: []*IPAddress{{Family: 2, Address: "10.0.0.2", Mask: "8"}}, HwAddr: "02:00:00:00:00:01", MTU: 1500}
	if d := cmp.Diff(want, v.Spec); d != "" {
		t.Errorf("decoded (-want +got):\n%s", d)
	}
	if v.Uplink != "veth1" || v.Addr != netip.MustParsePrefix("10.0.0.2/8") || v.Queues != 1 {
		t.Errorf("validated: %+v", v)
	}
	if strings.Contains(string(Encode(v.Spec)), "uplink") {
		t.Error("uplink echoed")
	}
}

// FuzzAddIface decodes and validates arbitrary add-iface input: no panic, and whatever passes
// validation is printable and passes again after a round trip.
func FuzzAddIface(f *testing.F) {
	for _, s := range []string{
		`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}`,
		`{"device":"t","name":"n","hwAddr":"02:00:00:00:00:01","mtu":46,"vhostUserSocket":"/run/vhost-user1","uplink":"eth1"}`,
		`{"device":"t","name":"n","IPAddresses":[{"address":"fd00::1","mask":"64"}],"hwAddr":"02:00:00:00:00:01","mtu":9600}`,
		`{"IPAddresses":[null]}`, `{"mtu":-1}`, `[]`, `null`, `{"queues":1e99}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req AddRequest
		if err := Decode(data, &req); err != nil {
			return
		}
		v, err := ValidateAdd(req, func(string) error { return nil })
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("validation error %v is not ErrInvalid", err)
			}
			return
		}
		if v.Queues < 1 || v.Queues > MaxQueues || len(v.MAC) != 6 || len(v.Spec.IPAddresses) > 2 {
			t.Fatalf("accepted %+v", v)
		}
		n := 0
		for _, p := range []netip.Prefix{v.Addr, v.Addr6} {
			if p.IsValid() {
				n++
				if p.Bits() == 0 {
					t.Fatalf("accepted mask 0: %+v", v)
				}
			}
		}
		if v.Addr.IsValid() && !v.Addr.Addr().Is4() || v.Addr6.IsValid() && !v.Addr6.Addr().Is6() {
			t.Fatalf("address of the wrong family: %+v", v)
		}
		if n != len(v.Spec.IPAddresses) {
			t.Fatalf("accepted address without family or prefix: %+v", v)
		}
		for _, a := range v.Spec.IPAddresses {
			if a.Family == 0 {
				t.Fatalf("accepted address without family: %+v", v)
			}
		}
		var again AddRequest
		if err := Decode(Encode(v.Spec), &again); err != nil {
			t.Fatalf("output does not decode: %v", err)
		}
		if _, err := ValidateAdd(again, func(string) error { return nil }); err != nil {
			t.Fatalf("output does not validate: %v", err)
		}
		ValidateUpdate(req.Interface)
	})
}

// FuzzRoutes decodes and validates arbitrary route input (one route and an array).
func FuzzRoutes(f *testing.F) {
	for _, s := range []string{
		`{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}`,
		`{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"netport_test_1"}`,
		`{"dest":"10.0.0.1","device":"lo","source":"10.0.0.2","scope":253}`,
		`[{"dest":"fd00::/64","device":"eth0","gateway":"fd00::1"},{"dest":"default","gateway":"fe80::1","device":"e"}]`,
		`{"dest":"::ffff:1.2.3.4/120","device":"e"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var rs []Route
		if err := Decode(data, &rs); err != nil {
			var r Route
			if err := Decode(data, &r); err != nil {
				return
			}
			rs = []Route{r}
		}
		for _, r := range rs {
			pr, err := ValidateRoute(r)
			fl, ferr := ValidateRouteFilter(r)
			if err != nil {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("validation error %v is not ErrInvalid", err)
				}
				continue
			}
			if ferr != nil {
				t.Fatalf("valid route %+v is not a valid filter: %v", r, ferr)
			}
			if !fl.Match(pr) {
				t.Fatalf("route %+v does not match itself", r)
			}
			if !pr.Dest.IsValid() || pr.Dest.Masked() != pr.Dest {
				t.Fatalf("accepted dest %v", pr.Dest)
			}
			if info, ok := ListRoute(pr); ok {
				if _, err := ParseDest(info.Dest); err != nil {
					t.Fatalf("listed dest %q does not parse: %v", info.Dest, err)
				}
			}
		}
	})
}
