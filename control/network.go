package control

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/internal/faultinject"
)

// The kata-network operations as typed methods. The wire contract (operation names, the
// network file's JSON, the exact stdout bytes and null conventions) is control/api's; these
// take and return the contract's types (netspec) and know no output format.
//
// Each operation first resolves the sandbox id (exact or unique prefix) and checks its health,
// under the sandbox's lock. Those checks, and only they, fail with ErrNoSuchSandbox,
// ErrAmbiguous or ErrUnhealthy, so a caller can tell "the sandbox is not there" from "the
// operation failed" (kata-network prints different things for them).

// AddIface adds a NIC to the sandbox (see the kata-network contract) and returns it as
// configured, pciAddr and IPAddresses[].Family filled in.
func (c *Controller) AddIface(ctx context.Context, id string, req netspec.AddRequest) (netspec.Interface, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return netspec.Interface{}, err
	}
	defer e.mu.Unlock()
	return c.addIface(ctx, e, req)
}

// DelIface removes the NIC matched by name (or, without a name, by hwAddr). An unknown NIC is
// not an error.
func (c *Controller) DelIface(ctx context.Context, id string, in netspec.Interface) error {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	return c.delIface(ctx, e, in)
}

// UpdateIface changes the address of the NIC named in.Name.
func (c *Controller) UpdateIface(ctx context.Context, id string, in netspec.Interface) (netspec.Interface, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return netspec.Interface{}, err
	}
	defer e.mu.Unlock()
	return c.updateIface(ctx, e, in)
}

// Ifaces returns the NICs added through kata-network, as configured. Like every kata-network
// operation it checks the sandbox's health first.
func (c *Controller) Ifaces(ctx context.Context, id string) ([]netspec.Interface, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	var out []netspec.Interface
	for _, n := range e.st.NICs {
		out = append(out, n.Spec)
	}
	return out, nil
}

// Routes returns the sandbox's routes as they were given (health checked first, as Ifaces).
func (c *Controller) Routes(ctx context.Context, id string) ([]netspec.Route, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	return slices.Clone(e.st.Routes), nil
}

// AddRoute adds one route and returns it.
func (c *Controller) AddRoute(ctx context.Context, id string, r netspec.Route) (netspec.Route, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return netspec.Route{}, err
	}
	defer e.mu.Unlock()
	return c.addRoute(ctx, e, r)
}

// DelRoute removes the routes matching r (fuzzy: empty device or gateway match any) and
// returns them.
func (c *Controller) DelRoute(ctx context.Context, id string, r netspec.Route) ([]netspec.Route, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	return c.delRoute(ctx, e, r)
}

// UpdateRoutes replaces the sandbox's routes and returns the routes now in force.
func (c *Controller) UpdateRoutes(ctx context.Context, id string, rs []netspec.Route) ([]netspec.Route, error) {
	e, err := c.acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	return c.updateRoutes(ctx, e, rs)
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

func freeSlot(st *state) (uint32, bool) {
	used := make([]bool, MaxEndpoints)
	for _, n := range st.NICs {
		if n.Slot < MaxEndpoints {
			used[n.Slot] = true
		}
	}
	for i, u := range used {
		if !u {
			return uint32(i), true
		}
	}
	return 0, false
}

func (c *Controller) addIface(ctx context.Context, e *entry, req netspec.AddRequest) (netspec.Interface, error) {
	return c.addIfaceWith(ctx, e, req, addOptions{})
}

// addOptions are the differences of an adopted NIC (adopt.go) from one added by kata-network.
type addOptions struct {
	adopt  bool   // the NIC is in the VM already (Kata plugged it): no hot-plug
	source string // where the NIC came from (nic.Source)
}

func (c *Controller) addIfaceWith(ctx context.Context, e *entry, req netspec.AddRequest, o addOptions) (netspec.Interface, error) {
	sb, st := e.sb, e.st
	v, err := netspec.ValidateAdd(req, c.cfg.CheckVhostSocket)
	if err != nil {
		return netspec.Interface{}, err
	}
	for _, n := range st.NICs {
		switch {
		case n.Spec.Name == v.Spec.Name:
			return netspec.Interface{}, fmt.Errorf("%w: NIC name %s is already used in the sandbox", ErrExists, v.Spec.Name)
		case n.Spec.Device == v.Spec.Device:
			return netspec.Interface{}, fmt.Errorf("%w: device %s is already used by NIC %s", ErrExists, v.Spec.Device, n.Spec.Name)
		case sameMAC(n.Spec.HwAddr, v.MAC):
			return netspec.Interface{}, fmt.Errorf("%w: hwAddr %s is already used by NIC %s", ErrExists, v.Spec.HwAddr, n.Spec.Name)
		case v.Spec.VhostUserSocket != "" && n.Spec.VhostUserSocket != "":
			return netspec.Interface{}, invalidf("only one vhostUserSocket per sandbox (NIC %s has one)", n.Spec.Name)
		case v.Uplink != "" && n.Uplink == v.Uplink:
			return netspec.Interface{}, fmt.Errorf("%w: uplink %s is already joined to NIC %s", ErrExists, v.Uplink, n.Spec.Name)
		case v.Uplink != "" && n.Spec.Device == v.Uplink:
			return netspec.Interface{}, invalidf("uplink %s is the tap of NIC %s", v.Uplink, n.Spec.Name)
		}
	}
	vhostUser := v.Spec.VhostUserSocket != ""
	switch {
	case vhostUser && v.Mode != "" && v.Mode != ModeVhostUser:
		return netspec.Interface{}, invalidf("mode %q does not apply to a vhost-user NIC (vhostUserSocket): the vhost-user switch moves its frames", v.Mode)
	case vhostUser && v.Uplink != "":
		return netspec.Interface{}, invalidf("uplink does not apply to a vhost-user NIC (vhostUserSocket): it has no tap")
	case vhostUser && v.Vhost != "":
		return netspec.Interface{}, invalidf("vhost (vhost-net) does not apply to a vhost-user NIC (vhostUserSocket): it has no tap")
	case !vhostUser && v.Mode != "" && !slices.Contains(Modes, v.Mode):
		return netspec.Interface{}, invalidf("mode %q is not one of %s", v.Mode, strings.Join(Modes, ", "))
	case v.Vhost != "" && !slices.Contains(VhostModes, v.Vhost):
		return netspec.Interface{}, invalidf("vhost %q is not one of %s", v.Vhost, strings.Join(VhostModes, ", "))
	}
	slot, ok := freeSlot(st)
	if !ok {
		return netspec.Interface{}, fmt.Errorf("%w: sandbox has %d NICs", ErrNoSlot, MaxEndpoints)
	}
	if v.Uplink != "" {
		ok, err := c.cfg.Taps.LinkExists(ctx, sb.NetNS, v.Uplink)
		if err != nil {
			return netspec.Interface{}, fmt.Errorf("look up uplink %s: %w", v.Uplink, err)
		}
		if !ok {
			return netspec.Interface{}, invalidf("uplink %s does not exist in the sandbox netns", v.Uplink)
		}
	}
	if err := c.reserveDevice(v.Spec.Device, sb.ID); err != nil {
		return netspec.Interface{}, err
	}
	n := nic{Spec: v.Spec, Slot: slot, Uplink: v.Uplink, Mode: v.Mode, Vhost: v.Vhost, Source: o.source}
	if src := sourceOf(ctx); n.Source == "" && src != SourceKataNetwork {
		if !slices.Contains(Sources, src) {
			return netspec.Interface{}, invalidf("NIC source %q is not one of %s", src, strings.Join(Sources, ", "))
		}
		n.Source = src
	}
	var u undo
	u.push("release device "+v.Spec.Device, func(context.Context) error { c.releaseDevice(v.Spec.Device, sb.ID); return nil })
	fail := func(err error) (netspec.Interface, error) { return netspec.Interface{}, c.rollback(ctx, &u, err) }
	if vhostUser {
		if err := c.reserveSocket(v.Spec.VhostUserSocket, sb.ID); err != nil {
			return fail(err)
		}
		u.push("release socket "+v.Spec.VhostUserSocket, func(context.Context) error { c.releaseSocket(v.Spec.VhostUserSocket, sb.ID); return nil })
	}

	// 0. The intent, saved before anything is created: the NIC, pending, with whether its
	// tap will be kata-dp's. An agent killed from here on removes the NIC completely before
	// anything else happens to the sandbox (resolvePending), so the retried add starts clean.
	if !vhostUser {
		exists, err := c.cfg.Taps.LinkExists(ctx, sb.NetNS, v.Spec.Device)
		if err != nil {
			return fail(fmt.Errorf("look up tap %s: %w", v.Spec.Device, err))
		}
		n.TapCreated = !exists
	}
	if err := c.saveIntent(e, &u, n, pendingAdd); err != nil {
		return fail(err)
	}
	faultinject.Point("add-iface:intent")

	// 1. The tap: created, or an existing one adopted (never joined, never deleted). A
	// vhost-user NIC has none: "device" only names it.
	created := false
	if !vhostUser {
		created, err = c.cfg.Taps.EnsureTap(ctx, sb.NetNS, v.Spec.Device, TapOptions{Queues: v.Queues, MTU: max(v.Spec.MTU, 68), Vnet: true})
		if err != nil {
			return fail(fmt.Errorf("tap %s: %w", v.Spec.Device, err))
		}
	}
	if created != n.TapCreated {
		// Someone else created or removed a link of that name meanwhile: record the truth.
		n.TapCreated = created
		if err := c.saveIntent(e, nil, n, pendingAdd); err != nil {
			if created {
				c.cfg.Taps.DeleteTap(ctx, sb.NetNS, v.Spec.Device)
			}
			return fail(err)
		}
	}
	faultinject.Point("add-iface:tap")
	if created {
		u.push("delete tap "+v.Spec.Device, func(ctx context.Context) error { return c.cfg.Taps.DeleteTap(ctx, sb.NetNS, v.Spec.Device) })
	}
	// 2. Joining: the sandbox uplink, when the tap is ours, the uplink exists and is free.
	if n.Uplink == "" && created && !slices.ContainsFunc(st.NICs, func(o nic) bool { return o.Uplink == sb.Uplink || o.Spec.Device == sb.Uplink }) {
		ok, err := c.cfg.Taps.LinkExists(ctx, sb.NetNS, sb.Uplink)
		if err != nil {
			return fail(fmt.Errorf("look up uplink %s: %w", sb.Uplink, err))
		}
		if ok {
			n.Uplink = sb.Uplink
		}
	}
	// 3. The dataplane.
	ep := sb.endpoint(n)
	if err := c.cfg.Dataplane.AddEndpoint(ctx, ep); err != nil {
		return fail(fmt.Errorf("dataplane: add endpoint %s: %w", n.Spec.Name, err))
	}
	u.push("dataplane: del endpoint "+n.Spec.Name, func(ctx context.Context) error { return c.cfg.Dataplane.DelEndpoint(ctx, ep) })
	faultinject.Point("add-iface:endpoint")
	// 4. The VM.
	if sb.QMP != "" && !o.adopt {
		pci, err := c.cfg.Hotplug.Plug(ctx, sb, ep)
		if err != nil {
			return fail(fmt.Errorf("hot-plug %s: %w", n.Spec.Name, err))
		}
		n.Spec.PCIAddr = pci
		u.push("hot-unplug "+n.Spec.Name, func(ctx context.Context) error { return c.cfg.Hotplug.Unplug(ctx, sb, ep) })
		if vr, ok := c.cfg.Hotplug.(VhostReporter); ok && !vhostUser {
			n.VhostDecision, _ = vr.VhostDecision(sb, ep)
		}
	}
	faultinject.Point("add-iface:plug")
	// 5. The state: the NIC, no longer pending.
	next := st.clone()
	next.NICs = append(next.NICs, n)
	if err := c.commit(e, next); err != nil {
		return fail(err)
	}
	c.log.Info("NIC added", "sandbox", sb.ID, "nic", n.Spec.Name, "tap", n.Spec.Device, "created", created,
		"slot", n.Slot, "uplink", n.Uplink, "pci", n.Spec.PCIAddr, "mode", ep.Mode, "vhost", n.VhostDecision, "vhostUserSocket", ep.VhostUserSocket,
		"source", n.source())
	return n.Spec, nil
}

func sameMAC(s string, mac net.HardwareAddr) bool {
	m, err := net.ParseMAC(s)
	return err == nil && bytes.Equal(m, mac)
}

func findNIC(st *state, in netspec.Interface) int {
	if in.Name != "" {
		return slices.IndexFunc(st.NICs, func(n nic) bool { return n.Spec.Name == in.Name })
	}
	mac, err := net.ParseMAC(in.HwAddr)
	if err != nil {
		return -1
	}
	return slices.IndexFunc(st.NICs, func(n nic) bool { return sameMAC(n.Spec.HwAddr, mac) })
}

func (c *Controller) delIface(ctx context.Context, e *entry, in netspec.Interface) error {
	sb, st := e.sb, e.st
	if in.Name == "" && in.HwAddr == "" {
		return invalidf("name is required")
	}
	i := findNIC(st, in)
	if i < 0 {
		// Not in the state: nothing to do, except removing what kata-dp may have left in the
		// VM under that name (a NIC whose state was lost): its ids are kata-dp's own.
		return c.scrubUnknown(ctx, sb, in)
	}
	n := st.NICs[i]
	ep := sb.endpoint(n)
	next := st.clone()
	next.NICs = slices.Delete(next.NICs, i, i+1)
	next.Routes = slices.DeleteFunc(next.Routes, func(r netspec.Route) bool { return r.Device == n.Spec.Name })

	var u undo
	fail := func(err error) error { return c.rollback(ctx, &u, err) }
	// 0. The intent: an agent killed from here on finishes the removal before anything else
	// happens to the sandbox.
	if err := c.saveIntent(e, &u, n, pendingDel); err != nil {
		return fail(err)
	}
	faultinject.Point("del-iface:intent")
	// 1. The VM.
	if sb.QMP != "" {
		if err := c.cfg.Hotplug.Unplug(ctx, sb, ep); err != nil {
			return fail(fmt.Errorf("hot-unplug %s: %w", n.Spec.Name, err))
		}
		u.push("hot-plug "+n.Spec.Name, func(ctx context.Context) error {
			pci, err := c.cfg.Hotplug.Plug(ctx, sb, ep)
			if err == nil && pci != n.Spec.PCIAddr {
				c.log.Warn("NIC re-plugged at another PCI address", "sandbox", sb.ID, "nic", n.Spec.Name, "was", n.Spec.PCIAddr, "now", pci)
			}
			return err
		})
	}
	faultinject.Point("del-iface:unplug")
	// 2. The routes through the NIC go with it.
	if len(next.Routes) != len(st.Routes) {
		if err := c.setRoutes(ctx, &u, sb, st, next); err != nil {
			return fail(err)
		}
	}
	faultinject.Point("del-iface:routes")
	// 3. The dataplane.
	if err := c.cfg.Dataplane.DelEndpoint(ctx, ep); err != nil {
		return fail(fmt.Errorf("dataplane: del endpoint %s: %w", n.Spec.Name, err))
	}
	u.push("dataplane: add endpoint "+n.Spec.Name, func(ctx context.Context) error { return c.cfg.Dataplane.AddEndpoint(ctx, ep) })
	faultinject.Point("del-iface:endpoint")
	// 4. The tap, if kata-dp created it.
	if n.TapCreated {
		if err := c.cfg.Taps.DeleteTap(ctx, sb.NetNS, n.Spec.Device); err != nil {
			return fail(fmt.Errorf("delete tap %s: %w", n.Spec.Device, err))
		}
		u.push("re-create tap "+n.Spec.Device, func(ctx context.Context) error {
			_, err := c.cfg.Taps.EnsureTap(ctx, sb.NetNS, n.Spec.Device, TapOptions{Queues: max(n.Spec.Queues, 1), MTU: max(n.Spec.MTU, 68), Vnet: true})
			return err
		})
	}
	faultinject.Point("del-iface:tap")
	// 5. The state.
	if err := c.commit(e, next); err != nil {
		return fail(err)
	}
	c.releaseDevice(n.Spec.Device, sb.ID)
	if n.Spec.VhostUserSocket != "" {
		c.releaseSocket(n.Spec.VhostUserSocket, sb.ID)
	}
	c.log.Info("NIC removed", "sandbox", sb.ID, "nic", n.Spec.Name, "tap", n.Spec.Device, "tapDeleted", n.TapCreated)
	return nil
}

func (c *Controller) updateIface(ctx context.Context, e *entry, in netspec.Interface) (netspec.Interface, error) {
	sb, st := e.sb, e.st
	upd, err := netspec.ValidateUpdate(in)
	if err != nil {
		return netspec.Interface{}, err
	}
	i := slices.IndexFunc(st.NICs, func(n nic) bool { return n.Spec.Name == upd.Name })
	if i < 0 {
		return netspec.Interface{}, fmt.Errorf("%w: no NIC named %s in the sandbox", ErrNotFound, upd.Name)
	}
	old := st.NICs[i]
	n := old
	n.Spec.IPAddresses = upd.IPAddresses
	next := st.clone()
	next.NICs[i] = n
	oldEP, newEP := sb.endpoint(old), sb.endpoint(n)

	var u undo
	fail := func(err error) (netspec.Interface, error) { return netspec.Interface{}, c.rollback(ctx, &u, err) }
	if up, ok := c.cfg.Dataplane.(EndpointUpdater); ok {
		if err := up.UpdateEndpoint(ctx, newEP); err != nil {
			return fail(fmt.Errorf("dataplane: update endpoint %s: %w", n.Spec.Name, err))
		}
		u.push("dataplane: restore endpoint "+n.Spec.Name, func(ctx context.Context) error { return up.UpdateEndpoint(ctx, oldEP) })
	} else {
		if err := c.cfg.Dataplane.DelEndpoint(ctx, oldEP); err != nil {
			return fail(fmt.Errorf("dataplane: del endpoint %s: %w", n.Spec.Name, err))
		}
		u.push("dataplane: add old endpoint "+n.Spec.Name, func(ctx context.Context) error { return c.cfg.Dataplane.AddEndpoint(ctx, oldEP) })
		if err := c.cfg.Dataplane.AddEndpoint(ctx, newEP); err != nil {
			return fail(fmt.Errorf("dataplane: add endpoint %s: %w", n.Spec.Name, err))
		}
		u.push("dataplane: del new endpoint "+n.Spec.Name, func(ctx context.Context) error { return c.cfg.Dataplane.DelEndpoint(ctx, newEP) })
	}
	if err := c.commit(e, next); err != nil {
		return fail(err)
	}
	c.log.Info("NIC updated", "sandbox", sb.ID, "nic", n.Spec.Name, "addr", newEP.Addr, "addr6", newEP.Addr6, "linkLocal", newEP.LinkLocal)
	return n.Spec, nil
}

// setRoutes programs next's routes when they differ from st's, pushing the undo.
func (c *Controller) setRoutes(ctx context.Context, u *undo, sb Sandbox, st, next *state) error {
	oldR, newR := programmed(st), programmed(next)
	if slices.Equal(oldR, newR) {
		return nil
	}
	if err := c.cfg.Dataplane.SetRoutes(ctx, sb.ID, newR); err != nil {
		return fmt.Errorf("dataplane: set routes: %w", err)
	}
	u.push("dataplane: restore routes", func(ctx context.Context) error { return c.cfg.Dataplane.SetRoutes(ctx, sb.ID, oldR) })
	return nil
}

// checkRoute validates a route against the sandbox: its device is a NIC or "lo".
func checkRoute(st *state, r netspec.Route) (netspec.ParsedRoute, error) {
	pr, err := netspec.ValidateRoute(r)
	if err != nil {
		return pr, err
	}
	if r.Device != netspec.LoopbackDevice && !slices.ContainsFunc(st.NICs, func(n nic) bool { return n.Spec.Name == r.Device }) {
		return pr, invalidf("route device %s is not a NIC of the sandbox (nor lo)", r.Device)
	}
	return pr, nil
}

func (c *Controller) addRoute(ctx context.Context, e *entry, r netspec.Route) (netspec.Route, error) {
	sb, st := e.sb, e.st
	pr, err := checkRoute(st, r)
	if err != nil {
		return netspec.Route{}, err
	}
	for _, o := range st.Routes {
		if opr, err := netspec.ValidateRoute(o); err == nil && opr.Dest == pr.Dest {
			return netspec.Route{}, fmt.Errorf("%w: a route to %s (device %s) already exists", ErrExists, r.Dest, o.Device)
		}
	}
	next := st.clone()
	next.Routes = append(next.Routes, r)
	var u undo
	if err := c.setRoutes(ctx, &u, sb, st, next); err != nil {
		return netspec.Route{}, err
	}
	if err := c.commit(e, next); err != nil {
		return netspec.Route{}, c.rollback(ctx, &u, err)
	}
	c.log.Info("route added", "sandbox", sb.ID, "dest", r.Dest, "gateway", r.Gateway, "device", r.Device)
	return r, nil
}

func (c *Controller) delRoute(ctx context.Context, e *entry, r netspec.Route) ([]netspec.Route, error) {
	sb, st := e.sb, e.st
	f, err := netspec.ValidateRouteFilter(r)
	if err != nil {
		return nil, err
	}
	next := st.clone()
	var removed []netspec.Route
	next.Routes = slices.DeleteFunc(next.Routes, func(o netspec.Route) bool {
		pr, err := netspec.ValidateRoute(o)
		if err == nil && f.Match(pr) {
			removed = append(removed, o)
			return true
		}
		return false
	})
	if len(removed) == 0 {
		return nil, fmt.Errorf("%w: no route matches dest %s", ErrNotFound, r.Dest)
	}
	var u undo
	if err := c.setRoutes(ctx, &u, sb, st, next); err != nil {
		return nil, err
	}
	if err := c.commit(e, next); err != nil {
		return nil, c.rollback(ctx, &u, err)
	}
	c.log.Info("routes removed", "sandbox", sb.ID, "dest", r.Dest, "count", len(removed))
	return removed, nil
}

func (c *Controller) updateRoutes(ctx context.Context, e *entry, rs []netspec.Route) ([]netspec.Route, error) {
	sb, st := e.sb, e.st
	if rs == nil {
		return nil, invalidf("update-routes needs a JSON array of routes")
	}
	seen := map[string]string{}
	for _, r := range rs {
		pr, err := checkRoute(st, r)
		if err != nil {
			return nil, err
		}
		key := pr.Dest.String()
		if prev, ok := seen[key]; ok {
			return nil, fmt.Errorf("%w: two routes to %s (devices %s and %s)", ErrExists, r.Dest, prev, r.Device)
		}
		seen[key] = r.Device
	}
	next := st.clone()
	next.Routes = slices.Clone(rs)
	var u undo
	if err := c.setRoutes(ctx, &u, sb, st, next); err != nil {
		return nil, err
	}
	if err := c.commit(e, next); err != nil {
		return nil, c.rollback(ctx, &u, err)
	}
	c.log.Info("routes replaced", "sandbox", sb.ID, "count", len(rs))
	return next.Routes, nil
}

// saveIntent saves the sandbox's state with n marked pending op (added to the NICs when op is
// pendingAdd and n is not there yet, replaced by name otherwise) and, with u, pushes the undo
// that saves the state as it was. The in-memory state stays as it was: e.st changes only at
// the operation's commit.
func (c *Controller) saveIntent(e *entry, u *undo, n nic, op string) error {
	intent := e.st.clone()
	n.Pending = op
	if i := slices.IndexFunc(intent.NICs, func(o nic) bool { return o.Spec.Name == n.Spec.Name }); i >= 0 {
		intent.NICs[i] = n
	} else {
		intent.NICs = append(intent.NICs, n)
	}
	if err := c.save(intent); err != nil {
		return fmt.Errorf("record intent: %w", err)
	}
	if u != nil {
		st := e.st
		u.push("forget intent "+op+" "+n.Spec.Name, func(context.Context) error { return c.save(st) })
	}
	return nil
}

// resolvePending finishes the NIC operations a killed agent left halfway (their intent was
// saved, their commit was not): each such NIC is removed completely, whatever step it got
// to, and the state saved without it. e.mu is held (or e is not yet visible, from New). After
// the saved state on disk, e.st is the source: New loads the intents into it; a live agent
// never leaves one there (the operation's commit or rollback replaces it).
func (c *Controller) resolvePending(ctx context.Context, e *entry) error {
	for {
		i := slices.IndexFunc(e.st.NICs, func(n nic) bool { return n.Pending != "" })
		if i < 0 {
			return nil
		}
		n := e.st.NICs[i]
		if err := c.removeNIC(ctx, e, n); err != nil {
			return fmt.Errorf("%s of NIC %s interrupted: %w", n.Pending, n.Spec.Name, err)
		}
		c.log.Warn("finished a NIC operation interrupted by an agent stop: NIC removed", "sandbox", e.sb.ID, "nic", n.Spec.Name, "op", n.Pending, "tapDeleted", n.TapCreated)
	}
}

// removeNIC removes everything kata-dp may have made for n, whichever step its add or delete
// got to (each step is idempotent), then saves the state without it and its routes.
func (c *Controller) removeNIC(ctx context.Context, e *entry, n nic) error {
	sb, st := e.sb, e.st
	ep := sb.endpoint(n)
	if sb.QMP != "" {
		if c.cfg.Hotplug == nil {
			return ErrNoHotplug
		}
		if err := c.scrubVM(ctx, sb, ep); err != nil {
			return fmt.Errorf("hot-unplug: %w", err)
		}
	}
	faultinject.Point("recover:unplug")
	next := st.clone()
	next.NICs = slices.DeleteFunc(next.NICs, func(o nic) bool { return o.Spec.Name == n.Spec.Name })
	next.Routes = slices.DeleteFunc(next.Routes, func(r netspec.Route) bool { return r.Device == n.Spec.Name })
	if newR := programmed(next); !slices.Equal(programmed(st), newR) {
		if err := c.cfg.Dataplane.SetRoutes(ctx, sb.ID, newR); err != nil {
			return fmt.Errorf("dataplane: set routes: %w", err)
		}
	}
	if err := c.cfg.Dataplane.DelEndpoint(ctx, ep); err != nil {
		return fmt.Errorf("dataplane: del endpoint: %w", err)
	}
	if n.TapCreated && n.Spec.VhostUserSocket == "" {
		if err := c.cfg.Taps.DeleteTap(ctx, sb.NetNS, n.Spec.Device); err != nil {
			return fmt.Errorf("delete tap %s: %w", n.Spec.Device, err)
		}
	}
	faultinject.Point("recover:removed")
	if err := c.commit(e, next); err != nil {
		return err
	}
	c.releaseDevice(n.Spec.Device, sb.ID)
	if n.Spec.VhostUserSocket != "" {
		c.releaseSocket(n.Spec.VhostUserSocket, sb.ID)
	}
	return nil
}

// scrubVM removes the NIC of ep from the VM, including what a plug stopped midway may have
// left (a netdev without device, passed files), with the Hotplugger's VMScrubber when it has
// one; a NIC that is not there is not an error.
func (c *Controller) scrubVM(ctx context.Context, sb Sandbox, ep Endpoint) error {
	if s, ok := c.cfg.Hotplug.(VMScrubber); ok {
		return s.Scrub(ctx, sb, ep)
	}
	return c.cfg.Hotplug.Unplug(ctx, sb, ep)
}

// scrubUnknown is del-iface of a NIC the state does not know: kata-dp's objects in the VM
// under that name (its QMP ids are kata-dp's own) are removed when the Hotplugger can tell
// them apart (VMScrubber); anything else of that name is not kata-dp's to touch.
func (c *Controller) scrubUnknown(ctx context.Context, sb Sandbox, in netspec.Interface) error {
	s, ok := c.cfg.Hotplug.(VMScrubber)
	if sb.QMP == "" || !ok || in.Name == "" {
		return nil
	}
	if err := netspec.ValidName("name", in.Name); err != nil {
		return nil // no NIC of kata-dp's can have that name
	}
	if err := s.Scrub(ctx, sb, Endpoint{Sandbox: sb.ID, NetNS: sb.NetNS, NIC: in.Name}); err != nil {
		return fmt.Errorf("remove what kata-dp left in the VM for %s: %w", in.Name, err)
	}
	return nil
}
