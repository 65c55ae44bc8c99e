package kube

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// SchedulerAnnotation on a Service names the IPVS scheduler of its virtual services (one of
// ipvs.Schedulers); without it they use DefaultScheduler.
const SchedulerAnnotation = "kata-dp.io/scheduler"

// DefaultScheduler is kube-proxy's IPVS mode default.
const DefaultScheduler = "rr"

// DefaultAffinityTimeout is Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds
// (three hours), used when a ClientIP service does not set it.
const DefaultAffinityTimeout = 10800

var (
	hostMask4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})
	hostMask6 = netip.AddrFrom16([16]byte{0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 255,
		8: 255, 9: 255, 10: 255, 11: 255, 12: 255, 13: 255, 14: 255, 15: 255})
)

// Skipped says why a Service (or one of its ports or addresses) is not programmed: not an
// error (headless and ExternalName services are meant to be skipped), but shown in the status.
type Skipped struct {
	Service string // namespace/name
	Reason  string
}

// Translation is what one Service becomes.
type Translation struct {
	// Services are its virtual services (one per ClusterIP and port; IDs unset: the Syncer
	// assigns them), in a stable order.
	Services []ipvs.Service
	// Skipped lists what was left out and why (empty for a fully programmed service).
	Skipped []string
}

// Translate turns one Service and its EndpointSlices into virtual services, following
// kube-proxy (pkg/proxy: ServicePort, the endpoint-slice cache and CategorizeEndpoints):
//   - ExternalName and headless (clusterIP None) services give nothing; the ClusterIP of a
//     NodePort or LoadBalancer service is translated like any other (its node ports and
//     load-balancer addresses stay kube-proxy's or the cloud's);
//   - every address of spec.clusterIPs (both families) times every port (TCP and UDP; SCTP
//     is skipped: the datapath balances TCP and UDP) is one virtual service;
//   - its real servers are the endpoints of the slices of the same address family whose port
//     has the service port's name and protocol (which is how a named targetPort is resolved:
//     the EndpointSlice controller writes the number each pod gives that name);
//   - ready endpoints (conditions.ready unset counts as ready); only when none is ready, the
//     serving ones that are terminating; with internalTrafficPolicy Local only the endpoints
//     on node (then the same ready/terminating rule among those);
//   - sessionAffinity ClientIP becomes persistence with its timeout (default three hours),
//     per client address (host netmask);
//   - the scheduler is the SchedulerAnnotation's value (an unknown one is reported and rr used).
//
// A service port without endpoints is still programmed, with no real servers, as kube-proxy's
// IPVS mode keeps such a virtual service.
func Translate(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node string) Translation {
	var tr Translation
	if svc == nil {
		return tr
	}
	switch {
	case svc.Spec.Type == corev1.ServiceTypeExternalName:
		tr.Skipped = append(tr.Skipped, "ExternalName service")
		return tr
	case svc.Spec.ClusterIP == corev1.ClusterIPNone:
		tr.Skipped = append(tr.Skipped, "headless service")
		return tr
	case svc.Spec.ClusterIP == "":
		tr.Skipped = append(tr.Skipped, "no cluster IP")
		return tr
	}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	sched := DefaultScheduler
	if a, ok := svc.Annotations[SchedulerAnnotation]; ok {
		if slices.Contains(ipvs.Schedulers, a) {
			sched = a
		} else {
			tr.Skipped = append(tr.Skipped, fmt.Sprintf("annotation %s: unknown scheduler %q (using %s)", SchedulerAnnotation, a, DefaultScheduler))
		}
	}
	var persist uint32
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		persist = DefaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			persist = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	for _, ipStr := range ips {
		vip, err := netip.ParseAddr(ipStr)
		if err != nil {
			tr.Skipped = append(tr.Skipped, fmt.Sprintf("cluster IP %q: not an address", ipStr))
			continue
		}
		vip = vip.Unmap()
		family := discoveryv1.AddressTypeIPv4
		mask := hostMask4
		if vip.Is6() {
			family, mask = discoveryv1.AddressTypeIPv6, hostMask6
		}
		for _, p := range svc.Spec.Ports {
			proto, ok := protoOf(p.Protocol)
			if !ok {
				tr.Skipped = append(tr.Skipped, fmt.Sprintf("port %d/%s: only TCP and UDP are balanced", p.Port, p.Protocol))
				continue
			}
			if p.Port <= 0 || p.Port > 65535 {
				tr.Skipped = append(tr.Skipped, fmt.Sprintf("port %d: out of range", p.Port))
				continue
			}
			s := ipvs.Service{
				ServiceKey: ipvs.ServiceKey{Proto: proto, Addr: netip.AddrPortFrom(vip, uint16(p.Port))},
				Scheduler:  sched,
				Persistent: persist,
			}
			if persist > 0 {
				s.Netmask = mask
			}
			for _, a := range endpoints(eps, family, p, local, node) {
				s.Servers = append(s.Servers, ipvs.Server{Addr: a, Weight: 1})
			}
			tr.Services = append(tr.Services, s)
		}
	}
	return tr
}

func protoOf(p corev1.Protocol) (ipvs.Proto, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return ipvs.TCP, true
	case corev1.ProtocolUDP:
		return ipvs.UDP, true
	}
	return 0, false
}

// candidate is one endpoint address:port with the conditions that decide whether it serves.
type candidate struct {
	addr        netip.AddrPort
	ready       bool
	serving     bool
	terminating bool
	local       bool
}

// endpoints returns the real servers of service port p among slices (sorted by address, no
// duplicates: an endpoint may be in two slices while the controller moves it).
func endpoints(eps []*discoveryv1.EndpointSlice, family discoveryv1.AddressType, p corev1.ServicePort, localOnly bool, node string) []netip.AddrPort {
	byAddr := map[netip.AddrPort]candidate{}
	for _, sl := range eps {
		if sl == nil || sl.AddressType != family {
			continue
		}
		port, ok := slicePort(sl, p)
		if !ok {
			continue
		}
		for _, ep := range sl.Endpoints {
			c := candidate{
				ready:       ep.Conditions.Ready == nil || *ep.Conditions.Ready,
				terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
				local:       ep.NodeName != nil && *ep.NodeName == node,
			}
			c.serving = c.ready
			if ep.Conditions.Serving != nil {
				c.serving = *ep.Conditions.Serving
			}
			if c.terminating {
				// A terminating endpoint is never ready (the API promises it; kube-proxy
				// relies on it too), whatever a hand-made slice says.
				c.ready = false
			}
			for _, s := range ep.Addresses {
				a, err := netip.ParseAddr(s)
				if err != nil {
					continue
				}
				c.addr = netip.AddrPortFrom(a.Unmap(), port)
				if old, ok := byAddr[c.addr]; ok {
					// Seen in two slices: take the better-off copy.
					c.ready = c.ready || old.ready
					c.serving = c.serving || old.serving
					c.terminating = c.terminating && old.terminating
					c.local = c.local || old.local
				}
				byAddr[c.addr] = c
			}
		}
	}
	var ready, fallback []netip.AddrPort
	for a, c := range byAddr {
		if localOnly && !c.local {
			continue
		}
		switch {
		case c.ready:
			ready = append(ready, a)
		case c.serving && c.terminating:
			fallback = append(fallback, a)
		}
	}
	out := ready
	if len(out) == 0 {
		out = fallback
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// slicePort returns the target port of service port p in slice sl: the slice port with the
// same name and protocol (kube-proxy matches by name; an unnamed service port matches an
// unnamed slice port).
func slicePort(sl *discoveryv1.EndpointSlice, p corev1.ServicePort) (uint16, bool) {
	for _, sp := range sl.Ports {
		name := ""
		if sp.Name != nil {
			name = *sp.Name
		}
		proto := corev1.ProtocolTCP
		if sp.Protocol != nil {
			proto = *sp.Protocol
		}
		if name != p.Name || cmp.Or(proto, corev1.ProtocolTCP) != cmp.Or(p.Protocol, corev1.ProtocolTCP) || sp.Port == nil {
			continue
		}
		if *sp.Port <= 0 || *sp.Port > 65535 {
			return 0, false
		}
		return uint16(*sp.Port), true
	}
	return 0, false
}

// ErrTooManyRules is returned when the cluster's services do not fit the cluster table's
// limit (services plus real servers, like kata-ipvs counts rules).
var ErrTooManyRules = errors.New("cluster table full")
