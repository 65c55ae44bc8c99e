package api

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics is the agent's Prometheus registry: per-endpoint counters read from the dataplane at
// scrape time, per-operation counts and latencies, and the agent's version.
type Metrics struct {
	reg *prometheus.Registry
	ops *prometheus.CounterVec
	dur *prometheus.HistogramVec
}

// NewMetrics builds the registry for the agent of ctrl.
func NewMetrics(ctrl *control.Controller, version string) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kata_dp_operations_total",
			Help: "Operations handled by the agent, by operation and result (ok, error).",
		}, []string{"op", "result"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kata_dp_operation_duration_seconds",
			Help:    "Time taken by agent operations, failed ones included.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"op"}),
	}
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kata_dp_agent_info",
		Help: "Information about the kata-dp agent; the value is 1.",
	}, []string{"version"})
	info.WithLabelValues(version).Set(1)
	m.reg.MustRegister(m.ops, m.dur, info, &collector{ctrl: ctrl},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the registry, so other parts of the agent (kata-ipvs) can add metrics.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Observe records one operation. A nil Metrics records nothing.
func (m *Metrics) Observe(op string, d time.Duration, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.ops.WithLabelValues(op, result).Inc()
	m.dur.WithLabelValues(op).Observe(d.Seconds())
}

var (
	descPackets = prometheus.NewDesc("kata_dp_endpoint_packets_total",
		"Packets forwarded through an endpoint, by direction (from_guest, to_guest).",
		[]string{"sandbox", "nic", "direction"}, nil)
	descBytes = prometheus.NewDesc("kata_dp_endpoint_bytes_total",
		"Bytes forwarded through an endpoint, by direction.",
		[]string{"sandbox", "nic", "direction"}, nil)
	descDrops = prometheus.NewDesc("kata_dp_endpoint_drops_total",
		"Packets dropped by the datapath at an endpoint, by direction and reason.",
		[]string{"sandbox", "nic", "direction", "reason"}, nil)
	descEndpoints = prometheus.NewDesc("kata_dp_endpoints",
		"Endpoints (NICs added through kata-network) per sandbox.",
		[]string{"sandbox"}, nil)
	descUnhealthy = prometheus.NewDesc("kata_dp_sandbox_unhealthy",
		"1 for each sandbox the agent could not re-adopt when it started (netns gone, pins or saved state unreadable), with the reason; such a sandbox can only be deleted.",
		[]string{"sandbox", "reason"}, nil)
	descStatsErrors = prometheus.NewDesc("kata_dp_endpoint_stats_errors",
		"Endpoints whose counters could not be read during this scrape.",
		nil, nil)
)

// collector reads the dataplane's counters at scrape time.
type collector struct {
	ctrl *control.Controller
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPackets
	ch <- descBytes
	ch <- descDrops
	ch <- descEndpoints
	ch <- descStatsErrors
	ch <- descUnhealthy
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	perSandbox := map[string]int{}
	for _, sb := range c.ctrl.Sandboxes() {
		perSandbox[sb.ID] = 0
	}
	failed := 0
	for _, ep := range c.ctrl.Endpoints() {
		perSandbox[ep.Sandbox]++
		st, err := c.ctrl.Stats(ctx, ep)
		if errors.Is(err, control.ErrNoCounters) {
			continue // a vhost-user NIC: its switch counts
		}
		if err != nil {
			failed++
			continue
		}
		for _, d := range []struct {
			name string
			s    control.DirStats
		}{{"from_guest", st.FromGuest}, {"to_guest", st.ToGuest}} {
			ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(d.s.Packets), ep.Sandbox, ep.NIC, d.name)
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(d.s.Bytes), ep.Sandbox, ep.NIC, d.name)
			for reason, n := range d.s.Drops {
				ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(n), ep.Sandbox, ep.NIC, d.name, reason)
			}
		}
	}
	for id, n := range perSandbox {
		ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(n), id)
	}
	ch <- prometheus.MustNewConstMetric(descStatsErrors, prometheus.GaugeValue, float64(failed))
	for id, why := range c.ctrl.Unhealthy() {
		ch <- prometheus.MustNewConstMetric(descUnhealthy, prometheus.GaugeValue, 1, id, why)
	}
}
