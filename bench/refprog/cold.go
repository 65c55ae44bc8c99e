package refprog

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
)

// The cold-entry probe's geometry (bpf/bench/cold.c).
const (
	ColdMaxK         = 8  // entries one frame can name
	ColdLine         = 64 // bytes of one array entry: a cache line
	ColdLinesPerPage = 4096 / ColdLine
	// ColdBad is what the probe returns for a malformed frame or an entry that is not there.
	ColdBad = 0xffffffff

	coldReqOff = 16
)

// ColdMap names one of the probe's maps.
type ColdMap int

const (
	ColdArray ColdMap = iota // array of 64-byte entries, page-aligned (BPF_F_MMAPABLE, as kdp_lb_ct)
	ColdHash                 // hash map without preallocation (as kdp_lb_svc, kdp_lb_stats), 8-byte keys, 48-byte values
)

func (m ColdMap) String() string {
	switch m {
	case ColdArray:
		return "array"
	case ColdHash:
		return "hash"
	}
	return fmt.Sprintf("ColdMap(%d)", int(m))
}

// Cold is the cold-entry probe: two tc programs that touch the map entries a frame names, so
// that a benchmark running them once per fresh frame (BPF_PROG_TEST_RUN) can tell what one
// cold map entry costs from what a warm one does (bench/lbperf's BenchmarkColdEntries).
type Cold struct {
	o           coldObjects
	arrayLen    uint32
	hashEntries uint32
}

// LoadCold loads the probe with an array of arrayLen 64-byte entries (0: 12288, the 768 KiB
// of the load balancer's default connection table) and a hash map holding the keys 0 ..
// hashEntries-1 (at most 40960, the size of the load balancer's counter map).
func LoadCold(arrayLen, hashEntries uint32) (*Cold, error) {
	spec, err := loadCold()
	if err != nil {
		return nil, fmt.Errorf("load cold-entry probe: %w", err)
	}
	if arrayLen == 0 {
		arrayLen = spec.Maps[coldMapColdArray].MaxEntries
	}
	if hashEntries > spec.Maps[coldMapColdHash].MaxEntries {
		return nil, fmt.Errorf("cold-entry probe: %d hash entries, at most %d", hashEntries, spec.Maps[coldMapColdHash].MaxEntries)
	}
	spec.Maps[coldMapColdArray].MaxEntries = arrayLen
	c := &Cold{arrayLen: arrayLen, hashEntries: hashEntries}
	if err := spec.LoadAndAssign(&c.o, nil); err != nil {
		return nil, fmt.Errorf("load cold-entry probe: %w", err)
	}
	keys := make([]coldColdKey, hashEntries)
	vals := make([]coldColdVal, hashEntries)
	for i := range keys {
		keys[i].Id = uint32(i)
	}
	if hashEntries > 0 {
		if _, err := c.o.ColdHash.BatchUpdate(keys, vals, nil); err != nil {
			c.Close()
			return nil, fmt.Errorf("fill the cold-entry probe's hash map: %w", err)
		}
	}
	return c, nil
}

// Close releases the programs and maps.
func (c *Cold) Close() error { return c.o.Close() }

// ArrayLen is the number of entries of the array map.
func (c *Cold) ArrayLen() uint32 { return c.arrayLen }

// HashEntries is the number of keys in the hash map.
func (c *Cold) HashEntries() uint32 { return c.hashEntries }

// Program is the probe's program for map m.
func (c *Cold) Program(m ColdMap) *ebpf.Program {
	if m == ColdHash {
		return c.o.ColdHashTouch
	}
	return c.o.ColdArrayTouch
}

// Set writes the first two words of entry idx (array index or hash key id): the probe reads
// or adds to the first and, chained, xors the second into the next index.
func (c *Cold) Set(m ColdMap, idx uint32, first, second uint64) error {
	var err error
	if m == ColdHash {
		err = c.o.ColdHash.Update(coldColdKey{Id: idx}, coldColdVal{N: [6]uint64{first, second}}, ebpf.UpdateExist)
	} else {
		err = c.o.ColdArray.Update(idx, coldColdLine{N: [8]uint64{first, second}}, ebpf.UpdateExist)
	}
	if err != nil {
		return fmt.Errorf("set %v entry %d: %w", m, idx, err)
	}
	return nil
}

// Get reads the first word of entry idx.
func (c *Cold) Get(m ColdMap, idx uint32) (uint64, error) {
	var err error
	var n uint64
	if m == ColdHash {
		var v coldColdVal
		err = c.o.ColdHash.Lookup(coldColdKey{Id: idx}, &v)
		n = v.N[0]
	} else {
		var v coldColdLine
		err = c.o.ColdArray.Lookup(idx, &v)
		n = v.N[0]
	}
	if err != nil {
		return 0, fmt.Errorf("get %v entry %d: %w", m, idx, err)
	}
	return n, nil
}

// ColdFrame is a 64-byte frame that makes the probe touch the entries idx (more than ColdMaxK
// make it a malformed request):
// read their first word, or with add increment it atomically; with chain each index after the
// first is xored with the second word of the entry before.
func ColdFrame(idx []uint32, add, chain bool) []byte {
	f := make([]byte, 64)
	f[12], f[13] = 0x08, 0x00
	r := f[coldReqOff:]
	r[0] = byte(len(idx))
	if add {
		r[1] = 1
	}
	if chain {
		r[2] = 1
	}
	for i, x := range idx[:min(len(idx), ColdMaxK)] {
		binary.NativeEndian.PutUint32(r[4+4*i:], x)
	}
	return f
}
