// Package loader loads kata-dp's datapath object once per sandbox (and direct mode's node
// object once per uplink), pins it, attaches its programs to devices and detaches them, and
// probes the kernel's features. It hands out the maps as *ebpf.Map handles (Sandbox.Maps,
// Node.Maps); reading and writing their entries is package maps' business. The key and value
// types bpf2go generates (Datapath*, Node*) are exported for maps to build on.
//
// Each sandbox gets its own collection under <root>/<sandbox>/ (root defaults to
// /sys/fs/bpf/kata-dp): its maps are pinned by name there and its links under links/, so
// sandboxes never see each other's state, ifindex collisions across network namespaces do not
// matter, and removing a sandbox is removing one directory. Programs are named kdp_* and the
// loader only ever detaches what it pinned itself.
//
// Attachment prefers TCX (anchored at the tail, so programs attached earlier by others run
// first and keep working); only when the kernel lacks TCX, or the sandbox was opened with
// Options.LegacyTC, does it use a clsact qdisc with a direct-action bpf filter. Reopening a sandbox whose pins exist reuses its maps and
// swaps the new programs into the pinned links with BPF_LINK_UPDATE, so an agent restart or an
// upgrade never leaves a gap in forwarding. A pinned map whose definition changed between
// versions (type, flags, key or value size) is replaced by one of this version's, keeping the
// entries whose layout did not change (migrate.go); the agent's reconcile rewrites the rest.
//
// A Sandbox is not safe for concurrent use; the control plane serialises calls per sandbox.
package loader
