// Package netmon joins the links that appear in a sandbox's network namespace to its VM by
// themselves, as Kata's enable_netmon does: a second CNI network attached to a running pod (a
// second CNI ADD, `docker network connect`, Multus) reaches the guest as a new NIC, and leaves
// it when the network is detached.
//
// One watcher per sandbox with the netmon option subscribes to netlink link, address and route
// events in the sandbox's netns (no polling). Events are coalesced (a CNI ADD is a burst: link,
// up, address, routes) and, once the netns has been quiet for Options.Quiet (never later than
// Options.MaxDelay after the first event), the watcher reconciles: it compares the netns with the
// sandbox's NICs whose source is netmon and calls the controller's typed kata-network operations
// (add-iface, update-iface, del-iface, add-route, del-route) for the difference, so a link goes
// through exactly the validation and steps a runtime's kata-network call would, under the
// sandbox's lock (never concurrently with another operation on the sandbox). A link the
// controller refuses is logged once with the reason and skipped; other failures are retried.
//
// Reconciling from what is there rather than replaying events makes restarts and lost events
// harmless: a watcher starts with a full reconcile, and a netlink socket that overflows or
// fails restarts the watcher. Nothing kata-dp does re-triggers work: taps and kata-dp's own
// devices are never taken, events about them are dropped, and a reconcile of an unchanged netns
// changes nothing.
//
// Which links join: any link with a MAC that is up (veth, macvlan, ipvlan, whatever a CNI plugin
// makes; once joined it stays while down), except loopback, taps, kata-dp's macvtaps, the sandbox's uplink (its NIC comes from the
// runtime, kata-network or discovery) and links another NIC already uses. The NIC takes the
// link's name (its name in the guest, as Kata names it), MAC and MTU, its first IPv4 and IPv6
// addresses (as many as add-iface accepts) and the main table's routes through it.
//
// A Monitor is started once (Run, from the agent's node tasks); Sync may be called from any
// goroutine, at any time, to say the set of sandboxes may have changed.
package netmon
