package metrics

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/watch"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics is the agent's Prometheus registry.
type Metrics struct {
	reg        *prometheus.Registry
	ops        *prometheus.CounterVec
	dur        *prometheus.HistogramVec
	reconciles *prometheus.CounterVec
	reconciled prometheus.Gauge
	qmpErrors  *prometheus.CounterVec
	taskRuns   *prometheus.CounterVec
	taskOK     *prometheus.GaugeVec

	once sync.Once
}

// New builds the registry of an agent of the given version, with the agent's own metrics.
// The dataplane's metrics are added with AddSources once the control plane exists.
func New(version string) *Metrics {
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
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kata_dp_reconciles_total",
			Help: "Reconciliations of a sandbox's datapath with its saved state (re-adoption at start, and later repairs), by result (ok, error).",
		}, []string{"result"}),
		reconciled: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kata_dp_reconcile_last_success_timestamp_seconds",
			Help: "Unix time of the last reconciliation that succeeded for every sandbox it covered (0: none yet).",
		}),
		qmpErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kata_dp_qmp_errors_total",
			Help: "Failed QMP calls to sandbox VMs, by call (plug, unplug, health).",
		}, []string{"call"}),
		taskRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kata_dp_task_runs_total",
			Help: "Runs of the agent's node tasks (lb-sweep, xdp-recheck, ...), by task and result (ok, error).",
		}, []string{"task", "result"}),
		taskOK: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kata_dp_task_last_success_timestamp_seconds",
			Help: "Unix time of a node task's last successful run.",
		}, []string{"task"}),
	}
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kata_dp_agent_info",
		Help: "Information about the kata-dp agent; the value is 1.",
	}, []string{"version"})
	info.WithLabelValues(version).Set(1)
	for _, r := range []string{"ok", "error"} {
		m.reconciles.WithLabelValues(r)
	}
	for _, c := range []string{"plug", "unplug", "health"} {
		m.qmpErrors.WithLabelValues(c)
	}
	m.reg.MustRegister(m.ops, m.dur, m.reconciles, m.reconciled, m.qmpErrors, m.taskRuns, m.taskOK, info,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Sources are what the scrape-time collectors read.
type Sources struct {
	// Controller lists sandboxes and endpoints and reads endpoint counters; required.
	Controller *control.Controller
	// LB gives each sandbox's kata-ipvs rules with their live counters (ipvsctl.Manager);
	// nil: no load-balancer metrics.
	LB LBSource
	// Datapath reads connection tables and map memory (control/dataplane); nil: none.
	Datapath Datapath
}

// AddSources registers the collectors that read the control plane and the dataplane at scrape
// time. Only the first call counts.
func (m *Metrics) AddSources(s Sources) {
	m.once.Do(func() {
		m.reg.MustRegister(&collector{src: s})
	})
}

// Registry returns the registry, so other parts of the agent can add metrics.
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
	m.ops.WithLabelValues(op, result(err)).Inc()
	m.dur.WithLabelValues(op).Observe(d.Seconds())
}

// Reconciled records a reconciliation pass over the sandboxes: failed is how many sandboxes
// could not be reconciled, ok how many were. The last-success time moves only when none
// failed. A nil Metrics records nothing.
func (m *Metrics) Reconciled(ok, failed int) {
	if m == nil {
		return
	}
	m.reconciles.WithLabelValues("ok").Add(float64(ok))
	m.reconciles.WithLabelValues("error").Add(float64(failed))
	if failed == 0 {
		m.reconciled.SetToCurrentTime()
	}
}

// Task returns t with every run counted (kata_dp_task_runs_total, and the time of its last
// success). A nil Metrics returns t as it is.
func (m *Metrics) Task(t watch.Task) watch.Task {
	if m == nil {
		return t
	}
	run := t.Run
	name := t.Name
	t.Run = func(ctx context.Context) error {
		err := run(ctx)
		m.taskRuns.WithLabelValues(name, result(err)).Inc()
		if err == nil {
			m.taskOK.WithLabelValues(name).SetToCurrentTime()
		}
		return err
	}
	return t
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}
