package dataplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/kata-dp/kata-dp/control"
)

// vhostUserMode is a NIC served by a vhost-user switch (OVS-DPDK's dpdkvhostuser ports and the
// like; control/hotplug plugs it): the switch moves the frames between its ports and the
// guest's memory itself, so there is no tap, no uplink and nothing of kata-dp's on the path.
// The mode exists so that such a NIC is an endpoint like any other (status, list-ifaces,
// update-iface, del-iface, reconcile) while the Dataplane installs nothing for it.
// Anti-spoofing, policy and counters are the switch's job: Stats says so with
// control.ErrNoCounters. A NIC runs it because it has a vhostUserSocket, never by choice, so
// Modes leaves it out; it is its own family and never replaces, nor is replaced by, a mode
// that joins a tap.
type vhostUserMode struct{}

func (vhostUserMode) Name() string   { return control.ModeVhostUser }
func (vhostUserMode) Family() Family { return FamilyVhostUser }

// Add installs nothing.
func (m vhostUserMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	if ep.VhostUserSocket == "" {
		return nil, errors.New("vhost-user mode needs a vhostUserSocket")
	}
	return running(m), nil
}

// Remove removes nothing: nothing was installed.
func (vhostUserMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error { return nil }

// Stats: kata-dp has no counters for the NIC; the switch's port statistics have them.
func (vhostUserMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	return control.EndpointStats{}, errVhostUserCounters
}

var errVhostUserCounters = fmt.Errorf("%w: the vhost-user switch moves this NIC's frames (see its port statistics)", control.ErrNoCounters)
