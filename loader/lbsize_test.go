package loader_test

import (
	"testing"

	"github.com/kata-dp/kata-dp/loader"
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
