package metrics

import (
	"context"
	"errors"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/prometheus/client_golang/prometheus"
)

// LBSource gives each sandbox's kata-ipvs rules with their live counters (ipvsctl.Manager).
type LBSource interface {
	// Sandboxes returns the ids of the sandboxes that have rules.
	Sandboxes() []string
	// Counters returns a copy of the sandbox's rules and their counters, read together.
	Counters(ctx context.Context, id string) (*ipvs.Table, ipvs.Counters, error)
}

// Datapath reads what the metrics need of a sandbox's BPF maps (control/dataplane).
type Datapath interface {
	// ConnTable returns the connection table's entries and capacity.
	ConnTable(ctx context.Context, id string) (entries, capacity int, err error)
	// MapMemory returns the kernel memory of each BPF map, by map name.
	MapMemory(ctx context.Context, id string) (map[string]uint64, error)
}

// scrapeTimeout bounds the reads of one scrape (Prometheus's default scrape timeout is 10s).
const scrapeTimeout = 5 * time.Second

var (
	epLabels      = []string{"sandbox", "nic", "mode", "direction"}
	descPackets   = prometheus.NewDesc("kata_dp_endpoint_packets_total", "Packets forwarded through an endpoint (a NIC added through kata-network), by the mode it runs in and direction (from_guest, to_guest).", epLabels, nil)
	descBytes     = prometheus.NewDesc("kata_dp_endpoint_bytes_total", "Bytes forwarded through an endpoint, by mode and direction.", epLabels, nil)
	descDrops     = prometheus.NewDesc("kata_dp_endpoint_drops_total", "Packets dropped by the datapath at an endpoint, by mode, direction and reason.", append(epLabels[:4:4], "reason"), nil)
	descEndpoints = prometheus.NewDesc("kata_dp_endpoints", "Endpoints (NICs added through kata-network) per sandbox.", []string{"sandbox"}, nil)
	descUnhealthy = prometheus.NewDesc("kata_dp_sandbox_unhealthy",
		"1 for each sandbox the agent could not re-adopt when it started (netns gone, pins or saved state unreadable), with the reason; such a sandbox can only be deleted.",
		[]string{"sandbox", "reason"}, nil)
	descSandboxes   = prometheus.NewDesc("kata_dp_sandboxes", "Sandboxes registered with the agent, by state (ready, unhealthy).", []string{"state"}, nil)
	descStatsErrors = prometheus.NewDesc("kata_dp_endpoint_stats_errors", "Endpoints whose counters could not be read during this scrape.", nil, nil)

	svcLabels     = []string{"sandbox", "protocol", "service"}
	srvLabels     = []string{"sandbox", "protocol", "service", "server"}
	descSvcConns  = prometheus.NewDesc("kata_dp_lb_service_connections_total", "Connections scheduled by a kata-ipvs virtual service (ipvsadm's Conns).", svcLabels, nil)
	descSvcPkts   = prometheus.NewDesc("kata_dp_lb_service_packets_total", "Packets of a kata-ipvs virtual service, by direction (in: from clients, out: replies).", append(svcLabels[:3:3], "direction"), nil)
	descSvcBytes  = prometheus.NewDesc("kata_dp_lb_service_bytes_total", "Bytes of a kata-ipvs virtual service, by direction (in, out).", append(svcLabels[:3:3], "direction"), nil)
	descSrvConns  = prometheus.NewDesc("kata_dp_lb_server_connections_total", "Connections scheduled to a real server of a kata-ipvs service.", srvLabels, nil)
	descSrvPkts   = prometheus.NewDesc("kata_dp_lb_server_packets_total", "Packets of a real server of a kata-ipvs service, by direction (in, out).", append(srvLabels[:4:4], "direction"), nil)
	descSrvBytes  = prometheus.NewDesc("kata_dp_lb_server_bytes_total", "Bytes of a real server of a kata-ipvs service, by direction (in, out).", append(srvLabels[:4:4], "direction"), nil)
	descSrvActive = prometheus.NewDesc("kata_dp_lb_server_active_connections", "Established TCP connections of a real server (ipvsadm's ActiveConn).", srvLabels, nil)
	descSrvInact  = prometheus.NewDesc("kata_dp_lb_server_inactive_connections", "Other connection entries of a real server: TCP closing, UDP (ipvsadm's InActConn).", srvLabels, nil)
	descSrvWeight = prometheus.NewDesc("kata_dp_lb_server_weight", "Weight of a real server (0: quiesced, gets no new connections).", srvLabels, nil)
	descLBErrors  = prometheus.NewDesc("kata_dp_lb_stats_errors", "Sandboxes whose load-balancer counters could not be read during this scrape.", nil, nil)

	descCTEntries  = prometheus.NewDesc("kata_dp_conntrack_entries", "Entries in a sandbox's load-balancer connection table (two per connection).", []string{"sandbox"}, nil)
	descCTCapacity = prometheus.NewDesc("kata_dp_conntrack_capacity", "Size of a sandbox's connection table; when full the oldest connections are evicted (reset).", []string{"sandbox"}, nil)
	descMapMemory  = prometheus.NewDesc("kata_dp_bpf_map_memory_bytes", "Kernel memory (memlock) of a sandbox's BPF map.", []string{"sandbox", "map"}, nil)
)

// collector reads the control plane and the dataplane at scrape time.
type collector struct {
	src Sources
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descBytes, descDrops, descEndpoints, descUnhealthy, descSandboxes,
		descStatsErrors, descSvcConns, descSvcPkts, descSvcBytes, descSrvConns, descSrvPkts, descSrvBytes, descSrvActive,
		descSrvInact, descSrvWeight, descLBErrors, descCTEntries, descCTCapacity, descMapMemory} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	ctrl := c.src.Controller
	sandboxes := ctrl.Sandboxes()
	unhealthy := ctrl.Unhealthy()
	c.endpoints(ctx, ch, ctrl, sandboxes)
	ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(len(sandboxes)-len(unhealthy)), "ready")
	ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(len(unhealthy)), "unhealthy")
	for id, why := range unhealthy {
		ch <- prometheus.MustNewConstMetric(descUnhealthy, prometheus.GaugeValue, 1, id, why)
	}
	if c.src.LB != nil {
		c.lb(ctx, ch)
	}
	if c.src.Datapath != nil {
		for _, sb := range sandboxes {
			if _, bad := unhealthy[sb.ID]; bad {
				continue
			}
			if n, size, err := c.src.Datapath.ConnTable(ctx, sb.ID); err == nil {
				ch <- prometheus.MustNewConstMetric(descCTEntries, prometheus.GaugeValue, float64(n), sb.ID)
				ch <- prometheus.MustNewConstMetric(descCTCapacity, prometheus.GaugeValue, float64(size), sb.ID)
			}
			if mem, err := c.src.Datapath.MapMemory(ctx, sb.ID); err == nil {
				for name, b := range mem {
					ch <- prometheus.MustNewConstMetric(descMapMemory, prometheus.GaugeValue, float64(b), sb.ID, name)
				}
			}
		}
	}
}

func (c *collector) endpoints(ctx context.Context, ch chan<- prometheus.Metric, ctrl *control.Controller, sandboxes []control.Sandbox) {
	perSandbox := map[string]int{}
	for _, sb := range sandboxes {
		perSandbox[sb.ID] = 0
	}
	failed := 0
	for _, ep := range ctrl.Endpoints() {
		perSandbox[ep.Sandbox]++
		st, err := ctrl.Stats(ctx, ep)
		if errors.Is(err, control.ErrNoCounters) {
			continue // a vhost-user NIC: its switch counts
		}
		if err != nil {
			failed++
			continue
		}
		mode := ctrl.RunningMode(ep)
		for _, d := range []struct {
			name string
			s    control.DirStats
		}{{"from_guest", st.FromGuest}, {"to_guest", st.ToGuest}} {
			ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(d.s.Packets), ep.Sandbox, ep.NIC, mode, d.name)
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(d.s.Bytes), ep.Sandbox, ep.NIC, mode, d.name)
			for reason, n := range d.s.Drops {
				ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(n), ep.Sandbox, ep.NIC, mode, d.name, reason)
			}
		}
	}
	for id, n := range perSandbox {
		ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(n), id)
	}
	ch <- prometheus.MustNewConstMetric(descStatsErrors, prometheus.GaugeValue, float64(failed))
}

func (c *collector) lb(ctx context.Context, ch chan<- prometheus.Metric) {
	failed := 0
	for _, id := range c.src.LB.Sandboxes() {
		t, cnt, err := c.src.LB.Counters(ctx, id)
		if err != nil {
			failed++
			continue
		}
		if cnt == nil {
			continue
		}
		for _, s := range t.Services {
			proto, vip := s.Proto.String(), s.Addr.String()
			sc := cnt.Service(s.ID)
			ch <- prometheus.MustNewConstMetric(descSvcConns, prometheus.CounterValue, float64(sc.Conns), id, proto, vip)
			for dir, v := range map[string][2]uint64{"in": {sc.InPkts, sc.InBytes}, "out": {sc.OutPkts, sc.OutBytes}} {
				ch <- prometheus.MustNewConstMetric(descSvcPkts, prometheus.CounterValue, float64(v[0]), id, proto, vip, dir)
				ch <- prometheus.MustNewConstMetric(descSvcBytes, prometheus.CounterValue, float64(v[1]), id, proto, vip, dir)
			}
			for _, d := range s.Servers {
				rs := d.Addr.String()
				dc := cnt.Server(d.ID)
				ch <- prometheus.MustNewConstMetric(descSrvConns, prometheus.CounterValue, float64(dc.Conns), id, proto, vip, rs)
				ch <- prometheus.MustNewConstMetric(descSrvActive, prometheus.GaugeValue, float64(dc.ActiveConn), id, proto, vip, rs)
				ch <- prometheus.MustNewConstMetric(descSrvInact, prometheus.GaugeValue, float64(dc.InActConn), id, proto, vip, rs)
				ch <- prometheus.MustNewConstMetric(descSrvWeight, prometheus.GaugeValue, float64(d.Weight), id, proto, vip, rs)
				for dir, v := range map[string][2]uint64{"in": {dc.InPkts, dc.InBytes}, "out": {dc.OutPkts, dc.OutBytes}} {
					ch <- prometheus.MustNewConstMetric(descSrvPkts, prometheus.CounterValue, float64(v[0]), id, proto, vip, rs, dir)
					ch <- prometheus.MustNewConstMetric(descSrvBytes, prometheus.CounterValue, float64(v[1]), id, proto, vip, rs, dir)
				}
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(descLBErrors, prometheus.GaugeValue, float64(failed))
}
