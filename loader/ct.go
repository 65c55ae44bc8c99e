package loader

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// CTWays is the number of slots in a bucket of the IPv4 connection table (KDP_CT_WAYS): the
// table (CTPin) is an array of buckets that the datapath manages itself (bpf/lib/lb.h), so
// Options.CTSize entries make CTSize/CTWays buckets. A connection's two entries lie in one
// bucket, as a pair of slots grouped by direction: the original direction's in slot p of the
// bucket's first half, the reply's in slot p of its second half (CTSlot), so that a lookup
// reads only its direction's half.
const CTWays = 8

// ctConns is the number of connections a bucket holds: pairs of slots.
const ctConns = CTWays / 2

// CTPin is the IPv4 connection table's map and pin name, kdp_lb_ct2. The name is the layout's
// version: the table's shape cannot tell this layout from the one before it (buckets of
// eight slots with a connection's two side by side), so the earlier layouts were all pinned
// as oldCTPin and this one under a name of its own. A version word kept beside the table
// (another pin, or an entry of the config map) would have to change together with the table
// it describes, and a crash between the two leaves a table read in the wrong layout; a new
// name commits a migration in one rename (migrateCTPin).
const CTPin = "kdp_lb_ct2"

// oldCTPin is the name the IPv4 connection table had in its earlier layouts, which
// oldCTLayout tells apart by shape.
const oldCTPin = "kdp_lb_ct"

// ctBuckets is the number of buckets that hold size entries.
func ctBuckets(size uint32) uint32 { return max(size/CTWays, 1) }

// Mix32 is the datapath's 32-bit integer hash, lb_vip_hash in bpf/lib/lb.h (the "lowbias32"
// constants: every input bit changes every output bit). The load balancer's prefilter
// (maps.LB's VIP and real-server bits) and the connection table's buckets (CTHash) hash with
// it, so the Go side must compute exactly what the datapath does.
func Mix32(w uint32) uint32 {
	w ^= w >> 16
	w *= 0x7feb352d
	w ^= w >> 15
	w *= 0x846ca68b
	w ^= w >> 16
	return w
}

// CTHash is ct_hash (bpf/lib/lb.h) of a connection key: the hash of the guest's side of it,
// which both directions' keys carry (the source address and port of an original key, the
// destination's of a reply key, and the protocol), as they lie in memory. A key's bucket is
// CTHash(k) % the table's buckets, the same for both entries of a connection.
//
// Changing it moves every connection to another bucket: an upgraded agent's loader must then
// re-place a pinned table's entries (convertCT), or the connections are scheduled again.
func CTHash(k DatapathCtKey) uint32 {
	addr, port := k.Saddr, k.Sport
	if k.Dir&1 != 0 {
		addr, port = k.Daddr, k.Dport
	}
	h := Mix32(addr ^ 0x9e3779b9)
	return Mix32(h ^ (uint32(port) | uint32(k.Proto)<<16))
}

// CTSlot is the slot of a bucket where an entry of key k lies when its connection holds pair
// p of the bucket (see CTWays).
func CTSlot(k DatapathCtKey, p int) int { return ctSlotOf(k.Dir, p) }

// ctSlotOf is the slot of direction dir (0 original, 1 reply) of pair p.
func ctSlotOf(dir uint8, p int) int { return int(dir&1)*ctConns + p }

// CTReplyKey is the reply direction's key of the connection whose original key is k and whose
// original entry is e (e holds the real server), as ct_insert makes it.
func CTReplyKey(k DatapathCtKey, e DatapathCtEntry) DatapathCtKey {
	return DatapathCtKey{Saddr: e.Addr, Daddr: k.Saddr, Sport: e.Port, Dport: k.Sport, Proto: k.Proto, Dir: 1}
}

// The IPv4 connection table's earlier layouts, all pinned as oldCTPin, which convertCT moves
// into the current one: an LRU hash of one entry per direction (kata-dp before the array of
// buckets); an array of buckets of four slots whose entries were placed by a hash of each
// direction's whole key (oldCTHash), so a connection's two entries were in unrelated buckets;
// and buckets of eight slots placed as today's (CTHash), a connection's two side by side
// (original in slot 2p, reply in 2p+1), so each direction's slots spread over the bucket.
const (
	oldCTWays        = 4
	ctLayoutLRU      = "lru hash"
	ctLayoutBuckets4 = "buckets of 4"
	ctLayoutPairs    = "buckets of 8, pairs side by side"
)

type oldCTBucket struct{ S [oldCTWays]DatapathCtSlot }

// oldCTLayout names the earlier layout of the IPv4 connection table m, pinned as oldCTPin,
// and the number of entries it holds, or "" when m is not one of them.
func oldCTLayout(m *ebpf.Map) (layout string, entries uint32) {
	switch {
	case m.Type() != ebpf.Array && m.KeySize() == 16 && m.ValueSize() == 24:
		return ctLayoutLRU, m.MaxEntries()
	case m.Type() == ebpf.Array && m.KeySize() == 4 && m.ValueSize() == uint32(unsafe.Sizeof(oldCTBucket{})):
		return ctLayoutBuckets4, m.MaxEntries() * oldCTWays
	case m.Type() == ebpf.Array && m.KeySize() == 4 && m.ValueSize() == uint32(unsafe.Sizeof(DatapathCtBucket{})):
		return ctLayoutPairs, m.MaxEntries() * CTWays
	}
	return "", 0
}

// convertCT moves the entries of an IPv4 connection table of an earlier layout (oldCTLayout)
// into m, the current one: each connection's two entries into a free pair of slots of their
// bucket, so that an agent upgraded across the change keeps its established connections on
// their real servers. An entry whose partner is not in the table (its connection half
// evicted, or one the control plane wrote alone) takes a pair of its own, after the whole
// connections. Connections whose bucket is full are dropped, the least recently seen first:
// the LRU hash and the buckets of four spread a connection's entries over two buckets, so a
// bucket of the new layout can receive more connections than it holds, rarely
// (docs/performance.md's figures); the pairs side by side move within their bucket.
func convertCT(old, m *ebpf.Map) (copied, dropped int, err error) {
	type entry struct {
		k DatapathCtKey
		e DatapathCtEntry
	}
	var all []entry
	layout, _ := oldCTLayout(old)
	switch layout {
	case ctLayoutLRU:
		var (
			k DatapathCtKey
			e DatapathCtEntry
		)
		it := old.Iterate()
		for it.Next(&k, &e) {
			all = append(all, entry{k, e})
		}
		if err := it.Err(); err != nil {
			return 0, 0, fmt.Errorf("read the connection table: %w", err)
		}
	case ctLayoutBuckets4, ctLayoutPairs:
		// Every slot in use, wherever it lies: the pairs are found again by their keys.
		add := func(s DatapathCtSlot) {
			if s.E.LastSeen != 0 && s.Seq&1 == 0 {
				all = append(all, entry{s.Key, s.E})
			}
		}
		var (
			i  uint32
			b4 oldCTBucket
			b8 DatapathCtBucket
		)
		it := old.Iterate()
		if layout == ctLayoutBuckets4 {
			for it.Next(&i, &b4) {
				for _, s := range b4.S {
					add(s)
				}
			}
		} else {
			for it.Next(&i, &b8) {
				for _, s := range b8.S {
					add(s)
				}
			}
		}
		if err := it.Err(); err != nil {
			return 0, 0, fmt.Errorf("read the connection table: %w", err)
		}
	default:
		return 0, 0, fmt.Errorf("connection table of an unknown layout (%s, key %d, value %d bytes)", old.Type(), old.KeySize(), old.ValueSize())
	}

	// Pair each original entry with its reply entry; the rest are alone.
	byKey := make(map[DatapathCtKey]int, len(all))
	for i, x := range all {
		byKey[x.k] = i
	}
	type conn struct {
		e     [2]*entry // original, reply (either may be nil)
		newer uint64
	}
	var conns []conn
	used := make([]bool, len(all))
	for i := range all {
		if all[i].k.Dir != 0 {
			continue
		}
		c := conn{newer: all[i].e.LastSeen}
		c.e[0] = &all[i]
		used[i] = true
		if j, ok := byKey[CTReplyKey(all[i].k, all[i].e)]; ok && !used[j] {
			c.e[1] = &all[j]
			used[j] = true
			c.newer = max(c.newer, all[j].e.LastSeen)
		}
		conns = append(conns, c)
	}
	whole := len(conns)
	for i := range all {
		if !used[i] && all[i].k.Dir == 1 {
			conns = append(conns, conn{e: [2]*entry{nil, &all[i]}, newer: all[i].e.LastSeen})
		} else if !used[i] {
			dropped++ // neither direction: not an entry the datapath writes
		}
	}
	// Whole connections first, each group the most recently seen first.
	slices.SortStableFunc(conns[:whole], func(a, b conn) int { return cmp.Compare(b.newer, a.newer) })
	slices.SortStableFunc(conns[whole:], func(a, b conn) int { return cmp.Compare(b.newer, a.newer) })

	n := m.MaxEntries()
	buckets := map[uint32]*DatapathCtBucket{}
	for _, c := range conns {
		x := c.e[0]
		if x == nil {
			x = c.e[1]
		}
		at := CTHash(x.k) % n
		b := buckets[at]
		if b == nil {
			b = &DatapathCtBucket{}
			buckets[at] = b
		}
		p := -1 // the first pair with both slots free
		for q := range ctConns {
			if b.S[ctSlotOf(0, q)].E.LastSeen == 0 && b.S[ctSlotOf(1, q)].E.LastSeen == 0 {
				p = q
				break
			}
		}
		for _, y := range c.e {
			if y == nil {
				continue
			}
			if p < 0 {
				dropped++
				continue
			}
			b.S[CTSlot(y.k, p)] = DatapathCtSlot{Key: y.k, E: y.e}
			copied++
		}
	}
	for i, b := range buckets {
		if err := m.Put(i, b); err != nil {
			return 0, 0, fmt.Errorf("write the connection table: %w", err)
		}
	}
	return copied, dropped, nil
}

// mapCT maps the IPv4 connection table m (an array with BPF_F_MMAPABLE, bpf/lib/lb.h) into
// this process, readable and writable and shared with the kernel: maps.LB reads and writes
// its slots in place with atomic operations (maps/ctmem.go), which the library's own mapping
// (ebpf.Map.Memory, copies only) does not offer. The caller owns the mapping and unmaps it
// (unix.Munmap) exactly once, after its last use (Sandbox.Close).
//
// A table that cannot be mapped is an error wrapping ebpf.ErrNotSupported: one without the
// flag (pinned by an older agent and not migrated, which Open does not leave), and one the
// kernel maps only read-only (frozen, or read-only for programs: EPERM, EACCES). Its users
// then take their batched paths.
func mapCT(m *ebpf.Map) ([]byte, error) { return mapArray(m, "connection table") }

// mapArray maps the values of a BPF_F_MMAPABLE array m (named what in errors) writable, or
// fails with ebpf.ErrNotSupported when m is not one or cannot be mapped writable.
func mapArray(m *ebpf.Map, what string) ([]byte, error) {
	if m.Type() != ebpf.Array || m.Flags()&unix.BPF_F_MMAPABLE == 0 {
		return nil, fmt.Errorf("%s (%s, flags %#x) is not a mmapable array: %w", what, m.Type(), m.Flags(), ebpf.ErrNotSupported)
	}
	size := arrayMapSize(m.ValueSize(), m.MaxEntries(), os.Getpagesize())
	b, err := unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return nil, fmt.Errorf("%s cannot be mapped writable: %w (%w)", what, ebpf.ErrNotSupported, err)
	}
	if err != nil {
		return nil, fmt.Errorf("map %d bytes of the %s: %w", size, what, err)
	}
	return b, nil
}

// arrayMapSize is the size of the value area of a BPF_F_MMAPABLE array, what mmap can map
// from offset 0: the kernel lays values out every round_up(value_size, 8) bytes and starts
// and pads the area to pages (kernel/bpf/arraymap.c: array_map_alloc; array_map_mmap refuses
// more than PAGE_ALIGN(max_entries * elem_size) bytes).
func arrayMapSize(valueSize, maxEntries uint32, pageSize int) int {
	elem := (uint64(valueSize) + 7) &^ 7
	n := elem * uint64(maxEntries)
	p := uint64(pageSize)
	return int((n + p - 1) / p * p)
}
