package dataplane_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// lbRig adds to the standard rig real servers behind the uplink: addresses 10.199.0.11-13 on
// the host veth, each with a TCP and a UDP server that answer with their own address, and a
// default route in the guest so it sends service traffic to the uplink.
type lbRig struct {
	*rig
	table *ipvs.Table
}

const vipAddr = "10.96.0.10"

func newLBRig(t *testing.T, id string) *lbRig {
	r := &lbRig{rig: newRig(t, id), table: &ipvs.Table{}}
	host := r.sb.Host
	// The servers' ends of accepted connections are closed at the end too: a connection
	// whose conntrack entry a test removed never sees its client's FIN.
	var mu sync.Mutex
	var accepted []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range accepted {
			c.Close()
		}
	})
	for i := 1; i <= 3; i++ {
		addr := fmt.Sprintf("10.199.0.1%d", i)
		if _, err := host.Exec("ip", "addr", "add", addr+"/24", "dev", r.sb.HostVeth.Name); err != nil {
			t.Fatal(err)
		}
		l, err := host.Listen("tcp", addr+":80")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				accepted = append(accepted, c)
				mu.Unlock()
				go func() {
					defer c.Close()
					fmt.Fprintf(c, "%s\n", addr)
					buf := make([]byte, 64<<10)
					for {
						if _, err := c.Read(buf); err != nil {
							return
						}
					}
				}()
			}
		}()
		pc, err := host.ListenPacket("udp", addr+":53")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				_, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo([]byte(addr), from)
			}
		}()
	}
	if _, err := r.guest.Exec("ip", "route", "add", "default", "via", r.sb.HostAddr.Addr().String()); err != nil {
		t.Fatal(err)
	}
	return r
}

// ipvsadm applies one kata-ipvs command to the table and the datapath.
func (r *lbRig) ipvsadm(t *testing.T, params string) {
	t.Helper()
	cmd, err := ipvs.ParseParameters(params)
	if err != nil {
		t.Fatalf("%s: %v", params, err)
	}
	if _, err := r.table.Apply(cmd); err != nil {
		t.Fatalf("%s: %v", params, err)
	}
	if err := r.dp.SetLB(context.Background(), r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
}

// dialTCP opens a connection from the guest to the VIP and returns it with the real server's
// greeting.
func (r *lbRig) dialTCP(t *testing.T) (net.Conn, string) {
	t.Helper()
	c, err := r.guest.Dial("tcp", vipAddr+":80", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		t.Fatalf("read greeting: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	return c, strings.TrimSpace(line)
}

func (r *lbRig) tcpPick(t *testing.T) string {
	c, who := r.dialTCP(t)
	c.Close()
	return who
}

// udpPicks sends one datagram from each of n sockets with distinct source ports (n new
// flows: an ephemeral port picked twice would be the same flow) and returns who answered.
func (r *lbRig) udpPicks(t *testing.T, n int) []string {
	t.Helper()
	var out []string
	for i := range n {
		var c net.Conn
		err := r.guest.Do(func() error {
			var err error
			d := net.Dialer{LocalAddr: &net.UDPAddr{Port: 20000 + i}}
			c, err = d.Dial("udp", vipAddr+":53")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("q"))
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		k, err := c.Read(buf)
		c.Close()
		if err != nil {
			t.Fatalf("udp answer: %v", err)
		}
		out = append(out, string(buf[:k]))
	}
	return out
}

// addRR adds an rr service on VIP:80/tcp (and VIP:53/udp with udp) with the real servers
// 10.199.0.11, .12 and .13, in that order.
func (r *lbRig) addRR(t *testing.T, udp bool) {
	t.Helper()
	r.ipvsadm(t, "-A -t "+vipAddr+":80 -s rr")
	if udp {
		r.ipvsadm(t, "-A -u "+vipAddr+":53 -s rr")
	}
	for i := 1; i <= 3; i++ {
		r.ipvsadm(t, fmt.Sprintf("-a -t %s:80 -r 10.199.0.1%d:80 -m", vipAddr, i))
		if udp {
			r.ipvsadm(t, fmt.Sprintf("-a -u %s:53 -r 10.199.0.1%d:53 -m", vipAddr, i))
		}
	}
}

// checkRR checks addRR's services through path (for the messages): six TCP connections pick
// 3, 2, 1, 3, 2, 1 (kernel order), and with udp 30 UDP flows are answered 10 by each server.
func (r *lbRig) checkRR(t *testing.T, udp bool, path string) {
	t.Helper()
	var got []string
	for range 6 {
		got = append(got, r.tcpPick(t))
	}
	want := []string{"10.199.0.13", "10.199.0.12", "10.199.0.11", "10.199.0.13", "10.199.0.12", "10.199.0.11"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("rr picks%s %v, want %v", path, got, want)
	}
	if !udp {
		return
	}
	count := map[string]int{}
	for _, who := range r.udpPicks(t, 30) {
		count[who]++
	}
	for i := 1; i <= 3; i++ {
		if n := count[fmt.Sprintf("10.199.0.1%d", i)]; n != 10 {
			t.Errorf("udp%s: server %d answered %d of 30 flows, want 10", path, i, n)
		}
	}
}

// TestLBRoundRobinTCP: rr over real servers added 1, 2, 3 picks 3, 2, 1, 3, 2, 1 (kernel order).
func TestLBRoundRobinTCP(t *testing.T) {
	r := newLBRig(t, "lbrr")
	r.addRR(t, false)
	r.checkRR(t, false, "")
	c, err := r.dp.LBCounters(context.Background(), "lbrr")
	if err != nil {
		t.Fatal(err)
	}
	list := r.table.List(ipvs.FormatStats, c)
	t.Log("\n" + list)
	s := r.table.Services[0]
	var conns uint64
	for _, d := range s.Servers {
		conns += c.Server(d.ID).Conns
	}
	if conns != 6 || c.Service(s.ID).Conns != 6 {
		t.Errorf("connection counters: servers %d, service %d, want 6", conns, c.Service(s.ID).Conns)
	}
}

// TestLBCountersSurviveRestart: an agent restart pushes the saved table again (a restore
// under a new generation beside the live one, same ids); freeing the old generation keeps the
// counters of the services that live on, and they go on counting.
func TestLBCountersSurviveRestart(t *testing.T) {
	r := newLBRig(t, "lbctr")
	ctx := context.Background()
	r.ipvsadm(t, "-A -t "+vipAddr+":80 -s rr")
	r.ipvsadm(t, "-a -t "+vipAddr+":80 -r 10.199.0.11:80 -m")
	r.tcpPick(t)
	restarted, err := dataplane.NewWithOptions(r.root, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer restarted.Close()
	if err := restarted.EnsureSandbox(ctx, r.ep.Sandbox, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	if err := restarted.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	r.tcpPick(t)
	c, err := restarted.LBCounters(ctx, r.ep.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Service(r.table.Services[0].ID).Conns; got != 2 {
		t.Errorf("service connections after the restart: %d, want 2 (one before, one after)", got)
	}
}

// TestLBCountersSlotReuse: a real server is deleted and a new one gets its counter entry (an
// id ipvs.CounterSlots later, as a table hands out after that many): with real connections, the
// listing shows the new server from zero and then its own connections only, the service all.
func TestLBCountersSlotReuse(t *testing.T) {
	r := newLBRig(t, "lbslot")
	ctx := context.Background()
	r.ipvsadm(t, "-A -t "+vipAddr+":80 -s rr")
	r.ipvsadm(t, "-a -t "+vipAddr+":80 -r 10.199.0.11:80 -m")
	for range 2 {
		if got := r.tcpPick(t); got != "10.199.0.11" {
			t.Fatalf("picked %s, want 10.199.0.11", got)
		}
	}
	old := r.table.Services[0].Servers[0].ID
	r.ipvsadm(t, "-d -t "+vipAddr+":80 -r 10.199.0.11:80")
	r.table.LastID = old + ipvs.CounterSlots - 1 // the next id is the first free one: old's entry
	r.ipvsadm(t, "-a -t "+vipAddr+":80 -r 10.199.0.12:80 -m")
	next := r.table.Services[0].Servers[0].ID
	if ipvs.CounterSlot(next) != ipvs.CounterSlot(old) || next == old {
		t.Fatalf("new real server's id %d does not take %d's entry", next, old)
	}
	counters := func() ipvs.Counters {
		t.Helper()
		c, err := r.dp.LBCounters(ctx, r.ep.Sandbox)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if s := counters().Server(next); s.Conns != 0 || s.InPkts != 0 || s.ActiveConn != 0 || s.InActConn != 0 {
		t.Errorf("the new real server's counters before any connection: %+v, want zero", s)
	}
	if got := r.tcpPick(t); got != "10.199.0.12" {
		t.Fatalf("picked %s, want 10.199.0.12", got)
	}
	c := counters()
	if s := c.Server(next); s.Conns != 1 || s.InPkts == 0 {
		t.Errorf("the new real server's counters after one connection: %+v, want 1 connection", s)
	}
	if got := c.Service(r.table.Services[0].ID).Conns; got != 3 {
		t.Errorf("service connections: %d, want 3", got)
	}
	t.Log("\n" + r.table.List(ipvs.FormatStats, c))
}

// TestLBWeightedUDP: wrr with weights 1:2:3 spreads 600 flows exactly in that ratio.
func TestLBWeightedUDP(t *testing.T) {
	r := newLBRig(t, "lbwrr")
	r.ipvsadm(t, "-A -u "+vipAddr+":53 -s wrr")
	for i := 1; i <= 3; i++ {
		r.ipvsadm(t, fmt.Sprintf("-a -u %s:53 -r 10.199.0.1%d:53 -m -w %d", vipAddr, i, i))
	}
	count := map[string]int{}
	for _, who := range r.udpPicks(t, 600) {
		count[who]++
	}
	for i := 1; i <= 3; i++ {
		if got := count[fmt.Sprintf("10.199.0.1%d", i)]; got != 100*i {
			t.Errorf("server %d (weight %d) got %d of 600 flows, want %d", i, i, got, 100*i)
		}
	}
}

// TestLBPersistenceAndCleanup: -p keeps a client on its real server across connections;
// cleanup deletes its connection entries; a quiesced server gets no new connection while an
// established one keeps working through rule edits.
func TestLBPersistenceAndEdits(t *testing.T) {
	r := newLBRig(t, "lbpersist")
	r.ipvsadm(t, "-A -t "+vipAddr+":80 -s rr -p 300")
	for i := 1; i <= 3; i++ {
		r.ipvsadm(t, fmt.Sprintf("-a -t %s:80 -r 10.199.0.1%d:80", vipAddr, i))
	}
	first := r.tcpPick(t)
	for range 4 {
		if got := r.tcpPick(t); got != first {
			t.Fatalf("persistent client moved from %s to %s", first, got)
		}
	}

	// An established connection survives edits, including its server being quiesced.
	c, who := r.dialTCP(t)
	defer c.Close()
	r.ipvsadm(t, fmt.Sprintf("-e -t %s:80 -r %s:80 -w 0", vipAddr, who))
	r.ipvsadm(t, "-E -t "+vipAddr+":80 -s wlc")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1<<20)
		for range 8 {
			if _, err := c.Write(buf); err != nil {
				t.Errorf("established connection broken by a rule edit: %v", err)
				return
			}
		}
	}()
	wg.Wait()
	// Without persistence, new connections avoid the quiesced server.
	r.ipvsadm(t, "-E -t "+vipAddr+":80 -s rr")
	for range 4 {
		if got := r.tcpPick(t); got == who {
			t.Errorf("quiesced server %s got a new connection", who)
		}
	}

	// cleanup removes the connection entries to that server.
	n, err := r.dp.CleanupConns(context.Background(), "lbpersist", netip.MustParseAddr(vipAddr), uint8(ipvs.TCP))
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Error("cleanup deleted no connection entry")
	}
}

// TestLBTimeouts: --set shortens the UDP timeout and the sweeper expires the flow, so the next
// datagram of the same flow is scheduled afresh (rr moves it on).
func TestLBTimeouts(t *testing.T) {
	r := newLBRig(t, "lbtimeout")
	r.ipvsadm(t, "-A -u "+vipAddr+":53 -s rr")
	for i := 1; i <= 3; i++ {
		r.ipvsadm(t, fmt.Sprintf("-a -u %s:53 -r 10.199.0.1%d:53", vipAddr, i))
	}
	r.ipvsadm(t, "--set 0 0 1")
	ctx := context.Background()

	conn, err := r.guest.Dial("udp", vipAddr+":53", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ask := func() string {
		conn.Write([]byte("q"))
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		k, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:k])
	}
	a, b := ask(), ask()
	if a != b {
		t.Fatalf("one UDP flow answered by %s then %s", a, b)
	}
	c, _ := r.dp.LBCounters(ctx, "lbtimeout")
	if got := activeAndInactive(r.table, c); got != 1 {
		t.Errorf("%d connection entries, want 1", got)
	}
	time.Sleep(2500 * time.Millisecond) // past the 1 s timeout
	if err := r.dp.Sweep(ctx); err != nil {
		t.Fatal(err)
	}
	c, _ = r.dp.LBCounters(ctx, "lbtimeout")
	if got := activeAndInactive(r.table, c); got != 0 {
		t.Errorf("%d connection entries after the timeout, want 0", got)
	}
	if got := ask(); got == a {
		t.Errorf("flow still on %s after its entry expired (rr should move it)", got)
	}
}

func activeAndInactive(t *ipvs.Table, c ipvs.Counters) int {
	n := 0
	for _, s := range t.Services {
		for _, d := range s.Servers {
			sc := c.Server(d.ID)
			n += int(sc.ActiveConn + sc.InActConn)
		}
	}
	return n
}

// TestLBRestore20000UnderTraffic: restoring 20000 rules (5000 services, three real servers
// each) while a ping flood crosses the datapath loses no frame, and the new services work at
// once afterwards.
func TestLBRestore20000UnderTraffic(t *testing.T) {
	r := newLBRig(t, "lbrestore")
	var sb strings.Builder
	for i := range 4999 {
		svc := fmt.Sprintf("10.%d.%d.%d:80", 100+i/65536, (i/256)%256, i%256)
		fmt.Fprintf(&sb, "-A -t %s -s rr\n", svc)
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&sb, "-a -t %s -r 10.199.0.1%d:80 -m -w 1\n", svc, j)
		}
	}
	fmt.Fprintf(&sb, "-A -t %s:80 -s rr\n", vipAddr)
	for j := 1; j <= 3; j++ {
		fmt.Fprintf(&sb, "-a -t %s:80 -r 10.199.0.1%d:80 -m\n", vipAddr, j)
	}
	cmds, err := ipvs.ParseRestore(strings.NewReader(sb.String()))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.table.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if got := r.table.Rules(); got != 20000 {
		t.Fatalf("%d rules, want 20000", got)
	}
	var (
		wg     sync.WaitGroup
		tx, rx int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tx, rx = ping(t, r.sb.Host, "-c", "1000", "-i", "0.002", "-W", "2", r.sb.GuestAddr.Addr().String())
	}()
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	if err := r.dp.RestoreLB(context.Background(), r.ep.Sandbox, r.table); err != nil {
		t.Fatal(err)
	}
	t.Logf("restore of 20000 rules into the datapath: %v", time.Since(start))
	wg.Wait()
	if tx == 0 || rx != tx {
		t.Errorf("ping during the restore: %d of %d replies", rx, tx)
	}
	if got := r.tcpPick(t); !strings.HasPrefix(got, "10.199.0.1") {
		t.Errorf("VIP after the restore answered by %q", got)
	}
}

// restoreRules builds a restore file of 5000 services with three real servers each (20000
// rules), the last service being the rig's VIP; sched names the scheduler of service i.
func restoreRules(sched func(i int) string) string {
	return restoreRulesFamilies(sched, false)
}

// restoreRulesFamilies is restoreRules; with v6, every odd service and its real servers are
// IPv6.
func restoreRulesFamilies(sched func(i int) string, v6 bool) string {
	var sb strings.Builder
	for i := range 5000 {
		svc := fmt.Sprintf("10.%d.%d.%d:80", 100+i/65536, (i/256)%256, i%256)
		server := "10.199.0.1%d:80"
		if v6 && i%2 == 1 {
			svc = fmt.Sprintf("[fd00:100::%x]:80", i)
			server = "[fd00:5::1%d]:80"
		}
		if i == 4999 {
			svc = vipAddr + ":80"
			server = "10.199.0.1%d:80"
		}
		fmt.Fprintf(&sb, "-A -t %s -s %s\n", svc, sched(i))
		for j := 1; j <= 3; j++ {
			// Weights with long wrr periods (up to 65535/1): a service still takes one
			// entry per real server.
			w := []int{1, 4095, 65535}[(i+j)%3]
			if i == 4999 {
				w = 1
			}
			fmt.Fprintf(&sb, "-a -t %s -r "+server+" -m -w %d\n", svc, j, w)
		}
	}
	return sb.String()
}

// TestLBRestore20000EveryScheduler (issue 18 item 3): 20000 rules fit for any scheduler. sh
// and dh once took 257 service-map entries per service and failed near the 255th service;
// here 5000 sh services x 3 real servers are restored, then (after a clear) 5000 dh, then a mix
// of all ten schedulers, each switched in at once: the VIP answers through the new table and
// the maps hold exactly the new generation.
func TestLBRestore20000EveryScheduler(t *testing.T) {
	r := newLBRig(t, "lb20k")
	ctx := context.Background()
	lb := r.lbMaps(t)
	// Each restore's late write (the real servers of its rr and wrr services) is held while
	// the maps are checked and the VIP is reached.
	g := holdLate(t)
	g.release()
	for _, tt := range []struct {
		name  string
		sched func(int) string
		v6    bool
	}{
		{"sh", func(int) string { return "sh" }, false},
		{"dh", func(int) string { return "dh" }, false},
		{"mix", func(i int) string { return ipvs.Schedulers[i%len(ipvs.Schedulers)] }, false},
		// Half the services IPv6 (issue 12: the limit counts both families).
		{"mix-families", func(i int) string { return ipvs.Schedulers[(i/2)%len(ipvs.Schedulers)] }, true},
	} {
		// As kata-ipvs does: a restore needs an empty table, so clear first.
		r.table.Clear()
		if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
			t.Fatalf("%s: clear: %v", tt.name, err)
		}
		cmds, err := ipvs.ParseRestore(strings.NewReader(restoreRulesFamilies(tt.sched, tt.v6)))
		if err != nil {
			t.Fatal(err)
		}
		if err := r.table.Restore(cmds); err != nil {
			t.Fatal(err)
		}
		if got := r.table.Rules(); got != 20000 {
			t.Fatalf("%s: %d rules, want 20000", tt.name, got)
		}
		cfg, err := maps.ReadConfig(lb.Config)
		if err != nil {
			t.Fatal(err)
		}
		g.hold()
		start := time.Now()
		if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, r.table); err != nil {
			t.Fatalf("%s: restore of 20000 rules: %v", tt.name, err)
		}
		t.Logf("%s: restore of 20000 rules: %v", tt.name, time.Since(start))
		// Nothing a service other than IPv4 rr and wrr without persistence reads is deferred.
		checkBackends(t, lb, r.table, true, tt.name+": late write held")
		after, err := maps.ReadConfig(lb.Config)
		if err != nil {
			t.Fatal(err)
		}
		if after.LbGen != (cfg.LbGen+1)&0xff {
			t.Errorf("%s: generation %d -> %d, want one switch", tt.name, cfg.LbGen, after.LbGen)
		}
		// Exactly the new generation is left: a master per service, holding its three
		// slots (none for sh and dh), a bucket table per sh/dh service.
		var want maps.Budget
		for i := range 5000 {
			if tt.v6 && i%2 == 1 && i != 4999 {
				want.Masters6++
			} else {
				want.Slots++
			}
			if s := tt.sched(i); s == "sh" || s == "dh" {
				want.Buckets++
			}
		}
		if got, err := lb.Usage(); err != nil || got != want {
			t.Errorf("%s: maps hold %v (%v), want %v", tt.name, got, err, want)
		}
		if got := r.tcpPick(t); !strings.HasPrefix(got, "10.199.0.1") {
			t.Errorf("%s: VIP after the restore answered by %q", tt.name, got)
		}
		g.release()
		if _, err := r.dp.LBCounters(ctx, r.ep.Sandbox); err != nil { // waits for the late write
			t.Fatal(err)
		}
		checkBackends(t, lb, r.table, false, tt.name+": after the late write")
	}
}

// TestLBRestoreFailsWhole: a restore the maps cannot take is refused before anything is
// written, and one that fails halfway (the bucket map filled behind the dataplane's back)
// leaves no entry of its generation and no real server it added: the live table is intact.
func TestLBRestoreFailsWhole(t *testing.T) {
	r := newLBRig(t, "lbfail")
	ctx := context.Background()
	lb := r.lbMaps(t)
	r.ipvsadm(t, "-A -t "+vipAddr+":80 -s rr")
	r.ipvsadm(t, "-a -t "+vipAddr+":80 -r 10.199.0.11:80")
	live, err := lb.Usage()
	if err != nil {
		t.Fatal(err)
	}
	liveBE, err := lb.BackendIDs()
	if err != nil {
		t.Fatal(err)
	}
	sh := r.table.Clone() // ids go on from the live table's, as a restore's do
	sh.Clear()
	cmds, err := ipvs.ParseRestore(strings.NewReader(restoreRules(func(int) string { return "sh" })))
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.Restore(cmds); err != nil {
		t.Fatal(err)
	}

	// Junk of an unused generation takes all but 100 bucket tables. The dataplane does not
	// know about it, so its check passes and the batch write of the bucket tables fails.
	junk := make([]loader.DatapathLbSvcKey, 0, lb.Hash.MaxEntries())
	for i := range int(lb.Hash.MaxEntries()) - live.Buckets - 100 {
		junk = append(junk, loader.DatapathLbSvcKey{Vip: uint32(i + 1), Vport: 1, Proto: 6, Gen: 200, Slot: 1 << 16})
	}
	if _, err := lb.Hash.BatchUpdate(junk, make([]loader.DatapathLbHash, len(junk)), nil); err != nil {
		t.Fatal(err)
	}
	if err := r.dp.RestoreLB(ctx, r.ep.Sandbox, sh); err == nil {
		t.Fatal("restore into full maps succeeded")
	}
	if _, err := lb.Hash.BatchDelete(junk, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := lb.Usage(); err != nil || got != live {
		t.Errorf("after a failed restore the maps hold %v (%v), want the live %v", got, err, live)
	}
	if got, err := lb.BackendIDs(); err != nil || len(got) != len(liveBE) {
		t.Errorf("after a failed restore %d real servers (%v), want %d", len(got), err, len(liveBE))
	}
	if got := r.tcpPick(t); got != "10.199.0.11" {
		t.Errorf("VIP after a failed restore answered by %q", got)
	}

	// Junk in the service map the dataplane counts (after a restart it knows nothing): the
	// check refuses before writing.
	fresh, err := dataplane.NewWithOptions(r.root, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if err := fresh.EnsureSandbox(ctx, r.ep.Sandbox, r.sb.NS.Path()); err != nil {
		t.Fatal(err)
	}
	skeys := make([]loader.DatapathLbSvcKey, 0, lb.Svc.MaxEntries())
	for i := range int(lb.Svc.MaxEntries()) - live.Slots - 10 {
		skeys = append(skeys, loader.DatapathLbSvcKey{Vip: uint32(i + 1), Vport: 1, Proto: 6, Gen: 200})
	}
	if _, err := lb.Svc.BatchUpdate(skeys, make([]loader.DatapathLbSvc, len(skeys)), nil); err != nil {
		t.Fatal(err)
	}
	err = fresh.RestoreLB(ctx, r.ep.Sandbox, sh)
	if !errors.Is(err, maps.ErrNoRoom) {
		t.Errorf("restore beyond the room: %v, want ErrNoRoom", err)
	}
	if _, err := lb.Svc.BatchDelete(skeys, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := lb.Usage(); err != nil || got != live {
		t.Errorf("after a refused restore the maps hold %v (%v), want the live %v", got, err, live)
	}
}

// TestLBIPv6ThroughDevices (issue 12): an IPv6 kata-ipvs service reached from the guest with
// real TCP and UDP through the real devices (guest emulator, tap, BPF, veth), the replies
// un-NATed (the guest's connected sockets accept them from the VIP only), then cleanup with
// an IPv6 --orig-dst. Anti-spoofing and strict egress are off here: this test is about the
// load balancer, not about the IPv6 checks.
func TestLBIPv6ThroughDevices(t *testing.T) {
	r := newLBRig(t, "lb6")
	ctx := context.Background()
	host, guest := r.sb.Host, r.guest
	sh := func(n interface {
		Exec(...string) (string, error)
	}, args ...string) {
		t.Helper()
		if out, err := n.Exec(args...); err != nil {
			t.Fatalf("%v: %v %s", args, err, out)
		}
	}
	sh(host, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf."+r.sb.HostVeth.Name+".disable_ipv6=0")
	sh(guest, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.eth0.disable_ipv6=0")
	sh(guest, "ip", "-6", "addr", "add", "fd00:5::2/64", "dev", "eth0", "nodad")
	for _, a := range []string{"fd00:5::1", "fd00:5::11", "fd00:5::12"} {
		sh(host, "ip", "-6", "addr", "add", a+"/64", "dev", r.sb.HostVeth.Name, "nodad")
	}
	sh(guest, "ip", "-6", "neigh", "replace", "fd00:5::1", "lladdr", r.sb.HostVeth.MAC.String(), "dev", "eth0")
	sh(guest, "ip", "-6", "route", "add", "default", "via", "fd00:5::1", "dev", "eth0")
	sh(host, "ip", "-6", "neigh", "replace", "fd00:5::2", "lladdr", r.sb.GuestMAC.String(), "dev", r.sb.HostVeth.Name)
	ep := r.ep
	ep.AntiSpoof, ep.StrictEgress = false, false
	if err := r.dp.UpdateEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"fd00:5::11", "fd00:5::12"} {
		l, err := host.Listen("tcp", "["+a+"]:8080")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s\n", a)
				c.Close()
			}
		}()
		pc, err := host.ListenPacket("udp", "["+a+"]:5353")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				_, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo([]byte(a), from)
			}
		}()
	}
	r.ipvsadm(t, "-A -t [2001:db8::10]:80 -s rr")
	r.ipvsadm(t, "-a -t [2001:db8::10]:80 -r [fd00:5::11]:8080")
	r.ipvsadm(t, "-a -t [2001:db8::10]:80 -r [fd00:5::12]:8080")
	r.ipvsadm(t, "-A -u [2001:db8::10]:53 -s rr -p 60 -M 64")
	r.ipvsadm(t, "-a -u [2001:db8::10]:53 -r [fd00:5::12]:5353")

	seen := map[string]int{}
	for range 4 {
		c, err := guest.Dial("tcp", "[2001:db8::10]:80", 3*time.Second)
		if err != nil {
			t.Fatalf("TCP to the IPv6 VIP: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			t.Fatalf("TCP greeting: %v", err)
		}
		seen[strings.TrimSpace(line)]++
	}
	if seen["fd00:5::11"] != 2 || seen["fd00:5::12"] != 2 {
		t.Errorf("rr over two IPv6 real servers: %v, want 2 each", seen)
	}
	var c net.Conn
	if err := guest.Do(func() error {
		var err error
		c, err = net.Dial("udp", "[2001:db8::10]:53")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("q"))
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "fd00:5::12" {
		t.Fatalf("UDP answer through the IPv6 VIP: %q, %v", buf[:n], err)
	}
	out, err := r.table.Apply(ipvs.Command{Op: ipvs.OpList})
	if err != nil || !strings.Contains(out, "UDP  [2001:db8::10]:53 rr persistent 60 mask 64\n") {
		t.Errorf("listing: %v\n%s", err, out)
	}
	// cleanup --orig-dst 2001:db8::10 --protonum udp deletes the UDP connection.
	deleted, err := r.dp.CleanupConns(ctx, r.ep.Sandbox, netip.MustParseAddr("2001:db8::10"), 17)
	if err != nil || deleted != 1 {
		t.Errorf("cleanup of the IPv6 VIP: %d deleted (%v), want 1", deleted, err)
	}
}
