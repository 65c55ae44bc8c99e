package ipvs

import (
	"math/rand"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// kernelWRR is a line-by-line model of ip_vs_wrr.c (init_svc,
// dest_changed, schedule) with unreduced weights, to check WRRSequence.
type kernelWRR struct {
	w              []int // kernel order
	cl, cw, mw, di int   // cl -1 is the list head
}

func newKernelWRR() *kernelWRR {
	k := &kernelWRR{cl: -1}
	k.di = k.gcd()
	k.mw = k.max() - (k.di - 1)
	k.cw = k.mw
	return k
}

func (k *kernelWRR) gcd() int {
	g := 0
	for _, w := range k.w {
		if w > 0 {
			g = gcd(g, w)
		}
	}
	if g == 0 {
		return 1
	}
	return g
}

func (k *kernelWRR) max() int {
	m := 0
	for _, w := range k.w {
		m = max(m, w)
	}
	return m
}

func (k *kernelWRR) add(w int) {
	k.w = append([]int{w}, k.w...)
	k.changed()
}

func (k *kernelWRR) changed() {
	k.cl = -1
	k.di = k.gcd()
	k.mw = k.max() - (k.di - 1)
	if k.cw > k.mw || k.cw == 0 {
		k.cw = k.mw
	} else if k.di > 1 {
		k.cw = (k.cw/k.di)*k.di + 1
	}
}

func (k *kernelWRR) schedule() int {
	dest := k.cl
	if k.mw == 0 {
		return -1
	}
	last, stop := dest, -2
	lastPass, restarted := false, false
	for {
		for dest = dest + 1; dest < len(k.w); dest++ {
			if k.w[dest] >= k.cw {
				k.cl = dest
				return dest
			}
			if dest == stop {
				k.cl = dest
				return -1
			}
		}
		dest = -1
		k.cw -= k.di
		if k.cw <= 0 {
			k.cw = k.mw
			if lastPass || last == -1 {
				k.cl = dest
				return -1
			}
			restarted = true
		}
		lastPass = k.cw <= k.di
		if lastPass && restarted && last != -1 {
			stop = last
		}
	}
}

func TestWRRSequenceSpecFact(t *testing.T) {
	// Weights 1, 2, 3 added in that order: kernel order 3, 2, 1.
	got := WRRSequence([]int{3, 2, 1})
	// Picks 3, 2, 1, 3, 3, 2 (indices of servers 3, 2, 1 are 0, 1, 2).
	if diff := cmp.Diff([]int{0, 1, 2, 0, 0, 1}, got); diff != "" {
		t.Errorf("WRRSequence (-want +got):\n%s", diff)
	}
	if got := WRRSequence([]int{0, 0}); len(got) != 0 {
		t.Errorf("all weight 0: %v, want empty", got)
	}
	if diff := cmp.Diff([]int{0, 2, 0}, WRRSequence([]int{200, 0, 100})); diff != "" {
		t.Errorf("gcd reduction, weight 0 (-want +got):\n%s", diff)
	}
}

// TestWRRSequenceMatchesKernel adds servers one by one to the kernel model
// and compares its first picks with the sequence repeated.
func TestWRRSequenceMatchesKernel(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for trial := 0; trial < 300; trial++ {
		n := 1 + r.Intn(6)
		scale := []int{1, 1, 3, 100}[r.Intn(4)]
		k := newKernelWRR()
		for i := 0; i < n; i++ {
			w := r.Intn(6) * scale
			if r.Intn(5) == 0 {
				w = 0
			}
			k.add(w)
		}
		seq := WRRSequence(k.w)
		if len(seq) == 0 {
			if got := k.schedule(); got != -1 {
				t.Fatalf("weights %v: kernel picked %d, sequence empty", k.w, got)
			}
			continue
		}
		for i := 0; i < 3*len(seq); i++ {
			if got, want := k.schedule(), seq[i%len(seq)]; got != want {
				t.Fatalf("weights %v: pick %d: kernel %d, sequence %d (%v)", k.w, i, got, want, seq)
			}
		}
	}
}

func TestWRRSequenceBounded(t *testing.T) {
	w := []int{65535, 1, 30000, 7}
	seq := WRRSequence(w)
	if len(seq) > MaxSequence || len(seq) == 0 {
		t.Fatalf("len = %d", len(seq))
	}
	count := make([]int, len(w))
	for _, i := range seq {
		count[i]++
	}
	for i, c := range count {
		if c == 0 {
			t.Errorf("server %d (weight %d) never picked", i, w[i])
		}
	}
	// Shares within 0.2% of exact for the heavy servers.
	total := 65535.0 + 1 + 30000 + 7
	for _, i := range []int{0, 2} {
		got, want := float64(count[i])/float64(len(seq)), float64(w[i])/total
		if d := got - want; d > 0.002 || d < -0.002 {
			t.Errorf("server %d share %.4f, want %.4f", i, got, want)
		}
	}
}

func TestRRSequenceThroughTable(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 10.0.0.1:80 -s rr",
		"-a -t 10.0.0.1:80 -r 10.1.0.1",
		"-a -t 10.0.0.1:80 -r 10.1.0.2",
		"-a -t 10.0.0.1:80 -r 10.1.0.3",
		"-a -t 10.0.0.1:80 -r 10.1.0.4 -w 0",
	)
	s, _ := tb.Service(ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:80")})
	var w []int
	for _, d := range s.Servers {
		w = append(w, d.Weight)
	}
	var got []string
	for _, i := range RRSequence(w) {
		got = append(got, s.Servers[i].Addr.Addr().String())
	}
	if diff := cmp.Diff([]string{"10.1.0.3", "10.1.0.2", "10.1.0.1"}, got); diff != "" {
		t.Errorf("rr picks (-want +got):\n%s", diff)
	}
}

func TestHashTables(t *testing.T) {
	sh := HashTable([]int{2, 1, 0})
	// Server 0 fills two buckets, server 1 one, server 2 one (weight 0:
	// unavailable), then around again.
	want := []int{0, 0, 1, -1, 0, 0, 1, -1}
	if diff := cmp.Diff(want, sh[:8]); diff != "" {
		t.Errorf("HashTable (-want +got):\n%s", diff)
	}
	if sh[255] != []int{0, 0, 1, -1}[255%4] {
		t.Errorf("bucket 255 = %d", sh[255])
	}
	for i, d := range HashTable([]int{300, 1}) {
		if d != 0 {
			t.Fatalf("weight 300 should fill every bucket; bucket %d = %d", i, d)
		}
	}
	for _, tab := range [][TableSize]int{HashTable(nil), DHTable(nil)} {
		for i, d := range tab {
			if d != -1 {
				t.Fatalf("empty service: bucket %d = %d", i, d)
			}
		}
	}
	dh := DHTable([]int{5, 0, 1})
	if diff := cmp.Diff([]int{0, -1, 2, 0, -1, 2}, dh[:6]); diff != "" {
		t.Errorf("DHTable (-want +got):\n%s", diff)
	}
	// Even weights: every server gets its share of buckets.
	count := map[int]int{}
	for _, d := range HashTable([]int{1, 1, 1, 1}) {
		count[d]++
	}
	if diff := cmp.Diff(map[int]int{0: 64, 1: 64, 2: 64, 3: 64}, count); diff != "" {
		t.Errorf("bucket shares (-want +got):\n%s", diff)
	}
}

func TestHashes(t *testing.T) {
	tests := []struct {
		addr   string
		sh, dh uint8
	}{
		{"0.0.0.1", 0x61, 0xb1},
		{"10.0.0.1", 39, 177},
		{"192.168.1.77", 144, 61},
		{"172.17.0.4", 37, 196},
		{"1.2.3.4", 52, 196},
	}
	for _, tt := range tests {
		a := netip.MustParseAddr(tt.addr)
		if got := SHHash(a); got != tt.sh {
			t.Errorf("SHHash(%s) = %d, want %d", a, got, tt.sh)
		}
		if got := DHHash(a); got != tt.dh {
			t.Errorf("DHHash(%s) = %d, want %d", a, got, tt.dh)
		}
	}
}

func TestLeastConnectionFamily(t *testing.T) {
	tests := []struct {
		name             string
		servers          []Load
		lc, wlc, sed, nq int
	}{
		{"empty", nil, -1, -1, -1, -1},
		{"all quiesced", []Load{{Weight: 0}, {Weight: 0}}, -1, -1, -1, -1},
		{"tie goes to kernel order", []Load{{Weight: 1}, {Weight: 1}, {Weight: 1}}, 0, 0, 0, 0},
		{"skip weight 0", []Load{{Weight: 0}, {Weight: 1, Active: 5}, {Weight: 1, Active: 5}}, 1, 1, 1, 1},
		{"overhead 256 per active", []Load{{Weight: 1, Active: 1}, {Weight: 1, Inactive: 255}}, 1, 1, 1, 1},
		{"inactive counts, except for sed and nq", []Load{{Weight: 1, Inactive: 300}, {Weight: 1, Active: 1}}, 1, 1, 0, 0},
		{"weighted", []Load{{Weight: 1, Active: 1}, {Weight: 3, Active: 2}}, 0, 1, 1, 1},
		{"sed vs wlc", []Load{{Weight: 1, Active: 0}, {Weight: 10, Active: 1}}, 0, 0, 1, 0},
		{"nq takes the first idle", []Load{{Weight: 10, Active: 1}, {Weight: 1, Active: 3}, {Weight: 1}}, 2, 2, 0, 2},
	}
	for _, tt := range tests {
		got := []int{LC(tt.servers), WLC(tt.servers), SED(tt.servers), NQ(tt.servers)}
		if diff := cmp.Diff([]int{tt.lc, tt.wlc, tt.sed, tt.nq}, got); diff != "" {
			t.Errorf("%s: lc, wlc, sed, nq (-want +got):\n%s", tt.name, diff)
		}
	}
}

func TestLBLC(t *testing.T) {
	c := NewLBLC()
	now := time.Unix(1000, 0)
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	servers := []Load{{ID: 10, Weight: 1}, {ID: 11, Weight: 1}}
	if got := c.Schedule(a, servers, now); got != 0 {
		t.Fatalf("first pick %d, want 0", got)
	}
	servers[0].Active = 1 // no longer least loaded, but a sticks
	if got := c.Schedule(a, servers, now); got != 0 {
		t.Errorf("a moved to %d", got)
	}
	if got := c.Schedule(b, servers, now); got != 1 {
		t.Errorf("b = %d, want 1 (least loaded)", got)
	}
	// Overloaded: more active than weight while another is under half.
	servers[0].Active = 2
	servers[1].Weight = 4
	if got := c.Schedule(a, servers, now); got != 1 {
		t.Errorf("overloaded: a = %d, want 1", got)
	}
	// Quiesced: moves away; server order changes do not matter (by id).
	servers = []Load{{ID: 11, Weight: 0}, {ID: 10, Weight: 1}}
	if got := c.Schedule(a, servers, now); got != 1 {
		t.Errorf("quiesced: a = %d, want 1", got)
	}
	// Expired entries are forgotten.
	servers = []Load{{ID: 11, Weight: 1}, {ID: 10, Weight: 1, Active: 1}}
	if got := c.Schedule(a, servers, now.Add(25*time.Hour)); got != 0 {
		t.Errorf("after expiry a = %d, want 0", got)
	}
}

func TestLBLCR(t *testing.T) {
	c := NewLBLCR()
	now := time.Unix(1000, 0)
	a := netip.MustParseAddr("10.0.0.1")
	servers := []Load{{ID: 1, Weight: 1}, {ID: 2, Weight: 4}}
	if got := c.Schedule(a, servers, now); got != 0 {
		t.Fatalf("first pick %d, want 0", got)
	}
	servers[0].Active = 2 // overloaded (2 > 1, and server 2 is idle)
	if got := c.Schedule(a, servers, now); got != 1 {
		t.Fatalf("overloaded pick %d, want 1", got)
	}
	if diff := cmp.Diff([]uint32{2, 1}, c.entries[a].ids); diff != "" {
		t.Errorf("set (-want +got):\n%s", diff)
	}
	// The set's least loaded member wins now.
	servers[0].Active = 0
	servers[1].Active = 3
	if got := c.Schedule(a, servers, now); got != 0 {
		t.Errorf("set min = %d, want 0", got)
	}
	// After the expiration, the most loaded member leaves the set.
	c.Schedule(a, servers, now.Add(23*time.Hour))
	later := now.Add(23*time.Hour + 2*time.Hour)
	if got := c.Schedule(a, servers, later); got != 0 {
		t.Errorf("pick after shrink = %d", got)
	}
	if diff := cmp.Diff([]uint32{1}, c.entries[a].ids); diff != "" {
		t.Errorf("set after expiration (-want +got):\n%s", diff)
	}
}

func TestPersistenceKey(t *testing.T) {
	tests := []struct{ src, mask, want string }{
		{"10.1.2.3", "255.255.255.255", "10.1.2.3"},
		{"10.1.2.3", "255.255.255.0", "10.1.2.0"},
		{"10.1.2.3", "255.0.255.0", "10.0.2.0"},
		{"10.1.2.3", "0.0.0.0", "0.0.0.0"},
	}
	for _, tt := range tests {
		got := PersistenceKey(netip.MustParseAddr(tt.src), netip.MustParseAddr(tt.mask))
		if got.String() != tt.want {
			t.Errorf("PersistenceKey(%s, %s) = %s, want %s", tt.src, tt.mask, got, tt.want)
		}
	}
}

func TestServiceTables(t *testing.T) {
	s := Service{Servers: []Server{{Weight: 3}, {Weight: 2}, {Weight: 1}}}
	for _, tt := range []struct {
		sched   string
		seq     []int
		buckets bool
	}{
		{"rr", []int{0, 1, 2}, false},
		{"wrr", []int{0, 1, 2, 0, 0, 1}, false},
		{"sh", nil, true},
		{"dh", nil, true},
		{"wlc", nil, false},
		{"lblcr", nil, false},
	} {
		s.Scheduler = tt.sched
		got := s.Tables()
		if diff := cmp.Diff(tt.seq, got.Sequence); diff != "" {
			t.Errorf("%s: Sequence (-want +got):\n%s", tt.sched, diff)
		}
		if (got.Buckets != nil) != tt.buckets {
			t.Errorf("%s: Buckets = %v", tt.sched, got.Buckets)
		}
	}
	s.Scheduler = "sh"
	if b := s.Tables().Buckets; b[0] != 0 || b[3] != 1 || b[5] != 2 || b[6] != 0 {
		t.Errorf("sh buckets start %v", b[:8])
	}
}

// An IPv6 address hashes as IPVS hashes it: its four words XORed, then as an IPv4 address.
func TestHashIPv6Folds(t *testing.T) {
	a := netip.MustParseAddr("2001:db8::a:1")
	folded := netip.MustParseAddr("32.11.13.185") // 0x20010db8 ^ 0 ^ 0 ^ 0x000a0001
	if SHHash(a) != SHHash(folded) || DHHash(a) != DHHash(folded) {
		t.Errorf("%s hashes to sh %d dh %d, its fold %s to sh %d dh %d", a, SHHash(a), DHHash(a), folded, SHHash(folded), DHHash(folded))
	}
	if got := PersistenceKey(netip.MustParseAddr("2001:db8::a:1"), netip.MustParseAddr("ffff:ffff:ffff:ffff::")); got != netip.MustParseAddr("2001:db8::") {
		t.Errorf("v6 persistence key %s", got)
	}
	if got := PersistenceKey(netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("255.255.0.0")); got != netip.MustParseAddr("10.1.0.0") {
		t.Errorf("v4 persistence key %s", got)
	}
}
