package main

import (
	"context"
	"errors"
	"net"
	"os"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/monitor"
	"github.com/kata-dp/kata-dp/control/vmplug"
	"github.com/kata-dp/kata-dp/control/watch"
	"github.com/kata-dp/kata-dp/loader"
)

// agentDeps are the parts of the agent that touch the kernel and the VMs.
type agentDeps struct {
	Dataplane control.Dataplane
	// LB runs kata-ipvs rules in the dataplane; nil disables kata-ipvs.
	LB ipvsctl.LB
	// Tasks are the node's long-running work (the LB connection sweep, the XDP recheck), run
	// by control/watch from the agent's start until it stops.
	Tasks []watch.Task
	// Hotplug is nil when the agent cannot hot-plug: sandboxes registered with a QMP socket
	// are then reported unhealthy (control.ErrNoHotplug).
	Hotplug control.Hotplugger
	Taps    control.TapManager
	// Monitor opens sandboxes' event streams (kata-dp monitor); nil: the monitor is not served.
	Monitor monitor.Source
	// Close releases what the dependencies hold open (never detaches the datapath).
	Close func() error
}

// newAgentDeps builds the real parts: the BPF dataplane (pins under --bpffs-root), the QMP
// hot-plugger and the netlink tap manager.
func newAgentDeps(_ context.Context, o agentOptions) (agentDeps, error) {
	if err := checkKernel(o.log); err != nil {
		return agentDeps{}, err
	}
	var lo loader.Options
	if o.kubeconfig != "" || o.kubeInCluster {
		// Room for the cluster table beside kata-ipvs's 20000 rules (docs/kubernetes.md).
		lo.ExtraLBRules = uint32(o.clusterMaxRules)
	}
	dp, err := dataplane.NewWithOptions(o.bpffsRoot, lo)
	if err != nil {
		return agentDeps{}, err
	}
	hp := vmplug.New()
	// In the macvtap modes the VM uses the macvtap the dataplane made, not the tap.
	hp.Device = func(ep control.Endpoint, n int) ([]*os.File, net.HardwareAddr, bool, error) {
		mv, ok := dp.Macvtap(ep)
		if !ok {
			return nil, nil, false, nil
		}
		fds, err := mv.Open(n, true)
		return fds, mv.MAC, true, err
	}
	return agentDeps{
		Dataplane: dp,
		LB:        dp,
		Tasks: []watch.Task{
			{Name: "lb-sweep", Every: sweepInterval, Run: dp.Sweep},
			{Name: "xdp-recheck", Every: xdpWatchInterval, Run: dp.RecheckXDP},
		},
		Hotplug: hp,
		Taps:    control.NetdevTaps{},
		Monitor: api.MonitorSource[*dataplane.MonitorStream](dp.Monitor),
		Close:   func() error { return errors.Join(hp.Close(), dp.Close()) },
	}, nil
}
