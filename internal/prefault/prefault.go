// Package prefault maps, at the start of every kata-dp client process, the pages its start is
// about to touch, in a few system calls instead of one page fault each.
//
// Every kata-network and kata-ipvs call of the runtime is a kata-dp process of its own, and it
// runs the init of every package the binary links (the Kubernetes client, prometheus, ...)
// before main: about 1 MB of allocations on 250-350 fresh heap pages, and code and tables read
// from 200-250 places of the 33 MB binary. On a paravirtualized host like the one kata-dp is
// measured on (a PVM guest, docs/benchmarks.md, "The profile") an anonymous page fault costs
// 10-20 us and a fault on the binary (which maps 16 pages around it) about 30 us, mostly the
// hypervisor's interrupt re-enabling, while MADV_POPULATE_WRITE and MADV_POPULATE_READ map
// pages for about 1 us and 0.1 us each in one call. On a host where a fault costs a
// microsecond or two the calls gain little and cost about as little (they map what the start
// would fault in anyway, plus the code it does not touch); that has not been measured here. `kata-dp --version`, 100-150 runs interleaved with the build before
// (docs/performance.md, "Round 5"): 3-7 ms less CPU per process in four comparisons.
//
// cmd/kata-dp imports this package for its init alone. It imports nothing but syscall, unsafe
// and internal/procself (syscall only), so it is initialised before the packages whose work it
// serves. The agent (argument "agent") is left alone: it starts once, and the binary's pages
// mapped would only make its resident size look larger.
//
// What it relies on: the runtime grows the heap upwards from where it allocates, in chunks of
// 4 MiB mapped read-write as a whole (runtime.mheap.grow); the binary's read-only segments are
// in the page cache (else the first process after a boot reads them whole, 22 MB, instead of
// the parts it uses). Where the first does not hold, or the kernel lacks the two calls (Linux
// < 5.14), a call fails or maps pages the process does not use; nothing else changes.
package prefault

import (
	"syscall"
	"unsafe"

	"github.com/kata-dp/kata-dp/internal/procself"
)

const (
	// chunk is the runtime's unit of heap growth (pallocChunkBytes): 4 MiB aligned and mapped
	// read-write as a whole, so a range inside one is never unmapped.
	chunk = 4 << 20
	// ahead is how much of the heap above the first allocation the initialisation of
	// kata-dp's packages touches: 1.5-2.1 MiB (95% of its faults within 1.7 MiB, perf record
	// -e page-faults -d of `kata-dp --version`, three runs).
	ahead = 2 << 20
	// behind covers the free pages below it that the next spans are taken from.
	behind = 256 << 10

	madvPopulateRead  = 22 // MADV_POPULATE_READ, Linux 5.14
	madvPopulateWrite = 23 // MADV_POPULATE_WRITE
)

// What init did, for the tests: the heap range warmed (End 0 if none) and the binary's
// read-only segments mapped.
var (
	Start, End uintptr
	Segments   int
)

// mark is a heap allocation made at init: where the heap is being filled now.
var mark *[16]byte

func init() {
	if isAgent() {
		return
	}
	Segments = warmImage()
	mark = new([16]byte)
	Start, End = span(uintptr(unsafe.Pointer(mark)))
	if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, Start, End-Start, madvPopulateWrite); errno != 0 {
		End = 0
	}
}

// span returns the page-aligned range to warm around heap address p, inside p's chunk.
func span(p uintptr) (start, end uintptr) {
	lo := p &^ (chunk - 1)
	start = lo
	if p-lo > behind {
		start = (p - behind) &^ 4095
	}
	end = min(lo+chunk, (p+ahead+4095)&^4095)
	return start, end
}

// isAgent reports whether this process is `kata-dp agent` (its first argument, from
// /proc/self/cmdline: os.Args is not set up yet).
func isAgent() bool {
	var buf [256]byte
	return agentCmdline(buf[:procself.ReadFile("/proc/self/cmdline", buf[:])])
}

// agentCmdline reports whether a command line as /proc/<pid>/cmdline has it (arguments ended
// by NUL bytes) runs the agent.
func agentCmdline(b []byte) bool {
	for i, c := range b {
		if c == 0 {
			return len(b) > i+6 && string(b[i+1:i+7]) == "agent\x00"
		}
	}
	return false
}

// The ELF program header and the auxiliary vector entries read here (elf.h).
type progHeader struct {
	typ, flags                                  uint32
	off, vaddr, paddr, filesz, memsz, alignment uint64
}

const (
	atPHDR  = 3 // AT_PHDR: where the program headers are mapped
	atPHNUM = 5 // AT_PHNUM: how many
	ptLoad  = 1 // PT_LOAD
	ptPHDR  = 6 // PT_PHDR: the program headers' own entry (its vaddr gives the load bias)
	pfW     = 2 // PF_W
)

// warmImage maps the pages of the binary's loaded segments that are not writable (code,
// read-only data, the function tables) with MADV_POPULATE_READ and returns how many segments
// it mapped. Writable data is left alone: populating it would copy every page.
func warmImage() int {
	var buf [512]byte
	n := procself.ReadFile("/proc/self/auxv", buf[:])
	var phdr, phnum uintptr
	for i := 0; i+16 <= n; i += 16 {
		v := *(*uintptr)(unsafe.Pointer(&buf[i+8]))
		switch *(*uintptr)(unsafe.Pointer(&buf[i])) {
		case atPHDR:
			phdr = v
		case atPHNUM:
			phnum = v
		}
	}
	if phdr == 0 || phnum == 0 || phnum > 64 {
		return 0
	}
	// The program headers are in the binary's mapping, never in Go's heap: their address is
	// read as a pointer from the variable holding it (a uintptr converted directly is what
	// vet's unsafeptr check flags, rightly for heap addresses).
	hs := unsafe.Slice(*(**progHeader)(unsafe.Pointer(&phdr)), phnum)
	bias, found := uintptr(0), false
	for _, h := range hs {
		if h.typ == ptPHDR {
			bias, found = phdr-uintptr(h.vaddr), true
		}
	}
	if !found {
		return 0
	}
	warmed := 0
	for _, h := range hs {
		if h.typ != ptLoad || h.flags&pfW != 0 || h.memsz == 0 {
			continue
		}
		start := (bias + uintptr(h.vaddr)) &^ 4095
		end := bias + uintptr(h.vaddr+h.memsz)
		if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, start, end-start, madvPopulateRead); errno == 0 {
			warmed++
		}
	}
	return warmed
}
