package loader_test

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
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
	statsKey := bytes.Repeat([]byte{1}, int(spec.Maps["kdp_lb_hash"].KeySize))
	statsVal := bytes.Repeat([]byte{7}, int(spec.Maps["kdp_lb_hash"].ValueSize))
	replace("kdp_lb_hash", func(ms *ebpf.MapSpec) { ms.Flags = 0 }, map[string]any{string(statsKey): statsVal})

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

	for _, name := range []string{"kdp_lb_hash", "kdp_lb_be", "kdp_stats"} {
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
		case "kdp_lb_hash":
			got := make([]byte, len(statsVal))
			if err := m.Lookup(statsKey, got); err != nil || !bytes.Equal(got, statsVal) {
				t.Errorf("kdp_lb_hash: the entry was not kept: %v %x", err, got)
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

// migratedConns are the connections of the migration tests: n connections from the guest's
// ports 1000.. to the VIP, each with its original and reply entries, both live at now, on the
// real server of the rig (real server id i), and one reply entry whose original is gone.
func migratedConns(n int, now uint64) (keys []loader.DatapathCtKey, entries []loader.DatapathCtEntry) {
	for i := range n {
		k := loader.DatapathCtKey{Saddr: ne32(guestIP), Daddr: ne32(vip.Addr()), Sport: htons(uint16(1000 + i)), Dport: htons(vip.Port()), Proto: unix.IPPROTO_TCP}
		e := loader.DatapathCtEntry{LastSeen: now - uint64(i)*1e6, Addr: ne32(backend.Addr()), Port: htons(backend.Port()), State: maps.CTTCPEst, Backend: uint32(i + 1), Svc: 3}
		re := e
		re.Addr, re.Port = k.Daddr, k.Dport
		keys = append(keys, k, loader.CTReplyKey(k, e))
		entries = append(entries, e, re)
	}
	lone := loader.CTReplyKey(loader.DatapathCtKey{Saddr: ne32(guestIP), Sport: htons(999), Proto: unix.IPPROTO_TCP}, loader.DatapathCtEntry{Addr: ne32(backend.Addr()), Port: htons(backend.Port())})
	keys = append(keys, lone)
	entries = append(entries, loader.DatapathCtEntry{LastSeen: now, Addr: ne32(vip.Addr()), Port: htons(vip.Port()), State: maps.CTTCPEst, Backend: 999, Svc: 3})
	return keys, entries
}

// checkMigratedConns: after the migration every entry of keys is where maps and the datapath
// look for it (ConnEntry), with its values, and the connections' frames take their entries:
// the guest's is sent to the real server with no service in the maps (the established path
// only), the real server's reply gets the VIP back.
func checkMigratedConns(t *testing.T, sb *loader.Sandbox, keys []loader.DatapathCtKey, entries []loader.DatapathCtEntry) {
	t.Helper()
	m := sb.Maps()
	lb := maps.ForSandbox(m).LB
	for i, k := range keys {
		e, err := lb.ConnEntry(k)
		if err != nil || e != entries[i] {
			t.Errorf("entry %d (%+v) after the migration: %+v, %v; want %+v", i, k, e, err, entries[i])
		}
	}
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	eps := maps.ForSandbox(m).Endpoints
	tapIn, _ := sb.Program(loader.ProgTapIn)
	upIn, _ := sb.Program(loader.ProgUplinkIn)
	for _, port := range []uint16{1000, 1001, 1000 + uint16(len(keys)/2-1)} {
		g := netip.AddrPortFrom(guestIP, port)
		eps.Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof))
		if ret, out := runOut(t, tapIn, l4Frame(unix.IPPROTO_TCP, guestMAC, g, vip, 0x10, 0)); ret != tcxRedirect || checkFrame(t, out) != (tuple{g, backend}) {
			t.Errorf("port %d: the guest's frame: verdict %d, %v, want %v -> %v", port, ret, checkFrame(t, out), g, backend)
		}
		eps.Put(1, maps.Endpoint{PeerIfindex: 42, Role: maps.RoleUplink})
		if ret, out := runOut(t, upIn, l4Frame(unix.IPPROTO_TCP, otherMAC, backend, g, 0x10, 0)); ret != tcxRedirect || checkFrame(t, out) != (tuple{vip, g}) {
			t.Errorf("port %d: the reply: verdict %d, %v, want %v -> %v", port, ret, checkFrame(t, out), vip, g)
		}
	}
}

func monotonic() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// TestMigrateConnTable: a sandbox pinned when the IPv4 connection table was an LRU hash (one
// entry per direction, keyed by the connection) is opened with its entries moved into the
// array of buckets, each connection's two entries in a pair of slots of the bucket of the
// guest's side, where the datapath looks for them: established connections survive the
// upgrade. The table keeps its capacity (entries, now CTWays per bucket).
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
	keys, entries := migratedConns(100, monotonic())
	for i := range keys {
		if err := old.Put(&keys[i], &entries[i]); err != nil {
			t.Fatal(err)
		}
	}
	pinOldCT(t, old, dir)

	sb, err = loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over the LRU connection table: %v", err)
	}
	defer sb.Close()
	checkOldCTUnpinned(t, dir)
	if got := maps.ForSandbox(sb.Maps()).LB.ConnCapacity(); got != 8192 {
		t.Errorf("capacity after the migration %d, want 8192", got)
	}
	checkMigratedConns(t, sb, keys, entries)
}

// oldCTHash is how the array of buckets of four slots placed an entry (kata-dp before a
// connection's entries shared a bucket): a hash of the whole key, each direction's own.
func oldCTHash(k loader.DatapathCtKey) uint32 {
	h := loader.Mix32(k.Saddr ^ 0x9e3779b9)
	h = loader.Mix32(h ^ k.Daddr)
	h = loader.Mix32(h ^ (uint32(k.Sport) | uint32(k.Dport)<<16))
	return loader.Mix32(h ^ (uint32(k.Proto) | uint32(k.Dir)<<8))
}

// TestMigrateConnTableBuckets: a sandbox pinned when the IPv4 connection table was an array
// of buckets, in one of its earlier layouts under the name kdp_lb_ct, is opened with a mapped
// table of this layout, kdp_lb_ct2, holding every entry, a connection's two in a pair of slots
// of one bucket, and the old pin gone: the datapath finds them (established connections stay
// on their real servers), the sweeper counts them reading the table in place, and the table
// keeps its capacity in entries. The layouts: buckets of four slots, each direction's entry
// in the bucket of its own key (so a connection's two entries in unrelated buckets), mapped
// (BPF_F_MMAPABLE) or not (the version before); and buckets of eight slots in this layout's
// buckets, a connection's two side by side (original in slot 2p, reply in 2p+1), which has
// this layout's shape and is told from it by its name alone.
func TestMigrateConnTableBuckets(t *testing.T) {
	needRoot(t)
	type bucket4 struct{ S [4]loader.DatapathCtSlot }
	for _, c := range []struct {
		name    string
		ways    int
		buckets uint32
		flags   uint32
	}{
		{"buckets of 4", 4, 1024, 0},
		{"buckets of 4, mapped", 4, 1024, unix.BPF_F_MMAPABLE},
		// 64 buckets: some hold two or three of the 50 connections, whose pairs move.
		{"buckets of 8, pairs side by side", 8, 64, unix.BPF_F_MMAPABLE},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := testRoot(t)
			const id = "migratect2"
			sb := openSandbox(t, root, id)
			dir := sb.Dir()
			sb.Close()

			now := monotonic()
			keys, entries := migratedConns(50, now)
			var (
				old    *ebpf.Map
				shared int // buckets of the pairs' table holding more than one connection
				err    error
			)
			if c.ways == 4 {
				old, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(bucket4{})), MaxEntries: c.buckets, Flags: c.flags})
				if err != nil {
					t.Fatal(err)
				}
				defer old.Close()
				buckets := map[uint32]*bucket4{}
				for i, k := range keys {
					at := oldCTHash(k) % c.buckets
					b := buckets[at]
					if b == nil {
						b = &bucket4{}
						buckets[at] = b
					}
					s := slices.IndexFunc(b.S[:], func(s loader.DatapathCtSlot) bool { return s.E.LastSeen == 0 })
					if s < 0 {
						t.Fatalf("bucket %d of the old table is full", at)
					}
					b.S[s] = loader.DatapathCtSlot{Seq: 2, Key: k, E: entries[i]}
				}
				for at, b := range buckets {
					if err := old.Put(at, b); err != nil {
						t.Fatal(err)
					}
				}
			} else {
				old, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(loader.DatapathCtBucket{})), MaxEntries: c.buckets, Flags: c.flags})
				if err != nil {
					t.Fatal(err)
				}
				defer old.Close()
				buckets := map[uint32]*loader.DatapathCtBucket{}
				conns := map[uint32]int{}
				for i := 0; i < len(keys); i++ {
					at := loader.CTHash(keys[i]) % c.buckets
					b := buckets[at]
					if b == nil {
						b = &loader.DatapathCtBucket{}
						buckets[at] = b
					}
					p := conns[at]
					if p == loader.CTWays/2 {
						t.Fatalf("bucket %d of the old table is full", at)
					}
					conns[at]++
					b.S[2*p+int(keys[i].Dir)] = loader.DatapathCtSlot{Seq: 2, Key: keys[i], E: entries[i]}
					if keys[i].Dir == 0 { // its reply follows it (migratedConns)
						i++
						b.S[2*p+1] = loader.DatapathCtSlot{Seq: 4, Key: keys[i], E: entries[i]}
					}
				}
				for at, b := range buckets {
					if err := old.Put(at, b); err != nil {
						t.Fatal(err)
					}
				}
				for _, n := range conns {
					if n > 1 {
						shared++
					}
				}
				if shared == 0 {
					t.Fatal("no bucket of the old table holds two connections: the test moves no pair")
				}
			}
			pinOldCT(t, old, dir)

			sb, err = loader.Open(root, id)
			if err != nil {
				t.Fatalf("open over the old connection table: %v", err)
			}
			defer sb.Close()
			checkOldCTUnpinned(t, dir)
			lb := maps.ForSandbox(sb.Maps()).LB
			if lb.CTMem == nil {
				t.Fatal("the migrated table is not mapped")
			}
			if got, want := lb.ConnCapacity(), int(c.buckets)*c.ways; got != want {
				t.Errorf("capacity after the migration %d, want %d", got, want)
			}
			res, err := lb.Sweep(now, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.Live != 50 || res.Conns[1].Active != 1 || res.Conns[50].Active != 1 {
				t.Errorf("sweep of the migrated table: %d live, counts %+v; want 50, one per real server", res.Live, res.Conns)
			}
			checkMigratedConns(t, sb, keys, entries)
		})
	}
}

// TestMigrateConnTableCrash: a crash after a migration pinned the new connection table
// (kdp_lb_ct2) and before it removed the old pin (kdp_lb_ct) leaves both; the next open keeps
// the new table as it is, with its entries, and removes the old pin without reading it.
func TestMigrateConnTableCrash(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migratect3"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	lb := maps.ForSandbox(sb.Maps()).LB
	keys, entries := migratedConns(3, monotonic())
	for i := range keys {
		if err := lb.SetConnEntry(keys[i], entries[i]); err != nil {
			t.Fatal(err)
		}
	}
	info, err := lb.CT.Info()
	if err != nil {
		t.Fatal(err)
	}
	want, _ := info.ID()
	sb.Close()

	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(loader.DatapathCtBucket{})), MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(dir, "kdp_lb_ct")); err != nil {
		t.Fatal(err)
	}

	sb, err = loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over both tables: %v", err)
	}
	defer sb.Close()
	checkOldCTUnpinned(t, dir)
	info, err = maps.ForSandbox(sb.Maps()).LB.CT.Info()
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := info.ID(); got != want {
		t.Errorf("the connection table after the open is map %d, want the one pinned before, %d", got, want)
	}
	checkMigratedConns(t, sb, keys, entries)
}

// pinOldCT pins m as an earlier agent's IPv4 connection table (kdp_lb_ct) in the sandbox's
// pin directory dir in place of this build's (kdp_lb_ct2): what an older agent left behind.
func pinOldCT(t *testing.T, m *ebpf.Map, dir string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, loader.CTPin)); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(dir, "kdp_lb_ct")); err != nil {
		t.Fatal(err)
	}
}

// checkOldCTUnpinned: after an open, the earlier connection table's pin is gone and this
// build's is there.
func checkOldCTUnpinned(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "kdp_lb_ct")); !os.IsNotExist(err) {
		t.Errorf("the old connection table's pin is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, loader.CTPin)); err != nil {
		t.Errorf("the connection table's pin: %v", err)
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

// TestMigrateCounters: a sandbox pinned when the load balancer's counters were hash maps
// (kdp_lb_stats keyed by {kind, id}, kdp_lb_conns by real server id) is opened with every
// counter in its id's entry of this version's arrays, owned by its id (kata-ipvs and cluster
// ids alike); installing the same service and real server again (the agent's first sync)
// keeps them, and the datapath's next connection counts on from them.
func TestMigrateCounters(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migratecnt"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	sb.Close()

	type statsKey struct{ Kind, ID uint32 }
	const clusterID = 0x40000005
	oldStats := map[statsKey]maps.LBStats{
		{maps.StatsService, 3}:         {Conns: 5, Inpkts: 50, Outpkts: 40, Inbytes: 5000, Outbytes: 4000, Sched: 5},
		{maps.StatsBackend, 7}:         {Conns: 5, Inpkts: 50, Outpkts: 40, Inbytes: 5000, Outbytes: 4000},
		{maps.StatsBackend, clusterID}: {Conns: 9},
	}
	oldConns := map[uint32]maps.LBConns{7: {Active: 2, Inactive: 1}, clusterID: {Inactive: 4}}
	st, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 8, ValueSize: uint32(unsafe.Sizeof(maps.LBStats{})), MaxEntries: 40960, Flags: unix.BPF_F_NO_PREALLOC})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for k, v := range oldStats {
		if err := st.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	cn, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(maps.LBConns{})), MaxEntries: 20480, Flags: unix.BPF_F_NO_PREALLOC})
	if err != nil {
		t.Fatal(err)
	}
	defer cn.Close()
	for k, v := range oldConns {
		if err := cn.Put(k, &v); err != nil {
			t.Fatal(err)
		}
	}
	repin(t, st, filepath.Join(dir, "kdp_lb_stats"))
	repin(t, cn, filepath.Join(dir, "kdp_lb_conns"))

	sb, err = loader.OpenWithOptions(root, id, loader.Options{ExtraLBRules: 1000}) // a cluster table's half
	if err != nil {
		t.Fatalf("open over the counters' hash maps: %v", err)
	}
	defer sb.Close()
	m := sb.Maps()
	lb := maps.ForSandbox(m).LB
	if m.LBStats.Type() != ebpf.Array || m.LBConns.Type() != ebpf.Array {
		t.Fatalf("counters after the open: %v and %v, want arrays", m.LBStats.Type(), m.LBConns.Type())
	}
	check := func(when string, want map[statsKey]maps.LBStats, wantConns map[uint32]maps.LBConns) {
		t.Helper()
		for k, v := range want {
			if got, err := lb.ReadStats(k.Kind, k.ID); err != nil || got != v {
				t.Errorf("%s: counters of %d (kind %d): %+v, %v; want %+v", when, k.ID, k.Kind, got, err, v)
			}
		}
		for id, v := range wantConns {
			if got, err := lb.ReadConns(id); err != nil || got != v {
				t.Errorf("%s: connection counts of %d: %+v, %v; want %+v", when, id, got, err, v)
			}
		}
	}
	check("after the migration", oldStats, oldConns)
	if n := m.LBStats.MaxEntries(); n != 2*loader.CounterHalf {
		t.Errorf("counters of a sandbox with a cluster table: %d entries, want %d", n, 2*loader.CounterHalf)
	}

	// The first sync installs the same ids again: the counters stay, and count on.
	if err := lb.PutBackend(7, maps.Backend{Addr: backend, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if err := lb.PutService(0, maps.ServiceSpec{VIP: vip, Proto: unix.IPPROTO_TCP, ID: 3, Sched: maps.SchedRR, Slots: []uint32{7}}); err != nil {
		t.Fatal(err)
	}
	if err := lb.ClaimCounters(nil, []uint32{clusterID}, false); err != nil {
		t.Fatal(err)
	}
	check("after the first sync", oldStats, oldConns)
	if err := maps.WriteConfig(m.Config, maps.Config{Flags: maps.ConfigLB, TcpTimeout: 900, TcpfinTimeout: 120, UdpTimeout: 300}); err != nil {
		t.Fatal(err)
	}
	if err := maps.ForSandbox(m).Endpoints.Put(1, tapEndpoint(0, 42, maps.FlagAntiSpoof)); err != nil {
		t.Fatal(err)
	}
	tapIn, _ := sb.Program(loader.ProgTapIn)
	frame := l4Frame(unix.IPPROTO_TCP, guestMAC, client, vip, 0x02, 10)
	if ret, out := runOut(t, tapIn, frame); ret != tcxRedirect || checkFrame(t, out) != (tuple{client, backend}) {
		t.Fatalf("a new connection after the upgrade: verdict %d, %v", ret, checkFrame(t, out))
	}
	svc, be := oldStats[statsKey{maps.StatsService, 3}], oldStats[statsKey{maps.StatsBackend, 7}]
	svc.Conns, svc.Inpkts, svc.Inbytes, svc.Sched = 6, 51, svc.Inbytes+uint64(len(frame)), 6
	be.Conns, be.Inpkts, be.Inbytes = 6, 51, be.Inbytes+uint64(len(frame))
	check("after a new connection", map[statsKey]maps.LBStats{{maps.StatsService, 3}: svc, {maps.StatsBackend, 7}: be},
		map[uint32]maps.LBConns{7: {Active: 3, Inactive: 1}})
}

// oldLbSvc is struct lb_svc before a service's slots moved into its master: a 24-byte master
// header or one slot (its real server's id, wrr weight in Wmax and, with Flags 1, IPv4 address
// in Pmask and port in Count), keyed rev << 16 | index (1-based).
type oldLbSvc struct {
	Id, Count, Rev, Persist, Pmask uint32
	Sched, Flags                   uint8
	Wmax                           uint16
}

// TestMigrateServiceMaps: a sandbox pinned when kdp_lb_svc and kdp_lb_svc6 held one entry per
// slot (24-byte values) is opened with both converted, not emptied: every service of every
// generation, IPv4 and IPv6, small (all slots in the master) and large (slot blocks), with its
// revision, persistence, wrr weights and the slots' addresses, comes out exactly as this
// version writes it, so an upgraded agent's programs balance new connections before its first
// sync rewrites the table; a slot of a revision no master names is dropped.
func TestMigrateServiceMaps(t *testing.T) {
	needRoot(t)
	root := testRoot(t)
	const id = "migratesvc"
	sb := openSandbox(t, root, id)
	dir := sb.Dir()
	lb := maps.ForSandbox(sb.Maps()).LB
	rs := func(i int) netip.AddrPort { return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 4, 0, byte(i)}), 80) }
	rs6 := func(i int) netip.AddrPort { return netip.MustParseAddrPort(fmt.Sprintf("[fd00:4::%x]:80", i)) }
	spec := func(vip string, id uint32, sched maps.Scheduler, n int, at func(int) netip.AddrPort) maps.ServiceSpec {
		s := maps.ServiceSpec{VIP: netip.MustParseAddrPort(vip), Proto: unix.IPPROTO_TCP, ID: id, Sched: sched}
		for i := 1; i <= n; i++ {
			s.Slots, s.Addrs = append(s.Slots, uint32(i)), append(s.Addrs, at(i))
			if sched == maps.SchedWRR {
				s.Weights = append(s.Weights, uint16(i))
			}
		}
		return s
	}
	for _, s := range []maps.ServiceSpec{
		spec("10.96.0.1:80", 1, maps.SchedRR, 3, rs),
		spec("10.96.0.2:80", 2, maps.SchedWRR, 20, rs),
		spec("10.96.0.3:80", 3, maps.SchedWLC, 8, rs),
		spec("[2001:db8::1]:80", 4, maps.SchedRR, 2, rs6),
		spec("[2001:db8::2]:80", 5, maps.SchedWLC, 12, rs6),
	} {
		// Twice: the live revision is 2 (the first one's blocks are gone).
		for range 2 {
			if err := lb.PutService(0, s); err != nil {
				t.Fatal(err)
			}
		}
	}
	persist := spec("10.96.0.4:80", 6, maps.SchedRR, 9, rs)
	persist.Persist, persist.PMask = 300, netip.MustParseAddr("255.255.255.0")
	if err := lb.PutServices(1, []maps.ServiceSpec{persist, spec("[2001:db8::3]:80", 7, maps.SchedWRR, 17, rs6)}); err != nil {
		t.Fatal(err)
	}
	want, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](lb.Svc)
	if err != nil {
		t.Fatal(err)
	}
	want6, err := maps.Dump[loader.DatapathLbSvc6Key, loader.DatapathLbSvc](lb.Svc6)
	if err != nil {
		t.Fatal(err)
	}

	// The same services as the older version wrote them, and a stale slot (revision 9).
	newOld := func(keySize uint32) *ebpf.Map {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: keySize, ValueSize: 24, MaxEntries: 65536, Flags: unix.BPF_F_NO_PREALLOC})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	old, old6 := newOld(lb.Svc.KeySize()), newOld(lb.Svc6.KeySize())
	// slotOf is slot i (0-based) of the service of master m whose blocks are keyed under base.
	slotOf := func(base loader.DatapathLbSvcKey, m loader.DatapathLbSvc, i int) loader.DatapathLbSlot {
		if i < maps.InlineSlots {
			return m.S[i]
		}
		base.Slot = m.Rev<<16 | uint32(i/maps.InlineSlots)
		return want[base].S[i%maps.InlineSlots]
	}
	putOld := func(to *ebpf.Map, k any, base loader.DatapathLbSvcKey, m loader.DatapathLbSvc) {
		t.Helper()
		if err := to.Put(k, &oldLbSvc{Id: m.Id, Count: m.Count, Rev: m.Rev, Persist: m.Persist, Pmask: m.Pmask, Sched: m.Sched, Wmax: m.Wmax}); err != nil {
			t.Fatal(err)
		}
		for i := range int(m.Count) {
			s := slotOf(base, m, i)
			o := oldLbSvc{Id: s.Id, Wmax: s.Weight}
			if s.Addr != 0 {
				o.Pmask, o.Count, o.Flags = s.Addr, uint32(s.Port), 1
			}
			sk := base
			sk.Slot = m.Rev<<16 | uint32(i+1)
			if err := old.Put(&sk, &o); err != nil {
				t.Fatal(err)
			}
		}
	}
	masters := 0
	for k, m := range want {
		if k.Slot == 0 {
			putOld(old, &k, k, m)
			masters++
		}
	}
	for k, m := range want6 {
		putOld(old6, &k, loader.DatapathLbSvcKey{Vip: m.Id, Proto: 0xff, Gen: k.Gen}, m)
	}
	if masters != 4 || len(want6) != 3 || len(want) == masters {
		t.Fatalf("the test's services: %d IPv4 masters, %d IPv6, %d service-map entries", masters, len(want6), len(want))
	}
	stale := loader.DatapathLbSvcKey{Vip: ne32(netip.MustParseAddr("10.96.0.1")), Vport: htons(80), Proto: unix.IPPROTO_TCP, Slot: 9<<16 | 1}
	if err := old.Put(&stale, &oldLbSvc{Id: 1}); err != nil {
		t.Fatal(err)
	}
	sb.Close()
	repin(t, old, filepath.Join(dir, "kdp_lb_svc"))
	repin(t, old6, filepath.Join(dir, "kdp_lb_svc6"))

	sb2, err := loader.Open(root, id)
	if err != nil {
		t.Fatalf("open over the older service maps: %v", err)
	}
	defer sb2.Close()
	lb = maps.ForSandbox(sb2.Maps()).LB
	got, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](lb.Svc)
	if err != nil {
		t.Fatal(err)
	}
	got6, err := maps.Dump[loader.DatapathLbSvc6Key, loader.DatapathLbSvc](lb.Svc6)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("kdp_lb_svc after the migration (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(want6, got6); diff != "" {
		t.Errorf("kdp_lb_svc6 after the migration (-want +got):\n%s", diff)
	}
}
