package lbcost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
)

// Part is a set of the parts a variant leaves out (or does twice), the bits of
// kdp_lb_cost_skip (bpf/lib/lb.h, KDP_COST_*).
type Part uint32

// The parts, as bpf/lib/lb.h defines them.
const (
	Prefilter Part = 0x1    // lb_prefilter says "may be" without looking
	CTLookup2 Part = 0x2    // an established frame looks its connection up twice
	Refresh   Part = 0x4    // no ct_touch
	Count     Part = 0x8    // no counters: neither their lookups nor their adds
	Plain     Part = 0x10   // the counters' adds plain, not atomic
	Rewrite   Part = 0x20   // no DNAT of the frame
	LB        Part = 0x40   // no load balancer at all
	CTMiss    Part = 0x80   // a SYN skips the connection lookup
	Master2   Part = 0x100  // a new connection looks its service's master up twice
	Sched     Part = 0x200  // no lb_schedule: the master's first slot
	Pick      Part = 0x400  // no ct_pick: the bucket's first pair
	Claim     Part = 0x800  // the two slots taken and published with plain stores
	Insert    Part = 0x1000 // no ct_insert at all
	Mon       Part = 0x2000 // no new-connection report to the monitor
	Rem       Part = 0x4000 // the bucket by the remainder always, never the mask
)

// Stops: the load balancer returns "not ours" at that point of its path (bits 16-19 of
// kdp_lb_cost_skip, KDP_STOP_* in bpf/lib/lb.h). Taken in turn, they split a path's cost into
// consecutive parts that add up to it.
const (
	StopPorts  Part = 2 << 16 // after the port parse
	StopLookup Part = 3 << 16 // after the connection lookup, hit or miss
	StopTouch  Part = 4 << 16 // established: after ct_touch
	StopMaster Part = 5 << 16 // new: after the master lookup
	StopSched  Part = 6 << 16 // new: after persistence, the service's counters and the schedule
	StopInsert Part = 7 << 16 // new: after the entry is made and inserted
	StopNAT    Part = 8 << 16 // both: before the DNAT
)

var stopNames = map[Part]string{
	StopPorts: "stop-ports", StopLookup: "stop-lookup", StopTouch: "stop-touch", StopMaster: "stop-master",
	StopSched: "stop-sched", StopInsert: "stop-insert", StopNAT: "stop-nat",
}

var partNames = []struct {
	p    Part
	name string
}{
	{Prefilter, "prefilter"}, {CTLookup2, "ctlookup2"}, {Refresh, "refresh"}, {Count, "count"},
	{Plain, "plain"}, {Rewrite, "rewrite"}, {LB, "lb"}, {CTMiss, "ctmiss"}, {Master2, "master2"},
	{Sched, "sched"}, {Pick, "pick"}, {Claim, "claim"}, {Insert, "insert"}, {Mon, "mon"}, {Rem, "rem"},
}

// String names the parts joined by "+", "full" for none.
func (p Part) String() string {
	if p == 0 {
		return "full"
	}
	var out []string
	if st := p & (0xf << 16); st != 0 {
		if n, ok := stopNames[st]; ok {
			out = append(out, n)
			p &^= st
		}
	}
	for _, n := range partNames {
		if p&n.p != 0 {
			out = append(out, n.name)
			p &^= n.p
		}
	}
	if p != 0 {
		out = append(out, fmt.Sprintf("%#x", uint32(p)))
	}
	return strings.Join(out, "+")
}

// TapIn loads the breakdown build's kdp_tap_in with the parts skip left out, on the maps of
// the sandbox pinned at dir (loader.Sandbox.Dir), so that it runs on the same services,
// connections and counters as the sandbox's own program. The program is the caller's to
// close.
func TapIn(dir string, skip Part) (*ebpf.Program, error) {
	spec, err := loadLbcost()
	if err != nil {
		return nil, fmt.Errorf("load breakdown build: %w", err)
	}
	if err := spec.Variables["kdp_lb_cost_skip"].Set(uint32(skip)); err != nil {
		return nil, fmt.Errorf("breakdown build: set parts %v: %w", skip, err)
	}
	// The sandbox's maps keep the sizes they were made with (loader.Options).
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("breakdown build: map %s: %w", name, err)
		}
		ms.MaxEntries = m.MaxEntries()
		m.Close()
	}
	var o struct {
		P *ebpf.Program `ebpf:"kdp_tap_in"`
	}
	if err := spec.LoadAndAssign(&o, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}); err != nil {
		return nil, fmt.Errorf("breakdown build %v: load: %w", skip, err)
	}
	return o.P, nil
}
