// Package cni is the logic of kata-dp-cni, a chained CNI plugin (spec 1.0 and 1.1) that puts a
// Kata-style VM behind the interface an earlier plugin of the chain made.
//
// The plugin runs after an interface-creating plugin (bridge, ptp, macvlan, ...) that left a
// veth (or any non-tap link) called CNI_IFNAME in the container netns. On ADD it asks the
// kata-dp agent, over the agent's unix socket, to register the sandbox (id = CNI_CONTAINERID,
// netns = CNI_NETNS) unless the runtime already did, and to add a NIC whose tap it creates in
// the netns and joins to that veth with the BPF datapath. The VM takes over the container's
// address: the NIC gets the veth's MAC, MTU and addresses (one per family), as Kata's tcfilter plumbing and
// awslabs/tc-redirect-tap do. The result is the previous result plus two interfaces in
// tc-redirect-tap's shape: the tap (sandbox = the netns path) and the VM's NIC (same name as
// the tap, sandbox = the container id, MAC of the veth), with the veth's IPs repeated for it.
// The agent reserves tap names host-wide, so unless tapName is configured the tap is named per
// container (TapNameFor); the name ADD used is recorded, and the other commands go by it.
//
// The plugin itself never changes the host: the agent does every step and rolls back its own
// partial work. What the plugin adds is bookkeeping, so that DEL removes only what ADD made: a
// record per attachment (network, container, ifname) and a marker per container when this
// plugin registered the sandbox, under the state directory (default /var/lib/cni/kata-dp).
// The sandbox is removed from the agent when its last attachment is deleted, and only when the
// marker says the plugin registered it. Every command takes an exclusive lock of the state
// directory, so concurrent invocations on a node are serialised.
//
// Kata's macvtap model is refused (mode "macvtap"): the VM would use a macvtap device the
// agent does not report, and the veth's MAC swap would break the previous plugin's CHECK.
//
// Errors are *types.Error: code 7 for a bad configuration, 4 for bad CNI_* arguments, 5 for a
// state directory that cannot be used, 50 for STATUS without a reachable agent, and the
// plugin's own codes from 100 (see the Code* constants).
//
// The functions are meant for one invocation of the plugin binary (skel.PluginMainFuncs); a
// Plugin has no state of its own and is safe for concurrent use.
package cni
