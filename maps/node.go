package maps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// ErrBadMAC is returned for a guest MAC that is not a unicast Ethernet address.
var ErrBadMAC = errors.New("guest mac must be a unicast ethernet address")

// Direct mode's node maps as the generated types of bpf/node.c.
type (
	// FDBEntry is where a guest MAC lives: the ifindex of its tap in the uplink's netns.
	FDBEntry = loader.NodeFdbEntry
	// NodeTapStats are the node programs' counters for one tap, summed over CPUs.
	NodeTapStats = loader.NodeNodeTapStats

	fdbKey   = loader.NodeFdbKey
	arpEntry = loader.NodeArpEntry
	ndKey    = loader.NodeNdKey
)

// Node counters (kdp_node_ctrs), see enum kdp_node_ctr.
const (
	NodeInGuest  = 0
	NodeInPass   = 1
	NodeOutGuest = 2
	NodeOutHost  = 3
	NodeOutPass  = 4
)

// Node is the view of one uplink's node maps (loader.Node.Maps): which tap each guest MAC
// and IPv4 address is delivered to, and the node's counters.
type Node loader.NodeMapHandles

func newFDBKey(mac net.HardwareAddr) (fdbKey, error) {
	var k fdbKey
	if len(mac) != 6 || mac[0]&1 != 0 || [6]byte(mac) == [6]byte{} {
		return k, fmt.Errorf("%w: %q", ErrBadMAC, mac)
	}
	copy(k.Mac[:], mac)
	return k, nil
}

// PutGuest makes the node deliver frames for mac (and ARP requests for addr, when valid) into
// the tap with ifindex tap, and creates the tap's counters (kept if they exist). A v6 addr is
// refused (ErrFamily) before anything is written.
func (n Node) PutGuest(mac net.HardwareAddr, addr netip.Addr, tap int) error {
	k, err := newFDBKey(mac)
	if err != nil {
		return err
	}
	a, err := v4OrZero(addr)
	if err != nil {
		return fmt.Errorf("put guest %s: %w", mac, err)
	}
	stats := make([]NodeTapStats, ebpf.MustPossibleCPU())
	if err := n.Taps.Update(uint32(tap), stats, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create tap counters: %w", err)
	}
	if err := n.FDB.Put(k, FDBEntry{Ifindex: uint32(tap)}); err != nil {
		return fmt.Errorf("write fdb entry %s: %w", mac, err)
	}
	if addr.IsValid() {
		if err := n.ARP.Put(a, arpEntry{Mac: k.Mac}); err != nil {
			return fmt.Errorf("write arp entry %s: %w", addr, err)
		}
	}
	return nil
}

// DelGuest removes the entries of mac and addr (zero: none), and the counters of tap. Missing
// entries are not an error.
func (n Node) DelGuest(mac net.HardwareAddr, addr netip.Addr, tap int) error {
	k, err := newFDBKey(mac)
	if err != nil {
		return err
	}
	a, err := v4OrZero(addr)
	if err != nil {
		return fmt.Errorf("delete guest %s: %w", mac, err)
	}
	if addr.IsValid() {
		if err := n.ARP.Delete(a); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete arp entry %s: %w", addr, err)
		}
	}
	if err := n.FDB.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete fdb entry %s: %w", mac, err)
	}
	if tap > 0 {
		if err := n.Taps.Delete(uint32(tap)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete tap counters: %w", err)
		}
	}
	return nil
}

// Guest returns the tap ifindex a MAC is delivered to (ok false if none).
func (n Node) Guest(mac net.HardwareAddr) (tap int, ok bool, err error) {
	k, err := newFDBKey(mac)
	if err != nil {
		return 0, false, err
	}
	var e FDBEntry
	if err := n.FDB.Lookup(k, &e); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("look up fdb entry %s: %w", mac, err)
	}
	return int(e.Ifindex), true, nil
}

// ARPOwner returns the MAC that owns addr (nil if none).
func (n Node) ARPOwner(addr netip.Addr) (net.HardwareAddr, error) {
	a, err := v4(addr)
	if err != nil {
		return nil, fmt.Errorf("look up arp entry: %w", err)
	}
	var e arpEntry
	if err := n.ARP.Lookup(a, &e); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up arp entry %s: %w", addr, err)
	}
	return net.HardwareAddr(e.Mac[:]), nil
}

// GuestCount is the number of guest MACs the node delivers.
func (n Node) GuestCount() (int, error) {
	var (
		k fdbKey
		v FDBEntry
	)
	c := 0
	it := n.FDB.Iterate()
	for it.Next(&k, &v) {
		c++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count guests: %w", err)
	}
	return c, nil
}

// TapStats returns the node's counters for tap, summed over CPUs.
func (n Node) TapStats(tap int) (NodeTapStats, error) {
	var (
		per []NodeTapStats
		out NodeTapStats
	)
	if err := n.Taps.Lookup(uint32(tap), &per); err != nil {
		return out, fmt.Errorf("tap %d counters: %w", tap, err)
	}
	for _, s := range per {
		out.Packets += s.Packets
		out.Bytes += s.Bytes
		out.Arp += s.Arp
		out.Local += s.Local
	}
	return out, nil
}

// Counter returns node counter c (Node*), summed over CPUs.
func (n Node) Counter(c uint32) (uint64, error) {
	var per []uint64
	if err := n.Counters.Lookup(c, &per); err != nil {
		return 0, fmt.Errorf("node counter %d: %w", c, err)
	}
	var sum uint64
	for _, v := range per {
		sum += v
	}
	return sum, nil
}

// DropStaleARP removes the ARP entries owned by mac other than keep (zero: keep none): a
// guest whose address changed must not keep drawing ARP requests for its old one.
func (n Node) DropStaleARP(mac net.HardwareAddr, keep netip.Addr) error {
	ka, err := v4OrZero(keep)
	if err != nil {
		return fmt.Errorf("drop stale arp entries of %s: %w", mac, err)
	}
	var (
		stale []uint32
		k     uint32
		v     arpEntry
	)
	it := n.ARP.Iterate()
	for it.Next(&k, &v) {
		if net.HardwareAddr(v.Mac[:]).String() == mac.String() && (!keep.IsValid() || k != ka) {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list arp entries: %w", err)
	}
	for _, k := range stale {
		if err := n.ARP.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete arp entry %s: %w", addr4(k), err)
		}
	}
	return nil
}

// SetND makes the node deliver IPv6 neighbour solicitations for addrs (the guest's IPv6
// address and link-local) to mac's tap, and drops the entries mac owned for other addresses.
// Addresses another MAC owns are taken over: the MAC's own join checks conflicts.
func (n Node) SetND(mac net.HardwareAddr, addrs []netip.Addr) error {
	k, err := newFDBKey(mac)
	if err != nil {
		return err
	}
	want := map[ndKey]bool{}
	for _, a := range addrs {
		w, err := v6(a)
		if err != nil {
			return fmt.Errorf("set nd entries of %s: %w", mac, err)
		}
		want[ndKey{Addr: w}] = true
	}
	var (
		stale []ndKey
		nk    ndKey
		v     arpEntry
	)
	it := n.ND.Iterate()
	for it.Next(&nk, &v) {
		if v.Mac == k.Mac && !want[nk] {
			stale = append(stale, nk)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list nd entries: %w", err)
	}
	for _, s := range stale {
		if err := n.ND.Delete(&s); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete nd entry %s: %w", addr6(s.Addr), err)
		}
	}
	for w := range want {
		if err := n.ND.Put(&w, arpEntry{Mac: k.Mac}); err != nil {
			return fmt.Errorf("write nd entry %s: %w", addr6(w.Addr), err)
		}
	}
	return nil
}

// NDOwner returns the MAC whose tap gets solicitations for addr (nil if none).
func (n Node) NDOwner(addr netip.Addr) (net.HardwareAddr, error) {
	w, err := v6(addr)
	if err != nil {
		return nil, fmt.Errorf("look up nd entry: %w", err)
	}
	var e arpEntry
	if err := n.ND.Lookup(&ndKey{Addr: w}, &e); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up nd entry %s: %w", addr, err)
	}
	return net.HardwareAddr(e.Mac[:]), nil
}
