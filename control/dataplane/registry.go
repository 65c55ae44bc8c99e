package dataplane

// registry lists every mode the Dataplane runs. Adding a mode is adding its file and one line
// here; CNI configuration and the benchmark read the list through Modes. The order is the
// order in which DelEndpoint and an add remove the modes' leftovers: tc goes first because its
// removal takes the whole BPF path (XDP included) away before the others' plumbing goes.
var registry = []Mode{
	tcMode{},
	xdpMode{},
	tcfilterMode{},
	macvtapMode{},
	macvtapBPFMode{},
	directMode{},
	vhostUserMode{},
}
