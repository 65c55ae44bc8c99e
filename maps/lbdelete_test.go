package maps

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
)

// TestDeleteKeysSkipsMissing: a batched delete that meets a key not in the map (where the
// kernel stops the batch) still deletes every key after it.
func TestDeleteKeysSkipsMissing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates BPF maps")
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var keys []uint32
	for k := uint32(1); k <= 20; k++ {
		keys = append(keys, k)
		if k%5 != 0 { // 5, 10, 15, 20 are missing
			if err := m.Put(k, k); err != nil {
				t.Fatal(err)
			}
		}
	}
	deleteKeys(m, keys)
	var k, v uint32
	if it := m.Iterate(); it.Next(&k, &v) {
		t.Errorf("key %d left in the map", k)
	}
}

// counterMap is a hash map of n possible keys 1..n of which every every-th one is present, the
// shape of the lazily made counters a clear deletes (most real servers never had one).
func counterMap(tb testing.TB, n, every int) (*ebpf.Map, []uint32) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: creates BPF maps")
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 16, MaxEntries: uint32(n + 1),
		Flags: 1 /* BPF_F_NO_PREALLOC, as kdp_lb_conns */})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { m.Close() })
	keys := make([]uint32, 0, n)
	for k := uint32(1); k <= uint32(n); k++ {
		keys = append(keys, k)
	}
	fill(tb, m, n, every)
	return m, keys
}

func fill(tb testing.TB, m *ebpf.Map, n, every int) {
	tb.Helper()
	for k := uint32(every); k <= uint32(n); k += uint32(every) {
		if err := m.Put(k, LBConns{Active: int64(k)}); err != nil {
			tb.Fatal(err)
		}
	}
}

// TestDeletePresent: the keys asked for that are there go, the ones not asked for stay,
// whether the list is short (deleted directly) or long (read first).
func TestDeletePresent(t *testing.T) {
	for _, n := range []int{deleteDirectMax, 5000} {
		m, keys := counterMap(t, n, 7)
		if err := m.Put(uint32(n+1), LBConns{Active: 1}); err != nil { // not in the list
			t.Fatal(err)
		}
		deletePresent[uint32, LBConns](m, keys)
		left, err := Dump[uint32, LBConns](m)
		if err != nil {
			t.Fatal(err)
		}
		if len(left) != 1 || left[uint32(n+1)] != (LBConns{Active: 1}) {
			t.Errorf("%d keys: left %v, want only %d", n, left, n+1)
		}
	}
}

// BenchmarkDeleteCounters deletes the counters of 15000 real servers of which one in 100 has
// any (a clear after a restore of 20000 rules with little traffic), by deleteKeys (a system
// call per missing key) and by deletePresent (one batched read first), side by side.
func BenchmarkDeleteCounters(b *testing.B) {
	const n, every = 15000, 100
	for _, c := range []struct {
		name string
		del  func(*ebpf.Map, []uint32)
	}{
		{"deleteKeys", deleteKeys[uint32]},
		{"deletePresent", deletePresent[uint32, LBConns]},
	} {
		b.Run(c.name, func(b *testing.B) {
			m, keys := counterMap(b, n, every)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c.del(m, keys)
				b.StopTimer()
				fill(b, m, n, every)
				b.StartTimer()
			}
		})
	}
}
