package loader_test

import (
	"testing"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestExtraLBRules: Options.ExtraLBRules grows the load balancer's maps (two tables' worth
// of service entries), and a sandbox pinned with other options is re-adopted with its maps as
// they are, both ways.
func TestExtraLBRules(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	plain, err := loader.OpenWithOptions(root, "lbsize0", loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	base := plain.Maps()
	svc, be := base.LBSvc.MaxEntries(), base.LBBackend.MaxEntries()
	plain.Close()
	loader.Remove(root, "lbsize0")

	big, err := loader.OpenWithOptions(root, "lbsize1", loader.Options{ExtraLBRules: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if m := big.Maps(); m.LBSvc.MaxEntries() != svc+2000 || m.LBBackend.MaxEntries() != be+1000 {
		t.Errorf("with 1000 extra rules: svc %d (want %d), backends %d (want %d)", m.LBSvc.MaxEntries(), svc+2000, m.LBBackend.MaxEntries(), be+1000)
	}
	big.Close()
	// Re-adopted by a run without the option: the pinned sizes stay.
	again, err := loader.OpenWithOptions(root, "lbsize1", loader.Options{})
	if err != nil {
		t.Fatalf("re-adopt with other options: %v", err)
	}
	if m := again.Maps(); m.LBSvc.MaxEntries() != svc+2000 {
		t.Errorf("re-adopted: svc %d, want the pinned %d", m.LBSvc.MaxEntries(), svc+2000)
	}
	again.Close()
	if err := loader.Remove(root, "lbsize1"); err != nil {
		t.Fatal(err)
	}
}

// TestCounterHalves: the counter arrays hold the kata-ipvs ids' half without a cluster table
// and both halves with one (Options.ExtraLBRules); a sandbox re-opened with the other option
// has its arrays migrated to the other size, the first half's counters kept.
func TestCounterHalves(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	sb, err := loader.OpenWithOptions(root, "cnthalf", loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	lb := maps.ForSandbox(sb.Maps()).LB
	if n := lb.Stats.MaxEntries(); n != loader.CounterHalf {
		t.Errorf("counters without a cluster table: %d entries, want %d", n, loader.CounterHalf)
	}
	if err := lb.SetConns(7, maps.LBConns{Active: 3}); err != nil {
		t.Fatal(err)
	}
	if c, err := lb.ReadConns(0x40000007); err != nil || c != (maps.LBConns{}) {
		t.Errorf("a cluster id without the cluster half: %+v, %v; want zero, no error", c, err)
	}
	sb.Close()
	for _, o := range []loader.Options{{ExtraLBRules: 100}, {}} {
		sb, err := loader.OpenWithOptions(root, "cnthalf", o)
		if err != nil {
			t.Fatal(err)
		}
		lb := maps.ForSandbox(sb.Maps()).LB
		want := uint32(loader.CounterHalf)
		if o.ExtraLBRules > 0 {
			want *= 2
		}
		if n := lb.Conns.MaxEntries(); n != want {
			t.Errorf("%+v: %d entries, want %d", o, n, want)
		}
		if c, err := lb.ReadConns(7); err != nil || c != (maps.LBConns{Active: 3}) {
			t.Errorf("%+v: counts of 7 after the resize: %+v, %v", o, c, err)
		}
		sb.Close()
	}
	if err := loader.Remove(root, "cnthalf"); err != nil {
		t.Fatal(err)
	}
}
