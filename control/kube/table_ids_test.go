package kube

import (
	"fmt"
	"testing"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// TestIDsAvoidLiveSlots: the cluster table's ids never share a counter entry (ipvs.CounterSlot,
// the datapath's counters: bpf/lib/lb.h lb_cnt_slot) while they live, even when their hashes
// fall on taken ones, a released id's entry is free again, and the same names in the same
// order get the same ids.
func TestIDsAvoidLiveSlots(t *testing.T) {
	const n = 20000 // the default limit: 20000 ids of ipvs.CounterSlots entries
	ids := func() (*Table, []uint32) {
		tb := NewTable(0)
		out := make([]uint32, n)
		for i := range out {
			out[i] = tb.id(fmt.Sprintf("svc|tcp 10.%d.%d.%d:80", i>>16, (i>>8)&255, i&255))
		}
		return tb, out
	}
	tb, got := ids()
	slots := map[uint32]uint32{}
	for _, id := range got {
		if id < IDBase || id >= IDLimit {
			t.Fatalf("id %#x outside the cluster range", id)
		}
		if o, ok := slots[ipvs.CounterSlot(id)]; ok {
			t.Fatalf("ids %#x and %#x share counter entry %d", o, id, ipvs.CounterSlot(id))
		}
		slots[ipvs.CounterSlot(id)] = id
	}
	if _, again := ids(); fmt.Sprint(again) != fmt.Sprint(got) {
		t.Errorf("the same names got other ids in a second table")
	}
	// A released name's entry is taken by the next name whose probe reaches it.
	tb.release("svc|tcp 10.0.0.7:80")
	free := ipvs.CounterSlot(got[7])
	for i := 0; ; i++ {
		id := tb.id(fmt.Sprintf("new|%d", i))
		if ipvs.CounterSlot(id) == free {
			break
		}
		if i > ipvs.CounterSlots {
			t.Fatalf("the released entry %d was never given out again", free)
		}
	}
}
