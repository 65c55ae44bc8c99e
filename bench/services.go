package bench

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
)

// A kata-dp mode with "+svc<N>" after its name runs as that mode with N load-balancer
// services loaded in the sandbox (tc+svc5000): what the load balancer costs the traffic that
// does not use it (the VIP prefilter's goal: under +20 ns of forward CPU per frame), measured
// through the real devices beside the same mode without services, and, in the vip cases, what
// an established connection through a VIP (DNAT one way, reverse NAT the other) costs.
const svcSuffix = "+svc"

// maxBenchServices is the most services a +svc row can load: every service with three real
// servers is four rules, and a sandbox holds at most ipvs.MaxRules (20000).
const maxBenchServices = ipvs.MaxRules / 4

// svcModes are the +svc rows in the default mode list; any other kata-dp mode takes the
// suffix too (--modes xdp+svc5000).
func svcModes() []modeDef { return []modeDef{svcMode(control.ModeTC, 5000)} }

// svcMode is kata-dp mode base with services loaded.
func svcMode(base string, n int) modeDef {
	desc, ok := kataDesc[base]
	if !ok {
		desc = "kata-dp " + base + " mode"
	}
	return modeDef{
		name: base + svcSuffix + strconv.Itoa(n),
		desc: fmt.Sprintf("the %s row with %d kata-ipvs services loaded (restored through the agent's path; rr, wrr, sh, persistence, TCP and UDP, IPv4 and IPv6, 3 real servers each), none of them the traffic's except the vip cases' one: %s", base, n, desc),
		svc:  n,
		base: base,
		setup: func(e *env) error {
			return setupKataDPWith(e, base, 0, n)
		},
	}
}

// parseSvcMode reads a "<kata-dp mode>+svc<N>" name.
func parseSvcMode(name string) (modeDef, bool) {
	base, n, ok := strings.Cut(name, svcSuffix)
	if !ok {
		return modeDef{}, false
	}
	if _, err := dataplane.Lookup(base); err != nil {
		return modeDef{}, false
	}
	k, err := strconv.Atoi(n)
	if err != nil || k < 1 || k > maxBenchServices || strconv.Itoa(k) != n {
		return modeDef{}, false
	}
	return svcMode(base, k), true
}

// The vip cases' service: a UDP VIP whose one real server is vipServer (an address of the
// host end's subnet that the other cases never use, so their frames are no real server's and
// the rows with services measure the prefilter on both directions) at vipServerPort; the guest
// talks to it from vipGuestPort. The ports differ from the other cases' (40000, 40001).
var benchVIP = netip.MustParseAddrPort("10.96.0.10:80")

// vipServer is the vip cases' real server: the host end's address with the last octet 254.
// The frames are written onto the host veth and taken off it by the harness, so no device
// needs the address.
func vipServer(host netip.Addr) netip.Addr {
	a := host.As4()
	a[3] = 254
	return netip.AddrFrom4(a)
}

const (
	vipServerPort = 40080
	vipGuestPort  = 40081
)

// benchServices writes n services in ipvsadm-save form, as `kata-ipvs --restore` takes them:
// the vip cases' service first, then n-1 others with three real servers each, spread over the
// schedulers and features the datapath has (rr; wrr with weights; sh, whose buckets live in a
// map of their own; persistence with a netmask; TCP and UDP; every fifth one IPv6), all on
// VIPs (10.100.0.0/14, fd00:96::/64) and real servers (172.31.0.0/16, fd00:97::/64) that none
// of the harness's traffic uses.
func benchServices(n int, server netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "-A -u %s -s rr\n-a -u %s -r %s -m -w 1\n", benchVIP, benchVIP, netip.AddrPortFrom(server, vipServerPort))
	for i := 1; i < n; i++ {
		var vip string
		rs := make([]string, 3)
		if i%5 == 0 {
			vip = fmt.Sprintf("[fd00:96::%x]:%d", i, 80+i%3)
			for j := range rs {
				rs[j] = fmt.Sprintf("[fd00:97::%x:%x]:8080", j+1, i)
			}
		} else {
			vip = fmt.Sprintf("10.%d.%d.%d:%d", 100+i/65536, (i/256)%256, i%256, 80+i%3)
			for j := range rs {
				rs[j] = fmt.Sprintf("172.31.%d.%d:8080", j+1, i%250+1)
			}
		}
		proto := "-t"
		if i%2 == 1 {
			proto = "-u"
		}
		var sched string
		switch i % 4 {
		case 0:
			sched = "-s rr"
		case 1:
			sched = "-s wrr"
		case 2:
			sched = "-s sh"
		case 3:
			sched = "-s rr -p 300 -M 255.255.255.0"
			if i%5 == 0 {
				sched = "-s rr -p 300 -M 64"
			}
		}
		fmt.Fprintf(&b, "-A %s %s %s\n", proto, vip, sched)
		for j, r := range rs {
			fmt.Fprintf(&b, "-a %s %s -r %s -m -w %d\n", proto, vip, r, j+1)
		}
	}
	return b.String()
}

// loadServices installs n services into sandbox id through the path `kata-ipvs --restore`
// takes in the agent: parse, validate into a rule table, write the whole table into the
// sandbox's maps and switch the datapath to it.
// It returns a reader of the vip cases' service's packet counters (in: from the guest, out:
// to it), the datapath's own.
func loadServices(ctx context.Context, dp *dataplane.Dataplane, id string, n int, server netip.Addr) (vipStats func() (in, out uint64, err error), err error) {
	cmds, err := ipvs.ParseRestore(strings.NewReader(benchServices(n, server)))
	if err != nil {
		return nil, fmt.Errorf("bench services: %w", err)
	}
	t := &ipvs.Table{}
	if err := t.Restore(cmds); err != nil {
		return nil, fmt.Errorf("bench services: %w", err)
	}
	if got := len(t.Services); got != n {
		return nil, fmt.Errorf("bench services: %d in the table, want %d", got, n)
	}
	vip, ok := t.Service(ipvs.ServiceKey{Proto: ipvs.UDP, Addr: benchVIP})
	if !ok {
		return nil, fmt.Errorf("bench services: no service %s", benchVIP)
	}
	if err := dp.RestoreLB(ctx, id, t); err != nil {
		return nil, fmt.Errorf("load %d services: %w", n, err)
	}
	return func() (uint64, uint64, error) {
		c, err := dp.LBCounters(ctx, id)
		if err != nil {
			return 0, 0, err
		}
		st := c.Service(vip.ID)
		return st.InPkts, st.OutPkts, nil
	}, nil
}
