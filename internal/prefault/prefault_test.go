package prefault

import (
	"bufio"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestHeapWarmed: the heap pages init asked for are resident (mincore), the first allocation is
// among them, and the range stays inside its 4 MiB heap chunk.
func TestHeapWarmed(t *testing.T) {
	if End == 0 {
		t.Skip("MADV_POPULATE_WRITE refused (kernel before 5.14?)")
	}
	p := uintptr(unsafe.Pointer(mark))
	if p < Start || p >= End {
		t.Fatalf("the first allocation %#x is outside the warmed range %#x-%#x", p, Start, End)
	}
	if Start/chunk != (End-1)/chunk {
		t.Fatalf("warmed range %#x-%#x crosses a heap chunk", Start, End)
	}
	n := int(End-Start) / 4096
	vec := make([]byte, n)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, Start, End-Start, uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	for i, v := range vec {
		if v&1 == 0 {
			t.Fatalf("page %d of %d (%#x) of the warmed range is not resident", i, n, Start+uintptr(i)*4096)
		}
	}
}

// TestImageWarmed: init mapped the binary's code and read-only data (this test binary's): the
// code's mapping is resident in this process's page tables nearly whole (its Rss in
// /proc/self/smaps), where a process only maps the pages it runs, 16 at a time.
func TestImageWarmed(t *testing.T) {
	if Segments == 0 {
		t.Skip("MADV_POPULATE_READ refused (kernel before 5.14?)")
	}
	if Segments < 2 {
		t.Errorf("%d read-only segments mapped, want the code's and the read-only data's", Segments)
	}
	code := uint64(reflect.ValueOf(span).Pointer())
	size, rss := smapsOf(t, code)
	if rss*10 < size*9 {
		t.Errorf("the code's mapping has %d of its %d KiB resident", rss, size)
	}
}

// smapsOf returns the Size and Rss (KiB) of this process's mapping holding addr.
func smapsOf(t *testing.T, addr uint64) (size, rss uint64) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(fs[0], "-"); ok && !strings.HasSuffix(fs[0], ":") {
			l, err1 := strconv.ParseUint(lo, 16, 64)
			h, err2 := strconv.ParseUint(hi, 16, 64)
			if err1 == nil && err2 == nil {
				if in {
					break
				}
				in = l <= addr && addr < h
				continue
			}
		}
		if in && len(fs) >= 2 {
			switch fs[0] {
			case "Size:":
				size, _ = strconv.ParseUint(fs[1], 10, 64)
			case "Rss:":
				rss, _ = strconv.ParseUint(fs[1], 10, 64)
			}
		}
	}
	if size == 0 {
		t.Fatalf("no mapping of %#x in /proc/self/smaps", addr)
	}
	return size, rss
}

// TestSpan: the range around an address is page-aligned, holds it, stays inside its chunk and
// is no larger than asked, at a chunk's start, middle and end.
func TestSpan(t *testing.T) {
	const base = 0x7000_0000_0000 // chunk-aligned
	for _, p := range []uintptr{base, base + 0x10, base + 1<<20 + 5, base + chunk - 8, 0x1000} {
		start, end := span(p)
		if start%4096 != 0 || end%4096 != 0 || start > p || end <= p || start/chunk != (end-1)/chunk {
			t.Errorf("span(%#x) = %#x-%#x: not page-aligned, not around it, or across chunks", p, start, end)
		}
		if end-start > ahead+behind+4096 {
			t.Errorf("span(%#x) = %#x-%#x: %d bytes, more than asked", p, start, end, end-start)
		}
	}
}

// TestAgentCmdline: only `kata-dp agent ...` is the agent.
func TestAgentCmdline(t *testing.T) {
	for cmdline, want := range map[string]bool{
		"kata-dp\x00agent\x00--socket\x00/s\x00": true,
		"/usr/bin/kata-dp\x00agent\x00":          true,
		"kata-dp\x00kata-ipvs\x00ipvsadm\x00":    false,
		"kata-dp\x00--version\x00":               false,
		"kata-dp\x00":                            false,
		"":                                       false,
		"kata-dp\x00agentx\x00":                  false,
		"kata-dp\x00kata-network\x00agent\x00":   false,
	} {
		if got := agentCmdline([]byte(cmdline)); got != want {
			t.Errorf("agentCmdline(%q) = %v, want %v", cmdline, got, want)
		}
	}
}
