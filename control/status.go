package control

import (
	"cmp"
	"context"
	"slices"
	"strings"

	"github.com/kata-dp/kata-dp/control/netspec"
)

// EndpointStatus is one NIC in a status report.
type EndpointStatus struct {
	NIC        string `json:"nic"`
	Tap        string `json:"tap"`
	TapCreated bool   `json:"tapCreated"`
	Uplink     string `json:"uplink,omitempty"`
	MAC        string `json:"mac"`
	Addr       string `json:"addr,omitempty"`  // IPv4/prefix
	Addr6      string `json:"addr6,omitempty"` // IPv6/prefix (global or link-local)
	Slot       uint32 `json:"slot"`
	PCIAddr    string `json:"pciAddr,omitempty"`
	// Mode is the dataplane mode the NIC asked for (its own or the sandbox's); RunningMode
	// what the dataplane really runs, with ModeReason when they differ (e.g. xdp fell back
	// to tc).
	Mode        string `json:"mode"`
	RunningMode string `json:"runningMode,omitempty"`
	ModeReason  string `json:"modeReason,omitempty"`
	// Vhost is what vhost-net came to for a tap NIC when it was plugged, with the reason
	// ("on: /dev/vhost-net opened", "off: open /dev/vhost-net: ..."); VhostUserSocket is the
	// socket of a vhost-user NIC (mode vhost-user).
	Vhost           string `json:"vhost,omitempty"`
	VhostUserSocket string `json:"vhostUserSocket,omitempty"`
	// Macvtap is the device the VM uses instead of the tap in the macvtap modes (macvtap,
	// macvtap-bpf): the macvtap on the uplink, and MacvtapDev its character device, the file
	// QEMU opens. Without them a status of such a NIC named only a tap no frame passes.
	Macvtap    string `json:"macvtap,omitempty"`
	MacvtapDev string `json:"macvtapDev,omitempty"`
	// Source is where the NIC came from: kata-network, netmon or discovery.
	Source     string         `json:"source"`
	Stats      *EndpointStats `json:"stats,omitempty"`
	StatsError string         `json:"statsError,omitempty"`
}

// SandboxStatus is one sandbox in a status report.
type SandboxStatus struct {
	Sandbox
	// VhostDecision is what the sandbox's vhost setting comes to on this host now, with the
	// reason: what a tap NIC plugged now gets (only for a sandbox with a VM).
	VhostDecision string           `json:"vhostDecision,omitempty"`
	Endpoints     []EndpointStatus `json:"endpoints"`
	Routes        int              `json:"routes"`
	// RouteList is the route table, both families (list-routes shows only IPv4, as openEuler
	// does; list-routes --all and this show IPv6 routes too).
	RouteList []netspec.RouteInfo `json:"routeList,omitempty"`
	// Unhealthy is why the agent could not re-adopt the sandbox when it started (its netns
	// vanished, its pins could not be loaded, its saved state was unreadable; such a sandbox
	// can only be deleted), or why a node task found it unhealthy since (its VM is gone);
	// "" when it is healthy.
	Unhealthy string `json:"unhealthy,omitempty"`
}

// Unhealthy returns the sandboxes the agent could not re-adopt at start, and those a node
// task found unhealthy since (SetDown), by id, with the reason.
func (c *Controller) Unhealthy() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for id, e := range c.sandboxes {
		if why := cmp.Or(e.broken, e.down); e.ready && why != "" {
			out[id] = why
		}
	}
	return out
}

// Endpoints returns a snapshot of every endpoint of every sandbox, ordered by sandbox and slot.
// It does not wait for running operations.
func (c *Controller) Endpoints() []Endpoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Endpoint
	for _, e := range c.sandboxes {
		if !e.ready {
			continue
		}
		for _, n := range e.st.NICs {
			out = append(out, e.sb.endpoint(n))
		}
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		if c := strings.Compare(a.Sandbox, b.Sandbox); c != 0 {
			return c
		}
		return int(a.Slot) - int(b.Slot)
	})
	return out
}

// NIC is one NIC of a sandbox as the agent's node work (netmon) sees it.
type NIC struct {
	Spec   netspec.Interface // as kata-network prints it
	Uplink string            // the device in the netns its tap is joined to; "" = not joined
	Source string            // where it came from: one of Sources
}

// NICs returns a snapshot of the NICs and routes of the sandbox whose id is exactly id. It does
// not wait for running operations: a caller acting on it goes through the typed operations,
// which check again under the sandbox's lock.
func (c *Controller) NICs(id string) ([]NIC, []netspec.Route, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, err := c.findExact(id)
	if err != nil {
		return nil, nil, err
	}
	out := make([]NIC, 0, len(e.st.NICs))
	for _, n := range e.st.NICs {
		out = append(out, NIC{Spec: n.Spec, Uplink: n.Uplink, Source: n.source()})
	}
	return out, slices.Clone(e.st.Routes), nil
}

// Stats returns the dataplane's counters of an endpoint.
func (c *Controller) Stats(ctx context.Context, ep Endpoint) (EndpointStats, error) {
	return c.cfg.Dataplane.Stats(ctx, ep)
}

// Status reports every sandbox with its endpoints and their counters. It does not wait for
// running operations.
func (c *Controller) Status(ctx context.Context) []SandboxStatus {
	type snap struct {
		sb     Sandbox
		st     *state
		broken string
	}
	c.mu.Lock()
	var snaps []snap
	for _, e := range c.sandboxes {
		if e.ready {
			snaps = append(snaps, snap{e.sb, e.st, cmp.Or(e.broken, e.down)})
		}
	}
	c.mu.Unlock()
	slices.SortFunc(snaps, func(a, b snap) int { return strings.Compare(a.sb.ID, b.sb.ID) })
	out := []SandboxStatus{}
	for _, s := range snaps {
		ss := SandboxStatus{Sandbox: s.sb, Endpoints: []EndpointStatus{}, Routes: len(s.st.Routes), Unhealthy: s.broken}
		for _, r := range s.st.Routes {
			if pr, err := netspec.ValidateRoute(r); err == nil {
				ss.RouteList = append(ss.RouteList, netspec.ListRouteAll(pr))
			}
		}
		if vr, ok := c.cfg.Hotplug.(VhostReporter); ok && s.sb.QMP != "" {
			ss.VhostDecision = vr.DecideVhost(cmp.Or(s.sb.Vhost, VhostAuto))
		}
		for _, n := range s.st.NICs {
			ep := s.sb.endpoint(n)
			es := EndpointStatus{
				NIC: n.Spec.Name, Tap: n.Spec.Device, TapCreated: n.TapCreated, Uplink: n.Uplink,
				MAC: n.Spec.HwAddr, Slot: n.Slot, PCIAddr: n.Spec.PCIAddr,
				Vhost: n.VhostDecision, VhostUserSocket: n.Spec.VhostUserSocket, Source: n.source(),
			}
			if p := prefixOf(n, netspec.FamilyIPv4); p.IsValid() {
				es.Addr = p.String()
			}
			if p := prefixOf(n, netspec.FamilyIPv6); p.IsValid() {
				es.Addr6 = p.String()
			}
			es.Mode = ep.Mode
			if mr, ok := c.cfg.Dataplane.(ModeReporter); ok {
				if m, why, err := mr.Mode(ep); err == nil {
					es.RunningMode, es.ModeReason = m, why
				}
			}
			if vr, ok := c.cfg.Dataplane.(VMDeviceReporter); ok {
				if name, dev, ok := vr.VMDevice(ep); ok {
					es.Macvtap, es.MacvtapDev = name, dev
				}
			}
			if st, err := c.cfg.Dataplane.Stats(ctx, ep); err != nil {
				es.StatsError = err.Error()
			} else {
				es.Stats = &st
			}
			ss.Endpoints = append(ss.Endpoints, es)
		}
		out = append(out, ss)
	}
	return out
}

// RunningMode returns the mode an endpoint really runs in (a requested xdp may have fallen
// back to tc), or the one it asked for when the dataplane cannot say.
func (c *Controller) RunningMode(ep Endpoint) string {
	if mr, ok := c.cfg.Dataplane.(ModeReporter); ok {
		if m, _, err := mr.Mode(ep); err == nil && m != "" {
			return m
		}
	}
	return ep.Mode
}
