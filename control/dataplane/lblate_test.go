package dataplane_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// lateGate holds the late writes of restores (the real servers written after the switch)
// until released, and makes them fail with err when set.
type lateGate struct {
	mu   sync.Mutex
	ch   chan struct{}
	err  error
	open []chan struct{} // every channel a write may wait on, closed at the end of the test
}

// holdLate installs a gate that holds every late write until release; the test's end
// releases whatever is still held.
func holdLate(t *testing.T) *lateGate {
	g := &lateGate{}
	g.hold()
	unset := dataplane.SetLateWriteHook(func(string) error {
		g.mu.Lock()
		ch, err := g.ch, g.err
		g.mu.Unlock()
		<-ch
		return err
	})
	t.Cleanup(func() {
		g.mu.Lock()
		for _, ch := range g.open {
			close(ch)
		}
		g.open = nil
		g.mu.Unlock()
		unset()
	})
	return g
}

// hold makes the next late writes wait (until release).
func (g *lateGate) hold() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.ch = make(chan struct{})
	g.open = append(g.open, g.ch)
}

// release lets the held writes and the next ones go on.
func (g *lateGate) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, ch := range g.open {
		close(ch)
	}
	g.open = nil
	g.ch = make(chan struct{})
	close(g.ch)
}

// pass lets the next writes go on at once and keeps the ones held now held.
func (g *lateGate) pass() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.ch = make(chan struct{})
	close(g.ch)
	g.err = nil
}

// fail makes the next writes fail with err (after they are let go).
func (g *lateGate) fail(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.err = err
}

// lateTable is the restore of the late-write tests: the rig's rr services on the VIP (TCP
// :80 and UDP :53) and a wrr one, whose real servers can be written after the switch, beside
// services that need theirs before it: lc, sh, rr with persistence, and an IPv6 rr one.
const lateTable = `-A -t 10.96.0.10:80 -s rr
-a -t 10.96.0.10:80 -r 10.199.0.11:80 -m
-a -t 10.96.0.10:80 -r 10.199.0.12:80 -m
-a -t 10.96.0.10:80 -r 10.199.0.13:80 -m
-A -u 10.96.0.10:53 -s rr
-a -u 10.96.0.10:53 -r 10.199.0.11:53 -m
-a -u 10.96.0.10:53 -r 10.199.0.12:53 -m
-a -u 10.96.0.10:53 -r 10.199.0.13:53 -m
-A -t 10.96.0.20:80 -s wrr
-a -t 10.96.0.20:80 -r 10.199.0.21:80 -m -w 2
-a -t 10.96.0.20:80 -r 10.199.0.22:80 -m -w 3
-A -t 10.96.0.21:80 -s lc
-a -t 10.96.0.21:80 -r 10.199.0.31:80 -m
-A -t 10.96.0.22:80 -s sh
-a -t 10.96.0.22:80 -r 10.199.0.41:80 -m
-A -t 10.96.0.23:80 -s rr -p 300
-a -t 10.96.0.23:80 -r 10.199.0.51:80 -m
-A -t [fd00:96::10]:80 -s rr
-a -t [fd00:96::10]:80 -r [fd00:199::11]:80 -m
`

// restoreTable parses rules into a new table whose ids go on from r.table's.
func (r *lbRig) restoreTable(t *testing.T, rules string) *ipvs.Table {
	t.Helper()
	next := r.table.Clone()
	next.Clear()
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules))
	if err != nil {
		t.Fatal(err)
	}
	if err := next.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	return next
}

// neededBefore says whether the datapath may read real server d of service s in kdp_lb_be
// for new connections: every scheduler but rr and wrr, persistence, and IPv6.
func neededBefore(s *ipvs.Service, d ipvs.Server) bool {
	return (s.Scheduler != "rr" && s.Scheduler != "wrr") || s.Persistent != 0 || !s.Addr.Addr().Is4() || !d.Addr.Addr().Is4()
}

// checkBackends checks that kdp_lb_be holds every real server of tb the datapath needs before
// the switch, and, with late, none of the others (their write is held).
func checkBackends(t *testing.T, lb maps.LB, tb *ipvs.Table, late bool, when string) {
	t.Helper()
	ids, err := lb.BackendIDs()
	if err != nil {
		t.Fatal(err)
	}
	missing, early := 0, 0
	for _, s := range tb.Services {
		for _, d := range s.Servers {
			switch need := neededBefore(s, d) || !late; {
			case need && !ids[d.ID]:
				if missing++; missing < 5 {
					t.Errorf("%s: real server %s of %s %s (%s) not in kdp_lb_be", when, d.Addr, s.Scheduler, s.Addr, s.Proto)
				}
			case !need && ids[d.ID]:
				early++
			}
		}
	}
	if missing > 0 {
		t.Errorf("%s: %d real servers missing", when, missing)
	}
	if early > 0 {
		t.Errorf("%s: %d real servers of rr/wrr services written before the late write", when, early)
	}
}

// returnsWithin says whether done is closed within d.
func returnsWithin(done <-chan struct{}, d time.Duration) bool {
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// TestLBRestoreLateServers: a restore writes the real servers of its rr and wrr services after
// the switch, and nothing is wrong meanwhile: new connections through the real devices reach
// the real servers and their replies come back (the prefilter's bits are set), every other
// service's real servers are written, and what reads kdp_lb_be waits for the late write: the
// listing's counters (the sweeper's recount would delete the counters of real servers it does
// not find) and an edit right after the restore, which then sees the whole state.
func TestLBRestoreLateServers(t *testing.T) {
	r := newLBRig(t, "lblate")
	ctx := context.Background()
	lb := r.lbMaps(t)
	g := holdLate(t)
	r.table = r.restoreTable(t, lateTable)
	if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	checkBackends(t, lb, r.table, true, "late write held")
	r.checkRR(t, true, " before the late write")

	// The listing waits for the late write, then counts every connection made meanwhile.
	counters := make(chan ipvs.Counters, 1)
	listed := make(chan struct{})
	go func() {
		defer close(listed)
		c, err := r.dp.LBCounters(ctx, r.ep.Sandbox)
		if err != nil {
			t.Error(err)
		}
		counters <- c
	}()
	// An edit right after the restore (the VIP's service to lc, whose scan reads kdp_lb_be)
	// waits too.
	edited := r.table.Clone()
	k := r.table.Services[0].ServiceKey
	cmd, err := ipvs.ParseParameters("-E -t " + vipAddr + ":80 -s lc")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := edited.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	edit := make(chan struct{})
	go func() {
		defer close(edit)
		if err := r.dp.SetLBService(ctx, r.ep.Sandbox, edited, k); err != nil {
			t.Error(err)
		}
	}()
	if returnsWithin(listed, 200*time.Millisecond) {
		t.Error("the listing's counters were read before the late write ended")
	}
	if returnsWithin(edit, 10*time.Millisecond) {
		t.Error("an edit ran before the late write ended")
	}
	g.release()
	<-listed
	c := <-counters
	<-edit
	checkBackends(t, lb, r.table, false, "after the late write")
	tcp, udp := r.table.Services[0], r.table.Services[1]
	var conns uint64
	for _, d := range tcp.Servers {
		conns += c.Server(d.ID).Conns
	}
	if conns != 6 {
		t.Errorf("the rr service's real servers count %d connections, want 6 (the counters the datapath made before the late write are kept)", conns)
	}
	if got := c.Service(tcp.ID).Conns + c.Service(udp.ID).Conns; got != 36 {
		t.Errorf("the rr services count %d connections, want 36", got)
	}
	if got := activeAndInactive(r.table, c); got != 36 {
		t.Errorf("active + inactive connections %d, want 36", got)
	}
	r.table = edited
	for range 3 {
		if got := r.tcpPick(t); !strings.HasPrefix(got, "10.199.0.1") {
			t.Errorf("VIP after the edit to lc answered by %q", got)
		}
	}
}

// TestLBRestoreLateFails: a late write that fails leaves rr working (its slots carry the
// addresses) and makes the dataplane forget what it wrote, so the next change rewrites the
// whole table: after it every real server is in kdp_lb_be and an lc edit works.
func TestLBRestoreLateFails(t *testing.T) {
	r := newLBRig(t, "lblatefail")
	ctx := context.Background()
	lb := r.lbMaps(t)
	g := holdLate(t)
	g.fail(errors.New("injected"))
	g.release()
	r.table = r.restoreTable(t, lateTable)
	if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	if _, err := r.dp.LBCounters(ctx, r.ep.Sandbox); err != nil { // waits for the write
		t.Fatal(err)
	}
	checkBackends(t, lb, r.table, true, "after a failed late write")
	r.checkRR(t, false, " after a failed late write")
	g.pass()
	cfg, err := maps.ReadConfig(lb.Config)
	if err != nil {
		t.Fatal(err)
	}
	r.ipvsadm(t, "-E -t "+vipAddr+":80 -s lc")
	after, err := maps.ReadConfig(lb.Config)
	if err != nil {
		t.Fatal(err)
	}
	if after.LbGen != (cfg.LbGen+1)&0xff {
		t.Errorf("the edit after a failed late write: generation %d -> %d, want a whole new one", cfg.LbGen, after.LbGen)
	}
	if _, err := r.dp.LBCounters(ctx, r.ep.Sandbox); err != nil {
		t.Fatal(err)
	}
	// The edit's restore defers the rr servers again (the UDP service): its late write ended.
	checkBackends(t, lb, r.table, false, "after the next edit")
	if got := r.tcpPick(t); !strings.HasPrefix(got, "10.199.0.1") {
		t.Errorf("VIP after the edit to lc answered by %q", got)
	}
}

// TestLBRestoreLateRestart: an agent killed after a restore answered and before its late write
// (here: held, and failing when let go, as if the process was gone) leaves a datapath that
// serves the rr services; the restarted agent's first sync writes the whole table and its
// counters go on.
func TestLBRestoreLateRestart(t *testing.T) {
	r := newLBRig(t, "lblatekill")
	ctx := context.Background()
	lb := r.lbMaps(t)
	g := holdLate(t)
	g.fail(errors.New("agent killed"))
	r.table = r.restoreTable(t, lateTable)
	if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	r.tcpPick(t)
	// The killed agent's write stays held; the restarted one's go on.
	g.pass()
	restarted, err := dataplane.NewWithOptions(r.root, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer restarted.Close()
	if err := restarted.EnsureSandbox(ctx, r.ep.Sandbox, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	if got := r.tcpPick(t); !strings.HasPrefix(got, "10.199.0.1") {
		t.Errorf("VIP after the restart, before the first sync, answered by %q", got)
	}
	if err := restarted.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	c, err := restarted.LBCounters(ctx, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	checkBackends(t, lb, r.table, false, "after the restarted agent's first sync")
	if got := c.Service(r.table.Services[0].ID).Conns; got != 2 {
		t.Errorf("service connections after the restarted agent's first sync: %d, want the 2 made before", got)
	}
	r.tcpPick(t)
	c, err = restarted.LBCounters(ctx, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	var conns uint64
	for _, d := range r.table.Services[0].Servers {
		conns += c.Server(d.ID).Conns
	}
	if conns != 3 {
		t.Errorf("real servers' connections after the first sync: %d, want 3 (two before it, one after)", conns)
	}
}
