package control

import (
	"context"
	"fmt"
	"slices"

	"github.com/kata-dp/kata-dp/control/netspec"
)

// Operations for sandboxes that Kata discovery (control/kata) registers: taking over a NIC
// Kata already plugged into the VM, marking a sandbox whose VM is gone, and handing a sandbox
// back to Kata's own plumbing. Registration and garbage collection use AddSandbox and
// DelSandbox with a SandboxSpec whose Source is SourceDiscovery.

// ErrNotDiscovered is returned by ReleaseSandbox for a sandbox registered by hand: it has no
// Kata plumbing to go back to (sandbox del removes it).
var ErrNotDiscovered = fmt.Errorf("%w: not registered by Kata discovery", ErrInvalid)

// AdoptIface takes over a NIC that is in the sandbox's VM already (Kata plugged it): req
// names the existing tap (device), the device it is joined to (uplink) and the identity the
// guest has (name, MAC, addresses, MTU). The tap is adopted, never created or deleted; the
// NIC's mode (ep.Mode, normally the sandbox's tc) is attached, and the dataplane then removes
// what other modes of its family left, Kata's u32 + mirred filters included: the BPF path is
// in place before the filters go (TCX runs before the ingress qdisc's filters), so frames
// keep flowing. There is no hot-plug. routes are then added (those that already exist, or do
// not apply, are skipped with a log line). The id must match exactly.
func (c *Controller) AdoptIface(ctx context.Context, id string, req netspec.AddRequest, routes []netspec.Route) (netspec.Interface, error) {
	e, err := c.lockExact(id)
	if err != nil {
		return netspec.Interface{}, fmt.Errorf("adopt iface: %w", err)
	}
	defer e.mu.Unlock()
	if e.broken != "" {
		return netspec.Interface{}, fmt.Errorf("adopt iface: %w: %s: %s", ErrUnhealthy, id, e.broken)
	}
	if req.Uplink == "" {
		return netspec.Interface{}, fmt.Errorf("adopt iface: %w: an adopted NIC needs the uplink its tap is joined to", ErrInvalid)
	}
	in, err := c.addIfaceWith(ctx, e, req, addOptions{adopt: true, source: SourceDiscovery})
	if err != nil {
		return netspec.Interface{}, fmt.Errorf("adopt iface %s: %w", req.Device, err)
	}
	for _, r := range routes {
		if _, err := c.addRoute(ctx, e, r); err != nil {
			c.log.Info("adopted route skipped", "sandbox", id, "dest", r.Dest, "gateway", r.Gateway, "device", r.Device, "why", err)
		}
	}
	return in, nil
}

// SetDown marks the sandbox unhealthy for reason (its VM is gone), or healthy again with "".
// Operations but delete and release are refused while it is down; status shows the reason.
// An unknown id is ignored.
func (c *Controller) SetDown(id, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.sandboxes[id]; ok && e.down != reason {
		e.down = reason
		if reason != "" {
			c.log.Warn("sandbox unhealthy", "sandbox", id, "why", reason)
		} else {
			c.log.Info("sandbox healthy again", "sandbox", id)
		}
	}
}

// downReason is e.down, read under c.mu.
func (c *Controller) downReason(e *entry) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return e.down
}

// ReleaseSandbox hands a discovered sandbox back to Kata's own plumbing, under traffic: each
// NIC's tap and uplink are joined with u32 + mirred again (the filters only see frames once
// the BPF programs are gone, so adding them first leaves no gap), then kata-dp's programs,
// map entries and pins are removed, and the sandbox is forgotten. Taps, the VM and the
// netns are not touched. Only sandboxes registered by discovery, whose NICs all came from
// it, can be released; the id must match exactly.
func (c *Controller) ReleaseSandbox(ctx context.Context, id string) error {
	e, err := c.lockExact(id)
	if err != nil {
		return fmt.Errorf("release sandbox: %w", err)
	}
	defer e.mu.Unlock()
	if e.sb.Source != SourceDiscovery {
		return fmt.Errorf("release sandbox %s: %w: it was registered by hand (sandbox del removes it)", id, ErrNotDiscovered)
	}
	if i := slices.IndexFunc(e.st.NICs, func(n nic) bool { return n.Source != SourceDiscovery || n.Uplink == "" }); i >= 0 {
		return fmt.Errorf("release sandbox %s: %w: NIC %s was added through kata-network, not taken over from Kata (del-iface it first)",
			id, ErrInvalid, e.st.NICs[i].Spec.Name)
	}
	up, ok := c.cfg.Dataplane.(EndpointUpdater)
	if !ok && len(e.st.NICs) > 0 {
		return fmt.Errorf("release sandbox %s: the dataplane cannot switch a NIC's mode in place", id)
	}
	if e.broken == "" && c.cfg.CheckNetNS(e.sb.NetNS) == nil {
		for _, n := range e.st.NICs {
			ep := e.sb.endpoint(n)
			ep.Mode = ModeTCFilter
			if err := up.UpdateEndpoint(ctx, ep); err != nil {
				return fmt.Errorf("release sandbox %s: restore Kata's filters for %s: %w", id, n.Spec.Name, err)
			}
		}
	}
	if err := c.cfg.Dataplane.RemoveSandbox(ctx, id); err != nil {
		return fmt.Errorf("release sandbox %s: dataplane: %w", id, err)
	}
	if err := c.cfg.Store.Delete(id); err != nil {
		return fmt.Errorf("release sandbox %s: %w", id, err)
	}
	c.forget(e)
	c.log.Info("sandbox released to Kata's tcfilter plumbing", "sandbox", id, "nics", len(e.st.NICs))
	return nil
}

// forget unregisters a removed sandbox; e.mu is held.
func (c *Controller) forget(e *entry) {
	e.gone = true
	c.mu.Lock()
	delete(c.sandboxes, e.sb.ID)
	for _, n := range e.st.NICs {
		if c.devices[n.Spec.Device] == e.sb.ID {
			delete(c.devices, n.Spec.Device)
		}
		if c.sockets[n.Spec.VhostUserSocket] == e.sb.ID {
			delete(c.sockets, n.Spec.VhostUserSocket)
		}
	}
	c.mu.Unlock()
	if c.cfg.OnSandboxRemoved != nil {
		c.cfg.OnSandboxRemoved(e.sb.ID)
	}
}
