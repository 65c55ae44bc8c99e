package maps

import (
	"fmt"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// The load balancer's prefilter (kdp_lb_vips, bpf/lib/lb.h): a bit per hash of an address
// word in two bitmaps, one for every service's VIP and one for every real server, each set
// before the service or real server goes live and never cleared while the sandbox lives, so
// that the datapath skips the connection and service lookups for a frame from the guest whose
// destination's VIP bit is clear, and the connection lookup for a frame to the guest whose
// source's real-server bit is clear. It stays exact because bits are only ever added: a
// connection was made to a service whose bit was set and to a real server whose bit was set,
// so its frames both ways find their bits too.

type vipSet = loader.DatapathLbVipset

// vipHash is lb_vip_hash: the hash of an address word (an IPv4 address as v4 encodes it, an
// IPv6 one folded, the XOR of its v6 words), through an integer hash whose every input bit
// changes every output bit. Its two 16-bit halves are the address's two bits.
func vipHash(w uint32) uint32 { return loader.Mix32(w) }

// setBits sets both bits of the address word w in bits.
func setBits(bits *[len(vipSet{}.Bits)]uint64, w uint32) {
	h := vipHash(w)
	for _, b := range []uint32{h & 0xffff, h >> 16} {
		bits[b>>6] |= 1 << (b & 63)
	}
}

// PrefilterVersion is the version of the prefilter's hash, kept in the filter's valid field
// (KDP_LB_PREFILTER_VERSION): the datapath uses only a filter of its own version, and a filter
// of another one (an older kata-dp's, or 0: not filled yet) is refilled from scratch at the
// first write.
const PrefilterVersion = 2

func fold6(w [4]uint32) uint32 { return w[0] ^ w[1] ^ w[2] ^ w[3] }

// prefilterMu serialises the read-modify-write of a prefilter's entry: a sandbox's services
// (kata-ipvs, the cluster table) and real servers are written by several callers, and a bit
// lost between two of them would hide a service from the datapath.
var prefilterMu sync.Mutex

// markVIPs sets the prefilter's bits of the VIP words ws (see markPrefilter).
func (l LB) markVIPs(ws ...uint32) error { return l.markPrefilter(ws, nil) }

// markRealServers sets the prefilter's bits of the real servers' address words ws.
func (l LB) markRealServers(ws ...uint32) error { return l.markPrefilter(nil, ws) }

// markPrefilter sets the prefilter bits of the VIP words vips and the real servers' words rss.
// The first time (valid not PrefilterVersion: a new sandbox, one pinned before the filter or
// its layout existed, or one an older hash filled) it starts from an empty filter and first
// adds every VIP and real server of every service, real server and
// connection already in the maps, and turns the filter on only with a second write, once every
// bit is in place: the datapath never uses a filter missing a VIP or a real server.
func (l LB) markPrefilter(vips, rss []uint32) error {
	if l.VIPs == nil {
		return nil
	}
	prefilterMu.Lock()
	defer prefilterMu.Unlock()
	var v vipSet
	if err := l.VIPs.Lookup(uint32(0), &v); err != nil {
		return fmt.Errorf("load balancer prefilter: %w", err)
	}
	seed := v.Valid != PrefilterVersion
	if seed {
		lv, lr, err := l.livePrefilter()
		if err != nil {
			return fmt.Errorf("load balancer prefilter: %w", err)
		}
		vips, rss = append(vips, lv...), append(rss, lr...)
		v = vipSet{} // an older hash's bits mean nothing to this one; the filter is off until the end
	}
	for _, w := range vips {
		setBits(&v.Bits, w)
	}
	for _, w := range rss {
		setBits(&v.Rbits, w)
	}
	if err := l.VIPs.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("load balancer prefilter: %w", err)
	}
	if seed {
		v.Valid = PrefilterVersion
		if err := l.VIPs.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("load balancer prefilter: %w", err)
		}
	}
	return nil
}

// livePrefilter is the address word of every service master (any generation) and of every
// connection's VIP (original entries' destinations), and of every real server and every
// connection's real server (reply entries' sources), both families.
func (l LB) livePrefilter() (vips, rss []uint32, err error) {
	svcs, err := Dump[svcKey, svc](l.Svc)
	if err != nil {
		return nil, nil, err
	}
	for k := range svcs {
		if k.Slot == 0 && k.Proto != v6SlotsProto {
			vips = append(vips, k.Vip)
		}
	}
	svcs6, err := Dump[svc6Key, svc](l.Svc6)
	if err != nil {
		return nil, nil, err
	}
	for k := range svcs6 {
		vips = append(vips, fold6(k.Vip))
	}
	bes, err := Dump[uint32, backend](l.Backend)
	if err != nil {
		return nil, nil, err
	}
	for _, b := range bes {
		rss = append(rss, b.Ip)
	}
	bes6, err := Dump[uint32, be6](l.Backend6)
	if err != nil {
		return nil, nil, err
	}
	for _, b := range bes6 {
		rss = append(rss, fold6(b.Ip))
	}
	err = l.scanCT(func(k ctKey, _ ctEntry) {
		if k.Dir == 0 {
			vips = append(vips, k.Daddr)
		} else {
			rss = append(rss, k.Saddr)
		}
	})
	if err != nil {
		return nil, nil, err
	}
	cts6, err := Dump[ct6Key, ct6Ent](l.CT6)
	if err != nil {
		return nil, nil, err
	}
	for k := range cts6 {
		if k.Dir == 0 {
			vips = append(vips, fold6(k.Daddr))
		} else {
			rss = append(rss, fold6(k.Saddr))
		}
	}
	return vips, rss, nil
}

// rsWord is the prefilter's address word of a real server.
func rsWord(b backend, b6 *be6) uint32 {
	if b6 != nil {
		return fold6(b6.Ip)
	}
	return b.Ip
}

// vipWord is the prefilter's address word of a service reference.
func (r svcRef) vipWord() uint32 {
	if r.v6 {
		return fold6(r.k6.Vip)
	}
	return r.k4.Vip
}
