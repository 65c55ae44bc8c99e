package metrics

import (
	"context"

	"github.com/kata-dp/kata-dp/control"
)

// Hotplug returns h with its failed calls counted in kata_dp_qmp_errors_total. The optional
// interfaces control looks for (control.VhostReporter) stay visible. A nil h or Metrics
// returns h.
func (m *Metrics) Hotplug(h control.Hotplugger) control.Hotplugger {
	if m == nil || h == nil {
		return h
	}
	c := countingHotplug{h: h, m: m}
	if vr, ok := h.(control.VhostReporter); ok {
		return countingVhostHotplug{countingHotplug: c, VhostReporter: vr}
	}
	return c
}

type countingHotplug struct {
	h control.Hotplugger
	m *Metrics
}

func (c countingHotplug) count(call string, err error) {
	// A cancelled caller is not the VM's fault.
	if err != nil && err != context.Canceled {
		c.m.qmpErrors.WithLabelValues(call).Inc()
	}
}

func (c countingHotplug) Plug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	pci, err := c.h.Plug(ctx, sb, ep)
	c.count("plug", err)
	return pci, err
}

func (c countingHotplug) Unplug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) error {
	err := c.h.Unplug(ctx, sb, ep)
	c.count("unplug", err)
	return err
}

func (c countingHotplug) Healthy(ctx context.Context, sb control.Sandbox) error {
	err := c.h.Healthy(ctx, sb)
	c.count("health", err)
	return err
}

type countingVhostHotplug struct {
	countingHotplug
	control.VhostReporter
}
