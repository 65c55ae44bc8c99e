package maps

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// ctScanBuckets is how many buckets of the IPv4 connection table one step of a scan copies
// (24 KiB: the copy stays in the CPU's first-level cache, 48 KiB here), and how many the
// batched fallback (scanCTBatch) reads at a time.
const ctScanBuckets = 64

// scanCT calls f with every entry of the IPv4 connection table (kdp_lb_ct2) that is in use,
// whether expired or not, in bucket order.
//
// The table is memory-mapped (BPF_F_MMAPABLE, bpf/lib/lb.h): the sweeper (once a second per
// sandbox with a load balancer) and the metrics' count (every scrape) read it in place instead
// of a batched lookup of the whole table (2048 buckets of 384 bytes by default, copied by the
// kernel and decoded into a Go map: about 5 ms each time, whatever the number of connections,
// docs/performance.md). A slot is read as the datapath's readers read it (ct_lookup), a
// seqlock read done a step of ctScanBuckets buckets at a time: every slot's seq is loaded
// (atomic), the step is copied, a release store (ctScanFence) keeps the copy's loads before
// the seqs are loaded again (atomic), and a slot whose seq was odd (a CPU is writing it) or
// changed is skipped: a new connection the datapath is inserting at that moment, which it
// counts itself, or one being cleared. The atomic loads and the store order the copy on arm64
// as x86-64's TSO orders plain loads (on x86-64 they are plain loads and one exchange per
// step). A step without an entry in use (most of a sparse table) is not copied.
//
// Measured against the copy-twice read it replaced (which relied on TSO) and a per-slot read
// with atomic loads of every word (docs/performance.md): as fast as the former on sparse
// tables and about 10% slower on a full one; the latter was twice as fast on sparse tables and
// twice as slow on a full one.
//
// A table that cannot be mapped (pinned by an older agent before the loader migrated it, or a
// kernel without the flag) is read with batched lookups as before.
func (l LB) scanCT(f func(k ctKey, e ctEntry)) error {
	mem, err := l.ctMem()
	if errors.Is(err, ebpf.ErrNotSupported) {
		return l.scanCTBatch(f)
	}
	if err != nil {
		return fmt.Errorf("map the connection table: %w", err)
	}
	var buf [ctScanBuckets]ctBucket
	var seqs [ctScanBuckets][loader.CTWays]uint32
	for at := 0; at < len(mem); at += ctScanBuckets {
		chunk := mem[at:min(at+ctScanBuckets, len(mem))]
		used := false
		for i := range chunk {
			for s := range chunk[i].S {
				x := &chunk[i].S[s]
				seqs[i][s] = atomic.LoadUint32(&x.Seq)
				used = used || atomic.LoadUint64(&x.E.LastSeen) != 0
			}
		}
		if !used {
			continue // a sparse table's step without an entry: nothing to copy
		}
		copy(buf[:], chunk)
		atomic.StoreUint32(&ctScanFence, 0)
		for i := range chunk {
			for s := range chunk[i].S {
				x := &buf[i].S[s]
				if x.E.LastSeen == 0 || seqs[i][s]&1 != 0 || atomic.LoadUint32(&chunk[i].S[s].Seq) != seqs[i][s] {
					continue
				}
				f(x.Key, x.E)
			}
		}
	}
	return nil
}

// ctScanFence is stored to (a release store: STLR on arm64, XCHG on x86-64) between scanCT's
// copy of a step and its second loads of the seqs (acquire loads), so that the copy's loads
// are done before them.
var ctScanFence uint32

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
