// Package kata reads what Kata Containers' Go runtime leaves on a node, so the agent can adopt
// its sandboxes as they are (issue 13): the runtime directory (default /run/vc) with one
// vm/<id>/ per running VM (QEMU's qmp.sock, held by Kata's shim, and extra-monitor.sock when
// Kata's extra_monitor_socket = "qmp" is set) and one sbs/<id>/persist.json per sandbox (its
// persisted state: network namespace and endpoints), and in each sandbox netns the veth /
// tapN_kata pairs Kata joined with an ingress qdisc and two u32 + mirred filters (its
// tcfilter interworking model).
//
// The persisted state is decoded into this package's own structs, which mirror only the fields
// of Kata's persistapi types that kata-dp needs (kata-containers/kata-containers,
// src/runtime/virtcontainers/persist/api/sandbox.go, network.go, hypervisor.go); unknown fields
// are ignored, as Kata's own loader does, so newer Kata versions keep working.
//
// Pairs are identified by what is on the node, not by Kata's interworking-model number (its
// enum changed between releases): a pair is a veth named in persist.json, the tap Kata named
// for it, and u32 + mirred filters joining the two both ways. Anything else is reported, never
// touched.
//
// The functions here only read; the Discovery task (discovery.go) registers, takes over,
// releases and garbage-collects through the control plane. All functions are safe for
// concurrent use.
package kata
