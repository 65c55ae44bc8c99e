package loader

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
)

// CounterHalf is KDP_LB_CNT_HALF (bpf/lib/lb.h): the entries of each id space's half of the
// counter arrays (kdp_lb_stats, kdp_lb_conns). A table holds at most ipvs.MaxRules (20000)
// ids, so each table's live ids always find free entries.
const CounterHalf = 20480

// clusterIDBit marks the cluster table's ids (control/kube: from 0x40000000), whose entries
// are in the arrays' second half.
const clusterIDBit = 0x40000000

// CounterSlot is lb_cnt_slot (bpf/lib/lb.h): the index of id's entry in the counter arrays.
// Live ids of one table never share one (control/ipvs and control/kube hand out ids that way).
func CounterSlot(id uint32) uint32 {
	s := id % CounterHalf
	if id&clusterIDBit != 0 {
		s += CounterHalf
	}
	return s
}

// convertCounters moves the counters of an earlier agent's hash maps into this version's
// arrays: kdp_lb_stats (key {kind, id}, value struct lb_stats) and kdp_lb_conns (key id,
// value struct lb_conns) become arrays indexed by CounterSlot whose entries name their owner
// (struct lb_cnt, struct lb_cnc). Every entry goes to its id's slot, owned by its id; two old
// entries for one slot (ids that an older agent handed out CounterHalf apart, both live or one
// long deleted) keep the first one met and the other is dropped. The agent's first sync then
// claims the entries of the live ids that had none (maps.LB.ClaimCounters) and leaves those
// carried over alone: the counters go on from where the old agent left them.
func convertCounters(old, m *ebpf.Map) (copied, dropped int, err error) {
	stats := m.ValueSize() == uint32(binary.Size(DatapathLbCnt{}))
	taken := map[uint32]bool{}
	err = eachEntry(old, func(key []byte, value any) {
		v, ok := value.([]byte)
		if !ok {
			dropped++
			return
		}
		var id, kind uint32
		var out []byte
		switch {
		case stats && len(key) == 8 && len(v) == binary.Size(DatapathLbStats{}):
			kind, id = binary.NativeEndian.Uint32(key), binary.NativeEndian.Uint32(key[4:])
		case !stats && len(key) == 4 && len(v) == binary.Size(DatapathLbConns{}):
			id = binary.NativeEndian.Uint32(key)
		default:
			dropped++
			return
		}
		slot := CounterSlot(id)
		if id == 0 || taken[slot] {
			dropped++
			return
		}
		out = binary.NativeEndian.AppendUint32(out, id)
		out = binary.NativeEndian.AppendUint32(out, kind)
		out = append(out, v...)
		if err := m.Put(slot, out); err != nil {
			dropped++
			return
		}
		taken[slot] = true
		copied++
	})
	if err != nil {
		return copied, dropped, fmt.Errorf("convert counters: %w", err)
	}
	return copied, dropped, nil
}

// isCounters says whether name is one of the counter arrays, whose size is one half
// (CounterHalf entries: kata-ipvs ids) or, with Options.ExtraLBRules (a cluster table), both:
// fixed by the id space, not by a rule count, so a pinned one of the other size is migrated
// (its entries copied, the second half's dropped when it shrinks) instead of kept.
func isCounters(name string) bool { return name == "kdp_lb_stats" || name == "kdp_lb_conns" }

// isOldCounters says whether old, pinned at name, is an earlier agent's counter hash map
// (kdp_lb_stats or kdp_lb_conns before they became arrays).
func isOldCounters(name string, old *ebpf.Map) bool {
	return isCounters(name) && old.Type() == ebpf.Hash
}
