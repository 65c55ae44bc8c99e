package refprog

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
)

// TestCold runs the cold-entry probe on crafted frames: it must touch exactly the entries the
// frame names, read or add, and follow a chain through the entries' second words.
func TestCold(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	c, err := LoadCold(256, 100)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, m := range []ColdMap{ColdArray, ColdHash, ColdHashes} {
		t.Run(m.String(), func(t *testing.T) {
			copies := uint64(1) // the maps Get sums over
			if m == ColdHashes {
				copies = 8
			}
			run := func(f []byte) uint32 {
				t.Helper()
				ret, err := c.Program(m).Run(&ebpf.RunOptions{Data: f})
				if err != nil {
					t.Fatal(err)
				}
				return ret
			}
			for i := uint32(0); i < 100; i++ {
				if err := c.Set(m, i, uint64(1)<<(i%20), 0); err != nil {
					t.Fatal(err)
				}
			}
			if got := run(ColdFrame(nil, false, false)); got != 0 {
				t.Errorf("k = 0: %d, want 0", got)
			}
			idx := []uint32{3, 0, 17, 64, 65, 99, 19, 40}
			var want uint32
			for _, i := range idx {
				want += 1 << (i % 20)
			}
			if got := run(ColdFrame(idx, false, false)); got != want {
				t.Errorf("read %v: %#x, want %#x", idx, got, want)
			}
			if got := run(ColdFrame(idx[:2], false, false)); got != 1<<3+1 {
				t.Errorf("read %v: %#x, want %#x", idx[:2], got, 1<<3+1)
			}
			// Add: k, and each named entry one more.
			if got := run(ColdFrame(idx[:3], true, false)); got != 3 {
				t.Errorf("add %v: %d, want 3", idx[:3], got)
			}
			for _, i := range []uint32{3, 0, 17, 64} {
				want := copies * uint64(1) << (i % 20)
				if i != 64 {
					want++
				}
				if n, err := c.Get(m, i); err != nil || n != want {
					t.Errorf("entry %d after add = %d, %v; want %d", i, n, err, want)
				}
			}
			// Chain: entry 5 says the next index is xored with 7: 2 ^ 7 = 5, whose second
			// word (7) then turns 2 into 5 again.
			if err := c.Set(m, 5, 1000, 7); err != nil {
				t.Fatal(err)
			}
			if err := c.Set(m, 2, 1, 0); err != nil {
				t.Fatal(err)
			}
			if got := run(ColdFrame([]uint32{5, 2, 2}, false, true)); got != 3000 {
				t.Errorf("chained read 5, 2^7, 2^7: %d, want 3000", got)
			}
			if got := run(ColdFrame([]uint32{5, 2}, false, false)); got != 1001 {
				t.Errorf("unchained read 5, 2: %d, want 1001", got)
			}
			// Entries that are not there, and more than ColdMaxK of them.
			if got := run(ColdFrame([]uint32{1, 1000}, false, false)); got != ColdBad {
				t.Errorf("missing entry: %d, want ColdBad", got)
			}
			if got := run(ColdFrame(make([]uint32, ColdMaxK+1), false, false)); got != ColdBad {
				t.Errorf("%d entries: %d, want ColdBad", ColdMaxK+1, got)
			}
		})
	}
}
