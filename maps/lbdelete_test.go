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
