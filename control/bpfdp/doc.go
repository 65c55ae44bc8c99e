// Package bpfdp is control's Dataplane on top of kata-dp's BPF datapath: it keeps one loaded
// collection per sandbox (loader), writes endpoint, route and counter entries (maps), and
// attaches the programs to the tap and the uplink of each NIC.
//
// The order of every change is chosen so the datapath never sees a half-made endpoint: map
// entries are written before programs are attached (a program without its entry passes frames
// on untouched), and removed after they are detached. Restarting the agent reopens the pinned
// maps and updates the pinned links in place, so nothing is re-created and no frame is lost.
//
// A Dataplane is safe for concurrent use; calls for one sandbox must not overlap (control
// serialises them).
package bpfdp
