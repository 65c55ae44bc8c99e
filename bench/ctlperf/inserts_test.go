package ctlperf

import (
	"context"
	"encoding/binary"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
)

// BenchmarkRestoreInserts is the kernel's floor under a restore's push: the entries a restore of
// 20000 rules (5000 rr services with three real servers each) writes, 5000 into a fresh map of
// kdp_lb_svc's spec (one master per service, with its pick sequence of three inside) and
// 15000 into one of kdp_lb_be's, with nothing of the agent around them. The keys are distinct
// byte strings of the maps' key sizes (a hash map's cost does not depend on what the bytes
// say). Ways of writing them:
//
//   - single: one BPF_MAP_UPDATE_ELEM per entry, one CPU;
//   - batch: one BPF_MAP_UPDATE_BATCH per map, one CPU;
//   - batch-4way: as maps.LB.PutServices and PutBackends write a fresh restore: both maps at
//     once, each in two halves (four writers on however many CPUs are free);
//   - services-only-batch-2way: the service map's 5000 alone, in two halves at once (what is
//     left when the real servers' entries are written after the switch: the slots of rr and
//     wrr services carry their IPv4 real server's address, see struct lb_slot in lb.h);
//   - prealloc-batch-4way: batch-4way into maps without BPF_F_NO_PREALLOC (the datapath's maps
//     are not preallocated; this says what preallocation would change, and memlock-MiB what
//     it costs: a preallocated map takes its capacity, 65536 and 20480 entries, at creation).
//
// Run (root): go test -run XXX -bench RestoreInserts -benchtime 20x ./bench/ctlperf/
func BenchmarkRestoreInserts(b *testing.B) {
	topotest.RequireRoot(b, "creates BPF maps")
	spec, err := loader.Spec()
	if err != nil {
		b.Fatal(err)
	}
	const nSvc, nBE = 5000, 15000
	for _, c := range []struct {
		name     string
		prealloc bool
		write    func(m *ebpf.Map, keys, vals reflect.Value) error
		ways     int
		nBE      int
	}{
		{"single", false, updateEach, 1, nBE},
		{"batch", false, updateBatch, 1, nBE},
		{"batch-4way", false, updateBatch, 2, nBE},
		{"services-only-batch-2way", false, updateBatch, 2, 0},
		{"prealloc-batch-4way", true, updateBatch, 2, nBE},
	} {
		b.Run(c.name, func(b *testing.B) {
			var ds []time.Duration
			var memlock uint64
			for range b.N {
				b.StopTimer()
				var ms [2]*ebpf.Map
				var writes []func() error
				for i, w := range []struct {
					name string
					n    int
				}{{"kdp_lb_svc", nSvc}, {"kdp_lb_be", c.nBE}} {
					ms[i] = freshMap(b, spec, w.name, c.prealloc)
					if w.n == 0 {
						continue
					}
					keys, vals := distinctEntries(ms[i], w.n)
					m, n := ms[i], w.n
					if c.ways == 1 {
						writes = append(writes, func() error { return c.write(m, keys, vals) })
						continue
					}
					h := n / 2
					writes = append(writes,
						func() error { return c.write(m, keys.Slice(0, h), vals.Slice(0, h)) },
						func() error { return c.write(m, keys.Slice(h, n), vals.Slice(h, n)) })
				}
				b.StartTimer()
				start := time.Now()
				if c.ways == 1 {
					for _, w := range writes {
						if err := w(); err != nil {
							b.Fatal(err)
						}
					}
				} else if err := allAtOnce(writes); err != nil {
					b.Fatal(err)
				}
				ds = append(ds, time.Since(start))
				b.StopTimer()
				// What the two maps take in kernel memory with the restore's entries in them,
				// as the kernel accounts a sandbox's maps (a preallocated map: its capacity).
				memlock = 0
				for _, m := range ms {
					if info, err := m.Info(); err == nil {
						if n, ok := info.Memlock(); ok {
							memlock += n
						}
					}
					m.Close()
				}
				b.StartTimer()
			}
			b.StopTimer()
			stats(b, ds)
			b.ReportMetric(float64(memlock)/(1<<20), "memlock-MiB")
		})
	}
}

// BenchmarkServiceEntries is what the service map's value size costs a restore of 20000
// rules (5000 rr services of three real servers): its entries written as maps.LB.PutServices
// writes them (one batch in two halves at once) into a fresh map of kdp_lb_svc's spec with
// the value size of each layout: 20000 of 24 bytes (a master and one entry per slot, before
// the slots moved into the master), 5000 of 120 (a master holding eight slots, this layout)
// and 5000 of 216 (sixteen).
//
// Run (root): go test -run XXX -bench ServiceEntries -benchtime 50x ./bench/ctlperf/
func BenchmarkServiceEntries(b *testing.B) {
	topotest.RequireRoot(b, "creates BPF maps")
	spec, err := loader.Spec()
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		n     int
		value uint32
	}{{20000, 24}, {5000, 120}, {5000, 216}} {
		b.Run(fmt.Sprintf("%dx%dB", c.n, c.value), func(b *testing.B) {
			var ds []time.Duration
			for range b.N {
				b.StopTimer()
				ms := spec.Maps["kdp_lb_svc"].Copy()
				ms.Pinning, ms.ValueSize = ebpf.PinNone, c.value
				m, err := ebpf.NewMap(ms)
				if err != nil {
					b.Fatal(err)
				}
				keys, vals := distinctEntries(m, c.n)
				h := c.n / 2
				b.StartTimer()
				start := time.Now()
				err = allAtOnce([]func() error{
					func() error { return updateBatch(m, keys.Slice(0, h), vals.Slice(0, h)) },
					func() error { return updateBatch(m, keys.Slice(h, c.n), vals.Slice(h, c.n)) },
				})
				ds = append(ds, time.Since(start))
				b.StopTimer()
				m.Close()
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.StopTimer()
			stats(b, ds)
		})
	}
}

// BenchmarkRestorePush is the agent's push of the same restore, to compare with the floor
// above: the dataplane's RestoreLB of a validated 20000-rule table into an empty sandbox (the
// agent's case after --clear or a first restore), with everything it does around the inserts
// (the services' specs and budgets, the room check, the prefilter, the switch), then a restore
// of the empty table (untimed). RestoreLB returns once the datapath serves the new table; the
// real servers it does not read for it (those of rr and wrr services: their slots carry the
// addresses) are written after that, and whole-*-ms is the time until they are (WaitLB).
//
// Run (root): go test -run XXX -bench RestorePush -benchtime 20x ./bench/ctlperf/
func BenchmarkRestorePush(b *testing.B) {
	topotest.RequireRoot(b, "loads the datapath")
	root := topotest.BPFFS(b, "kdptcp")
	dp, err := dataplane.New(root)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close() })
	ctx := context.Background()
	if err := dp.EnsureSandbox(ctx, "perf", ""); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.RemoveSandbox(ctx, "perf") })
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules20000()))
	if err != nil {
		b.Fatal(err)
	}
	t := &ipvs.Table{}
	if err := t.Restore(cmds); err != nil {
		b.Fatal(err)
	}
	if err := dp.RestoreLB(ctx, "perf", &ipvs.Table{}); err != nil {
		b.Fatal(err)
	}
	var ds, whole []time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if err := dp.RestoreLB(ctx, "perf", t); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
		b.StopTimer()
		if err := dp.WaitLB(ctx, "perf"); err != nil {
			b.Fatal(err)
		}
		whole = append(whole, time.Since(start))
		if err := dp.RestoreLB(ctx, "perf", &ipvs.Table{}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	stats(b, ds)
	statsAs(b, "whole-", whole)
}

// freshMap creates an unpinned map of the datapath's spec of name, preallocated or not.
func freshMap(b *testing.B, spec *ebpf.CollectionSpec, name string, prealloc bool) *ebpf.Map {
	ms, ok := spec.Maps[name]
	if !ok {
		b.Fatalf("no map %s in the datapath", name)
	}
	ms = ms.Copy()
	ms.Pinning = ebpf.PinNone
	if prealloc {
		ms.Flags &^= 1 // BPF_F_NO_PREALLOC
	}
	m, err := ebpf.NewMap(ms)
	if err != nil {
		b.Fatalf("create %s: %v", name, err)
	}
	return m
}

// distinctEntries returns n keys (each a distinct number in its first bytes) and n zero
// values of m's sizes, as slices of byte arrays of those sizes (what BatchUpdate takes).
func distinctEntries(m *ebpf.Map, n int) (keys, vals reflect.Value) {
	ks, vs := int(m.KeySize()), int(m.ValueSize())
	keys = reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(ks, reflect.TypeFor[byte]())), n, n)
	for i := range n {
		binary.LittleEndian.PutUint32(keys.Index(i).Bytes(), uint32(i)*2654435761)
	}
	return keys, reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(vs, reflect.TypeFor[byte]())), n, n)
}

func updateBatch(m *ebpf.Map, keys, vals reflect.Value) error {
	if _, err := m.BatchUpdate(keys.Interface(), vals.Interface(), nil); err != nil {
		return fmt.Errorf("batch update of %d entries: %w", keys.Len(), err)
	}
	return nil
}

func updateEach(m *ebpf.Map, keys, vals reflect.Value) error {
	for i := range keys.Len() {
		if err := m.Update(keys.Index(i).Bytes(), vals.Index(i).Bytes(), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("update entry %d: %w", i, err)
		}
	}
	return nil
}

// allAtOnce runs fns on goroutines of their own and returns the first error.
func allAtOnce(fns []func() error) error {
	errs := make(chan error, len(fns))
	var wg sync.WaitGroup
	for _, fn := range fns {
		wg.Go(func() { errs <- fn() })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
