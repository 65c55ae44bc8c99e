package main

import (
	"context"
	"log/slog"

	"github.com/kata-dp/kata-dp/control"
)

// agentDeps are the parts of the agent that touch the kernel and the VMs.
type agentDeps struct {
	Dataplane control.Dataplane
	// Hotplug is nil when the agent cannot hot-plug: sandboxes registered with a QMP socket
	// are then reported unhealthy (control.ErrNoHotplug).
	Hotplug control.Hotplugger
	Taps    control.TapManager
	// Close releases what the dependencies hold open (never detaches the datapath).
	Close func() error
}

// newAgentDeps is the factory of the agent's dependencies.
//
// Integrator: plug the real parts in here, e.g.
//
//	dp, err := bpfdp.New(o.bpffsRoot)
//	if err != nil { return agentDeps{}, err }
//	hp := hotplug.New(...) // the QMP hot-plugger
//	return agentDeps{Dataplane: dp, Hotplug: hp, Taps: control.NetdevTaps{}, Close: dp.Close}, nil
//
// and delete placeholderDataplane. Until then the agent runs with a dataplane that programs
// nothing and says so at start and on every endpoint.
func newAgentDeps(_ context.Context, o agentOptions) (agentDeps, error) {
	return agentDeps{
		Dataplane: newPlaceholderDataplane(o.log),
		Hotplug:   nil,
		Taps:      control.NetdevTaps{},
		Close:     func() error { return nil },
	}, nil
}

// placeholderDataplane stands in for the BPF dataplane while it is not wired in: it keeps the
// endpoints and routes in memory (control.MemDataplane) and forwards nothing, and logs a
// warning on start and on every endpoint so that nobody mistakes it for the real thing.
type placeholderDataplane struct {
	*control.MemDataplane
	log *slog.Logger
}

func newPlaceholderDataplane(log *slog.Logger) *placeholderDataplane {
	log.Warn("PLACEHOLDER DATAPLANE: no BPF dataplane is wired into this build; endpoints are recorded but no traffic is forwarded")
	return &placeholderDataplane{MemDataplane: control.NewMemDataplane(), log: log}
}

func (p *placeholderDataplane) AddEndpoint(ctx context.Context, ep control.Endpoint) error {
	p.log.Warn("placeholder dataplane: endpoint recorded, not programmed", "sandbox", ep.Sandbox, "nic", ep.NIC, "tap", ep.Tap)
	return p.MemDataplane.AddEndpoint(ctx, ep)
}
