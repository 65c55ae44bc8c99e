package cni

import (
	"encoding/json"
	"net"
	"slices"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/google/go-cmp/cmp"
)

// bridgeResult is what the bridge plugin returns: the bridge, the host veth, the container
// veth, and the container's addresses.
const bridgeResult = `{"cniVersion":"1.0.0",
 "interfaces":[{"name":"cni0","mac":"0a:58:0a:e7:00:01"},
               {"name":"veth1","mac":"6e:00:00:00:00:01"},
               {"name":"eth0","mac":"02:42:0a:e7:00:02","sandbox":"/run/netns/c1"}],
 "ips":[{"interface":2,"address":"fd00::2/64","gateway":"fd00::1"},
        {"interface":2,"address":"10.231.0.2/24","gateway":"10.231.0.1"},
        {"interface":2,"address":"10.231.0.3/24"}],
 "routes":[{"dst":"0.0.0.0/0"}],
 "dns":{"nameservers":["10.231.0.1"]}}`

func parseResult(t *testing.T, s string) *current.Result {
	t.Helper()
	r, err := current.NewResult([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	res, err := current.GetResult(r)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestContainerIface(t *testing.T) {
	prev := parseResult(t, bridgeResult)
	if i, err := containerIface(prev, "eth0", "/run/netns/c1"); err != nil || i != 2 {
		t.Errorf("eth0 = %d, %v; want 2", i, err)
	}
	for _, tc := range []struct{ name, netns string }{{"eth1", "/run/netns/c1"}, {"eth0", "/run/netns/c2"}, {"cni0", "/run/netns/c1"}} {
		if i, err := containerIface(prev, tc.name, tc.netns); err == nil {
			t.Errorf("%s in %s = %d; want an error", tc.name, tc.netns, i)
		}
	}
}

func TestGuestAddrs(t *testing.T) {
	prev := parseResult(t, bridgeResult)
	var got []string
	for _, a := range guestAddrs(prev, 2) {
		got = append(got, a.IP.String()+"/"+maskLen(a.Mask))
	}
	if want := []string{"10.231.0.2/24", "fd00::2/64"}; !slices.Equal(got, want) {
		t.Errorf("guestAddrs = %v; want the first IPv4 and the first IPv6 address, IPv4 first: %v", got, want)
	}
	if got := guestAddrs(prev, 1); got != nil {
		t.Errorf("guestAddrs of the host veth = %v; want none", got)
	}
	ll := parseResult(t, `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/c1"}],
 "ips":[{"interface":0,"address":"fe80::1/64"},{"interface":0,"address":"2001:db8::5/64"}]}`)
	if got := guestAddrs(ll, 0); len(got) != 1 || got[0].String() != "2001:db8::5/64" {
		t.Errorf("guestAddrs with a link-local address first = %v; want 2001:db8::5/64 only", got)
	}
}

func TestWithVM(t *testing.T) {
	prev := parseResult(t, bridgeResult)
	before, _ := json.Marshal(prev)
	res := withVM(prev, 2, "tap0_kata", "aa:bb:cc:00:00:01", "/run/netns/c1", "c1", "02:42:0a:e7:00:02")
	after, _ := json.Marshal(prev)
	if diff := cmp.Diff(string(before), string(after)); diff != "" {
		t.Errorf("withVM changed prevResult (-before +after):\n%s", diff)
	}
	wantIfs := []current.Interface{
		{Name: "cni0", Mac: "0a:58:0a:e7:00:01"},
		{Name: "veth1", Mac: "6e:00:00:00:00:01"},
		{Name: "eth0", Mac: "02:42:0a:e7:00:02", Sandbox: "/run/netns/c1"},
		{Name: "tap0_kata", Mac: "aa:bb:cc:00:00:01", Sandbox: "/run/netns/c1"},
		{Name: "tap0_kata", Mac: "02:42:0a:e7:00:02", Sandbox: "c1"},
	}
	var gotIfs []current.Interface
	for _, i := range res.Interfaces {
		gotIfs = append(gotIfs, *i)
	}
	if diff := cmp.Diff(wantIfs, gotIfs); diff != "" {
		t.Errorf("interfaces (-want +got):\n%s", diff)
	}
	type ip struct {
		If       int
		Addr, Gw string
	}
	var gotIPs []ip
	for _, c := range res.IPs {
		gotIPs = append(gotIPs, ip{*c.Interface, c.Address.String(), c.Gateway.String()})
	}
	nilGw := net.IP(nil).String()
	wantIPs := []ip{
		{2, "fd00::2/64", "fd00::1"}, {2, "10.231.0.2/24", "10.231.0.1"}, {2, "10.231.0.3/24", nilGw},
		{4, "fd00::2/64", "fd00::1"}, {4, "10.231.0.2/24", "10.231.0.1"}, {4, "10.231.0.3/24", nilGw},
	}
	if diff := cmp.Diff(wantIPs, gotIPs); diff != "" {
		t.Errorf("ips (-want +got):\n%s", diff)
	}
	if len(res.Routes) != 1 || len(res.DNS.Nameservers) != 1 {
		t.Errorf("routes %v, dns %v: want prevResult's", res.Routes, res.DNS)
	}
}
