package loader

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"unicode"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// Features is what the running kernel supports, probed (never guessed from its version).
type Features struct {
	TCX      bool // BPF links at tc ingress/egress (Linux 6.6+)
	XDP      bool // XDP programs
	SchedCLS bool // tc BPF programs (needed for the clsact fallback too)
	LPMTrie  bool // route tables
	DevMap   bool // XDP redirect into another device
	// XDPFeatures: the netdev generic netlink family reports devices' xdp_features (Linux
	// 6.3+), which xdp mode reads to know whether the veth takes redirected frames.
	XDPFeatures bool
	// Checks are every kernel feature the datapath and node objects use, read from the
	// compiled objects themselves (program types, map types, and each helper per program type),
	// plus TCX; see Missing for what each dataplane mode lacks.
	Checks []Check
}

// Check is one probed kernel feature.
type Check struct {
	Name      string   // e.g. "helper bpf_loop (xdp)", "map lpm_trie", "program sched_cls", "link tcx"
	Kind      string   // program, map, helper, link or netlink
	Objects   []string // the objects that use it: datapath, node (empty for tcx)
	Supported bool
	// Fallback says what runs instead when it is missing ("" when nothing does).
	Fallback string
	// Required are the objects among Objects that the fallback does not serve: they need the
	// feature itself (tcx: the datapath falls back to clsact, direct mode's node programs
	// do not).
	Required []string
}

// The compiled objects, as Check.Objects names them. Which dataplane mode loads which object is
// the dataplane's to say (dataplane.Objects), not the loader's.
const (
	ObjectDatapath = "datapath" // a sandbox's collection (LoadDatapath)
	ObjectNode     = "node"     // an uplink's node collection in direct mode (LoadNode)
)

// Missing returns the checks that the given objects need and the kernel lacks, with no
// fallback for them (TCX is not needed by the datapath: clsact is its fallback; the node
// object requires it). An object is all or nothing: every program of it is loaded, the xdp
// ones included, whatever mode runs.
func (f Features) Missing(objects ...string) []Check {
	var out []Check
	for _, c := range f.Checks {
		if c.Supported {
			continue
		}
		need := c.Objects
		if c.Fallback != "" {
			need = c.Required
		}
		if slices.ContainsFunc(need, func(o string) bool { return slices.Contains(objects, o) }) {
			out = append(out, c)
		}
	}
	return out
}

func (f Features) String() string {
	var b strings.Builder
	for _, x := range []struct {
		name string
		ok   bool
	}{{"tcx", f.TCX}, {"xdp", f.XDP}, {"sched_cls", f.SchedCLS}, {"lpm_trie", f.LPMTrie}, {"devmap", f.DevMap}, {"xdp_features", f.XDPFeatures}} {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%v", x.name, x.ok)
	}
	return b.String()
}

var (
	probeOnce sync.Once
	probed    Features
	probeErr  error
)

// Probe reports the kernel's features. It probes once per process; later calls return the
// cached result.
func Probe() (Features, error) {
	probeOnce.Do(func() { probed, probeErr = probe() })
	return probed, probeErr
}

// have turns a feature probe's result into supported or not; other errors are errors.
func have(err error) (bool, error) {
	if err == nil {
		return true, nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return false, nil
	}
	return false, err
}

// Needs is what a compiled object asks of the kernel.
type Needs struct {
	Programs []ebpf.ProgramType
	Maps     []ebpf.MapType
	// Helpers are the helper calls by program type.
	Helpers map[ebpf.ProgramType][]asm.BuiltinFunc
}

// NeedsOf reads what spec's programs and maps need: their types and every helper call.
func NeedsOf(spec *ebpf.CollectionSpec) Needs {
	n := Needs{Helpers: map[ebpf.ProgramType][]asm.BuiltinFunc{}}
	for _, p := range spec.Programs {
		if !slices.Contains(n.Programs, p.Type) {
			n.Programs = append(n.Programs, p.Type)
		}
		for _, ins := range p.Instructions {
			if ins.IsBuiltinCall() {
				fn := asm.BuiltinFunc(ins.Constant)
				if !slices.Contains(n.Helpers[p.Type], fn) {
					n.Helpers[p.Type] = append(n.Helpers[p.Type], fn)
				}
			}
		}
	}
	for _, m := range spec.Maps {
		if !slices.Contains(n.Maps, m.Type) {
			n.Maps = append(n.Maps, m.Type)
		}
	}
	slices.Sort(n.Programs)
	slices.Sort(n.Maps)
	for _, h := range n.Helpers {
		slices.Sort(h)
	}
	return n
}

// objectNeeds reads the needs of the two compiled objects.
func objectNeeds() (map[string]Needs, error) {
	dp, err := LoadDatapath()
	if err != nil {
		return nil, fmt.Errorf("datapath object: %w", err)
	}
	node, err := LoadNode()
	if err != nil {
		return nil, fmt.Errorf("node object: %w", err)
	}
	return map[string]Needs{ObjectDatapath: NeedsOf(dp), ObjectNode: NeedsOf(node)}, nil
}

func probe() (Features, error) {
	var f Features
	var err error
	if f.SchedCLS, err = have(features.HaveProgramType(ebpf.SchedCLS)); err != nil {
		return f, fmt.Errorf("probe sched_cls: %w", err)
	}
	if f.XDP, err = have(features.HaveProgramType(ebpf.XDP)); err != nil {
		return f, fmt.Errorf("probe xdp: %w", err)
	}
	if f.LPMTrie, err = have(features.HaveMapType(ebpf.LPMTrie)); err != nil {
		return f, fmt.Errorf("probe lpm_trie: %w", err)
	}
	if f.DevMap, err = have(features.HaveMapType(ebpf.DevMap)); err != nil {
		return f, fmt.Errorf("probe devmap: %w", err)
	}
	// Querying TCX programs of the loopback device is read-only and fails with EINVAL on
	// kernels without TCX.
	if _, qerr := link.QueryPrograms(link.QueryOptions{Target: 1, Attach: ebpf.AttachTCXIngress}); qerr == nil {
		f.TCX = true
	}
	f.XDPFeatures = haveXDPFeatures()
	needs, err := objectNeeds()
	if err != nil {
		return f, err
	}
	checks := map[string]*Check{}
	add := func(name, kind, obj string, probe func() error) error {
		if c := checks[name]; c != nil {
			if !slices.Contains(c.Objects, obj) {
				c.Objects = append(c.Objects, obj)
			}
			return nil
		}
		ok, err := have(probe())
		if err != nil {
			return fmt.Errorf("probe %s: %w", name, err)
		}
		checks[name] = &Check{Name: name, Kind: kind, Objects: []string{obj}, Supported: ok}
		return nil
	}
	for _, obj := range []string{ObjectDatapath, ObjectNode} {
		n := needs[obj]
		for _, pt := range n.Programs {
			if err := add("program "+ProgramTypeName(pt), "program", obj, func() error { return features.HaveProgramType(pt) }); err != nil {
				return f, err
			}
		}
		for _, mt := range n.Maps {
			if err := add("map "+MapTypeName(mt), "map", obj, func() error { return features.HaveMapType(mt) }); err != nil {
				return f, err
			}
		}
		for _, pt := range n.Programs {
			for _, fn := range n.Helpers[pt] {
				name := fmt.Sprintf("helper %s (%s)", HelperName(fn), ProgramTypeName(pt))
				if err := add(name, "helper", obj, func() error { return features.HaveProgramHelper(pt, fn) }); err != nil {
					return f, err
				}
			}
		}
	}
	for _, c := range checks {
		f.Checks = append(f.Checks, *c)
	}
	slices.SortFunc(f.Checks, func(a, b Check) int { return strings.Compare(a.Kind+" "+a.Name, b.Kind+" "+b.Name) })
	// The node's programs on a direct-mode uplink need links that other tc users cannot
	// displace (ErrNoTCX): clsact is the datapath's fallback only.
	f.Checks = append(f.Checks, Check{Name: "link tcx", Kind: "link", Objects: []string{ObjectDatapath, ObjectNode},
		Supported: f.TCX, Fallback: "clsact + direct-action bpf filter, but not for direct mode", Required: []string{ObjectNode}})
	f.Checks = append(f.Checks, Check{Name: "netlink netdev xdp_features", Kind: "netlink", Supported: f.XDPFeatures,
		Fallback: "tc for the guest's frames in xdp mode"})
	return f, nil
}

// ProgramTypeName is the kernel's name of a program type (BPF_PROG_TYPE_SCHED_CLS: sched_cls).
func ProgramTypeName(t ebpf.ProgramType) string { return snake(t.String()) }

// MapTypeName is the kernel's name of a map type (BPF_MAP_TYPE_LPM_TRIE: lpm_trie).
func MapTypeName(t ebpf.MapType) string {
	switch t {
	case ebpf.DevMap:
		return "devmap"
	case ebpf.DevMapHash:
		return "devmap_hash"
	case ebpf.PerCPUArray:
		return "percpu_array"
	case ebpf.PerCPUHash:
		return "percpu_hash"
	case ebpf.LRUCPUHash:
		return "lru_percpu_hash"
	}
	return snake(t.String())
}

// HelperName is the helper's C name (asm.FnXdpLoadBytes: bpf_xdp_load_bytes).
func HelperName(fn asm.BuiltinFunc) string {
	return "bpf_" + snake(strings.TrimPrefix(fn.String(), "Fn"))
}

// snake turns Go's CamelCase names (LPMTrie, SchedCLS, XdpLoadBytes) into the kernel's
// snake_case (lpm_trie, sched_cls, xdp_load_bytes).
func snake(s string) string {
	r := []rune(s)
	var b strings.Builder
	for i, c := range r {
		if unicode.IsUpper(c) && i > 0 {
			prevLower := unicode.IsLower(r[i-1]) || unicode.IsDigit(r[i-1])
			nextLower := i+1 < len(r) && unicode.IsLower(r[i+1])
			if prevLower || (unicode.IsUpper(r[i-1]) && nextLower) {
				b.WriteByte('_')
			}
		}
		b.WriteRune(unicode.ToLower(c))
	}
	return b.String()
}

// VerifierLines is how many of the verifier's last log lines a load error keeps.
const VerifierLines = 12

// CheckLoad loads the datapath object (and direct mode's node object) into throwaway, unpinned
// collections and closes them again, so that a kernel whose verifier refuses a program says so
// when the agent starts, with the verifier's last lines, rather than at the first sandbox. The
// probes cannot tell this: Debian 12's 6.1 kernel has every feature the objects use, and its
// verifier still refuses kdp_xdp_tap.
func CheckLoad() error {
	for _, o := range LoadObjects() {
		if o.Err != nil {
			return o.Err
		}
	}
	return nil
}

// ObjectLoad is the result of loading one compiled object.
type ObjectLoad struct {
	Object string // datapath or node
	Err    error  // nil when the kernel accepted every program and map
}

// LoadObjects loads each compiled object into a throwaway, unpinned collection (closed again)
// and reports whether the kernel took it.
func LoadObjects() []ObjectLoad {
	var out []ObjectLoad
	for _, o := range []struct {
		name string
		load func() (*ebpf.CollectionSpec, error)
	}{{ObjectDatapath, LoadDatapath}, {ObjectNode, LoadNode}} {
		spec, err := o.load()
		if err != nil {
			out = append(out, ObjectLoad{o.name, fmt.Errorf("%s object: %w", o.name, err)})
			continue
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone // throwaway: never touch a pinned map
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{})
		if err != nil {
			out = append(out, ObjectLoad{o.name, fmt.Errorf("load the %s object: %w", o.name, verifierTail(err))})
			continue
		}
		coll.Close()
		out = append(out, ObjectLoad{Object: o.name})
	}
	return out
}

// verifierTail keeps the last VerifierLines lines of a verifier log in err's text.
func verifierTail(err error) error {
	var ve *ebpf.VerifierError
	if !errors.As(err, &ve) {
		return err
	}
	lines := ve.Log
	if len(lines) > VerifierLines {
		lines = lines[len(lines)-VerifierLines:]
	}
	return fmt.Errorf("%w\nverifier log (last %d lines):\n  %s", err, len(lines), strings.Join(lines, "\n  "))
}
