package kube

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

func svc(ips []string, ports ...corev1.ServicePort) *corev1.Service {
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: ips[0], ClusterIPs: ips, Ports: ports}}
	return s
}

type ep struct {
	addr                        string
	ready, serving, terminating *bool
	node                        string
}

func slice(family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web-x",
		Labels: map[string]string{discoveryv1.LabelServiceName: "web"}}, AddressType: family, Ports: ports}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.addr},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			d.NodeName = ptr.To(e.node)
		}
		sl.Endpoints = append(sl.Endpoints, d)
	}
	return sl
}

func sport(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Protocol: ptr.To(proto), Port: ptr.To(port)}
}

func addrs(s ipvs.Service) []string {
	var out []string
	for _, d := range s.Servers {
		out = append(out, d.Addr.String())
	}
	return out
}

func TestTranslateBasics(t *testing.T) {
	s := svc([]string{"10.96.0.10"},
		corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80},
		corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53})
	sl := slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 5353)},
		ep{addr: "10.0.0.2"}, ep{addr: "10.0.0.1", ready: ptr.To(true)}, ep{addr: "10.0.0.3", ready: ptr.To(false)})
	tr := Translate(s, []*discoveryv1.EndpointSlice{sl}, "n1")
	if len(tr.Services) != 2 || len(tr.Skipped) != 0 {
		t.Fatalf("got %+v", tr)
	}
	want := ipvs.ServiceKey{Proto: ipvs.TCP, Addr: netip.MustParseAddrPort("10.96.0.10:80")}
	if tr.Services[0].ServiceKey != want || tr.Services[0].Scheduler != "rr" || tr.Services[0].Persistent != 0 {
		t.Errorf("service 0 = %+v", tr.Services[0])
	}
	if d := cmp.Diff([]string{"10.0.0.1:8080", "10.0.0.2:8080"}, addrs(tr.Services[0])); d != "" {
		t.Errorf("tcp servers (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]string{"10.0.0.1:5353", "10.0.0.2:5353"}, addrs(tr.Services[1])); d != "" || tr.Services[1].Proto != ipvs.UDP {
		t.Errorf("udp servers (-want +got):\n%s", d)
	}
}

func TestTranslateTerminatingOnlyWithoutReady(t *testing.T) {
	s := svc([]string{"10.96.0.10"}, corev1.ServicePort{Protocol: corev1.ProtocolTCP, Port: 80})
	ports := []discoveryv1.EndpointPort{sport("", corev1.ProtocolTCP, 80)}
	term := ep{addr: "10.0.0.9", ready: ptr.To(false), serving: ptr.To(true), terminating: ptr.To(true)}
	notServing := ep{addr: "10.0.0.8", ready: ptr.To(false), serving: ptr.To(false), terminating: ptr.To(true)}
	tr := Translate(s, []*discoveryv1.EndpointSlice{slice(discoveryv1.AddressTypeIPv4, ports, ep{addr: "10.0.0.1"}, term, notServing)}, "")
	if d := cmp.Diff([]string{"10.0.0.1:80"}, addrs(tr.Services[0])); d != "" {
		t.Errorf("with a ready one (-want +got):\n%s", d)
	}
	tr = Translate(s, []*discoveryv1.EndpointSlice{slice(discoveryv1.AddressTypeIPv4, ports, term, notServing)}, "")
	if d := cmp.Diff([]string{"10.0.0.9:80"}, addrs(tr.Services[0])); d != "" {
		t.Errorf("without a ready one (-want +got):\n%s", d)
	}
}

func TestTranslateLocalAffinitySchedulerDualStack(t *testing.T) {
	s := svc([]string{"10.96.0.10", "fd00::10"}, corev1.ServicePort{Name: "p", Protocol: corev1.ProtocolTCP, Port: 80})
	s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
	s.Annotations = map[string]string{SchedulerAnnotation: "wlc"}
	ports := []discoveryv1.EndpointPort{sport("p", corev1.ProtocolTCP, 8080)}
	v4 := slice(discoveryv1.AddressTypeIPv4, ports, ep{addr: "10.0.0.1", node: "n1"}, ep{addr: "10.0.0.2", node: "n2"})
	v6 := slice(discoveryv1.AddressTypeIPv6, ports, ep{addr: "fd00::1", node: "n1"}, ep{addr: "fd00::2", node: "n2"})
	tr := Translate(s, []*discoveryv1.EndpointSlice{v4, v6}, "n1")
	if len(tr.Services) != 2 {
		t.Fatalf("got %+v", tr)
	}
	for i, want := range []string{"10.0.0.1:8080", "[fd00::1]:8080"} {
		got := tr.Services[i]
		if d := cmp.Diff([]string{want}, addrs(got)); d != "" {
			t.Errorf("service %d servers (-want +got):\n%s", i, d)
		}
		if got.Scheduler != "wlc" || got.Persistent != 60 || !got.Netmask.IsValid() {
			t.Errorf("service %d = %+v", i, got)
		}
	}
	if tr.Services[1].Addr.Addr() != netip.MustParseAddr("fd00::10") || tr.Services[1].Netmask != hostMask6 {
		t.Errorf("v6 service = %+v", tr.Services[1])
	}
	s.Annotations[SchedulerAnnotation] = "fastest"
	if tr := Translate(s, nil, "n1"); tr.Services[0].Scheduler != "rr" || len(tr.Skipped) != 1 {
		t.Errorf("unknown scheduler: %+v", tr)
	}
}

func TestTranslateSkips(t *testing.T) {
	hl := svc([]string{"None"}, corev1.ServicePort{Port: 80})
	en := svc([]string{""}, corev1.ServicePort{Port: 80})
	en.Spec.Type = corev1.ServiceTypeExternalName
	sctp := svc([]string{"10.96.0.1"}, corev1.ServicePort{Protocol: corev1.ProtocolSCTP, Port: 80})
	for _, s := range []*corev1.Service{hl, en, sctp} {
		if tr := Translate(s, nil, ""); len(tr.Services) != 0 || len(tr.Skipped) != 1 {
			t.Errorf("%+v: got %+v", s.Spec, tr)
		}
	}
	np := svc([]string{"10.96.0.1"}, corev1.ServicePort{Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30080})
	np.Spec.Type = corev1.ServiceTypeNodePort
	if tr := Translate(np, nil, ""); len(tr.Services) != 1 || len(tr.Services[0].Servers) != 0 {
		t.Errorf("NodePort: got %+v", tr)
	}
}

func TestTableUpdateIDsAndLimit(t *testing.T) {
	tb := NewTable(5)
	s := svc([]string{"10.96.0.10"}, corev1.ServicePort{Protocol: corev1.ProtocolTCP, Port: 80})
	ports := []discoveryv1.EndpointPort{sport("", corev1.ProtocolTCP, 80)}
	tr := Translate(s, []*discoveryv1.EndpointSlice{slice(discoveryv1.AddressTypeIPv4, ports, ep{addr: "10.0.0.1"}, ep{addr: "10.0.0.2"})}, "")
	ch, err := tb.Update("ns/web", tr)
	if err != nil || len(ch) != 1 || tb.Rules() != 3 {
		t.Fatalf("update: %v %v rules %d", ch, err, tb.Rules())
	}
	first := tb.Snapshot()[ch[0]]
	if first.ID < IDBase || first.ID >= IDLimit || first.Servers[0].ID < IDBase {
		t.Errorf("ids out of range: %+v", first)
	}
	if ch, err := tb.Update("ns/web", tr); err != nil || len(ch) != 0 {
		t.Errorf("same again: changed %v, %v", ch, err)
	}
	// Another table (a restarted agent) gives the same ids.
	tb2 := NewTable(0)
	tb2.Update("ns/web", tr)
	if second := tb2.Snapshot()[ch0(tb2)]; second.ID != first.ID || second.Servers[0].ID != first.Servers[0].ID || second.Servers[1].ID != first.Servers[1].ID {
		t.Errorf("ids differ across tables: %+v and %+v", first, second)
	}
	// Scale up: the kept server keeps its id; the old value is not changed.
	tr3 := Translate(s, []*discoveryv1.EndpointSlice{slice(discoveryv1.AddressTypeIPv4, ports, ep{addr: "10.0.0.1"}, ep{addr: "10.0.0.2"}, ep{addr: "10.0.0.3"})}, "")
	if ch, err := tb.Update("ns/web", tr3); err != nil || len(ch) != 1 {
		t.Fatalf("scale up: %v %v", ch, err)
	}
	now := tb.Snapshot()[first.ServiceKey]
	if len(first.Servers) != 2 || now.Servers[0].ID != first.Servers[0].ID || now.ID != first.ID {
		t.Errorf("scale up: before %+v, after %+v", first, now)
	}
	// Beyond the limit: refused, nothing changed.
	tr4 := Translate(s, []*discoveryv1.EndpointSlice{slice(discoveryv1.AddressTypeIPv4, ports, ep{addr: "10.0.0.1"}, ep{addr: "10.0.0.2"}, ep{addr: "10.0.0.3"}, ep{addr: "10.0.0.4"}, ep{addr: "10.0.0.5"})}, "")
	if _, err := tb.Update("ns/web", tr4); !errors.Is(err, ErrTooManyRules) || tb.Rules() != 4 {
		t.Errorf("over the limit: %v, rules %d", err, tb.Rules())
	}
	if ch, err := tb.Update("ns/web", Translation{}); err != nil || len(ch) != 1 || tb.Len() != 0 || tb.Rules() != 0 {
		t.Errorf("delete: %v %v", ch, err)
	}
}

func ch0(tb *Table) ipvs.ServiceKey {
	for k := range tb.services {
		return k
	}
	return ipvs.ServiceKey{}
}
