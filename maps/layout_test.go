package maps

import (
	"reflect"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/loader"
)

// TestLayoutMatchesBTF keeps the Go mirrors honest: every C struct shared with the datapath
// must have the same size and the same field offsets as its Go type.
func TestLayoutMatchesBTF(t *testing.T) {
	spec, err := loader.Spec()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c      string
		goType any
	}{
		{"endpoint", Endpoint{}},
		{"ep_stats", Stats{}},
		{"route_key", RouteKey{}},
		{"route_val", RouteValue{}},
		{"config", Config{}},
		{"lb_svc_key", SvcKey{}},
		{"lb_svc", Svc{}},
		{"lb_backend", Backend{}},
		{"lb_stats_key", LBStatsKey{}},
		{"lb_stats", LBStats{}},
		{"lb_conns", LBConns{}},
		{"ct_key", CTKey{}},
		{"ct_entry", CTEntry{}},
		{"aff_key", AffKey{}},
		{"aff_entry", AffEntry{}},
	} {
		t.Run(tc.c, func(t *testing.T) {
			var st *btf.Struct
			if err := spec.Types.TypeByName(tc.c, &st); err != nil {
				t.Fatalf("struct %s not in the object's BTF: %v", tc.c, err)
			}
			gt := reflect.TypeOf(tc.goType)
			if got, want := gt.Size(), uintptr(st.Size); got != want {
				t.Errorf("size of %s: Go %d, C %d", tc.c, got, want)
			}
			var cOffs, goOffs []uint32
			for _, m := range st.Members {
				cOffs = append(cOffs, m.Offset.Bytes())
			}
			for i := 0; i < gt.NumField(); i++ {
				f := gt.Field(i)
				if f.Name == "_" {
					continue
				}
				goOffs = append(goOffs, uint32(f.Offset))
			}
			if diff := cmp.Diff(cOffs, goOffs); diff != "" {
				t.Errorf("field offsets of %s (-C +Go):\n%s", tc.c, diff)
			}
		})
	}
}
