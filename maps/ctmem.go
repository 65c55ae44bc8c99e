package maps

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// The control plane writes the IPv4 connection table's slots (clearConns, SetConnEntry) in
// place, in the memory the kernel shares with the datapath (BPF_F_MMAPABLE), with the
// datapath's own protocol (bpf/lib/lb.h, ct_insert): seq is odd while a CPU writes the slot
// (scanCT reads with ct_lookup's side of it). The accesses are
// sync/atomic operations on the mapping (seq as a uint32, key and entry as five uint64
// words), which Go orders among themselves on every architecture (sequentially consistent),
// where plain loads are ordered only by x86-64's TSO.
//
// Layout, checked by TestCTSlotLayout: a slot is seq (4 bytes at offset 0), padding, key (16
// bytes at 8) and entry (24 bytes at 24); buckets follow each other in the mapping (an
// array's values lie on 8-byte boundaries and a bucket is 384 bytes), and the mapping starts
// on a page: seq is 4-byte aligned, the words 8-byte aligned.
const (
	ctSlotSize   = int(unsafe.Sizeof(ctSlot{}))
	ctBucketSize = int(unsafe.Sizeof(ctBucket{}))
	ctWordsOff   = int(unsafe.Offsetof(ctSlot{}.Key))
	ctWords      = int(unsafe.Sizeof(ctKeyEntry{})) / 8
)

// ctKeyEntry is a slot's key and entry as they lie in it from ctWordsOff on (TestCTSlotLayout).
type ctKeyEntry struct {
	Key ctKey
	E   ctEntry
}

// ctClaimTries bounds how often a slot another writer holds (odd seq) or that changed under a
// compare-and-swap is looked at again before it is reported busy. A datapath write takes tens
// of nanoseconds and BPF programs run to completion, so it holds a slot only for a moment; a
// writer of the control plane can be descheduled while it holds one, and the bound keeps it
// (or a broken writer) from hanging the sweeper.
const ctClaimTries = 1000

// errCTBusy says a slot stayed odd (being written) for ctClaimTries looks.
var errCTBusy = errors.New("slot is being written by another CPU")

// ctMem is the IPv4 connection table's memory mapping (LB.CTMem) as its buckets, writable
// and shared with the kernel, or an error wrapping ebpf.ErrNotSupported for a table that is
// not mapped (pinned by an older agent before the loader migrated it, a kernel without the
// flag, a table the kernel maps only read-only: loader.mapCT).
//
// The mapping is the loader's (mapped with unix.Mmap when it opens the sandbox, unmapped
// when it closes it): the atomic accesses a slot's seq needs take pointers into it, which
// the library's ebpf.Memory (copies only) does not give. It is used only while the sandbox
// is open, as the maps' file descriptors are (see loader.Sandbox.Close).
func (l LB) ctMem() ([]ctBucket, error) {
	if l.CTMem == nil {
		return nil, fmt.Errorf("connection table not memory-mapped: %w", ebpf.ErrNotSupported)
	}
	if uint32(ctBucketSize) != l.CT.ValueSize() {
		return nil, fmt.Errorf("connection table: buckets of %d bytes, want %d", l.CT.ValueSize(), ctBucketSize)
	}
	n := int(l.CT.MaxEntries())
	if n*ctBucketSize > len(l.CTMem) {
		return nil, fmt.Errorf("connection table: mapping of %d bytes for %d buckets", len(l.CTMem), n)
	}
	p := unsafe.Pointer(unsafe.SliceData(l.CTMem))
	if uintptr(p)%8 != 0 {
		return nil, fmt.Errorf("connection table: mapping at %p is not 8-byte aligned", p)
	}
	return unsafe.Slice((*ctBucket)(p), n), nil
}

// ctSlotWords are a slot's key and entry as the words the atomic accesses use.
func ctSlotWords(s *ctSlot) *[ctWords]uint64 {
	return (*[ctWords]uint64)(unsafe.Add(unsafe.Pointer(s), ctWordsOff))
}

// ctLoad copies slot s's key and entry (the caller checks seq around it).
func ctLoad(s *ctSlot) (ctKey, ctEntry) {
	var c [ctWords]uint64
	w := ctSlotWords(s)
	for i := range c {
		c[i] = atomic.LoadUint64(&w[i])
	}
	x := (*ctKeyEntry)(unsafe.Pointer(&c))
	return x.Key, x.E
}

// ctStore writes key k and entry e into slot s (the caller holds the claim: seq odd).
func ctStore(s *ctSlot, k ctKey, e ctEntry) {
	var c [ctWords]uint64
	*(*ctKeyEntry)(unsafe.Pointer(&c)) = ctKeyEntry{k, e}
	w := ctSlotWords(s)
	for i := range c {
		atomic.StoreUint64(&w[i], c[i])
	}
}

// ctClearMapped clears, in place, the slots of keys in bucket b: each is claimed as the
// datapath's writers claim one (compare-and-swap of seq from even to odd), its key checked
// again under the claim, zeroed, and published (seq odd to even: it moved by two, so a
// reader that copied the slot before sees that it changed). The bucket's other slots are
// never written, so a connection the datapath inserts into one of them meanwhile stays.
//
// A slot another writer holds (odd seq) whose key, as it reads, is not one of keys is left:
// it did not hold one of them, or the writer is replacing it (a new connection, or another
// clear). One that still shows one of keys is looked at again, up to ctClaimTries times
// (yielding in between), and reported (errCTBusy) after the others are cleared if it stays
// odd: a writer of the control plane can be descheduled while it holds a slot.
func ctClearMapped(b *ctBucket, keys []ctKey) error {
	var busy error
	for i := range b.S {
		s := &b.S[i]
		for try := 0; ; try++ {
			seq := atomic.LoadUint32(&s.Seq)
			k, e := ctLoad(s)
			if !slices.Contains(keys, k) || (seq&1 == 0 && e.LastSeen == 0) {
				break
			}
			if seq&1 != 0 {
				if try == ctClaimTries {
					busy = fmt.Errorf("slot %d: %w", i, errCTBusy)
					break
				}
				runtime.Gosched()
				continue
			}
			if !atomic.CompareAndSwapUint32(&s.Seq, seq, seq+1) {
				continue // claimed or rewritten since the load: look again
			}
			if k2, _ := ctLoad(s); k2 != k {
				atomic.AddUint32(&s.Seq, 1) // cannot happen (writers claim first); leave it
				break
			}
			if ctClearHook != nil {
				ctClearHook(s)
			}
			ctStore(s, ctKey{}, ctEntry{})
			atomic.AddUint32(&s.Seq, 1)
			break
		}
	}
	return busy
}

// ctClearHook, when set (tests), runs in ctClearMapped while it holds a slot's claim, before
// the slot is zeroed: a test writes other slots of the bucket there, as a CPU of the datapath
// could at that moment.
var ctClearHook func(s *ctSlot)

// ctSetMapped writes key k and entry e, in place, into k's slot of the pair of bucket b that
// ctPick chooses at now for the connection of keys orig and reply (one of them k), among the
// slots no other writer holds (odd seq: taken for a fresh entry of another key), claimed as
// the datapath's writers claim one; the bucket's other slots are not written. A slot
// rewritten between the choice and the claim makes it choose again, up to ctClaimTries times
// (yielding when the slot is held).
func ctSetMapped(b *ctBucket, k ctKey, e ctEntry, orig, reply ctKey, now uint64, cfg Config) error {
	for range ctClaimTries {
		var snap ctBucket
		for i := range b.S {
			snap.S[i].Seq = atomic.LoadUint32(&b.S[i].Seq)
			snap.S[i].Key, snap.S[i].E = ctLoad(&b.S[i])
			if snap.S[i].Seq&1 != 0 {
				snap.S[i].Key, snap.S[i].E = ctKey{}, ctEntry{LastSeen: math.MaxInt64}
			}
		}
		at := loader.CTSlot(k, ctPick(&snap, orig, reply, now, cfg))
		s, seq := &b.S[at], snap.S[at].Seq
		if seq&1 != 0 {
			runtime.Gosched() // the slot is held
			continue
		}
		if !atomic.CompareAndSwapUint32(&s.Seq, seq, seq+1) {
			continue
		}
		ctStore(s, k, e)
		atomic.AddUint32(&s.Seq, 1)
		return nil
	}
	return errCTBusy
}
