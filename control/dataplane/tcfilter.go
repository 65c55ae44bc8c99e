package dataplane

import (
	"context"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/mirred"
)

// tcfilterMode is Kata's own plumbing (an ingress qdisc and two u32 + mirred filters), built
// by the leaf package control/mirred, which only this file uses. No BPF, no checks, no
// counters of its own: Stats reports the tap's link counters, marked with NoBPFCounters.
type tcfilterMode struct{}

func (tcfilterMode) Name() string   { return control.ModeTCFilter }
func (tcfilterMode) Family() Family { return FamilySandbox }

// Add joins the tap and the uplink with the mirred filters; the Dataplane then takes the BPF
// path away (until then it runs first and takes the frames) and what macvtap mode left.
func (m tcfilterMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	if ep.Uplink != "" {
		if err := mirred.Join(ep.NetNS, ep.Uplink, ep.Tap); err != nil {
			return nil, err
		}
	}
	return running(m), nil
}

// Remove takes out the redirect filters between the tap and the uplink, if they are there.
func (tcfilterMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	if ep.Uplink == "" {
		return nil
	}
	if joined, err := mirred.Joined(ep.NetNS, ep.Uplink, ep.Tap); err == nil && joined {
		return mirred.Unjoin(ep.NetNS, ep.Uplink, ep.Tap)
	}
	return nil
}

// Stats are the tap's link counters: the tap receives what the VM sends.
func (tcfilterMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	return linkStats(ep, ep.Tap, true)
}
