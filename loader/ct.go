package loader

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// CTWays is the number of slots in a bucket of the IPv4 connection table (KDP_CT_WAYS): the
// table (kdp_lb_ct) is an array of buckets that the datapath manages itself (bpf/lib/lb.h),
// so Options.CTSize entries make CTSize/CTWays buckets.
const CTWays = 4

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

// CTHash is ct_hash (bpf/lib/lb.h) of a connection key: its four words as they lie in memory.
// A key's bucket is CTHash(k) % the table's buckets.
func CTHash(k DatapathCtKey) uint32 {
	h := Mix32(k.Saddr ^ 0x9e3779b9)
	h = Mix32(h ^ k.Daddr)
	h = Mix32(h ^ (uint32(k.Sport) | uint32(k.Dport)<<16))
	return Mix32(h ^ (uint32(k.Proto) | uint32(k.Dir)<<8 | uint32(k.Pad)<<16))
}

// convertCT moves the entries of an IPv4 connection table of the LRU hash layout (before the
// array of buckets) into m, each into a free slot of its bucket, so that an agent upgraded
// across the change keeps its established connections. An entry whose bucket is full is
// dropped (the hash's entries are spread like new ones; at most a few of a full table).
func convertCT(old, m *ebpf.Map) (copied, dropped int, err error) {
	n := m.MaxEntries()
	buckets := map[uint32]*DatapathCtBucket{}
	var (
		k DatapathCtKey
		e DatapathCtEntry
	)
	it := old.Iterate()
	for it.Next(&k, &e) {
		i := CTHash(k) % n
		b := buckets[i]
		if b == nil {
			b = &DatapathCtBucket{}
			buckets[i] = b
		}
		placed := false
		for s := range b.S {
			if b.S[s].E.LastSeen == 0 {
				b.S[s] = DatapathCtSlot{Key: k, E: e}
				placed = true
				break
			}
		}
		if placed {
			copied++
		} else {
			dropped++
		}
	}
	if err := it.Err(); err != nil {
		return 0, 0, fmt.Errorf("read the connection table: %w", err)
	}
	for i, b := range buckets {
		if err := m.Put(i, b); err != nil {
			return 0, 0, fmt.Errorf("write the connection table: %w", err)
		}
	}
	return copied, dropped, nil
}

// isOldCT reports whether m is an IPv4 connection table of the LRU hash layout.
func isOldCT(m *ebpf.Map) bool {
	return m.Type() != ebpf.Array && m.KeySize() == 16 && m.ValueSize() == 24
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
func mapCT(m *ebpf.Map) ([]byte, error) {
	if m.Type() != ebpf.Array || m.Flags()&unix.BPF_F_MMAPABLE == 0 {
		return nil, fmt.Errorf("connection table (%s, flags %#x) is not a mmapable array: %w", m.Type(), m.Flags(), ebpf.ErrNotSupported)
	}
	size := arrayMapSize(m.ValueSize(), m.MaxEntries(), os.Getpagesize())
	b, err := unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return nil, fmt.Errorf("connection table cannot be mapped writable: %w (%w)", ebpf.ErrNotSupported, err)
	}
	if err != nil {
		return nil, fmt.Errorf("map %d bytes of the connection table: %w", size, err)
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
