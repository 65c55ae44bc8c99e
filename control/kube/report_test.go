package kube

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/client-go/rest"

	"github.com/kata-dp/kata-dp/control/clusterlb"
	"github.com/kata-dp/kata-dp/control/ipvs"
)

// nopLB takes every write.
type nopLB struct{}

func (nopLB) SetLB(context.Context, string, *ipvs.Table) error     { return nil }
func (nopLB) RestoreLB(context.Context, string, *ipvs.Table) error { return nil }
func (nopLB) SetLBService(context.Context, string, *ipvs.Table, ipvs.ServiceKey) error {
	return nil
}
func (nopLB) LBCounters(context.Context, string) (ipvs.Counters, error) { return nil, nil }
func (nopLB) CleanupConns(context.Context, string, netip.Addr, uint8) (int, error) {
	return 0, nil
}

// TestReporterMetrics: the collector's metrics pass Prometheus' lint and carry the Syncer's
// and the Tables' state (nothing is synced: the Syncer is not run).
func TestReporterMetrics(t *testing.T) {
	tables := clusterlb.New(nopLB{}, func() []string { return []string{"sb1"} }, nil)
	tables.Started()
	// A client of nothing: New contacts no API server; Run is not called.
	s, err := New(tables, Options{Config: &rest.Config{Host: "http://127.0.0.1:1"}, Node: "n1", MaxRules: 100})
	if err != nil {
		t.Fatal(err)
	}
	r := Reporter{Syncer: s, Tables: tables}
	if probs, err := testutil.CollectAndLint(r); err != nil || len(probs) > 0 {
		t.Fatalf("lint: %v %v", err, probs)
	}
	want := `
# HELP kata_dp_kube_rules_max The cluster table's limit (--cluster-max-rules).
# TYPE kata_dp_kube_rules_max gauge
kata_dp_kube_rules_max 100
# HELP kata_dp_kube_synced 1 once the first sync of the cluster's Services and EndpointSlices was written into the sandboxes.
# TYPE kata_dp_kube_synced gauge
kata_dp_kube_synced 0
`
	if err := testutil.CollectAndCompare(r, strings.NewReader(want), "kata_dp_kube_rules_max", "kata_dp_kube_synced"); err != nil {
		t.Error(err)
	}
	if err := s.Ready(context.Background()); err == nil {
		t.Error("ready before the first sync")
	}
}
