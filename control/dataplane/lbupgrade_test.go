package dataplane_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// oldSvc is struct lb_svc before the slots moved into the master (kata-dp up to round 6 of
// issue 19): a 24-byte value, a master's header or one slot of its own, keyed rev << 16 |
// index; a slot carried its IPv4 real server's address in Pmask and port in Count (Flags 1).
type oldSvc struct {
	Id, Count, Rev, Persist, Pmask uint32
	Sched, Flags                   uint8
	Wmax                           uint16
}

// pinOldServiceMaps replaces the sandbox's pinned kdp_lb_svc and kdp_lb_svc6 by maps of the
// older definition holding the live services in the older layout, as an agent of that version
// left them: what an upgraded agent finds at its start.
func pinOldServiceMaps(t *testing.T, dir string, lb maps.LB) {
	t.Helper()
	live, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](lb.Svc)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"kdp_lb_svc", "kdp_lb_svc6"} {
		cur, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: cur.KeySize(), ValueSize: 24,
			MaxEntries: cur.MaxEntries(), Flags: cur.Flags()})
		cur.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer old.Close()
		if name == "kdp_lb_svc" {
			for k, m := range live {
				if k.Slot != 0 || m.Count > uint32(maps.InlineSlots) {
					t.Fatalf("the test's services are IPv4 and small: %+v %+v", k, m)
				}
				if err := old.Put(&k, &oldSvc{Id: m.Id, Count: m.Count, Rev: m.Rev, Persist: m.Persist, Pmask: m.Pmask, Sched: m.Sched, Wmax: m.Wmax}); err != nil {
					t.Fatal(err)
				}
				for i, s := range m.S[:m.Count] {
					sk := k
					sk.Slot = m.Rev<<16 | uint32(i+1)
					if err := old.Put(&sk, &oldSvc{Id: s.Id, Count: uint32(s.Port), Pmask: s.Addr, Flags: 1, Wmax: s.Weight}); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		path := filepath.Join(dir, name)
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := old.Pin(path); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLBUpgradeServiceLayout: an agent upgraded from a version whose service map had the older
// value layout (one entry per slot) finds the map pinned with it. Its start migrates the map
// (converted into a new one of this layout: the loader's migratePinned) and moves the
// sandbox's links to its programs: an established flow keeps its real server through the
// switch and after it (the connection table is kept), new flows are balanced before the first
// sync (the saved table pushed again) and after it, and the service map then holds one entry
// per service.
func TestLBUpgradeServiceLayout(t *testing.T) {
	r := newLBRig(t, "lbupg")
	ctx := context.Background()
	r.addRR(t, true)
	lb := r.lbMaps(t)

	// A flow established under the old agent: its datagrams are answered by one real server.
	var flow net.Conn
	if err := r.guest.Do(func() error {
		var err error
		d := net.Dialer{LocalAddr: &net.UDPAddr{Port: 21000}}
		flow, err = d.Dial("udp", vipAddr+":53")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	ask := func(when string) string {
		t.Helper()
		flow.Write([]byte("q"))
		flow.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, err := flow.Read(buf)
		if err != nil {
			t.Fatalf("established flow %s: %v", when, err)
		}
		return string(buf[:n])
	}
	server := ask("before the upgrade")

	sbm, err := loader.Open(r.root, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	dir := sbm.Dir()
	sbm.Close()
	pinOldServiceMaps(t, dir, lb)

	// The upgraded agent's start: it opens (and migrates) the sandbox.
	upgraded, err := dataplane.NewWithOptions(r.root, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer upgraded.Close()
	if err := upgraded.EnsureSandbox(ctx, r.ep.Sandbox, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	if got := ask("after the switch, before the first sync"); got != server {
		t.Errorf("established flow after the switch answered by %s, want %s", got, server)
	}
	// New flows before the first sync: balanced from the converted map.
	count := map[string]int{}
	for _, who := range r.udpPicks(t, 30) {
		count[who]++
	}
	for _, s := range []string{"10.199.0.11", "10.199.0.12", "10.199.0.13"} {
		if count[s] != 10 {
			t.Errorf("new flows before the first sync: %s answered %d of 30, want 10 (%v)", s, count[s], count)
		}
	}
	// Its first sync.
	if err := upgraded.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	if got := ask("after the first sync"); got != server {
		t.Errorf("established flow after the first sync answered by %s, want %s", got, server)
	}
	picked := map[string]bool{}
	for range 3 {
		picked[r.tcpPick(t)] = true
	}
	if len(picked) != 3 {
		t.Errorf("three new connections after the first sync went to %v, want the three real servers", picked)
	}
	now := r.lbMaps(t)
	if vs := now.Svc.ValueSize(); vs != 120 {
		t.Errorf("kdp_lb_svc's value after the upgrade: %d bytes, want this layout's 120", vs)
	}
	all, err := maps.Dump[loader.DatapathLbSvcKey, loader.DatapathLbSvc](now.Svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(r.table.Services) {
		t.Errorf("kdp_lb_svc after the first sync: %d entries, want one per service (%d)", len(all), len(r.table.Services))
	}
}
