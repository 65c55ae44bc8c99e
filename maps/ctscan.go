package maps

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"
)

// ctScanBuckets is how many buckets of the IPv4 connection table one step of a scan copies
// (12 KiB: two copies of it stay in the CPU's first-level caches).
const ctScanBuckets = 64

// scanCT calls f with every entry of the IPv4 connection table (kdp_lb_ct) that is in use,
// whether expired or not, in bucket order.
//
// The table is memory-mapped (BPF_F_MMAPABLE, bpf/lib/lb.h): the sweeper (once a second per
// sandbox with a load balancer) and the metrics' count (every scrape) read it with two memory
// copies per step instead of a batched lookup of the whole table (4096 buckets of 192 bytes
// by default, copied by the kernel and decoded into a Go map: about 5 ms each time, whatever
// the number of connections, docs/performance.md). A slot is read as the datapath's readers
// read it (ct_lookup): the step is copied twice, and a slot whose seq is odd (a CPU is
// writing it) or differs between the copies (rewritten in between) is skipped: a new
// connection the datapath is inserting at that moment, which it counts itself, or one being
// cleared. On x86-64 the copies' loads are ordered (TSO), so an equal even seq in both copies
// means the first copy's entry is whole.
//
// A table that cannot be mapped (pinned by an older agent before the loader migrated it, or a
// kernel without the flag) is read with batched lookups as before.
func (l LB) scanCT(f func(k ctKey, e ctEntry)) error {
	mem, err := l.CT.Memory()
	if errors.Is(err, ebpf.ErrNotSupported) {
		return l.scanCTBatch(f)
	}
	if err != nil {
		return fmt.Errorf("map the connection table: %w", err)
	}
	var a, b [ctScanBuckets]ctBucket
	const size = int(unsafe.Sizeof(ctBucket{}))
	if uint32(size) != l.CT.ValueSize() {
		return fmt.Errorf("connection table: buckets of %d bytes, want %d", l.CT.ValueSize(), size)
	}
	ab := unsafe.Slice((*byte)(unsafe.Pointer(&a[0])), len(a)*size)
	bb := unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), len(b)*size)
	n := int(l.CT.MaxEntries())
	for at := 0; at < n; at += ctScanBuckets {
		c := min(ctScanBuckets, n-at)
		off := int64(at) * int64(size)
		if _, err := mem.ReadAt(ab[:c*size], off); err != nil {
			return fmt.Errorf("read the connection table at bucket %d: %w", at, err)
		}
		if _, err := mem.ReadAt(bb[:c*size], off); err != nil {
			return fmt.Errorf("read the connection table at bucket %d: %w", at, err)
		}
		for i := range c {
			for s := range a[i].S {
				x := &a[i].S[s]
				if x.E.LastSeen == 0 || x.Seq&1 != 0 || x.Seq != b[i].S[s].Seq {
					continue
				}
				f(x.Key, x.E)
			}
		}
	}
	return nil
}

// scanCTBatch is scanCT for a table that is not memory-mapped: batched lookups into a
// buffer of ctScanBuckets buckets.
func (l LB) scanCTBatch(f func(k ctKey, e ctEntry)) error {
	keys := make([]uint32, ctScanBuckets)
	vals := make([]ctBucket, ctScanBuckets)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := l.CT.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			for _, s := range vals[i].S {
				if s.E.LastSeen != 0 && s.Seq&1 == 0 {
					f(s.Key, s.E)
				}
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read the connection table: %w", err)
		}
	}
}
