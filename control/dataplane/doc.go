// Package dataplane is control's Dataplane on top of kata-dp's BPF datapath: it keeps one
// loaded collection per sandbox (loader), writes endpoint, route, load-balancer and counter
// entries (maps), and joins each NIC's tap to its uplink in the NIC's dataplane mode.
//
// # Modes
//
// A Mode is one way of joining a tap to its uplink: tc (the default: BPF at TCX ingress of
// both devices), xdp (tc with XDP on the tap for the guest's frames), tcfilter (Kata's u32 + mirred), macvtap (Kata's
// older model), macvtap-bpf (macvtap's plumbing with the BPF programs passing frames on) and
// direct (taps beside a shared host uplink, steered by MAC); and vhost-user,
// which a NIC with a vhostUserSocket runs: no tap, nothing installed, the vhost-user switch
// moves the frames. Each lives in one file (tc.go, xdp.go, tcfilter.go, macvtap.go,
// macvtapbpf.go, direct.go, vhostuser.go) and is listed once in registry.go.
// The Dataplane does what the modes share and calls the endpoint's mode for the rest:
//
//   - AddEndpoint, UpdateEndpoint and Reconcile validate the endpoint, call Mode.Add (fresh
//     for a new endpoint, which resets its counters and undoes a failed add; an update or a
//     reconcile keeps the counters and re-adopts what is pinned), record the State it returns,
//     then call Remove of every other mode of the same Family, so that an endpoint moved from
//     one mode to another loses the old plumbing only once the new one is in place.
//   - DelEndpoint calls Remove of every mode of the endpoint's family: after a restart this
//     process does not know what an earlier one installed, and each Remove takes away
//     whatever of its mode is there and nothing else. Modes of another family are never
//     asked: a direct-mode endpoint's uplink is shared with other sandboxes.
//   - Stats asks the mode the endpoint runs in (xdp may have fallen back to tc; Mode says so
//     and why).
//
// Adding a mode is adding one file with a type that implements Mode and one line in
// registry.go; Modes (the names, for CNI configuration and `kata-dp bench`) and Lookup follow.
// The device recipes of tcfilter, macvtap and direct stay in the leaf packages control/mirred,
// control/macvtap and control/direct: each is a self-contained netlink or node-collection
// recipe with its own tests, and only its mode files import it (macvtap's: macvtap.go and
// macvtapbpf.go).
//
// # Order and concurrency
//
// The order of every change is chosen so the datapath never sees a half-made endpoint: map
// entries are written before programs are attached (a program without its entry passes frames
// on untouched), and removed after they are detached. Restarting the agent reopens the pinned
// maps and updates the pinned links in place, so nothing is re-created and no frame is lost.
//
// A Dataplane is safe for concurrent use across sandboxes; calls for one sandbox must not
// overlap (control serialises them). RecheckXDP and Sweep, which control/watch runs on
// tickers, may run at any time beside them. Modes are stateless: what they need of a sandbox
// comes in its *Sandbox.
package dataplane
