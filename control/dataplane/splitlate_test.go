package dataplane

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvs/ipvstest"
	"github.com/kata-dp/kata-dp/maps"
)

// restoredTable is the table a restore of rules makes, and its real servers by id as
// RestoreLB collects them.
func restoredTable(tb testing.TB, rules string) (*ipvs.Table, map[uint32]maps.Backend) {
	tb.Helper()
	cmds, err := ipvs.ParseRestoreChunks(strings.NewReader(rules))
	if err != nil {
		tb.Fatal(err)
	}
	t := &ipvs.Table{}
	if err := t.Restore(cmds...); err != nil {
		tb.Fatal(err)
	}
	return t, backendsOf(t)
}

// TestSplitLate: a real server is written after the switch only when every service naming it
// is an IPv4 rr or wrr service without persistence and its own address is IPv4.
func TestSplitLate(t *testing.T) {
	rules := strings.Join([]string{
		"-A -t 10.0.0.1:80 -s rr", // a real server is a service's: 172.16.0.3 is two
		"-a -t 10.0.0.1:80 -r 172.16.0.1:80 -m",
		"-a -t 10.0.0.1:80 -r 172.16.0.3:80 -m",
		"-A -t 10.0.0.2:80 -s wrr",
		"-a -t 10.0.0.2:80 -r 172.16.0.2:80 -m -w 2",
		"-A -t 10.0.0.3:80 -s sh",
		"-a -t 10.0.0.3:80 -r 172.16.0.3:80 -m",
		"-A -t 10.0.0.4:80 -s rr -p 300", // persistence: its real servers are read
		"-a -t 10.0.0.4:80 -r 172.16.0.4:80 -m",
		"-A -t [2001:db8::1]:80 -s rr", // IPv6 VIP
		"-a -t [2001:db8::1]:80 -r [2001:db8::2]:80 -m",
		"-A -t 10.0.0.5:80 -s rr",
		"-a -t 10.0.0.5:80 -r 172.16.0.5:80 -m",
		"-A -t 10.0.0.6:80 -s lc",
		"-a -t 10.0.0.6:80 -r 172.16.0.6:80 -m",
		"",
	}, "\n")
	tbl, all := restoredTable(t, rules)
	now, late := splitLate(tbl, all)
	names := func(m map[uint32]maps.Backend) map[string]bool {
		out := map[string]bool{}
		for _, s := range tbl.Services {
			for _, dst := range s.Servers {
				if _, ok := m[dst.ID]; ok {
					out[s.Addr.String()+" "+dst.Addr.String()] = true
				}
			}
		}
		return out
	}
	wantLate := map[string]bool{"10.0.0.1:80 172.16.0.1:80": true, "10.0.0.1:80 172.16.0.3:80": true, "10.0.0.2:80 172.16.0.2:80": true,
		"10.0.0.5:80 172.16.0.5:80": true}
	wantNow := map[string]bool{"10.0.0.3:80 172.16.0.3:80": true, "10.0.0.4:80 172.16.0.4:80": true, "[2001:db8::1]:80 [2001:db8::2]:80": true,
		"10.0.0.6:80 172.16.0.6:80": true}
	if d := cmp.Diff(wantLate, names(late)); d != "" {
		t.Errorf("late (-want +got):\n%s", d)
	}
	if d := cmp.Diff(wantNow, names(now)); d != "" {
		t.Errorf("now (-want +got):\n%s", d)
	}
	if len(now)+len(late) != len(all) {
		t.Errorf("now %d + late %d real servers, want all %d", len(now), len(late), len(all))
	}
	for id, be := range late {
		if all[id] != be {
			t.Errorf("late %d = %+v, want %+v", id, be, all[id])
		}
	}
	for id, be := range now {
		if all[id] != be {
			t.Errorf("now %d = %+v, want %+v", id, be, all[id])
		}
	}
	// Only rr services: late is all of them.
	tbl, all = restoredTable(t, "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 172.16.0.1:80 -m\n-a -t 10.0.0.1:80 -r 172.16.0.2:80 -m\n")
	if now, late := splitLate(tbl, all); len(now) != 0 || len(late) != 2 {
		t.Errorf("rr only: now %v, late %v; want none, both", now, late)
	}
}

// BenchmarkSplitLate: bench/ctlperf's restore table (5000 rr services of three real servers).
func BenchmarkSplitLate(b *testing.B) {
	tbl, all := restoredTable(b, ipvstest.Rules(5000))
	b.ResetTimer()
	for range b.N {
		splitLate(tbl, all)
	}
}
