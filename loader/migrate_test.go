package loader_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestMigratePinnedMaps opens a sandbox whose pins an "older kata-dp" made with other map
// definitions, as an agent upgraded across a map change does: the open succeeds, every map is
// then this build's definition, entries whose layout did not change are kept (a hash whose
// flags changed; a per-CPU hash that became a per-CPU array indexed by the same keys), a map
// whose value grew starts empty, and a temporary pin left by a crash mid-migration is gone.
func TestMigratePinnedMaps(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migrate"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	sb.Close()

	spec, err := loader.LoadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	// replace pins the map name with an older definition made from the current one by change,
	// holding the given entries.
	replace := func(name string, change func(*ebpf.MapSpec), entries map[string]any) {
		t.Helper()
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		change(ms)
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatalf("old %s: %v", name, err)
		}
		defer m.Close()
		for k, v := range entries {
			if err := m.Put([]byte(k), v); err != nil {
				t.Fatalf("old %s: put: %v", name, err)
			}
		}
		repin(t, m, filepath.Join(dir, name))
	}
	statsKey := bytes.Repeat([]byte{1}, int(spec.Maps["kdp_lb_stats"].KeySize))
	statsVal := bytes.Repeat([]byte{7}, int(spec.Maps["kdp_lb_stats"].ValueSize))
	replace("kdp_lb_stats", func(ms *ebpf.MapSpec) { ms.Flags = 0 }, map[string]any{string(statsKey): statsVal})

	beKey := []byte{5, 0, 0, 0}
	replace("kdp_lb_be", func(ms *ebpf.MapSpec) { ms.ValueSize += 4 },
		map[string]any{string(beKey): make([]byte, spec.Maps["kdp_lb_be"].ValueSize+4)})

	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	vs := int(spec.Maps["kdp_stats"].ValueSize)
	perCPU := make([][]byte, cpus)
	for i := range perCPU {
		perCPU[i] = bytes.Repeat([]byte{byte(i + 1)}, vs)
	}
	slot3 := []byte{3, 0, 0, 0}
	replace("kdp_stats", func(ms *ebpf.MapSpec) { ms.Type = ebpf.PerCPUHash; ms.Flags = 0 },
		map[string]any{string(slot3): perCPU})

	// A crash between pinning a migrated map and renaming it over the old pin left this.
	left, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := left.Pin(filepath.Join(dir, "kdp_lb_be_migrating")); err != nil {
		t.Fatal(err)
	}
	left.Close()

	sb, err = loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over older pins: %v", err)
	}
	sb.Close()

	for _, name := range []string{"kdp_lb_stats", "kdp_lb_be", "kdp_stats"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		want := spec.Maps[name].Copy()
		want.MaxEntries = m.MaxEntries()
		if err := want.Compatible(m); err != nil {
			t.Errorf("%s after the open: %v", name, err)
		}
		switch name {
		case "kdp_lb_stats":
			got := make([]byte, len(statsVal))
			if err := m.Lookup(statsKey, got); err != nil || !bytes.Equal(got, statsVal) {
				t.Errorf("kdp_lb_stats: the entry was not kept: %v %x", err, got)
			}
		case "kdp_lb_be":
			if err := m.NextKey(nil, make([]byte, m.KeySize())); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Errorf("kdp_lb_be (value grew): want it empty, NextKey says %v", err)
			}
		case "kdp_stats":
			var got [][]byte
			if err := m.Lookup(slot3, &got); err != nil {
				t.Fatalf("kdp_stats slot 3: %v", err)
			}
			for i := range got {
				if !bytes.Equal(got[i], perCPU[i]) {
					t.Errorf("kdp_stats slot 3 CPU %d: got %x, want %x", i, got[i], perCPU[i])
				}
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "kdp_lb_be_migrating")); !os.IsNotExist(err) {
		t.Errorf("the temporary pin is still there: %v", err)
	}
	runtime.KeepAlive(sb)
}

// TestMigrateConnTable: a sandbox pinned when the IPv4 connection table was an LRU hash (one
// entry per direction, keyed by the connection) is opened with its entries moved into the
// array of buckets, each where the datapath looks for it: established connections survive
// the upgrade. The table keeps its capacity (entries, now CTWays per bucket).
func TestMigrateConnTable(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migratect"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	sb.Close()

	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 16, ValueSize: 24, MaxEntries: 8192})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var keys []loader.DatapathCtKey
	for i := range 100 {
		k := loader.DatapathCtKey{Saddr: 0x0300a8c0, Daddr: 0x0a00600a, Sport: uint16(1000 + i), Dport: 0x5000, Proto: 6, Dir: uint8(i % 2)}
		e := loader.DatapathCtEntry{LastSeen: uint64(1 + i), Addr: 0x0a00000a, Port: 0x901f, State: 1, Backend: uint32(i), Svc: 3}
		if err := old.Put(&k, &e); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	repin(t, old, filepath.Join(dir, "kdp_lb_ct"))

	sb, err = loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over the LRU connection table: %v", err)
	}
	defer sb.Close()
	lb := maps.ForSandbox(sb.Maps()).LB
	if got := lb.ConnCapacity(); got != 8192 {
		t.Errorf("capacity after the migration %d, want 8192", got)
	}
	for i, k := range keys {
		e, err := lb.ConnEntry(k)
		if err != nil || e.Backend != uint32(i) || e.LastSeen != uint64(1+i) {
			t.Errorf("connection %d after the migration: %+v, %v", i, e, err)
		}
	}
}

// TestMigrateConnTableMapped: a sandbox pinned when the IPv4 connection table was an array of
// buckets the control plane could not map (no BPF_F_MMAPABLE, the version before) is opened
// with a mapped table holding the same buckets, and the sweeper counts its connections by
// reading it in place.
func TestMigrateConnTableMapped(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migratect2"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	sb.Close()

	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(loader.DatapathCtBucket{})), MaxEntries: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	now := uint64(ts.Nano())
	var keys []loader.DatapathCtKey
	buckets := map[uint32]*loader.DatapathCtBucket{}
	for i := range 50 {
		k := loader.DatapathCtKey{Saddr: 0x0300a8c0, Daddr: 0x0a00600a, Sport: uint16(1000 + i), Dport: 0x5000, Proto: 6}
		at := loader.CTHash(k) % 1024
		b := buckets[at]
		if b == nil {
			b = &loader.DatapathCtBucket{}
			buckets[at] = b
		}
		for s := range b.S {
			if b.S[s].E.LastSeen == 0 {
				b.S[s] = loader.DatapathCtSlot{Seq: 2, Key: k, E: loader.DatapathCtEntry{LastSeen: now, Addr: 0x0a00000a, Port: 0x901f, State: maps.CTTCPEst, Backend: 7, Svc: 3}}
				keys = append(keys, k)
				break
			}
		}
	}
	for at, b := range buckets {
		if err := old.Put(at, b); err != nil {
			t.Fatal(err)
		}
	}
	repin(t, old, filepath.Join(dir, "kdp_lb_ct"))

	sb, err = loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over the unmapped connection table: %v", err)
	}
	defer sb.Close()
	lb := maps.ForSandbox(sb.Maps()).LB
	if lb.CTMem == nil {
		t.Fatal("the migrated table is not mapped")
	}
	if got := lb.ConnCapacity(); got != 1024*loader.CTWays {
		t.Errorf("capacity after the migration %d, want %d", got, 1024*loader.CTWays)
	}
	for _, k := range keys {
		if _, err := lb.ConnEntry(k); err != nil {
			t.Errorf("connection %+v after the migration: %v", k, err)
		}
	}
	want := len(keys)
	res, err := lb.Sweep(now, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Live != want || res.Conns[7].Active != int64(want) {
		t.Errorf("sweep of the migrated table: %d live, counts %+v; want %d", res.Live, res.Conns[7], want)
	}
}

// repin puts m at path in place of the map pinned there: what an older agent left behind.
func repin(t *testing.T, m *ebpf.Map, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
}
