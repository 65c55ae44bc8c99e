package dataplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// xdpMode is tc mode with XDP on the guest's side: the tap's XDP program takes the frames
// the guest writes (natively: tun runs XDP on the buffer it builds from the writer's frame,
// before any skb exists) and redirects them through a devmap into the veth. Frames to the
// guest stay on the tc program at the veth's ingress, because that is the cheaper way here:
// an XDP program on a veth turns its receive path into NAPI and copies every skb the stack
// hands it into a page with XDP headroom before the program runs, which cost 1.5x tc's
// forward CPU per frame host->guest, while guest->host XDP costs about 0.75x tc's
// (docs/benchmarks.md, "Where the time goes"). So xdp mode is tc mode, made cheaper
// guest->host. What XDP cannot take (GSO super-frames, frames longer than the port allows)
// it passes on untouched to the tc program, so the features and counters are the same and
// nothing is processed twice. Frames from the guest take XDP only while the veth's peer,
// which belongs to the CNI and lives outside the sandbox netns, runs XDP or has GRO on: the
// kernel drops frames XDP redirects into a veth otherwise. kata-dp reads that from the veth's
// xdp_features and never changes the peer; an operator or CNI that turns GRO on there gets
// XDP at the next UpdateEndpoint or RecheckXDP. Where XDP cannot attach the endpoint runs in
// tc mode, logged, and Mode says why.
//
// Switching between tc, xdp and tcfilter moves the frames from one path to the other while
// both are in place (the new path is installed before the old one is removed, and TCX runs
// before the legacy ingress qdisc, XDP before both), so a switch loses no frame by design.
type xdpMode struct{}

func (xdpMode) Name() string    { return control.ModeXDP }
func (xdpMode) Family() Family  { return FamilySandbox }
func (xdpMode) under() []string { return []string{control.ModeTC} }

func (xdpMode) programsOnBoth() bool { return true }

func (m xdpMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	tap, uplink, err := addTC(sb, ep, fresh)
	if err != nil {
		return nil, err
	}
	st := running(m)
	if st.xdpFromGuest, err = setXDP(sb, ep, tap, uplink); err != nil {
		st.mode, st.reason = control.ModeTC, err.Error()
		sb.dp.log.Warn("xdp mode not available: using tc", "sandbox", ep.Sandbox, "nic", ep.NIC, "reason", err)
		removeXDP(sb, ep)
	}
	return st, nil
}

// Remove stops XDP redirecting and detaches the XDP programs; the tc programs stay (tc's
// Remove takes them).
func (xdpMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	removeXDP(sb, ep)
	return nil
}

// Stats are tc mode's: XDP counts into the same per-slot counters.
func (xdpMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	return tcMode{}.Stats(ctx, sb, ep)
}

// setXDP attaches the tap's XDP program and writes its port. It reports whether frames from
// the guest take XDP (see xdpMode). An XDP program an earlier kata-dp left on the uplink (it
// used to redirect frames to the guest too) and its port are removed first: frames to the
// guest then go on to the tc program, which is attached already.
func setXDP(sb *Sandbox, ep control.Endpoint, tap, uplink netdev.LinkInfo) (bool, error) {
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
	if err := sb.xdp().Delete(uint32(uplink.Index)); err != nil {
		return false, err
	}
	if err := sb.lsb.DetachXDP(ep.NetNS, ep.Uplink); err != nil {
		return false, err
	}
	// The program goes first: it passes every frame on to tc until its port exists.
	ta, err := sb.lsb.AttachXDP(ep.NetNS, ep.Tap, loader.ProgXDPTap)
	if err != nil {
		return false, err
	}
	ok, err := loader.XDPRedirectTarget(ep.NetNS, ep.Uplink)
	if err != nil {
		return false, err
	}
	if !ok {
		sb.dp.log.Info("xdp mode: frames from the guest stay on tc: the uplink's peer has neither XDP nor GRO on (or the kernel, before 6.3, cannot tell)",
			"sandbox", ep.Sandbox, "nic", ep.NIC, "uplink", ep.Uplink)
		return false, sb.xdp().Delete(uint32(tap.Index))
	}
	return true, sb.xdp().Set(ep.NetNS, uint32(tap.Index), uint32(uplink.Index), maps.XDPPort{
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
	return maps.XDPFlagCsum
}

// removeXDP stops XDP redirecting (ports first: from then on XDP passes every frame to tc)
// and detaches the XDP programs. Best effort: what is already gone is not an error.
func removeXDP(sb *Sandbox, ep control.Endpoint) {
	var tap, uplink netdev.LinkInfo
	tap, _ = netdev.LookupLink(ep.NetNS, ep.Tap)
	if ep.Uplink != "" {
		uplink, _ = netdev.LookupLink(ep.NetNS, ep.Uplink)
	}
	for _, idx := range []int{tap.Index, uplink.Index} {
		if idx > 0 {
			if err := sb.xdp().Delete(uint32(idx)); err != nil {
				sb.dp.log.Warn("remove xdp port", "sandbox", ep.Sandbox, "nic", ep.NIC, "err", err)
			}
		}
	}
	for _, dev := range []string{ep.Uplink, ep.Tap} {
		if dev == "" {
			continue
		}
		if err := sb.lsb.DetachXDP(ep.NetNS, dev); err != nil {
			sb.dp.log.Warn("detach xdp", "sandbox", ep.Sandbox, "nic", ep.NIC, "dev", dev, "err", err)
		}
	}
}

// RecheckXDP re-reads, for every endpoint in xdp mode, whether the veth takes XDP frames (its
// peer's XDP or GRO, which the CNI or an operator may change at any time) and starts or stops
// redirecting the guest's frames with XDP to match. While the peer has neither, frames XDP
// redirects into the veth are dropped by the kernel, so the agent should run this
// periodically (every 2 seconds, as a control/watch task) to bound that window.
func (d *Dataplane) RecheckXDP(ctx context.Context) error {
	type item struct {
		sb *Sandbox
		m  State
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
				err = it.sb.xdp().Set(ep.NetNS, uint32(tap.Index), uint32(uplink.Index), maps.XDPPort{
					MaxLen: uint32(uplink.MTU) + 18, Flags: csumFlag(loader.XDPAttachment{Mode: mode}),
				})
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
		} else if err := it.sb.xdp().Delete(uint32(tap.Index)); err != nil {
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

func (sb *Sandbox) xdp() maps.XDPPorts { return maps.ForSandbox(sb.lsb.Maps()).XDP }
