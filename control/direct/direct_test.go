package direct_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/direct"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// rig is a throwaway netns with an uplink (a veth) and three taps beside it.
func rig(t *testing.T) (*direct.Manager, *topo.NetNS, string) {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs and builds namespaces")
	n := topotest.MustNetNS(t, "kdptd-m")
	if out, err := n.Exec("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p"); err != nil {
		t.Fatal(err, out)
	}
	n.Exec("ip", "link", "set", "up0", "up")
	for _, tap := range []string{"tapa", "tapb", "tapc"} {
		if err := netdev.CreateTap(n.Path(), tap, netdev.TapOptions{VnetHdr: true}); err != nil {
			t.Fatal(err)
		}
	}
	root := topotest.BPFFS(t, "kdptd-m")
	return direct.New(root), n, root
}

// TestJoinLeave: a MAC or address of a live tap cannot be taken by another tap, a stale one
// (its tap deleted) can; Leave removes only the leaving guest's entries; the last Leave
// detaches the node programs and removes the node's pins.
func TestJoinLeave(t *testing.T) {
	m, n, root := rig(t)
	macA := net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 1}
	macB := net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 2}
	ipA, ipB := netip.MustParseAddr("10.9.0.2"), netip.MustParseAddr("10.9.0.3")
	a := direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "tapa", MAC: macA, Addr: ipA}
	b := direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "tapb", MAC: macB, Addr: ipB}

	if _, _, err := m.Join(a); err != nil {
		t.Fatal(err)
	}
	if !m.Joined(n.Path(), "up0") {
		t.Fatal("node programs not attached")
	}
	if _, _, err := m.Join(b); err != nil {
		t.Fatal(err)
	}
	// Rejoining the same guest is idempotent.
	if _, _, err := m.Join(a); err != nil {
		t.Fatal(err)
	}
	steal := b
	steal.MAC = macA
	if _, _, err := m.Join(steal); !errors.Is(err, direct.ErrConflict) {
		t.Errorf("B taking A's MAC: %v", err)
	}
	steal = direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "tapc", MAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 3}, Addr: ipB}
	if _, _, err := m.Join(steal); !errors.Is(err, direct.ErrConflict) {
		t.Errorf("C taking B's address: %v", err)
	}
	if _, _, err := m.Join(direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "up0", MAC: macA}); err == nil {
		t.Error("the uplink accepted as a tap")
	}
	// Leave of a guest that claims A's MAC from another tap removes nothing.
	if err := m.Leave(direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "tapc", MAC: macA, Addr: ipA}); err != nil {
		t.Fatal(err)
	}
	ln, err := loader.OpenNodeMaps(root, n.Path(), "up0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	node := maps.Node(ln.Maps())
	if _, ok, _ := node.Guest(macA); !ok {
		t.Fatal("another tap's Leave removed A")
	}
	if owner, _ := node.ARPOwner(ipA); owner.String() != macA.String() {
		t.Fatalf("A's address owner %v", owner)
	}
	// tapb deleted (the VM went away): its MAC is stale and may be taken over by tapc.
	if err := netdev.DeleteLink(n.Path(), "tapb"); err != nil {
		t.Fatal(err)
	}
	c := direct.Guest{NetNS: n.Path(), Uplink: "up0", Tap: "tapc", MAC: macB, Addr: ipB}
	if _, _, err := m.Join(c); err != nil {
		t.Fatalf("taking over a stale entry: %v", err)
	}
	// A guest rejoined with a new address no longer draws ARP for the old one.
	moved := a
	moved.Addr = netip.MustParseAddr("10.9.0.12")
	if _, _, err := m.Join(moved); err != nil {
		t.Fatal(err)
	}
	if owner, _ := node.ARPOwner(ipA); owner != nil {
		t.Errorf("old address still owned by %v", owner)
	}
	if err := m.Leave(moved); err != nil {
		t.Fatal(err)
	}
	if owner, _ := node.ARPOwner(moved.Addr); owner != nil {
		t.Errorf("address left behind, owned by %v", owner)
	}
	if _, ok, _ := node.Guest(macA); ok {
		t.Error("A still in the fdb")
	}
	if !m.Joined(n.Path(), "up0") {
		t.Fatal("node programs gone while C is joined")
	}
	if err := m.Leave(c); err != nil {
		t.Fatal(err)
	}
	if m.Joined(n.Path(), "up0") {
		t.Error("node programs left after the last guest")
	}
	dir, _ := loader.NodeDirOf(root, n.Path(), "up0")
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("node pins left: %v", err)
	}
	// Leaving again is not an error.
	if err := m.Leave(c); err != nil {
		t.Fatal(err)
	}
}
