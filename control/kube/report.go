package kube

import (
	"maps"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kata-dp/kata-dp/control/clusterlb"
)

// Report is the cluster table's state: the Syncer's and, by sandbox, what is in force there
// (GET /v1/cluster, `kata-dp status`).
type Report struct {
	Status
	// Sandboxes is the cluster table in each sandbox written so far.
	Sandboxes map[string]clusterlb.SandboxStatus `json:"sandboxes"`
	// WriteErrors counts failed writes into sandboxes since the start.
	WriteErrors uint64 `json:"writeErrors"`
}

// Reporter reads a Syncer and the Tables it writes into, for the API and the metrics.
type Reporter struct {
	Syncer *Syncer
	Tables *clusterlb.Tables
}

// Report returns the current state.
func (r Reporter) Report() Report {
	sb, werr := r.Tables.Status()
	return Report{Status: r.Syncer.Status(), Sandboxes: sb, WriteErrors: werr}
}

var (
	descSynced = prometheus.NewDesc("kata_dp_kube_synced", "1 once the first sync of the cluster's Services and EndpointSlices was written into the sandboxes.", nil, nil)
	descConn   = prometheus.NewDesc("kata_dp_kube_apiserver_up", "1 when the last probe of the API server answered; 0 while it is unreachable (the datapath keeps the last state).", nil, nil)
	descLast   = prometheus.NewDesc("kata_dp_kube_last_contact_timestamp_seconds", "Unix time the API server last answered a probe (0: never).", nil, nil)
	descLag    = prometheus.NewDesc("kata_dp_kube_sync_lag_seconds", "Time the last change took from the informer's event to every sandbox's datapath.", nil, nil)
	descMaxLag = prometheus.NewDesc("kata_dp_kube_sync_lag_max_seconds", "Longest sync lag since the start.", nil, nil)
	descObj    = prometheus.NewDesc("kata_dp_kube_objects", "Objects in the informers' caches, by kind (service, endpointslice).", []string{"kind"}, nil)
	descVS     = prometheus.NewDesc("kata_dp_kube_virtual_services", "Virtual services in the cluster table.", nil, nil)
	descRules  = prometheus.NewDesc("kata_dp_kube_rules", "Rules (services plus real servers) in the cluster table.", nil, nil)
	descMax    = prometheus.NewDesc("kata_dp_kube_rules_max", "The cluster table's limit (--cluster-max-rules).", nil, nil)
	descErr    = prometheus.NewDesc("kata_dp_kube_errors_total", "Errors since the start: sync (translation, table full, watch, probe) and write (a sandbox's datapath).", []string{"kind"}, nil)
	descProg   = prometheus.NewDesc("kata_dp_kube_programmed_services", "Cluster services in force in a sandbox (the ones a kata-ipvs service of the sandbox hides excluded).", []string{"sandbox"}, nil)
	descHidden = prometheus.NewDesc("kata_dp_kube_overridden_services", "Cluster services a kata-ipvs service of the sandbox hides.", []string{"sandbox"}, nil)
)

// Describe implements prometheus.Collector.
func (r Reporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSynced, descConn, descLast, descLag, descMaxLag, descObj, descVS, descRules, descMax, descErr, descProg, descHidden} {
		ch <- d
	}
}

// Collect implements prometheus.Collector (read at scrape time).
func (r Reporter) Collect(ch chan<- prometheus.Metric) {
	rep := r.Report()
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	g := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	g(descSynced, b(rep.Synced))
	g(descConn, b(rep.Connected))
	last := 0.0
	if !rep.LastContact.IsZero() {
		last = float64(rep.LastContact.UnixNano()) / 1e9
	}
	g(descLast, last)
	g(descLag, rep.SyncLag.Seconds())
	g(descMaxLag, rep.MaxSyncLag.Seconds())
	g(descObj, float64(rep.Services), "service")
	g(descObj, float64(rep.EndpointSlices), "endpointslice")
	g(descVS, float64(rep.VirtualServices))
	g(descRules, float64(rep.Rules))
	g(descMax, float64(rep.MaxRules))
	ch <- prometheus.MustNewConstMetric(descErr, prometheus.CounterValue, float64(rep.Errors), "sync")
	ch <- prometheus.MustNewConstMetric(descErr, prometheus.CounterValue, float64(rep.WriteErrors), "write")
	for _, id := range slices.Sorted(maps.Keys(rep.Sandboxes)) {
		g(descProg, float64(rep.Sandboxes[id].Programmed), id)
		g(descHidden, float64(rep.Sandboxes[id].Overridden), id)
	}
}
