package dataplane

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/macvtap"
	"github.com/kata-dp/kata-dp/control/netdev"
)

// macvtapMode is Kata's older model: a macvtap in bridge mode on the uplink takes the guest's
// MAC, and the VM reads and writes its /dev/tapN instead of the tap. The device work is the
// leaf package control/macvtap, which only this file uses. No BPF; Stats reports the
// macvtap's link counters, marked with NoBPFCounters. Switching into or out of macvtap changes
// the device the VM must use: the frames queued on the old device and those sent before the
// VM has moved are lost.
type macvtapMode struct{}

func (macvtapMode) Name() string   { return control.ModeMacvtap }
func (macvtapMode) Family() Family { return FamilySandbox }

// macvtapDevice is the device the VM uses in macvtap mode (see Dataplane.Macvtap).
type macvtapDevice = macvtap.Macvtap

// macvtapName is the macvtap device of an endpoint in macvtap mode, unique per sandbox netns.
func macvtapName(ep control.Endpoint) string { return "kdpmv" + strconv.Itoa(int(ep.Slot)) }

// Add makes (or adopts) the endpoint's macvtap on the uplink; the Dataplane then takes the BPF
// and tcfilter paths away: they run before macvlan's receive handler and would keep the frames.
func (m macvtapMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	if ep.Uplink == "" {
		return nil, errors.New("macvtap mode needs an uplink")
	}
	name := macvtapName(ep)
	mv, err := adoptMacvtap(ep.NetNS, name)
	if err != nil {
		if mv, err = macvtap.Create(ep.NetNS, ep.Uplink, name); err != nil {
			return nil, err
		}
	}
	if ep.MAC != nil && !sameMAC(ep.MAC, mv.MAC) {
		sb.dp.log.Warn("macvtap mode: the guest must use the uplink's MAC", "sandbox", ep.Sandbox, "nic", ep.NIC,
			"mac", ep.MAC.String(), "macvtap_mac", mv.MAC.String())
	}
	st := running(m)
	st.mv = mv
	return st, nil
}

// Remove deletes the endpoint's macvtap, if there is one (a device of that name that is no
// macvtap is not ours and stays), and gives the uplink its MAC back.
func (macvtapMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	if ep.Uplink == "" {
		return nil
	}
	if _, err := adoptMacvtap(ep.NetNS, macvtapName(ep)); err != nil {
		return nil
	}
	return macvtap.Delete(ep.NetNS, ep.Uplink, macvtapName(ep))
}

// Stats are the macvtap's link counters: a macvtap transmits what the VM sends.
func (macvtapMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	return linkStats(ep, macvtapName(ep), false)
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

// MacvtapDevice is the device the VM uses for an endpoint in macvtap mode: the macvtap's name,
// its MAC (the guest's) and the character device the VM opens (DevPath).
type MacvtapDevice struct{ macvtap.Macvtap }

// Macvtap returns the VM's device of an endpoint in macvtap or macvtap-bpf mode; ok is false
// in other modes.
func (d *Dataplane) Macvtap(ep control.Endpoint) (dev MacvtapDevice, ok bool) {
	sb, err := d.get(ep.Sandbox)
	if err != nil {
		return MacvtapDevice{}, false
	}
	st := d.state(sb, ep.Slot)
	if st == nil || (st.mode != control.ModeMacvtap && st.mode != control.ModeMacvtapBPF) {
		return MacvtapDevice{}, false
	}
	return MacvtapDevice{st.mv}, true
}

var _ control.VMDeviceReporter = (*Dataplane)(nil)

// VMDevice is Macvtap for control (control.VMDeviceReporter, shown by status): the
// macvtap's name and its character device.
func (d *Dataplane) VMDevice(ep control.Endpoint) (name, dev string, ok bool) {
	mv, ok := d.Macvtap(ep)
	if !ok {
		return "", "", false
	}
	return mv.Name, mv.DevPath, true
}

// Open opens n queues of the macvtap's character device the way QEMU does (non-blocking when
// nonblock is set). The caller closes the files.
func (m MacvtapDevice) Open(n int, nonblock bool) ([]*os.File, error) {
	return macvtap.Open(m.Macvtap, n, nonblock)
}
