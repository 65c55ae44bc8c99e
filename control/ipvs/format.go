package ipvs

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Stats are the traffic counters of a service or real server, as IPVS
// keeps them (ip_vs_stats): totals and the estimator's rates per second.
type Stats struct {
	Conns, InPkts, OutPkts, InBytes, OutBytes uint64
	CPS, InPPS, OutPPS, InBPS, OutBPS         uint64
}

// ServiceCounters are the live counters of a virtual service.
type ServiceCounters struct {
	Stats
}

// ServerCounters are the live counters of a real server. ActiveConn counts
// its established TCP connections; InActConn its other connection entries
// (TCP in other states, UDP), as IPVS counts them.
type ServerCounters struct {
	ActiveConn, InActConn uint32
	Stats
}

// Counters gives the datapath's live counts for the listings, by the ids
// of the table. Unknown ids give zeros.
type Counters interface {
	Service(id uint32) ServiceCounters
	Server(id uint32) ServerCounters
}

// Format selects a listing layout.
type Format int

// Listing layouts (ipvsadm -L, -L --stats, -L --rate). Stats wins over
// Rate when both are given, as in ipvsadm.
const (
	FormatPlain Format = iota
	FormatStats
	FormatRate
)

func format(c Command) Format {
	switch {
	case c.Stats:
		return FormatStats
	case c.Rate:
		return FormatRate
	}
	return FormatPlain
}

// Header is ipvsadm's first line of a full listing, for the kernel's IPVS
// 1.2.1 with its default connection table size.
const Header = "IP Virtual Server version 1.2.1 (size=4096)\n"

// List returns what "ipvsadm -L -n" (with --stats or --rate for those
// formats) prints for the table, byte for byte.
func (t *Table) List(f Format, c Counters) string {
	var b strings.Builder
	b.WriteString(Header)
	title(&b, f)
	for _, s := range t.sortedServices() {
		entry(&b, s, f, c)
	}
	return b.String()
}

// ListService returns what "ipvsadm -L -n -t|-u service" prints (no
// version header), or ErrNoService (ipvsadm exits 1).
func (t *Table) ListService(k ServiceKey, f Format, c Counters) (string, error) {
	s, ok := t.idx()[k]
	if !ok {
		e := failErr(ErrNoService, k.String())
		e.Code = 1
		return "", e
	}
	var b strings.Builder
	title(&b, f)
	entry(&b, s, f, c)
	return b.String(), nil
}

// ListTimeout returns what "ipvsadm -L --timeout" prints.
func (t *Table) ListTimeout() string {
	to := t.Timeouts()
	return fmt.Sprintf("Timeout (tcp tcpfin udp): %d %d %d\n", to.TCP, to.TCPFin, to.UDP)
}

// Save returns what "ipvsadm -S -n" prints: restore lines in the
// listing's order.
func (t *Table) Save() string {
	var b strings.Builder
	for _, s := range t.sortedServices() {
		name := s.ServiceKey.String()
		fmt.Fprintf(&b, "-A %s -s %s", name, s.Scheduler)
		if s.Persistent != 0 {
			fmt.Fprintf(&b, " -p %d", s.Persistent)
			if m, ok := shownMask(s); ok {
				fmt.Fprintf(&b, " -M %s", m)
			}
		}
		b.WriteByte('\n')
		for _, d := range sortedServers(s) {
			fmt.Fprintf(&b, "-a %s -r %s -m -w %d\n", name, d.Addr, d.Weight)
		}
	}
	return b.String()
}

// shownMask returns a persistent service's netmask as ipvsadm prints it, unless it is the
// default: a dotted quad for IPv4 (not 255.255.255.255), a prefix length for IPv6 (not 128).
func shownMask(s *Service) (string, bool) {
	m := s.Netmask
	switch {
	case !m.IsValid():
		return "", false
	case m.Is6():
		n := PrefixLen(m)
		return strconv.Itoa(n), n != 128
	}
	return m.String(), m != hostMask
}

func title(b *strings.Builder, f Format) {
	switch f {
	case FormatStats:
		fmt.Fprintf(b, "%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n",
			"Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes")
	case FormatRate:
		fmt.Fprintf(b, "%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n",
			"Prot LocalAddress:Port", "CPS", "InPPS", "OutPPS", "InBPS", "OutBPS")
	default:
		b.WriteString("Prot LocalAddress:Port Scheduler Flags\n" +
			"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")
	}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

func entry(b *strings.Builder, s *Service, f Format, c Counters) {
	name := truncate(s.Proto.String()+"  "+s.Addr.String(), 33)
	var sc ServiceCounters
	if c != nil {
		sc = c.Service(s.ID)
	}
	switch f {
	case FormatStats:
		fmt.Fprintf(b, "%-33s", name)
		largenum(b, sc.Conns, sc.InPkts, sc.OutPkts, sc.InBytes, sc.OutBytes)
	case FormatRate:
		fmt.Fprintf(b, "%-33s", name)
		largenum(b, sc.CPS, sc.InPPS, sc.OutPPS, sc.InBPS, sc.OutBPS)
	default:
		fmt.Fprintf(b, "%s %s", name, s.Scheduler)
		if s.Persistent != 0 {
			fmt.Fprintf(b, " persistent %d", s.Persistent)
			if m, ok := shownMask(s); ok {
				fmt.Fprintf(b, " mask %s", m)
			}
		}
	}
	b.WriteByte('\n')
	for _, d := range sortedServers(s) {
		var dc ServerCounters
		if c != nil {
			dc = c.Server(d.ID)
		}
		dname := truncate(d.Addr.String(), 28)
		switch f {
		case FormatStats:
			fmt.Fprintf(b, "  -> %-28s", dname)
			largenum(b, dc.Conns, dc.InPkts, dc.OutPkts, dc.InBytes, dc.OutBytes)
		case FormatRate:
			fmt.Fprintf(b, "  -> %-28s %8d %8d %8d", dname, dc.CPS, dc.InPPS, dc.OutPPS)
			largenum(b, dc.InBPS, dc.OutBPS)
		default:
			fmt.Fprintf(b, "  -> %-28s %-7s %-6d %-10d %-10d", dname, "Masq", d.Weight, dc.ActiveConn, dc.InActConn)
		}
		b.WriteByte('\n')
	}
}

// largenum is ipvsadm's print_largenum (without --exact): nine columns,
// with K/M/G/T units from 100 million up.
func largenum(b *strings.Builder, vs ...uint64) {
	for _, i := range vs {
		switch {
		case i < 100000000:
			fmt.Fprintf(b, "%9d", i)
		case i < 1000000000:
			fmt.Fprintf(b, "%8dK", i/1000)
		case i < 100000000000:
			fmt.Fprintf(b, "%8dM", i/1000000)
		case i < 100000000000000:
			fmt.Fprintf(b, "%8dG", i/1000000000)
		default:
			fmt.Fprintf(b, "%8dT", i/1000000000000)
		}
	}
}

// hostOrder returns an IPv4 address as a host-order integer (ntohl). An IPv6 address is
// folded to one word as IPVS folds it for its sh and dh hashes (the XOR of its four words,
// ip_vs_sh_hashkey and ip_vs_dh_hashkey).
func hostOrder(a netip.Addr) uint32 {
	b := a.AsSlice()
	var v uint32
	for i := 0; i+4 <= len(b); i += 4 {
		v ^= binary.BigEndian.Uint32(b[i:])
	}
	return v
}

// cmpAddr is libipvs's address comparison: the difference of the
// host-order addresses as a signed 32-bit int, which wraps (so 172.x sorts
// before 10.x), and is not transitive across more than 2^31 addresses; for
// IPv6 the same, word by word, until two words differ.
func cmpAddr(a, b netip.Addr) int {
	x, y := a.AsSlice(), b.AsSlice()
	for i := 0; i+4 <= len(x) && i+4 <= len(y); i += 4 {
		if r := int(int32(binary.BigEndian.Uint32(x[i:]) - binary.BigEndian.Uint32(y[i:]))); r != 0 {
			return r
		}
	}
	return 0
}

// family is the address family number libipvs compares (AF_INET 2, AF_INET6 10).
func family(a netip.Addr) int {
	if a.Is6() {
		return 10
	}
	return 2
}

// cmpServices is libipvs's ipvs_cmp_services for non-fwmark services: IPv4
// before IPv6, then TCP before UDP, address, port.
func cmpServices(a, b *Service) int {
	if r := family(a.Addr.Addr()) - family(b.Addr.Addr()); r != 0 {
		return r
	}
	if r := int(a.Proto) - int(b.Proto); r != 0 {
		return r
	}
	if r := cmpAddr(a.Addr.Addr(), b.Addr.Addr()); r != 0 {
		return r
	}
	return int(a.Addr.Port()) - int(b.Addr.Port())
}

// cmpServers is libipvs's ipvs_cmp_dests (a service's real servers share its family).
func cmpServers(a, b *Server) int {
	if r := cmpAddr(a.Addr.Addr(), b.Addr.Addr()); r != 0 {
		return r
	}
	return int(a.Addr.Port()) - int(b.Addr.Port())
}

// sortedServices returns the services in ipvsadm's listing order. The
// input order is creation order; it matters only where the comparison is
// not transitive (see msort).
func (t *Table) sortedServices() []*Service {
	s := append([]*Service(nil), t.Services...)
	msort(s, cmpServices)
	return s
}

// sortedServers returns the real servers in ipvsadm's listing order, the
// kernel's list (newest first) sorted as ipvsadm sorts it.
func sortedServers(s *Service) []*Server {
	d := make([]*Server, len(s.Servers))
	for i := range s.Servers {
		d[i] = &s.Servers[i]
	}
	msort(d, cmpServers)
	return d
}

// msort sorts like glibc's qsort (msort_with_tmp: top-down merge sort,
// first half n/2, ties taken from the first half), which ipvsadm's qsort
// is on the glibc versions it ships with. Because libipvs's comparison is
// not transitive when addresses span more than 2^31, the exact algorithm
// decides the order in that case, so it is reproduced here.
func msort[T any](v []T, cmp func(a, b T) int) {
	tmp := make([]T, len(v))
	msortRec(v, tmp, cmp)
}

func msortRec[T any](v, tmp []T, cmp func(a, b T) int) {
	n := len(v)
	if n <= 1 {
		return
	}
	n1 := n / 2
	b1, b2 := v[:n1], v[n1:]
	msortRec(b1, tmp, cmp)
	msortRec(b2, tmp, cmp)
	k := 0
	i, j := 0, 0
	for i < len(b1) && j < len(b2) {
		if cmp(b1[i], b2[j]) <= 0 {
			tmp[k] = b1[i]
			i++
		} else {
			tmp[k] = b2[j]
			j++
		}
		k++
	}
	k += copy(tmp[k:], b1[i:])
	// The rest of b2 is already in place.
	copy(v, tmp[:k])
}
