package bpfdp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/macvtap"
	"github.com/kata-dp/kata-dp/control/mirred"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// Dataplane modes per endpoint (DESIGN.md decision 2):
//
//   - tc: the tc programs on the tap and the uplink (bpfdp.go's add).
//   - xdp: the tc programs plus the XDP programs in front of them. XDP redirects what it can
//     through a devmap; what it cannot (GSO super-frames, and every frame of a direction whose
//     target does not take XDP frames) it passes on untouched to the tc program, so the
//     features and counters are the same and nothing is processed twice. Frames for the
//     guest always take XDP (a tap takes XDP frames). Frames from the guest take XDP only
//     while the veth's peer, which belongs to the CNI and lives outside the sandbox netns,
//     runs XDP or has GRO on: the kernel drops frames XDP redirects into a veth otherwise.
//     kata-dp reads that from the veth's xdp_features and never changes the peer; an
//     operator or CNI that turns GRO on there gets XDP both ways at the next UpdateEndpoint
//     or SwitchMode. Where XDP cannot attach the endpoint runs in tc mode, logged.
//   - tcfilter: Kata's ingress qdisc + u32 + mirred (control/mirred). No BPF, no checks, no
//     counters of its own: Stats reports the tap's link counters, marked.
//   - macvtap: Kata's older model (control/macvtap): a macvtap in bridge mode on the uplink
//     takes the guest's MAC, and the VM reads and writes its /dev/tapN instead of the tap. No
//     BPF; Stats reports the macvtap's link counters, marked.
//
// Switching between tc, xdp and tcfilter moves the frames from one path to the other while
// both are in place (the new path is installed before the old one is removed, and TCX runs
// before the legacy ingress qdisc, XDP before both), so a switch loses no frame by design.
// Switching into or out of macvtap changes the device the VM must use: the frames queued on
// the old device and those sent before the VM has moved are lost.

// Marker put into Drops by Stats for modes without BPF counters: the packets and bytes are
// the device's link counters, and there are no drop reasons.
const NoBPFCounters = "no_bpf_counters"

// epMode is what this process knows of an endpoint's dataplane.
type epMode struct {
	requested, mode string // mode asked for, mode running
	reason          string // why mode differs from requested
	xdpFromGuest    bool   // xdp: the guest's frames take XDP too
	mv              macvtap.Macvtap
	ep              control.Endpoint // as last added, for RecheckXDP
}

func normMode(m string) string {
	if m == "" {
		return control.ModeTC
	}
	return m
}

// macvtapName is the macvtap device of an endpoint in macvtap mode, unique per sandbox netns.
func macvtapName(ep control.Endpoint) string { return "kdpmv" + strconv.Itoa(int(ep.Slot)) }

func (d *Dataplane) modeOf(sb *sandbox, slot uint32) *epMode {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sb.modes == nil {
		return nil
	}
	return sb.modes[slot]
}

func (d *Dataplane) setModeOf(sb *sandbox, slot uint32, m *epMode) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sb.modes == nil {
		sb.modes = map[uint32]*epMode{}
	}
	if m == nil {
		delete(sb.modes, slot)
	} else {
		sb.modes[slot] = m
	}
}

// Mode returns the mode the endpoint runs in and, when it is not the one asked for, why.
func (d *Dataplane) Mode(ep control.Endpoint) (mode, reason string, err error) {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return "", "", err
	}
	m := d.modeOf(sb, ep.Slot)
	if m == nil {
		return "", "", fmt.Errorf("mode of %s: endpoint not added by this process", ep.NIC)
	}
	return m.mode, m.reason, nil
}

// Macvtap returns the macvtap of an endpoint in macvtap mode: the VM side opens its DevPath
// (with macvtap.Open) instead of the tap.
func (d *Dataplane) Macvtap(ep control.Endpoint) (macvtap.Macvtap, bool) {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return macvtap.Macvtap{}, false
	}
	m := d.modeOf(sb, ep.Slot)
	if m == nil || m.mode != control.ModeMacvtap {
		return macvtap.Macvtap{}, false
	}
	return m.mv, true
}

// finishBPF completes an endpoint whose tc programs and entries are in place: XDP in front of
// them for xdp mode (or the fallback to tc), and the removal of what other modes left.
func (d *Dataplane) finishBPF(sb *sandbox, ep control.Endpoint, tap, uplink netdev.LinkInfo) error {
	m := &epMode{requested: normMode(ep.Mode), mode: control.ModeTC, ep: ep}
	if m.requested == control.ModeXDP {
		var err error
		if m.xdpFromGuest, err = d.setXDP(sb, ep, tap, uplink); err != nil {
			m.reason = err.Error()
			d.log.Warn("xdp mode not available: using tc", "sandbox", ep.Sandbox, "nic", ep.NIC, "reason", err)
			d.removeXDP(sb, ep, tap, uplink)
		} else {
			m.mode = control.ModeXDP
		}
	} else {
		d.removeXDP(sb, ep, tap, uplink)
	}
	d.setModeOf(sb, ep.Slot, m)
	return d.removeNonBPF(ep)
}

// setXDP attaches the XDP programs and writes the XDP ports. It reports whether frames from
// the guest take XDP too (see the package's mode notes).
func (d *Dataplane) setXDP(sb *sandbox, ep control.Endpoint, tap, uplink netdev.LinkInfo) (bool, error) {
	if ep.Uplink == "" {
		return false, errors.New("not joined to an uplink: nothing to redirect")
	}
	f, err := loader.Probe()
	if err != nil {
		return false, err
	}
	if !f.XDP || !f.DevMap {
		return false, fmt.Errorf("kernel lacks xdp or devmap (%s)", f)
	}
	// The programs go first: they pass every frame on to tc until their port exists.
	ua, err := sb.lsb.AttachXDP(ep.NetNS, ep.Uplink, loader.ProgXDPUplink)
	if err != nil {
		return false, err
	}
	ta, err := sb.lsb.AttachXDP(ep.NetNS, ep.Tap, loader.ProgXDPTap)
	if err != nil {
		return false, err
	}
	ok, err := loader.XDPRedirectTarget(ep.NetNS, ep.Tap)
	if err != nil {
		return false, err
	}
	if !ok {
		return false, fmt.Errorf("%s does not take XDP frames", ep.Tap)
	}
	if err := sb.lsb.SetXDPPort(ep.NetNS, uint32(uplink.Index), uint32(tap.Index), loader.XDPPort{
		MaxLen: uint32(tap.MTU) + 18, Flags: csumFlag(ua),
	}); err != nil {
		return false, err
	}
	ok, err = loader.XDPRedirectTarget(ep.NetNS, ep.Uplink)
	if err != nil {
		return false, err
	}
	if !ok {
		d.log.Info("xdp mode: frames from the guest stay on tc: the uplink's peer has neither XDP nor GRO on",
			"sandbox", ep.Sandbox, "nic", ep.NIC, "uplink", ep.Uplink)
		return false, sb.lsb.DelXDPPort(uint32(tap.Index))
	}
	return true, sb.lsb.SetXDPPort(ep.NetNS, uint32(tap.Index), uint32(uplink.Index), loader.XDPPort{
		MaxLen: uint32(uplink.MTU) + 18, Flags: csumFlag(ta),
	})
}

// csumFlag: checksum repair for a program in driver mode only. Generic XDP redirects the skb
// itself, with its note that a checksum is partial, so there is nothing to repair, and a
// repaired checksum would be summed a second time.
func csumFlag(a loader.XDPAttachment) uint32 {
	if a.Mode == "generic" {
		return 0
	}
	return loader.XDPFlagCsum
}

// removeXDP stops XDP redirecting (ports first: from then on XDP passes every frame to tc)
// and detaches the XDP programs. Best effort: what is already gone is not an error.
func (d *Dataplane) removeXDP(sb *sandbox, ep control.Endpoint, tap, uplink netdev.LinkInfo) {
	for _, idx := range []int{tap.Index, uplink.Index} {
		if idx > 0 {
			if err := sb.lsb.DelXDPPort(uint32(idx)); err != nil {
				d.log.Warn("remove xdp port", "sandbox", ep.Sandbox, "nic", ep.NIC, "err", err)
			}
		}
	}
	for _, dev := range []string{ep.Uplink, ep.Tap} {
		if dev == "" {
			continue
		}
		if err := sb.lsb.DetachXDP(ep.NetNS, dev); err != nil {
			d.log.Warn("detach xdp", "sandbox", ep.Sandbox, "nic", ep.NIC, "dev", dev, "err", err)
		}
	}
}

// removeBPF takes the endpoint out of the BPF datapath: XDP ports and programs, tc programs,
// then its entries (a program without an entry passes frames on).
func (d *Dataplane) removeBPF(sb *sandbox, ep control.Endpoint) error {
	var tap, uplink netdev.LinkInfo
	tap, _ = netdev.LookupLink(ep.NetNS, ep.Tap)
	if ep.Uplink != "" {
		uplink, _ = netdev.LookupLink(ep.NetNS, ep.Uplink)
	}
	d.removeXDP(sb, ep, tap, uplink)
	for _, dev := range []string{ep.Uplink, ep.Tap} {
		if dev == "" {
			continue
		}
		if err := sb.lsb.Detach(ep.NetNS, dev); err != nil {
			return err
		}
	}
	eps := maps.EndpointMap{Map: sb.lsb.Maps().Endpoints}
	all, err := eps.All()
	if err != nil {
		return err
	}
	for ifindex, e := range all {
		if e.Slot == ep.Slot {
			// XDP ports of a device that is gone (or was recreated) are only found here.
			if err := sb.lsb.DelXDPPort(ifindex); err != nil {
				return err
			}
			if err := eps.Remove(ifindex); err != nil {
				return err
			}
		}
	}
	return nil
}

// removeNonBPF removes the tcfilter and macvtap plumbing of the endpoint, if any.
func (d *Dataplane) removeNonBPF(ep control.Endpoint) error {
	if ep.Uplink == "" {
		return nil
	}
	if joined, err := mirred.Joined(ep.NetNS, ep.Uplink, ep.Tap); err == nil && joined {
		if err := mirred.Unjoin(ep.NetNS, ep.Uplink, ep.Tap); err != nil {
			return err
		}
	}
	return deleteMacvtap(ep)
}

// deleteMacvtap deletes the endpoint's macvtap, if there is one (a device of that name that is
// no macvtap is not ours and stays).
func deleteMacvtap(ep control.Endpoint) error {
	if _, err := adoptMacvtap(ep.NetNS, macvtapName(ep)); err != nil {
		return nil
	}
	return macvtap.Delete(ep.NetNS, ep.Uplink, macvtapName(ep))
}

// addTCFilter joins the tap and the uplink with Kata's mirred filters, then takes the BPF path
// away (until then it runs first and takes the frames) and what macvtap mode left.
func (d *Dataplane) addTCFilter(sb *sandbox, ep control.Endpoint) error {
	if ep.Uplink != "" {
		if err := mirred.Join(ep.NetNS, ep.Uplink, ep.Tap); err != nil {
			return err
		}
	}
	if err := d.removeBPF(sb, ep); err != nil {
		return err
	}
	if ep.Uplink != "" {
		if err := deleteMacvtap(ep); err != nil {
			return err
		}
	}
	d.setModeOf(sb, ep.Slot, &epMode{requested: control.ModeTCFilter, mode: control.ModeTCFilter})
	return nil
}

// addMacvtap makes (or adopts) the endpoint's macvtap on the uplink, then takes the BPF and
// tcfilter paths away: they run before macvlan's receive handler and would keep the frames.
func (d *Dataplane) addMacvtap(sb *sandbox, ep control.Endpoint) error {
	if ep.Uplink == "" {
		return errors.New("macvtap mode needs an uplink")
	}
	name := macvtapName(ep)
	mv, err := adoptMacvtap(ep.NetNS, name)
	if err != nil {
		if mv, err = macvtap.Create(ep.NetNS, ep.Uplink, name); err != nil {
			return err
		}
	}
	if ep.MAC != nil && ep.MAC.String() != mv.MAC.String() {
		d.log.Warn("macvtap mode: the guest must use the uplink's MAC", "sandbox", ep.Sandbox, "nic", ep.NIC,
			"mac", ep.MAC.String(), "macvtap_mac", mv.MAC.String())
	}
	if err := d.removeBPF(sb, ep); err != nil {
		return err
	}
	if joined, err := mirred.Joined(ep.NetNS, ep.Uplink, ep.Tap); err == nil && joined {
		if err := mirred.Unjoin(ep.NetNS, ep.Uplink, ep.Tap); err != nil {
			return err
		}
	}
	d.setModeOf(sb, ep.Slot, &epMode{requested: control.ModeMacvtap, mode: control.ModeMacvtap, mv: mv})
	return nil
}

// adoptMacvtap describes an existing macvtap (made by an earlier run).
func adoptMacvtap(nsPath, name string) (macvtap.Macvtap, error) {
	li, err := netdev.LookupLink(nsPath, name)
	if err != nil {
		return macvtap.Macvtap{}, err
	}
	if li.Type != "macvtap" {
		return macvtap.Macvtap{}, fmt.Errorf("%s is a %s, not a macvtap", name, li.Type)
	}
	return macvtap.Macvtap{
		Name: name, Ifindex: li.Index, MAC: li.MAC,
		DevPath: filepath.Join(macvtap.DevDir, "tap"+strconv.Itoa(li.Index)),
	}, nil
}

// nonBPFMode returns the endpoint's mode when it is one without BPF counters (tcfilter,
// macvtap), from what this process did or, after a restart before Reconcile, from ep.Mode.
func (d *Dataplane) nonBPFMode(sb *sandbox, ep control.Endpoint) *epMode {
	m := d.modeOf(sb, ep.Slot)
	if m == nil {
		m = &epMode{mode: normMode(ep.Mode)}
		if m.mode == control.ModeMacvtap {
			m.mv, _ = adoptMacvtap(ep.NetNS, macvtapName(ep))
		}
	}
	if m.mode != control.ModeTCFilter && m.mode != control.ModeMacvtap {
		return nil
	}
	return m
}

// linkStats are the Stats of an endpoint in a mode without BPF counters: the link counters of
// the device the VM uses (the tap, or the macvtap), with the NoBPFCounters marker.
func (d *Dataplane) linkStats(ep control.Endpoint, m *epMode) (control.EndpointStats, error) {
	var out control.EndpointStats
	dev := ep.Tap
	if m.mode == control.ModeMacvtap {
		dev = m.mv.Name
	}
	st, err := devStats(ep.NetNS, dev)
	if err != nil {
		return out, fmt.Errorf("stats of %s: %w", ep.NIC, err)
	}
	// A tap receives what the VM sends; a macvtap transmits it.
	from, to := dirStats(st.RxPackets, st.RxBytes, st.RxDropped), dirStats(st.TxPackets, st.TxBytes, st.TxDropped)
	if m.mode == control.ModeMacvtap {
		from, to = to, from
	}
	out.FromGuest, out.ToGuest = from, to
	return out, nil
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

// RecheckXDP re-reads, for every endpoint in xdp mode, whether the veth takes XDP frames (its
// peer's XDP or GRO, which the CNI or an operator may change at any time) and starts or stops
// redirecting the guest's frames with XDP to match. While the peer has neither, frames XDP
// redirects into the veth are dropped by the kernel, so the agent should run this
// periodically (RunXDPWatch) to bound that window.
func (d *Dataplane) RecheckXDP(ctx context.Context) error {
	type item struct {
		sb *sandbox
		m  epMode
	}
	var items []item
	d.mu.Lock()
	for _, sb := range d.sandboxes {
		for _, m := range sb.modes {
			if m.mode == control.ModeXDP {
				items = append(items, item{sb, *m})
			}
		}
	}
	d.mu.Unlock()
	var errs []error
	for _, it := range items {
		ep := it.m.ep
		ok, err := loader.XDPRedirectTarget(ep.NetNS, ep.Uplink)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ok == it.m.xdpFromGuest {
			continue
		}
		tap, err := netdev.LookupLink(ep.NetNS, ep.Tap)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ok {
			uplink, err := netdev.LookupLink(ep.NetNS, ep.Uplink)
			if err == nil {
				_, mode, _ := loader.XDPProgram(ep.NetNS, ep.Tap)
				err = it.sb.lsb.SetXDPPort(ep.NetNS, uint32(tap.Index), uint32(uplink.Index), loader.XDPPort{
					MaxLen: uint32(uplink.MTU) + 18, Flags: csumFlag(loader.XDPAttachment{Mode: mode}),
				})
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
		} else if err := it.sb.lsb.DelXDPPort(uint32(tap.Index)); err != nil {
			errs = append(errs, err)
			continue
		}
		d.log.Info("xdp mode: frames from the guest now take "+map[bool]string{true: "XDP", false: "tc"}[ok],
			"sandbox", ep.Sandbox, "nic", ep.NIC, "uplink", ep.Uplink)
		d.mu.Lock()
		if m := it.sb.modes[ep.Slot]; m != nil && m.mode == control.ModeXDP {
			m.xdpFromGuest = ok
		}
		d.mu.Unlock()
	}
	return errors.Join(errs...)
}

// RunXDPWatch runs RecheckXDP every interval until ctx ends.
func (d *Dataplane) RunXDPWatch(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if err := d.RecheckXDP(ctx); err != nil {
				d.log.Warn("recheck xdp", "err", err)
			}
		}
	}
}

// XDPFromGuest reports whether an endpoint in xdp mode redirects the guest's frames with XDP
// too (false: they take the tc program).
func (d *Dataplane) XDPFromGuest(ep control.Endpoint) bool {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m := sb.modes[ep.Slot]
	return m != nil && m.mode == control.ModeXDP && m.xdpFromGuest
}

// frameCounts are, per device of the endpoint, the frames that entered the sandbox netns
// through it (uplink and tap receive, macvtap transmit: the VM's writes) and left through it.
func frameCounts(ep control.Endpoint) map[string][2]uint64 {
	out := map[string][2]uint64{}
	for _, dev := range []string{ep.Uplink, ep.Tap, macvtapName(ep)} {
		if dev == "" {
			continue
		}
		st, err := devStats(ep.NetNS, dev)
		if err != nil {
			continue // not there (yet, or any more)
		}
		if dev == macvtapName(ep) {
			out[dev] = [2]uint64{st.TxPackets, st.RxPackets}
		} else {
			out[dev] = [2]uint64{st.RxPackets, st.TxPackets}
		}
	}
	return out
}

// growth is the growth of (in - out) from a to b over the devices present in b (a device made
// in between starts from zero; one removed in between is not counted).
func growth(a, b map[string][2]uint64) int64 {
	var bal int64
	for dev, n := range b {
		m := a[dev]
		bal += int64(n[0]-m[0]) - int64(n[1]-m[1])
	}
	return bal
}

// settledLoss reads the counters a few times, 2 ms apart, and takes the smallest growth since
// before: a frame in flight (queued for the VM's read) at one reading is not taken for lost.
func settledLoss(ep control.Endpoint, before map[string][2]uint64) uint64 {
	best := int64(-1)
	for i := range 5 {
		if i > 0 {
			time.Sleep(2 * time.Millisecond)
		}
		if g := growth(before, frameCounts(ep)); best < 0 || g < best {
			best = g
		}
	}
	if best < 0 {
		return 0
	}
	return uint64(best)
}

// SwitchSettle is how long SwitchMode lets frames in flight land before it counts.
var SwitchSettle = 200 * time.Millisecond

// SwitchMode moves a live endpoint to another mode (ep.Mode is ignored) and reports the
// frames lost in the switch: the growth of (frames in - frames out) over the endpoint's
// devices from just before the switch to SwitchSettle after it (the smallest of a few
// readings, so frames queued for the VM's read are not taken for lost). Frames in flight at
// the first reading make this an estimate to within the queue depth; leaving macvtap
// mode removes the macvtap and its counters, so that switch's count leaves out what crossed
// the macvtap after the first reading. A failed switch leaves the endpoint in its old mode
// when it can.
func (d *Dataplane) SwitchMode(ctx context.Context, ep control.Endpoint, mode string) (lost uint64, err error) {
	old := ep.Mode
	if m, err := d.get(ep.Sandbox); err == nil {
		if cur := d.modeOf(m, ep.Slot); cur != nil {
			old = cur.mode
		}
	}
	ep.Mode = mode
	if err := checkMode(ep); err != nil {
		return 0, fmt.Errorf("switch %s to %s: %w", ep.NIC, mode, err)
	}
	before := frameCounts(ep)
	if err := d.add(ep, false); err != nil {
		ep.Mode = old
		if rerr := d.add(ep, false); rerr != nil {
			err = errors.Join(err, fmt.Errorf("back to %s: %w", old, rerr))
		}
		return 0, fmt.Errorf("switch %s to %s: %w", ep.NIC, mode, err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(SwitchSettle):
	}
	lost = settledLoss(ep, before)
	slog.Info("switched dataplane mode", "sandbox", ep.Sandbox, "nic", ep.NIC, "from", old, "to", mode, "lost", lost)
	return lost, nil
}
