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
	ColdArray  ColdMap = iota // array of 64-byte entries, page-aligned (BPF_F_MMAPABLE, as kdp_lb_ct)
	ColdHash                  // hash map without preallocation (as kdp_lb_svc, kdp_lb_stats), 8-byte keys, 48-byte values
	ColdHashes                // eight such hash maps: the i-th entry a frame names is looked up in the i-th
)

func (m ColdMap) String() string {
	switch m {
	case ColdArray:
		return "array"
	case ColdHash:
		return "hash"
	case ColdHashes:
		return "hashes"
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
// of the load balancer's default connection table) and eight hash maps each holding the keys
// 0 .. hashEntries-1 (at most 40960, the size of the load balancer's counter map).
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
		for i, h := range c.hashes() {
			if _, err := h.BatchUpdate(keys, vals, nil); err != nil {
				c.Close()
				return nil, fmt.Errorf("fill the cold-entry probe's hash map %d: %w", i, err)
			}
		}
	}
	return c, nil
}

func (c *Cold) hashes() []*ebpf.Map {
	return []*ebpf.Map{c.o.ColdHash, c.o.ColdHash1, c.o.ColdHash2, c.o.ColdHash3,
		c.o.ColdHash4, c.o.ColdHash5, c.o.ColdHash6, c.o.ColdHash7}
}

// Close releases the programs and maps.
func (c *Cold) Close() error { return c.o.Close() }

// ArrayLen is the number of entries of the array map.
func (c *Cold) ArrayLen() uint32 { return c.arrayLen }

// HashEntries is the number of keys in each hash map.
func (c *Cold) HashEntries() uint32 { return c.hashEntries }

// Program is the probe's program for map m.
func (c *Cold) Program(m ColdMap) *ebpf.Program {
	switch m {
	case ColdHash:
		return c.o.ColdHashTouch
	case ColdHashes:
		return c.o.ColdHashesTouch
	}
	return c.o.ColdArrayTouch
}

// Set writes the first two words of entry idx (array index or hash key id; ColdHashes: in
// every hash map): the probe reads or adds to the first and, chained, xors the second into
// the next index.
func (c *Cold) Set(m ColdMap, idx uint32, first, second uint64) error {
	var err error
	switch m {
	case ColdArray:
		err = c.o.ColdArray.Update(idx, coldColdLine{N: [8]uint64{first, second}}, ebpf.UpdateExist)
	case ColdHash:
		err = c.o.ColdHash.Update(coldColdKey{Id: idx}, coldColdVal{N: [6]uint64{first, second}}, ebpf.UpdateExist)
	default:
		for _, h := range c.hashes() {
			if err = h.Update(coldColdKey{Id: idx}, coldColdVal{N: [6]uint64{first, second}}, ebpf.UpdateExist); err != nil {
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("set %v entry %d: %w", m, idx, err)
	}
	return nil
}

// Get reads the first word of entry idx (ColdHashes: its sum over the hash maps).
func (c *Cold) Get(m ColdMap, idx uint32) (uint64, error) {
	var err error
	var n uint64
	switch m {
	case ColdArray:
		var v coldColdLine
		err = c.o.ColdArray.Lookup(idx, &v)
		n = v.N[0]
	case ColdHash:
		var v coldColdVal
		err = c.o.ColdHash.Lookup(coldColdKey{Id: idx}, &v)
		n = v.N[0]
	default:
		for _, h := range c.hashes() {
			var v coldColdVal
			if err = h.Lookup(coldColdKey{Id: idx}, &v); err != nil {
				break
			}
			n += v.N[0]
		}
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
