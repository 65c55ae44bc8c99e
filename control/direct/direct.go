// Package direct runs the node half of kata-dp's direct mode: the taps of sandboxes live beside
// a host uplink (in the host netns or one the operator names), and one node collection per
// uplink (loader.Node) steers frames by guest MAC between the uplink and the taps, replacing
// the bridge and the veth pair of the standard CNI path. The per-sandbox half (anti-spoofing,
// policy, load balancing on each tap's ingress) stays in the sandbox's own collection.
//
// The package keeps no state of its own: the pinned node maps are the state, so an agent
// restart needs no reconstruction, and "the last guest left" is read from the fdb itself.
package direct

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// ErrConflict is returned when a guest's MAC or IPv4 address is already delivered to another
// live tap on the same uplink: taking it over would hand one sandbox another's frames.
var ErrConflict = errors.New("already joined to another tap on this uplink")

// Guest is one guest NIC joined to an uplink.
type Guest struct {
	NetNS  string           // netns of the uplink and the tap ("" = the caller's)
	Uplink string           // host uplink device
	Tap    string           // the guest's tap, beside the uplink
	MAC    net.HardwareAddr // guest MAC
	Addr   netip.Addr       // guest IPv4 for ARP steering; zero = none
	Addrs6 []netip.Addr     // guest IPv6 addresses (global, link-local) for NS steering
}

// Manager joins guests to uplinks. It serialises changes to node collections, so two
// sandboxes joining or leaving one uplink at once cannot race on attaching or removing it.
type Manager struct {
	root string
	mu   sync.Mutex
}

// New returns a Manager pinning node collections under root ("" = loader.DefaultRoot).
func New(root string) *Manager {
	if root == "" {
		root = loader.DefaultRoot
	}
	return &Manager{root: root}
}

// Join makes the uplink's node programs deliver the guest's frames into its tap, attaching
// them to the uplink if it had no guest yet. It returns the tap and uplink ifindexes. On
// failure nothing of this call is left.
func (m *Manager) Join(g Guest) (tap, uplink int, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ti, err := netdev.LookupLink(g.NetNS, g.Tap)
	if err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: tap: %w", g.Tap, g.Uplink, err)
	}
	ui, err := netdev.LookupLink(g.NetNS, g.Uplink)
	if err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: uplink: %w", g.Tap, g.Uplink, err)
	}
	if ti.Index == ui.Index {
		return 0, 0, fmt.Errorf("join %s to %s: the tap cannot be the uplink", g.Tap, g.Uplink)
	}
	n, err := loader.OpenNode(m.root, g.NetNS, g.Uplink)
	if err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	defer n.Close()
	nm := maps.Node(n.Maps())
	if err := m.checkFree(nm, g, ti.Index); err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	if other, ok, err := nm.Guest(g.MAC); err == nil && ok && other != ti.Index {
		// Taking over a stale entry (checkFree allowed it): drop its dead tap's counters.
		if err := nm.DelGuest(g.MAC, netip.Addr{}, other); err != nil {
			return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
		}
	}
	if err := nm.PutGuest(g.MAC, g.Addr, ti.Index); err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	if err := nm.DropStaleARP(g.MAC, g.Addr); err != nil {
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	if err := nm.SetND(g.MAC, g.Addrs6); err != nil {
		nm.DelGuest(g.MAC, g.Addr, ti.Index)
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	if err := n.Attach(); err != nil {
		nm.SetND(g.MAC, nil)
		nm.DelGuest(g.MAC, g.Addr, ti.Index)
		m.removeIfEmpty(nm, g)
		return 0, 0, fmt.Errorf("join %s to %s: %w", g.Tap, g.Uplink, err)
	}
	return ti.Index, ui.Index, nil
}

// checkFree refuses a MAC or address another live tap owns. An entry whose tap no longer
// exists (left by a crash) is stale and may be taken over.
func (m *Manager) checkFree(n maps.Node, g Guest, tap int) error {
	other, ok, err := n.Guest(g.MAC)
	if err != nil {
		return err
	}
	if ok && other != tap && linkExists(g.NetNS, other) {
		return fmt.Errorf("mac %s: %w", g.MAC, ErrConflict)
	}
	if !g.Addr.Is4() {
		return nil
	}
	owner, err := n.ARPOwner(g.Addr)
	if err != nil {
		return err
	}
	if owner == nil || owner.String() == g.MAC.String() {
		return nil
	}
	if otap, ok, err := n.Guest(owner); err == nil && ok && otap != tap && linkExists(g.NetNS, otap) {
		return fmt.Errorf("address %s: %w", g.Addr, ErrConflict)
	}
	return nil
}

// Leave stops delivering the guest's frames, touching only entries that still point at this
// guest (its MAC on its tap, its address on its MAC), and detaches the node programs when it
// was the uplink's last guest. A guest that is not joined is not an error.
func (m *Manager) Leave(g Guest) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	dir, err := loader.NodeDirOf(m.root, g.NetNS, g.Uplink)
	if err != nil {
		return fmt.Errorf("leave %s: %w", g.Tap, err)
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	n, err := loader.OpenNode(m.root, g.NetNS, g.Uplink)
	if err != nil {
		return fmt.Errorf("leave %s: %w", g.Tap, err)
	}
	defer n.Close()
	nm := maps.Node(n.Maps())
	tap := -1
	if ti, err := netdev.LookupLink(g.NetNS, g.Tap); err == nil {
		tap = ti.Index
	}
	cur, ok, err := nm.Guest(g.MAC)
	if err != nil {
		return fmt.Errorf("leave %s: %w", g.Tap, err)
	}
	// The MAC is this guest's if it points at its tap, or at a tap that is gone (the tap was
	// deleted before del-iface, as Kata does when the VM exits).
	if ok && (cur == tap || !linkExists(g.NetNS, cur)) {
		addr := netip.Addr{}
		if g.Addr.Is4() {
			if owner, err := nm.ARPOwner(g.Addr); err == nil && owner.String() == g.MAC.String() {
				addr = g.Addr
			}
		}
		if err := nm.SetND(g.MAC, nil); err != nil {
			return fmt.Errorf("leave %s: %w", g.Tap, err)
		}
		if err := nm.DelGuest(g.MAC, addr, cur); err != nil {
			return fmt.Errorf("leave %s: %w", g.Tap, err)
		}
	}
	if err := m.removeIfEmpty(nm, g); err != nil {
		return fmt.Errorf("leave %s: %w", g.Tap, err)
	}
	return nil
}

// removeIfEmpty detaches and unpins the uplink's node collection when no guest is left.
func (m *Manager) removeIfEmpty(n maps.Node, g Guest) error {
	c, err := n.GuestCount()
	if err != nil || c > 0 {
		return err
	}
	return loader.RemoveNode(m.root, g.NetNS, g.Uplink)
}

// ToGuest returns the node's counters of frames delivered into the guest's tap. It only
// reads the pinned maps: no program is loaded.
func (m *Manager) ToGuest(g Guest) (maps.NodeTapStats, error) {
	n, err := loader.OpenNodeMaps(m.root, g.NetNS, g.Uplink)
	if err != nil {
		return maps.NodeTapStats{}, fmt.Errorf("to-guest counters of %s: %w", g.Tap, err)
	}
	defer n.Close()
	nm := maps.Node(n.Maps())
	tap, ok, err := nm.Guest(g.MAC)
	if err != nil {
		return maps.NodeTapStats{}, fmt.Errorf("to-guest counters of %s: %w", g.Tap, err)
	}
	if !ok {
		return maps.NodeTapStats{}, fmt.Errorf("to-guest counters of %s: mac %s is not joined to %s", g.Tap, g.MAC, g.Uplink)
	}
	return nm.TapStats(tap)
}

// Joined reports whether the uplink has a node collection with its programs attached.
func (m *Manager) Joined(nsPath, uplink string) bool {
	dir, err := loader.NodeDirOf(m.root, nsPath, uplink)
	if err != nil {
		return false
	}
	if _, err := os.Stat(dir); err != nil {
		return false
	}
	n, err := loader.OpenNode(m.root, nsPath, uplink)
	if err != nil {
		return false
	}
	defer n.Close()
	return n.Attached()
}

func linkExists(nsPath string, ifindex int) bool {
	found := true
	netdev.InNetNS(nsPath, func() error {
		if _, err := netlink.LinkByIndex(ifindex); err != nil {
			var lnf netlink.LinkNotFoundError
			found = !errors.As(err, &lnf)
		}
		return nil
	})
	return found
}
