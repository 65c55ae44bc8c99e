package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// CPU time is read from /proc/<pid>/task/<tid>/schedstat (nanoseconds on
// CPU, exact), not from tick-based counters: at 250 Hz a tick is 4 ms, far
// too coarse for costs of a fraction of a microsecond per frame.

// taskNS returns the nanoseconds task tid of process pid has run.
func taskNS(pid, tid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/schedstat", pid, tid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	n, _ := strconv.ParseUint(f[0], 10, 64)
	return n
}

// ksoftirqds returns the pids of the ksoftirqd threads, by CPU.
func ksoftirqds() map[int]int {
	out := map[int]int{}
	dirs, _ := filepath.Glob("/proc/[0-9]*/comm")
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue
		}
		c, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "ksoftirqd/")
		if !ok {
			continue
		}
		cpu, err1 := strconv.Atoi(c)
		pid, err2 := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		if err1 == nil && err2 == nil {
			out[cpu] = pid
		}
	}
	return out
}

// pinnedTasks returns the threads of this process whose affinity is
// exactly cpu.
func pinnedTasks(cpu int) []int {
	ents, _ := os.ReadDir("/proc/self/task")
	var out []int
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var set unix.CPUSet
		if unix.SchedGetaffinity(tid, &set) != nil {
			continue
		}
		if set.Count() == 1 && set.IsSet(cpu) {
			out = append(out, tid)
		}
	}
	return out
}

// busyTicks returns the busy clock ticks (USER_HZ) of all CPUs from
// /proc/stat, and of this process and the given other pids from their stat
// files: the difference is what other processes ran (coarse, but enough to
// notice a neighbour taking a core).
type ticks struct {
	busy, ours, steal uint64
}

func readTicks(extra []int) ticks {
	var t ticks
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 9 || f[0] != "cpu" {
				continue
			}
			for i, v := range f[1:9] {
				n, _ := strconv.ParseUint(v, 10, 64)
				switch i {
				case 3, 4: // idle, iowait
				case 7:
					t.steal = n
				default:
					t.busy += n
				}
			}
		}
	}
	t.ours = procTicks("/proc/self/stat")
	for _, p := range extra {
		t.ours += procTicks(fmt.Sprintf("/proc/%d/stat", p))
	}
	return t
}

// procTicks returns utime+stime of a /proc/<pid>/stat file.
func procTicks(path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return u + s
}

// clkTck is USER_HZ, the unit of /proc/stat; Linux fixes it at 100.
const clkTck = 100
