package maps

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// The VIP prefilter (kdp_lb_vips, bpf/lib/lb.h): a bit per hash of an address word, set for
// every service's VIP before the service goes live and never cleared while the sandbox lives,
// so that the datapath skips the connection and service lookups for a frame from the guest
// whose destination's bit is clear. It stays exact because bits are only ever added: a
// connection was made to a service whose bit was set, so its frames find their bit too.

type vipSet = loader.DatapathLbVipset

// vipBit is lb_vip_bit: the bit of an address word (an IPv4 address as v4 encodes it, an
// IPv6 one folded, the XOR of its v6 words).
func vipBit(w uint32) uint32 { return (w * 0x9E3779B1) >> 16 }

func fold6(w [4]uint32) uint32 { return w[0] ^ w[1] ^ w[2] ^ w[3] }

// markVIPs sets the prefilter bits of the address words ws. The first time (valid still 0:
// a new sandbox, or one pinned before the filter existed) it first adds every VIP of every
// service and connection already in the maps, and turns the filter on only with a second
// write, once every bit is in place: the datapath never uses a filter missing a VIP.
func (l LB) markVIPs(ws ...uint32) error {
	if l.VIPs == nil {
		return nil
	}
	var v vipSet
	if err := l.VIPs.Lookup(uint32(0), &v); err != nil {
		return fmt.Errorf("VIP prefilter: %w", err)
	}
	seed := v.Valid == 0
	if seed {
		live, err := l.liveVIPs()
		if err != nil {
			return fmt.Errorf("VIP prefilter: %w", err)
		}
		ws = append(ws, live...)
	}
	for _, w := range ws {
		b := vipBit(w)
		v.Bits[b>>6] |= 1 << (b & 63)
	}
	if err := l.VIPs.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("VIP prefilter: %w", err)
	}
	if seed {
		v.Valid = 1
		if err := l.VIPs.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("VIP prefilter: %w", err)
		}
	}
	return nil
}

// liveVIPs is the address word of every service master (any generation) and of every
// connection's VIP (original entries' destinations), both families.
func (l LB) liveVIPs() ([]uint32, error) {
	var ws []uint32
	svcs, err := Dump[svcKey, svc](l.Svc)
	if err != nil {
		return nil, err
	}
	for k := range svcs {
		if k.Slot == 0 && k.Proto != v6SlotsProto {
			ws = append(ws, k.Vip)
		}
	}
	svcs6, err := Dump[svc6Key, svc](l.Svc6)
	if err != nil {
		return nil, err
	}
	for k := range svcs6 {
		ws = append(ws, fold6(k.Vip))
	}
	cts, err := Dump[ctKey, ctEntry](l.CT)
	if err != nil {
		return nil, err
	}
	for k := range cts {
		if k.Dir == 0 {
			ws = append(ws, k.Daddr)
		}
	}
	cts6, err := Dump[ct6Key, ct6Ent](l.CT6)
	if err != nil {
		return nil, err
	}
	for k := range cts6 {
		if k.Dir == 0 {
			ws = append(ws, fold6(k.Daddr))
		}
	}
	return ws, nil
}

// vipWord is the prefilter's address word of a service reference.
func (r svcRef) vipWord() uint32 {
	if r.v6 {
		return fold6(r.k6.Vip)
	}
	return r.k4.Vip
}
