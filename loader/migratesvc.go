package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// oldLbSvc is struct lb_svc before a service's slots moved into its master (bpf/lib/lb.h): a
// 24-byte value that was either a master's header or one slot, keyed rev << 16 | index
// (1-based) in kdp_lb_svc. A slot held its real server's id in Id, its wrr weight in Wmax and,
// with Flags 1, its IPv4 address in Pmask and port in Count.
type oldLbSvc struct {
	Id, Count, Rev, Persist, Pmask uint32
	Sched, Flags                   uint8
	Wmax                           uint16
}

const (
	oldLbSvcSize  = 24
	oldSlotAddr   = 1
	v6SlotsProto  = 0xff // KDP_LB_V6_SLOTS
	lbInlineSlots = len(DatapathLbSvc{}.S)
)

// svcConversion holds the service maps of the older layout (kdp_lb_svc and kdp_lb_svc6 with
// oldLbSvc values) a sandbox was pinned with, read before either is replaced, so that both
// are converted (convert) rather than started empty: the IPv6 masters' first slots are in the
// old kdp_lb_svc, which is migrated first. Without it an upgraded agent's programs would find
// no service from the moment Open moves the links onto them until its first sync writes the
// table again: new connections to a VIP would go out unbalanced meanwhile. (A crash between
// the two maps' replacements leaves the older kdp_lb_svc6 without the slots it needs: the next
// open starts it empty, and the IPv6 services are back at the first sync.)
type svcConversion struct {
	svc  map[DatapathLbSvcKey]oldLbSvc
	svc6 map[DatapathLbSvc6Key]oldLbSvc
}

// readOldServices returns the conversion of the service maps pinned in dir when kdp_lb_svc
// has the older layout, else nil.
func readOldServices(dir string) (*svcConversion, error) {
	old, err := ebpf.LoadPinnedMap(filepath.Join(dir, "kdp_lb_svc"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer old.Close()
	if old.ValueSize() != oldLbSvcSize {
		return nil, nil
	}
	c := &svcConversion{svc: map[DatapathLbSvcKey]oldLbSvc{}, svc6: map[DatapathLbSvc6Key]oldLbSvc{}}
	if err := readAll(old, c.svc); err != nil {
		return nil, fmt.Errorf("read the older kdp_lb_svc: %w", err)
	}
	old6, err := ebpf.LoadPinnedMap(filepath.Join(dir, "kdp_lb_svc6"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, err
	}
	defer old6.Close()
	if old6.ValueSize() == oldLbSvcSize {
		if err := readAll(old6, c.svc6); err != nil {
			return nil, fmt.Errorf("read the older kdp_lb_svc6: %w", err)
		}
	}
	return c, nil
}

func readAll[K comparable](m *ebpf.Map, out map[K]oldLbSvc) error {
	var (
		k K
		v oldLbSvc
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return it.Err()
}

// slot is slot idx (0-based) of the service whose old slots are keyed under base at rev, in
// this layout, and whether the old map had it.
func (c *svcConversion) slot(base DatapathLbSvcKey, rev, idx uint32) (DatapathLbSlot, bool) {
	base.Slot = rev<<16 | (idx+1)&0xffff
	o, ok := c.svc[base]
	if !ok {
		return DatapathLbSlot{}, false
	}
	s := DatapathLbSlot{Id: o.Id, Weight: o.Wmax}
	if o.Flags&oldSlotAddr != 0 {
		s.Addr, s.Port = o.Pmask, uint16(o.Count)
	}
	return s, true
}

// service converts one old master m, whose slots are keyed under base, into its master of
// this layout and its slot blocks (keyed under base), and counts the old slots it used.
func (c *svcConversion) service(base DatapathLbSvcKey, m oldLbSvc, blocks map[DatapathLbSvcKey]*DatapathLbSvc) (DatapathLbSvc, int) {
	nm := DatapathLbSvc{Id: m.Id, Count: m.Count, Rev: m.Rev, Persist: m.Persist, Pmask: m.Pmask, Sched: m.Sched, Wmax: m.Wmax}
	used := 0
	for i := range m.Count {
		s, ok := c.slot(base, m.Rev, i)
		if !ok {
			continue
		}
		used++
		if i < uint32(lbInlineSlots) {
			nm.S[i] = s
			continue
		}
		bk := base
		bk.Slot = m.Rev<<16 | (i/uint32(lbInlineSlots))&0xffff
		b := blocks[bk]
		if b == nil {
			b = &DatapathLbSvc{}
			blocks[bk] = b
		}
		b.S[i%uint32(lbInlineSlots)] = s
	}
	return nm, used
}

// convert fills m, the new map name (kdp_lb_svc or kdp_lb_svc6), from the old service maps:
// kdp_lb_svc gets the IPv4 masters with their first slots and the slot blocks of both
// families' larger services, kdp_lb_svc6 the IPv6 masters with their first slots. Old entries
// that no master names (a slot of a revision no longer live) are dropped.
func (c *svcConversion) convert(name string, m *ebpf.Map) (copied, dropped int, err error) {
	put := func(k any, v *DatapathLbSvc) {
		if m.Put(k, v) != nil {
			dropped++
		} else {
			copied++
		}
	}
	blocks := map[DatapathLbSvcKey]*DatapathLbSvc{}
	switch name {
	case "kdp_lb_svc":
		used := 0
		for k, o := range c.svc {
			if k.Slot != 0 || k.Proto == v6SlotsProto {
				continue
			}
			nm, n := c.service(k, o, blocks)
			used += 1 + n
			put(&k, &nm)
		}
		for k, o := range c.svc6 {
			_, n := c.service(DatapathLbSvcKey{Vip: o.Id, Proto: v6SlotsProto, Gen: k.Gen}, o, blocks)
			used += n
		}
		for k, b := range blocks {
			put(&k, b)
		}
		dropped += len(c.svc) - used
	case "kdp_lb_svc6":
		for k, o := range c.svc6 {
			nm, _ := c.service(DatapathLbSvcKey{Vip: o.Id, Proto: v6SlotsProto, Gen: k.Gen}, o, blocks)
			put(&k, &nm)
		}
	}
	return copied, dropped, nil
}
