package dataplane

import (
	"context"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// Mode is one way of joining an endpoint's tap to its uplink (DESIGN.md decision 2). The
// Dataplane keeps everything the modes share (validation, the sandbox's collection, what this
// process installed, the removal of other modes' leftovers) and calls the endpoint's mode for
// the rest. Modes are stateless values listed in registry.go; what an endpoint runs is
// recorded in its State.
type Mode interface {
	// Name is the mode's name as users give it in "mode" ("tc", "xdp", ...).
	Name() string
	// Family names the devices the mode joins. Modes of one family can replace one another on
	// a live endpoint: adding an endpoint in one removes what the others left, and deleting an
	// endpoint removes what any of them may have left.
	Family() Family
	// Add installs ep in this mode, or rewrites it in place when it is there (reconcile is
	// an add that keeps counters). fresh marks a new endpoint: its slot's counters are reset
	// and a failure undoes what this call did. It returns what runs, which may be another
	// mode of the family when this one cannot (xdp falls back to tc).
	Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error)
	// Remove removes whatever this mode may have left of ep: it must not assume the mode
	// ran, nor that its devices still exist, and it never touches what is not kata-dp's.
	Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error
	// Stats reads ep's counters in this mode.
	Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error)
}

// Family is a set of modes that use the same devices of an endpoint.
type Family string

// The families of the registered modes.
const (
	// FamilySandbox: the tap and its uplink (the CNI's veth) live in the sandbox's netns and
	// belong to this sandbox alone.
	FamilySandbox Family = "sandbox"
	// FamilyNode: the tap lives beside a host uplink that several sandboxes share.
	FamilyNode Family = "node"
	// FamilyVhostUser: no device at all; a vhost-user switch serves the NIC (vhostuser.go).
	FamilyVhostUser Family = "vhost-user"
)

// layered is implemented by a mode that runs on top of others of its family (xdp on the tc
// programs, macvtap-bpf on tc's uplink program and macvtap's device): adding an endpoint in it
// keeps their plumbing.
type layered interface{ under() []string }

// programmed is implemented by modes that attach kata-dp's programs to both the tap and its
// uplink.
type programmed interface{ programsOnBoth() bool }

// AttachesPrograms reports whether an endpoint in the named mode ("" = tc) has kata-dp's
// programs attached to both its tap and its uplink (tc, xdp): what kata-dp-cni's CHECK can
// verify on the devices. Unknown modes do not.
func AttachesPrograms(name string) bool {
	m, err := Lookup(name)
	if err != nil {
		return false
	}
	p, ok := m.(programmed)
	return ok && p.programsOnBoth()
}

// State is what this process knows of an endpoint's dataplane: set by a successful add,
// cleared by a delete, lost on restart (Reconcile sets it again).
type State struct {
	requested, mode string           // mode asked for, mode running
	reason          string           // why mode differs from requested
	ep              control.Endpoint // as last added (for RecheckXDP)
	xdpFromGuest    bool             // xdp: the guest's frames take XDP too (xdp.go)
	mv              macvtapDevice    // macvtap, macvtap-bpf: the VM's device (macvtap.go)
}

// running returns the state of an endpoint running in mode m.
func running(m Mode) *State { return &State{mode: m.Name()} }

// Objects names the compiled BPF objects (loader.Object*) a mode needs the kernel to load, so
// that `kata-dp version` and the agent can say per mode what the kernel lacks: every sandbox
// loads its datapath collection whatever its NICs' modes, and a mode of the node family loads
// the uplink's node collection too.
func Objects(mode string) ([]string, error) {
	m, err := Lookup(mode)
	if err != nil {
		return nil, err
	}
	if m.Family() == FamilyNode {
		return []string{loader.ObjectDatapath, loader.ObjectNode}, nil
	}
	return []string{loader.ObjectDatapath}, nil
}

// Lookup returns the registered mode of that name ("" = tc), or an error wrapping ErrMode.
func Lookup(name string) (Mode, error) {
	if name == "" {
		name = control.ModeTC
	}
	for _, m := range registry {
		if m.Name() == name {
			return m, nil
		}
	}
	return nil, fmt.Errorf("%w %q", ErrMode, name)
}

// Modes returns the names of the modes users choose (CNI configuration, `kata-dp bench`,
// "mode"), in registry order: every registered mode but vhost-user, which a NIC runs because it
// has a vhostUserSocket.
func Modes() []string {
	var out []string
	for _, m := range registry {
		if m.Family() != FamilyVhostUser {
			out = append(out, m.Name())
		}
	}
	return out
}

// modeFor is the mode ep runs in: the one this process installed, else (after a restart before
// Reconcile) the one ep names, else tc.
func (d *Dataplane) modeFor(sb *Sandbox, ep control.Endpoint) Mode {
	name := ep.Mode
	if st := d.state(sb, ep.Slot); st != nil {
		name = st.mode
	}
	m, err := Lookup(name)
	if err != nil {
		m, _ = Lookup(control.ModeTC)
	}
	return m
}

// removeOthers removes what the other modes of m's family (those m does not run on) left of ep.
func removeOthers(ctx context.Context, sb *Sandbox, ep control.Endpoint, m Mode) error {
	keep := map[string]bool{m.Name(): true}
	if l, ok := m.(layered); ok {
		for _, u := range l.under() {
			keep[u] = true
		}
	}
	for _, o := range registry {
		if o.Family() != m.Family() || keep[o.Name()] {
			continue
		}
		if err := o.Remove(ctx, sb, ep); err != nil {
			return fmt.Errorf("remove %s leftovers: %w", o.Name(), err)
		}
	}
	return nil
}

func (d *Dataplane) state(sb *Sandbox, slot uint32) *State {
	d.mu.Lock()
	defer d.mu.Unlock()
	return sb.modes[slot]
}

func (d *Dataplane) setState(sb *Sandbox, slot uint32, st *State) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sb.modes == nil {
		sb.modes = map[uint32]*State{}
	}
	if st == nil {
		delete(sb.modes, slot)
	} else {
		sb.modes[slot] = st
	}
}

// Mode returns the mode the endpoint runs in and, when it is not the one asked for, why.
func (d *Dataplane) Mode(ep control.Endpoint) (mode, reason string, err error) {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return "", "", err
	}
	st := d.state(sb, ep.Slot)
	if st == nil {
		return "", "", fmt.Errorf("mode of %s: endpoint not added by this process", ep.NIC)
	}
	return st.mode, st.reason, nil
}

// tapEntry is the endpoint map entry of ep's tap: the guest's MAC and address the checks hold
// it to, its flags, and the device its frames are redirected to (peer). Every BPF mode writes
// this one entry for the tap.
func tapEntry(ep control.Endpoint, peer int) (maps.Endpoint, error) {
	e := maps.Endpoint{Slot: ep.Slot, Role: maps.RoleTap, PeerIfindex: uint32(peer)}
	if err := e.SetMAC(ep.MAC); err != nil {
		return e, err
	}
	e.Addr, e.Addr6, e.LinkLocal = ep.Addr, ep.Addr6, ep.LinkLocal
	if ep.AntiSpoof {
		e.Flags |= maps.FlagAntiSpoof
	}
	if ep.StrictEgress {
		e.Flags |= maps.FlagStrictEgress
	}
	return e, nil
}

// bpfDirStats reads one direction of the slot's BPF counters.
func bpfDirStats(sb *Sandbox, slot uint32, dir maps.Direction) (control.DirStats, error) {
	s, err := maps.ForSandbox(sb.lsb.Maps()).Stats.Read(slot, dir)
	if err != nil {
		return control.DirStats{}, err
	}
	out := control.DirStats{Packets: s.Packets, Bytes: s.Bytes, Drops: map[string]uint64{}}
	for _, r := range maps.DropReasons() {
		out.Drops[r.String()] = s.Drops[r]
	}
	return out, nil
}

// removeSlotEntries removes every endpoint entry of the slot, with the XDP ports of their
// devices (a device that is gone, or was recreated, is only found here).
func removeSlotEntries(sb *Sandbox, slot uint32) error {
	eps := maps.ForSandbox(sb.lsb.Maps()).Endpoints
	all, err := eps.All()
	if err != nil {
		return err
	}
	for ifindex, e := range all {
		if e.Slot == slot {
			if err := sb.xdp().Delete(ifindex); err != nil {
				return err
			}
			if err := eps.Remove(ifindex); err != nil {
				return err
			}
		}
	}
	return nil
}

// NoBPFCounters is the marker Stats puts into Drops for modes without BPF counters: the
// packets and bytes are the device's link counters, and there are no drop reasons.
const NoBPFCounters = "no_bpf_counters"

// linkStats are the Stats of an endpoint in a mode without BPF counters: the link counters of
// dev, the device the VM uses. rxFromGuest: the device receives what the VM sends (a tap; a
// macvtap transmits it).
func linkStats(ep control.Endpoint, dev string, rxFromGuest bool) (control.EndpointStats, error) {
	st, err := devStats(ep.NetNS, dev)
	if err != nil {
		return control.EndpointStats{}, err
	}
	rx, tx := dirStats(st.RxPackets, st.RxBytes, st.RxDropped), dirStats(st.TxPackets, st.TxBytes, st.TxDropped)
	if rxFromGuest {
		return control.EndpointStats{FromGuest: rx, ToGuest: tx}, nil
	}
	return control.EndpointStats{FromGuest: tx, ToGuest: rx}, nil
}

func dirStats(p, b, dropped uint64) control.DirStats {
	return control.DirStats{Packets: p, Bytes: b, Drops: map[string]uint64{NoBPFCounters: 1, "link_dropped": dropped}}
}

func devStats(nsPath, dev string) (netlink.LinkStatistics, error) {
	var st netlink.LinkStatistics
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		if s := l.Attrs().Statistics; s != nil {
			st = netlink.LinkStatistics(*s)
		}
		return nil
	})
	return st, err
}

// sameMAC reports whether a and b are the same address (nil matches nil only).
func sameMAC(a, b net.HardwareAddr) bool { return a.String() == b.String() }
