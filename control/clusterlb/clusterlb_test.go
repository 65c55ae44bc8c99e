package clusterlb

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// recLB records what reaches the dataplane: the effective table of each sandbox.
type recLB struct {
	calls []string
	live  map[string]map[ipvs.ServiceKey]uint32 // sandbox -> key -> service id in force
	fail  map[string]error                      // sandbox -> the error its writes fail with
}

func (r *recLB) set(id string, t *ipvs.Table) {
	m := map[ipvs.ServiceKey]uint32{}
	for _, s := range t.Services {
		m[s.ServiceKey] = s.ID
	}
	r.live[id] = m
}
func (r *recLB) SetLB(_ context.Context, id string, t *ipvs.Table) error {
	r.calls = append(r.calls, "set "+id)
	if err := r.fail[id]; err != nil {
		return err
	}
	r.set(id, t)
	return nil
}
func (r *recLB) RestoreLB(_ context.Context, id string, t *ipvs.Table) error {
	r.calls = append(r.calls, "restore "+id)
	r.set(id, t)
	return nil
}
func (r *recLB) SetLBService(_ context.Context, id string, t *ipvs.Table, k ipvs.ServiceKey) error {
	r.calls = append(r.calls, fmt.Sprintf("service %s %s", id, k))
	if err := r.fail[id]; err != nil {
		return err
	}
	if s, ok := t.Service(k); ok {
		r.live[id][k] = s.ID
	} else {
		delete(r.live[id], k)
	}
	return nil
}
func (r *recLB) LBCounters(context.Context, string) (ipvs.Counters, error) { return nil, nil }
func (r *recLB) CleanupConns(_ context.Context, id string, dst netip.Addr, proto uint8) (int, error) {
	r.calls = append(r.calls, fmt.Sprintf("cleanup %s %s/%d", id, dst, proto))
	return 0, nil
}

func key(s string) ipvs.ServiceKey {
	return ipvs.ServiceKey{Proto: ipvs.TCP, Addr: netip.MustParseAddrPort(s)}
}

func TestTablesMerge(t *testing.T) {
	ctx := context.Background()
	lb := &recLB{live: map[string]map[ipvs.ServiceKey]uint32{}}
	tb := New(lb, func() []string { return []string{"a", "b"} }, nil)
	tb.SetFirstSyncWait(time.Hour)
	// Start: the saved kata-ipvs table of "a" is recorded, not pushed.
	kataA := &ipvs.Table{Services: []*ipvs.Service{{ID: 1, ServiceKey: key("10.96.0.1:80"), Scheduler: "rr"}}}
	if err := tb.RestoreLB(ctx, "a", kataA); err != nil || len(lb.calls) != 0 {
		t.Fatalf("restore at start: %v, calls %v", err, lb.calls)
	}
	tb.Started()
	cluster := map[ipvs.ServiceKey]*ipvs.Service{
		key("10.96.0.1:80"): {ID: 0x40000001, ServiceKey: key("10.96.0.1:80"), Scheduler: "rr"},
		key("10.96.0.2:80"): {ID: 0x40000002, ServiceKey: key("10.96.0.2:80"), Scheduler: "rr"},
	}
	if err := tb.SetCluster(ctx, cluster, nil); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(lb.calls, []string{"set a", "set b"}) {
		t.Errorf("first sync calls %v, want a whole set of each sandbox", lb.calls)
	}
	if got := lb.live["a"][key("10.96.0.1:80")]; got != 1 {
		t.Errorf("a: 10.96.0.1:80 is service %#x, want kata-ipvs's 1", got)
	}
	if got := lb.live["b"][key("10.96.0.1:80")]; got != 0x40000001 {
		t.Errorf("b: 10.96.0.1:80 is service %#x, want the cluster's", got)
	}
	st, _ := tb.Status()
	if st["a"].Programmed != 1 || st["a"].Overridden != 1 || st["b"].Programmed != 2 {
		t.Errorf("status %+v", st)
	}
	// A change of the hidden key reaches only b.
	lb.calls = nil
	c2 := map[ipvs.ServiceKey]*ipvs.Service{key("10.96.0.1:80"): {ID: 0x40000009, ServiceKey: key("10.96.0.1:80"), Scheduler: "rr"}, key("10.96.0.2:80"): cluster[key("10.96.0.2:80")]}
	if err := tb.SetCluster(ctx, c2, []ipvs.ServiceKey{key("10.96.0.1:80")}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(lb.calls, []string{"service b -t 10.96.0.1:80"}) {
		t.Errorf("calls %v", lb.calls)
	}
	// kata-ipvs deletes its service in a: the cluster's takes over there.
	lb.calls = nil
	if err := tb.SetLBService(ctx, "a", &ipvs.Table{}, key("10.96.0.1:80")); err != nil {
		t.Fatal(err)
	}
	if got := lb.live["a"][key("10.96.0.1:80")]; got != 0x40000009 {
		t.Errorf("a after the kata-ipvs delete: service %#x, want the cluster's", got)
	}
}

// TestRetryFailed: a sandbox whose write failed (no room in its maps) is written whole by the
// next RetryFailed once the cause is gone, not left until its services change again; the
// sandboxes that worked are not written again.
func TestRetryFailed(t *testing.T) {
	ctx := context.Background()
	lb := &recLB{live: map[string]map[ipvs.ServiceKey]uint32{}, fail: map[string]error{"b": errors.New("no room")}}
	tb := New(lb, func() []string { return []string{"a", "b"} }, nil)
	tb.Started()
	if err := tb.RetryFailed(ctx); err != nil || len(lb.calls) != 0 {
		t.Fatalf("before the first sync: %v, calls %v", err, lb.calls)
	}
	cluster := map[ipvs.ServiceKey]*ipvs.Service{key("10.96.0.1:80"): {ID: 0x40000001, ServiceKey: key("10.96.0.1:80"), Scheduler: "rr"}}
	if err := tb.SetCluster(ctx, cluster, nil); err == nil {
		t.Fatal("SetCluster: no error for b")
	}
	if st, n := tb.Status(); st["b"].Err == "" || st["a"].Err != "" || n != 1 {
		t.Fatalf("status %+v, %d errors", st, n)
	}
	lb.calls = nil
	if err := tb.RetryFailed(ctx); err == nil || !slices.Equal(lb.calls, []string{"set b"}) {
		t.Fatalf("retry while b still fails: %v, calls %v", err, lb.calls)
	}
	delete(lb.fail, "b")
	lb.calls = nil
	if err := tb.RetryFailed(ctx); err != nil || !slices.Equal(lb.calls, []string{"set b"}) {
		t.Fatalf("retry: %v, calls %v", err, lb.calls)
	}
	if got := lb.live["b"][key("10.96.0.1:80")]; got != 0x40000001 {
		t.Errorf("b after the retry: service %#x, want the cluster's", got)
	}
	if st, _ := tb.Status(); st["b"].Err != "" || st["b"].Programmed != 1 {
		t.Errorf("b's status after the retry: %+v", st["b"])
	}
	lb.calls = nil
	if err := tb.RetryFailed(ctx); err != nil || len(lb.calls) != 0 {
		t.Errorf("nothing failed: %v, calls %v", err, lb.calls)
	}
}
