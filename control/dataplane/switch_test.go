package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kata-dp/kata-dp/control"
)

// Test-only hooks for the external tests (package dataplane_test): moving a live endpoint
// between modes and counting what the switch lost, and whether xdp mode takes the guest's
// frames with XDP too.

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
	if sb, err := d.get(ep.Sandbox); err == nil {
		if cur := d.state(sb, ep.Slot); cur != nil {
			old = cur.mode
		}
	}
	ep.Mode = mode
	if _, err := Lookup(mode); err != nil {
		return 0, fmt.Errorf("switch %s to %s: %w", ep.NIC, mode, err)
	}
	before := frameCounts(ep)
	if err := d.add(ctx, ep, false); err != nil {
		ep.Mode = old
		if rerr := d.add(ctx, ep, false); rerr != nil {
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
