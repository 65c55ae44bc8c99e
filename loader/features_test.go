package loader

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// TestNeedsOfObjects: reading the compiled objects finds what the datapath is known to use
// (the features that set its minimum kernel), so the probe list follows the object.
func TestNeedsOfObjects(t *testing.T) {
	dp, err := LoadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	n := NeedsOf(dp)
	for _, want := range []struct {
		pt ebpf.ProgramType
		fn asm.BuiltinFunc
	}{{ebpf.SchedCLS, asm.FnLoop}, {ebpf.XDP, asm.FnXdpLoadBytes}, {ebpf.SchedCLS, asm.FnRedirect}, {ebpf.XDP, asm.FnRedirectMap}} {
		if !slices.Contains(n.Helpers[want.pt], want.fn) {
			t.Errorf("datapath: %s not found among the %s helpers %v", HelperName(want.fn), ProgramTypeName(want.pt), n.Helpers[want.pt])
		}
	}
	for _, mt := range []ebpf.MapType{ebpf.LPMTrie, ebpf.DevMapHash, ebpf.LRUHash} {
		if !slices.Contains(n.Maps, mt) {
			t.Errorf("datapath: map type %s not found in %v", MapTypeName(mt), n.Maps)
		}
	}
	if !slices.Equal(n.Programs, []ebpf.ProgramType{ebpf.SchedCLS, ebpf.XDP}) {
		t.Errorf("datapath program types: %v", n.Programs)
	}
	for in, want := range map[string]string{"LPMTrie": "lpm_trie", "SchedCLS": "sched_cls", "XdpLoadBytes": "xdp_load_bytes", "XDP": "xdp", "LRUHash": "lru_hash"} {
		if got := snake(in); got != want {
			t.Errorf("snake(%q) = %q, want %q", in, got, want)
		}
	}
	if got := HelperName(asm.FnLoop); got != "bpf_loop" {
		t.Errorf("HelperName(FnLoop) = %q", got)
	}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: probes load BPF programs")
	}
}

// TestProbeCoversObjects: the probe has one check for every program type, map type and
// (program type, helper) pair of both objects, and on this kernel (6.18) all are there.
func TestProbeCoversObjects(t *testing.T) {
	requireRoot(t)
	f, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]Check{}
	for _, c := range f.Checks {
		names[c.Name] = c
	}
	needs, err := objectNeeds()
	if err != nil {
		t.Fatal(err)
	}
	for obj, n := range needs {
		var want []string
		for _, pt := range n.Programs {
			want = append(want, "program "+ProgramTypeName(pt))
			for _, fn := range n.Helpers[pt] {
				want = append(want, "helper "+HelperName(fn)+" ("+ProgramTypeName(pt)+")")
			}
		}
		for _, mt := range n.Maps {
			want = append(want, "map "+MapTypeName(mt))
		}
		for _, w := range want {
			c, ok := names[w]
			if !ok || !slices.Contains(c.Objects, obj) {
				t.Errorf("%s object needs %q; probe has %+v", obj, w, c)
			} else if !c.Supported {
				t.Errorf("%q not supported on this kernel", w)
			}
		}
	}
	if c := names["link tcx"]; !c.Supported || c.Fallback == "" {
		t.Errorf("tcx: %+v", c)
	}
	if c := names["netlink netdev xdp_features"]; !c.Supported || c.Fallback == "" || !f.XDPFeatures {
		t.Errorf("xdp_features: %+v", c)
	}
	if miss := f.Missing(ObjectDatapath, ObjectNode); len(miss) != 0 {
		t.Errorf("missing on this kernel: %v", miss)
	}
}

// TestMissingPerObject: a kernel without bpf_loop for xdp cannot load the datapath object (it
// is loaded whole); one without percpu_hash loses only the node object; a missing feature
// with a fallback (tcx) stops only the object that requires it all the same (the node).
func TestMissingPerObject(t *testing.T) {
	f := Features{Checks: []Check{
		{Name: "helper bpf_loop (xdp)", Kind: "helper", Objects: []string{"datapath"}, Supported: false},
		{Name: "map percpu_hash", Kind: "map", Objects: []string{"node"}, Supported: false},
		{Name: "map array", Kind: "map", Objects: []string{"datapath", "node"}, Supported: true},
		{Name: "link tcx", Kind: "link", Objects: []string{"datapath", "node"}, Supported: false, Fallback: "clsact", Required: []string{"node"}},
	}}
	for _, tc := range []struct {
		objects []string
		want    string
	}{
		{[]string{ObjectDatapath}, "helper bpf_loop (xdp)"},
		{[]string{ObjectNode}, "map percpu_hash,link tcx"},
		{[]string{ObjectDatapath, ObjectNode}, "helper bpf_loop (xdp),map percpu_hash,link tcx"},
		{nil, ""},
	} {
		var got []string
		for _, c := range f.Missing(tc.objects...) {
			got = append(got, c.Name)
		}
		if strings.Join(got, ",") != tc.want {
			t.Errorf("objects %v: missing %q, want %q", tc.objects, got, tc.want)
		}
	}
}

// TestCheckLoad loads both objects unpinned, and a program the verifier refuses comes back with
// the verifier's last lines in the error.
func TestCheckLoad(t *testing.T) {
	requireRoot(t)
	if err := CheckLoad(); err != nil {
		t.Fatal(err)
	}
	spec := &ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: asm.Instructions{
		asm.Mov.Reg(asm.R0, asm.R6), // R6 is never set: the verifier refuses
		asm.Return(),
	}}
	_, err := ebpf.NewProgram(spec)
	if err == nil {
		t.Fatal("the verifier accepted an invalid program")
	}
	msg := verifierTail(err).Error()
	if !strings.Contains(msg, "verifier log (last ") || !strings.Contains(msg, "R6 !read_ok") {
		t.Errorf("verifier tail: %s", msg)
	}
}
