package ipvs

import (
	"net/netip"
	"time"
)

// This file holds the scheduler mathematics the BPF datapath implements:
// precomputed tables for the stateless-per-packet schedulers (rr, wrr, sh,
// dh) and reference implementations of the load-based ones (lc, wlc, sed,
// nq, lblc, lblcr) to check the datapath against. Every function takes the
// real servers of one service in kernel order (newest first, the order of
// Service.Servers) and answers with indices into that slice.

// MaxSequence bounds the length of a WRRSequence.
const MaxSequence = 4096

// TableSize is the number of buckets of the sh and dh tables (IPVS's
// IP_VS_SH_TAB_SIZE and IP_VS_DH_TAB_SIZE, 2^8).
const TableSize = 256

// RRSequence returns the picks of IPVS's rr over servers with the given
// weights, in kernel order: every server of weight > 0 once, in list
// order (servers added 1, 2, 3 are picked 3, 2, 1, 3, 2, 1, ...). The
// datapath picks sequence[n % len] for its n-th new connection. Empty
// when no server has weight > 0 (no destination: the connection is
// refused).
func RRSequence(weights []int) []int {
	var seq []int
	for i, w := range weights {
		if w > 0 {
			seq = append(seq, i)
		}
	}
	return seq
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// WRRWeights returns what the datapath's wrr walks: the weights divided by the gcd of the
// positive ones (IPVS's di; weight 0 stays 0) and the largest of them (IPVS's mw, 0 when no
// server has weight > 0). The datapath runs ip_vs_wrr_schedule's state machine over the
// servers in kernel order with these weights, from the state WRRSequence starts from, so its
// picks are WRRSequence's, without the scaling WRRSequence applies to long periods.
func WRRWeights(weights []int) (reduced []int, mw int) {
	g := 0
	for _, x := range weights {
		if x > 0 {
			g = gcd(g, x)
		}
	}
	reduced = make([]int, len(weights))
	for i, x := range weights {
		if x > 0 {
			reduced[i] = x / g
			mw = max(mw, reduced[i])
		}
	}
	return reduced, mw
}

// WRRSequence returns one period of IPVS's wrr picks (ip_vs_wrr.c) over
// servers with the given weights, in kernel order; the datapath picks
// sequence[n % len] for its n-th new connection.
//
// It runs the kernel's algorithm from the state a service has after its
// servers were added one by one (cursor at the list head, current weight
// 1: the first add sets it to 1 and later adds keep it). The picks are then
// periodic from the first one: a pass over every server of weight >= 1,
// then IPVS's interleave from the largest weight down (weights 1, 2, 3
// added in that order, kernel order 3, 2, 1, give 3, 2, 1, 3, 3, 2 and
// repeat). A period is sum(w)/gcd(w) picks long, each server appearing
// w/gcd times; weight 0 is never picked.
//
// Approximation: when sum(w)/gcd(w) exceeds MaxSequence, the weights are
// scaled to fit (w' = max(1, w*(MaxSequence-n)/sum) for the n servers of
// weight > 0), which keeps the shares within about n/MaxSequence of
// exact and the interleave's shape. With more than MaxSequence servers of
// weight > 0 the result is RRSequence.
func WRRSequence(weights []int) []int {
	w := make([]int, len(weights))
	sum, n, g := 0, 0, 0
	for i, x := range weights {
		if x > 0 {
			w[i] = x
			sum += x
			n++
			g = gcd(g, x)
		}
	}
	if n == 0 {
		return nil
	}
	if n > MaxSequence {
		return RRSequence(weights)
	}
	if sum/g > MaxSequence {
		budget := MaxSequence - n
		g = 0
		for i, x := range w {
			if x > 0 {
				w[i] = max(1, x*budget/sum)
				g = gcd(g, w[i])
			}
		}
	}
	maxw, total := 0, 0
	for i := range w {
		w[i] /= g
		maxw = max(maxw, w[i])
		total += w[i]
	}
	// The kernel's state: cl (pos, -1 = list head), cw; di = 1 and
	// mw = max after the reduction by the gcd.
	seq := make([]int, 0, total)
	pos, cw := -1, 1
	for len(seq) < total {
		pos++
		if pos == len(w) {
			pos = -1
			if cw--; cw <= 0 {
				cw = maxw
			}
			continue
		}
		if w[pos] >= cw {
			seq = append(seq, pos)
		}
	}
	return seq
}

// SHHash is the bucket of source address a in the sh table, exactly as
// ip_vs_sh_hashkey computes it for a service without the sh-port flag:
// hash_32(ntohl(saddr), 8) with the kernel's GOLDEN_RATIO_32 (an IPv6
// address is first folded to one word, see hostOrder), in C for IPv4
//
//	__u8 b = (__u32)(bpf_ntohl(saddr) * 0x61C88647U) >> 24;
func SHHash(a netip.Addr) uint8 {
	return uint8((hostOrder(a) * 0x61C88647) >> 24)
}

// DHHash is the bucket of destination address a in the dh table, exactly
// as ip_vs_dh_hashkey computes it (IPv6 folded, see hostOrder), in C for IPv4
//
//	__u8 b = (__u32)(bpf_ntohl(daddr) * 2654435761U) & 0xff;
//
// The destination of a packet to a VIP:port service is the VIP, so dh
// (like IPVS's) sends every connection of a service to one real server.
func DHHash(a netip.Addr) uint8 {
	return uint8(hostOrder(a) * 2654435761)
}

// HashTable returns the sh bucket table for servers with the given weights
// in kernel order (ip_vs_sh_reassign): walking the list from its head, each
// server fills as many consecutive buckets as its weight (at least one),
// wrapping around the list until all 256 are filled. A bucket is the index
// of its server, or -1 when the service has no server or the bucket's
// server has weight 0 (IPVS then finds no destination and refuses the
// connection; it does not fall back to another bucket).
func HashTable(weights []int) [TableSize]int {
	var t [TableSize]int
	n := len(weights)
	p, count := 0, 0
	for i := range t {
		if n == 0 {
			t[i] = -1
			continue
		}
		t[i] = p
		if count++; count >= weights[p] {
			p, count = (p+1)%n, 0
		}
	}
	return unavailable(t, weights)
}

// DHTable returns the dh bucket table (ip_vs_dh_reassign): the servers in
// kernel order, round robin over the 256 buckets, weights ignored except
// that a bucket whose server has weight 0 is -1 (no destination), as is
// every bucket of a service without servers.
func DHTable(weights []int) [TableSize]int {
	var t [TableSize]int
	for i := range t {
		t[i] = -1
		if len(weights) > 0 {
			t[i] = i % len(weights)
		}
	}
	return unavailable(t, weights)
}

func unavailable(t [TableSize]int, weights []int) [TableSize]int {
	for i, d := range t {
		if d >= 0 && weights[d] <= 0 {
			t[i] = -1
		}
	}
	return t
}

// Load is what the load-based schedulers know of a real server.
type Load struct {
	ID       uint32 // Server.ID, for the lblc/lblcr caches
	Weight   int
	Active   int // ActiveConn
	Inactive int // InActConn
}

// Overhead is IPVS's ip_vs_dest_conn_overhead: active*256 + inactive.
func Overhead(l Load) int64 { return int64(l.Active)<<8 + int64(l.Inactive) }

// LC is ip_vs_lc: the server of weight > 0 with the least Overhead; ties
// go to the first in kernel order. -1 when no server has weight > 0.
func LC(servers []Load) int {
	least := -1
	for i, s := range servers {
		if s.Weight == 0 {
			continue
		}
		if least < 0 || Overhead(s) < Overhead(servers[least]) {
			least = i
		}
	}
	return least
}

// weighted is the shared loop of wlc, sed and lblc: the first server of
// weight > 0, then any later one whose overhead per weight is strictly
// smaller (compared crosswise, in 64 bits, as the kernel does).
func weighted(servers []Load, oh func(Load) int64) int {
	least := -1
	for i, s := range servers {
		if least < 0 {
			if s.Weight > 0 {
				least = i
			}
			continue
		}
		l := servers[least]
		if oh(l)*int64(s.Weight) > oh(s)*int64(l.Weight) {
			least = i
		}
	}
	return least
}

// WLC is ip_vs_wlc: the least Overhead/Weight, ties to the first in kernel
// order. -1 when no server has weight > 0.
func WLC(servers []Load) int { return weighted(servers, Overhead) }

// SED is ip_vs_sed: the least (Active+1)/Weight, ties to the first in
// kernel order.
func SED(servers []Load) int {
	return weighted(servers, func(l Load) int64 { return int64(l.Active) + 1 })
}

// NQ is ip_vs_nq: the first idle server (Active == 0) of weight > 0 in
// kernel order if any, else as SED.
func NQ(servers []Load) int {
	least := -1
	for i, s := range servers {
		if s.Weight == 0 {
			continue
		}
		if s.Active == 0 {
			return i
		}
		if least < 0 {
			least = i
			continue
		}
		l := servers[least]
		if (int64(l.Active)+1)*int64(s.Weight) > (int64(s.Active)+1)*int64(l.Weight) {
			least = i
		}
	}
	return least
}

// overloaded is lblc's and lblcr's is_overloaded: more active connections
// than weight while some server runs at less than half its weight.
func overloaded(servers []Load, i int) bool {
	if servers[i].Active <= servers[i].Weight {
		return false
	}
	for _, s := range servers {
		if s.Active*2 < s.Weight {
			return true
		}
	}
	return false
}

func indexOf(servers []Load, id uint32) int {
	for i, s := range servers {
		if s.ID == id {
			return i
		}
	}
	return -1
}

// DefaultLocalityExpiration is the kernel's default for the
// lblc_expiration and lblcr_expiration sysctls.
const DefaultLocalityExpiration = 24 * time.Hour

// LBLC is a reference model of ip_vs_lblc for one service: each
// destination address sticks to the server it was last given while that
// server has weight > 0 and is not overloaded; otherwise (and the first
// time) the server is chosen as by WLC and remembered. An entry unused for
// Expiration is forgotten (the kernel collects such entries lazily, so
// this bound is approximate). The destination is the VIP for a VIP:port
// service.
type LBLC struct {
	Expiration time.Duration
	entries    map[netip.Addr]locality
}

type locality struct {
	ids     []uint32 // lblc: one; lblcr: the set, newest first
	lastUse time.Time
	lastMod time.Time
}

// NewLBLC returns an LBLC with the kernel's default expiration.
func NewLBLC() *LBLC { return &LBLC{Expiration: DefaultLocalityExpiration} }

// Schedule returns the index of the server for a new connection to dst at
// time now, or -1 when no server has weight > 0.
func (c *LBLC) Schedule(dst netip.Addr, servers []Load, now time.Time) int {
	if c.entries == nil {
		c.entries = map[netip.Addr]locality{}
	}
	if e, ok := c.entries[dst]; ok && now.Sub(e.lastUse) <= c.Expiration {
		e.lastUse = now
		c.entries[dst] = e
		if i := indexOf(servers, e.ids[0]); i >= 0 && servers[i].Weight > 0 && !overloaded(servers, i) {
			return i
		}
	}
	i := WLC(servers)
	if i >= 0 {
		c.entries[dst] = locality{ids: []uint32{servers[i].ID}, lastUse: now, lastMod: now}
	}
	return i
}

// LBLCR is a reference model of ip_vs_lblcr for one service: each
// destination address has a set of servers; a connection goes to the
// member with the least Overhead/Weight unless it is overloaded, in which
// case a server chosen as by WLC joins the set and gets it. A set of more
// than one that has not changed for Expiration loses its most loaded
// member. Entries unused for Expiration are forgotten.
type LBLCR struct {
	Expiration time.Duration
	entries    map[netip.Addr]*locality
}

// NewLBLCR returns an LBLCR with the kernel's default expiration.
func NewLBLCR() *LBLCR { return &LBLCR{Expiration: DefaultLocalityExpiration} }

// Schedule returns the index of the server for a new connection to dst at
// time now, or -1 when no server has weight > 0.
func (c *LBLCR) Schedule(dst netip.Addr, servers []Load, now time.Time) int {
	if c.entries == nil {
		c.entries = map[netip.Addr]*locality{}
	}
	e, ok := c.entries[dst]
	if ok && now.Sub(e.lastUse) > c.Expiration {
		delete(c.entries, dst)
		ok = false
	}
	if !ok {
		i := WLC(servers)
		if i >= 0 {
			c.entries[dst] = &locality{ids: []uint32{servers[i].ID}, lastUse: now, lastMod: now}
		}
		return i
	}
	e.lastUse = now
	d := setMin(e.ids, servers)
	if len(e.ids) > 1 && now.Sub(e.lastMod) > c.Expiration {
		if m := setMax(e.ids, servers); m >= 0 {
			e.ids = append(e.ids[:m:m], e.ids[m+1:]...)
			e.lastMod = now
		}
	}
	if d >= 0 && !overloaded(servers, d) {
		return d
	}
	i := WLC(servers)
	if i < 0 {
		return -1
	}
	if indexOfID(e.ids, servers[i].ID) < 0 {
		e.ids = append([]uint32{servers[i].ID}, e.ids...)
		e.lastMod = now
	}
	return i
}

func indexOfID(ids []uint32, id uint32) int {
	for i, x := range ids {
		if x == id {
			return i
		}
	}
	return -1
}

// setMin is ip_vs_dest_set_min: the member (present, weight > 0) with the
// least Overhead/Weight, ties to the newest member. It returns a server
// index or -1.
func setMin(ids []uint32, servers []Load) int {
	least := -1
	for _, id := range ids {
		i := indexOf(servers, id)
		if i < 0 {
			continue
		}
		s := servers[i]
		if least < 0 {
			if s.Weight > 0 {
				least = i
			}
			continue
		}
		l := servers[least]
		if Overhead(l)*int64(s.Weight) > Overhead(s)*int64(l.Weight) {
			least = i
		}
	}
	return least
}

// setMax is ip_vs_dest_set_max: the position in ids of the member of
// weight > 0 with the greatest Overhead/Weight, or -1.
func setMax(ids []uint32, servers []Load) int {
	most := -1
	var m Load
	for k, id := range ids {
		i := indexOf(servers, id)
		if i < 0 || servers[i].Weight <= 0 {
			continue
		}
		s := servers[i]
		if most < 0 || Overhead(m)*int64(s.Weight) < Overhead(s)*int64(m.Weight) {
			most, m = k, s
		}
	}
	return most
}

// PersistenceKey is the client identity of a persistent service: the
// source address masked by the service's netmask (-M). Connections whose
// keys are equal stick to one real server.
func PersistenceKey(src, netmask netip.Addr) netip.Addr {
	if !src.IsValid() || src.BitLen() != netmask.BitLen() {
		return src
	}
	s, m := src.AsSlice(), netmask.AsSlice()
	for i := range s {
		s[i] &= m[i]
	}
	k, _ := netip.AddrFromSlice(s)
	return k
}

// Weights returns the weights of the service's real servers in kernel
// order, the input of the scheduler functions.
func (s *Service) Weights() []int {
	w := make([]int, len(s.Servers))
	for i, d := range s.Servers {
		w[i] = d.Weight
	}
	return w
}

// Tables are the precomputed scheduler tables of a service, with indices
// into its Servers (kernel order).
type Tables struct {
	// Sequence (rr, wrr): the n-th new connection goes to
	// Servers[Sequence[n%len(Sequence)]]; empty means no destination.
	Sequence []int
	// Buckets (sh, dh): a new connection goes to Servers[Buckets[h]],
	// h = SHHash(source) for sh, DHHash(destination) for dh; -1 means no
	// destination.
	Buckets *[TableSize]int
}

// Tables returns the service's scheduler tables: a Sequence for rr and
// wrr, Buckets for sh and dh, nothing for the load-based schedulers (lc,
// wlc, sed, nq, lblc, lblcr), which choose per connection from the live
// counts (see LC, WLC, SED, NQ, LBLC, LBLCR).
func (s *Service) Tables() Tables {
	w := s.Weights()
	switch s.Scheduler {
	case "rr":
		return Tables{Sequence: RRSequence(w)}
	case "wrr":
		return Tables{Sequence: WRRSequence(w)}
	case "sh":
		b := HashTable(w)
		return Tables{Buckets: &b}
	case "dh":
		b := DHTable(w)
		return Tables{Buckets: &b}
	}
	return Tables{}
}
