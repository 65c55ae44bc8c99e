// Package control is kata-dp's control plane: the registry of sandboxes, the NICs and routes
// kata-network adds to them, and the steps that turn one request into taps, dataplane entries,
// hot-plugged devices and saved state.
//
// Control owns the rules (validation first, then each step with its undo; any failure rolls
// back what was done) and depends only on small interfaces for the work below it: Dataplane
// (BPF programs and maps, implemented in control/dataplane), Hotplugger (QMP), TapManager (netdev)
// and StateStore (control/store). That keeps its logic testable with fakes
// (control/controltest: MemDataplane, MemHotplugger, MemTaps) and its integration testable
// with the real parts.
//
// A Controller is safe for concurrent use. Operations on one sandbox are serialised (one lock
// per sandbox, held for the whole operation including its health check); operations on
// different sandboxes run in parallel. Host-wide rules (a tap name is used by one NIC on the
// host; a vhost-user socket serves one NIC) are enforced with short critical sections on the
// registry.
//
// A NIC with a vhostUserSocket has no tap: control creates none, the dataplane runs it in mode
// vhost-user (nothing installed) and the Hotplugger plugs it as a vhost-user NIC. Tap NICs
// carry their vhost-net setting (the NIC's "vhost", else the sandbox's) to the Hotplugger,
// and what it came to is kept with the NIC for status (VhostReporter).
package control
