package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/kube/kubetest"
)

// TestKubernetesDualStack: a dual-stack Service (an IPv4 and an IPv6 ClusterIP, one
// EndpointSlice per family) reaches the guest of a dual-stack sandbox through both ClusterIPs,
// with real TCP and UDP, each family balanced to its own family's endpoints; scaling the IPv6
// slice moves new IPv6 connections and leaves IPv4 alone.
func TestKubernetesDualStack(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	kc := kubetest.Start(t)
	ctx := context.Background()
	cs := kc.Client
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kdpt"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	const vip4, vip6 = "10.96.0.20", "fd00:96::20"
	policy := corev1.IPFamilyPolicyRequireDualStack
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "kdpt"}, Spec: corev1.ServiceSpec{
		ClusterIP:      vip4,
		ClusterIPs:     []string{vip4, vip6},
		IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
		IPFamilyPolicy: &policy,
		Ports: []corev1.ServicePort{
			{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)},
			{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353)},
		}}}
	if _, err := cs.CoreV1().Services("kdpt").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	slice := func(name string, typ discoveryv1.AddressType, eps ...string) *discoveryv1.EndpointSlice {
		sl := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "kdpt", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: typ,
			Ports: []discoveryv1.EndpointPort{
				{Name: ptr.To("http"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To[int32](8080)},
				{Name: ptr.To("dns"), Protocol: ptr.To(corev1.ProtocolUDP), Port: ptr.To[int32](5353)},
			},
		}
		for _, e := range eps {
			sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{e}})
		}
		return sl
	}
	const be4, be6a, be6b = "10.198.0.11", "fd00:198::11", "fd00:198::12"
	slices := cs.DiscoveryV1().EndpointSlices("kdpt")
	if _, err := slices.Create(ctx, slice("web-v4", discoveryv1.AddressTypeIPv4, be4), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := slices.Create(ctx, slice("web-v6", discoveryv1.AddressTypeIPv6, be6a), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	a, p := startTestAgent(t, nil, nil, "kdptk", "--config", "", "--kata-dir", "", "--kubeconfig", kc.Kubeconfig, "--node-name", "node-a")

	// One dual-stack sandbox: the guest emulator has 10.198.0.2 and fd00:198::2, the host side
	// 10.198.0.1 and fd00:198::1 and the backends' addresses.
	const id, tap, mac = "9999aaaa0000bbbb1111cccc2222dddd", "tap-k6", "02:42:20:6f:a3:66"
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptk6", NoTap: true, IPv6: true,
		HostAddr: netip.MustParsePrefix("10.198.0.1/24"), GuestAddr: netip.MustParsePrefix("10.198.0.2/24")})
	for _, addr := range []string{"fd00:198::1/64", be4 + "/24", be6a + "/64", be6b + "/64"} {
		if err := sb.Host.AddAddr(sb.HostVeth.Name, addr); err != nil {
			t.Fatalf("host address %s: %v", addr, err)
		}
	}
	guest := topotest.MustNetNS(t, "kdptk6g")
	a.check(t, "", []string{"sandbox", "add", id, "--netns", sb.NS.Path()}, result{stdout: id + "\n"})
	in := fmt.Sprintf(`{"device":"%s","name":"eth-test","IPAddresses":[{"address":"10.198.0.2","mask":"24"},{"address":"fd00:198::2","mask":"64"}],"hwAddr":"%s","mtu":1500}`, tap, mac)
	if r := a.cli(t, in, "kata-network", "add-iface", id, "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v", r)
	}
	// Strict egress: the ClusterIPs are off the NIC's prefixes, so the guest needs routes.
	for _, gw := range []string{"10.198.0.1", "fd00:198::1"} {
		route := `{"dest":"default","gateway":"` + gw + `","device":"eth-test"}`
		if r := a.cli(t, route, "kata-network", "add-route", id, "-"); r.code != 0 {
			t.Fatalf("add-route %s: %+v", gw, r)
		}
	}
	hw, _ := net.ParseMAC(mac)
	emulateGuest(t, sb.NS.Path(), tap, guest, "eth0", guestemu.BridgeOptions{MAC: hw,
		Addrs: []netip.Prefix{sb.GuestAddr, netip.MustParsePrefix("fd00:198::2/64")}, Gateway: sb.HostAddr.Addr()})
	if out, err := guest.Exec("ip", "-6", "route", "add", "default", "via", "fd00:198::1", "dev", "eth0"); err != nil {
		t.Fatalf("guest IPv6 default route: %v: %s", err, out)
	}
	for _, s := range []struct{ addr, name string }{{be4, "be4"}, {be6a, "be6a"}, {be6b, "be6b"}} {
		l, err := sb.Host.Listen("tcp", net.JoinHostPort(s.addr, "8080"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go serveName(l, s.name)
		serveUDPName(t, sb.Host, net.JoinHostPort(s.addr, "5353"), s.name)
	}
	dial := func(vip string) string {
		c, err := guest.Dial("tcp", net.JoinHostPort(vip, "80"), time.Second)
		if err != nil {
			return ""
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		return strings.TrimSpace(string(buf[:n]))
	}
	udp := func(vip string) string {
		u, err := guest.Dial("udp", net.JoinHostPort(vip, "53"), time.Second)
		if err != nil {
			return ""
		}
		defer u.Close()
		return ask(u)
	}

	eventually(t, "the guest reaches be4 through the IPv4 ClusterIP", func() bool { return dial(vip4) == "be4" })
	eventually(t, "the guest reaches be6a through the IPv6 ClusterIP", func() bool { return dial(vip6) == "be6a" })
	if got := udp(vip4); got != "be4" {
		t.Errorf("udp over the IPv4 ClusterIP: %q, want be4\n%s", got, p.stderr)
	}
	if got := udp(vip6); got != "be6a" {
		t.Errorf("udp over the IPv6 ClusterIP: %q, want be6a\n%s", got, p.stderr)
	}
	// Scale the IPv6 slice to be6b: new IPv6 connections follow, IPv4 stays on be4.
	if _, err := slices.Update(ctx, slice("web-v6", discoveryv1.AddressTypeIPv6, be6b), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new IPv6 connections reach be6b", func() bool { return dial(vip6) == "be6b" })
	if got := dial(vip4); got != "be4" {
		t.Errorf("IPv4 after the IPv6 change: %q, want be4", got)
	}
	// kata-ipvs lists none of the cluster's services.
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", "-S -n", id); r.code != 0 || r.stdout != "" {
		t.Errorf("kata-ipvs --save shows the cluster's services: %+v", r)
	}
}
