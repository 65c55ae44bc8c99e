package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
)

// sweepInterval is how often the agent expires idle load-balanced connections.
const sweepInterval = time.Second

// xdpWatchInterval is how often xdp-mode endpoints re-check whether their veth's peer can take
// XDP frames (GRO or XDP on the peer), moving traffic between XDP and tc when it changed.
const xdpWatchInterval = 2 * time.Second

func init() {
	probeFeatures = func(context.Context) (kernelReport, error) {
		f, err := loader.Probe()
		if err != nil {
			return kernelReport{}, err
		}
		return reportOf(f, loader.LoadObjects()), nil
	}
}

// reportOf turns the loader's probe and the trial loads of the objects into what `kata-dp
// version` prints. A refused object is a missing feature of its own ("verifier accepts the
// datapath object"), with the verifier's last lines in its error.
func reportOf(f loader.Features, loads []loader.ObjectLoad) kernelReport {
	var r kernelReport
	for _, c := range f.Checks {
		r.Features = append(r.Features, Feature{Name: c.Name, Supported: c.Supported, Fallback: c.Fallback, UsedBy: c.Objects})
	}
	for _, l := range loads {
		ft := Feature{Name: "verifier accepts the " + l.Object + " object", Supported: l.Err == nil, UsedBy: []string{l.Object}}
		if l.Err != nil {
			ft.Error = l.Err.Error()
		}
		r.Features = append(r.Features, ft)
		f.Checks = append(f.Checks, loader.Check{Name: ft.Name, Kind: "load", Objects: ft.UsedBy, Supported: ft.Supported})
	}
	for _, m := range dataplane.Modes() {
		mr := ModeReport{Mode: m, Missing: []string{}}
		objs, _ := dataplane.Objects(m) // m comes from the registry
		for _, c := range f.Missing(objs...) {
			mr.Missing = append(mr.Missing, c.Name)
		}
		mr.OK = len(mr.Missing) == 0
		r.Modes = append(r.Modes, mr)
	}
	return r
}

// checkKernel runs when the real agent starts: it logs the kernel features and the modes
// that cannot run, and loads the datapath once (unpinned, then closed) so that a verifier
// refusal stops the agent at once with the verifier's last lines, not at the first sandbox.
func checkKernel(log *slog.Logger) error {
	f, err := loader.Probe()
	if err != nil {
		return fmt.Errorf("probe kernel features: %w", err)
	}
	log.Info("kernel features", "probe", f.String())
	for _, m := range reportOf(f, nil).Modes {
		if !m.OK {
			log.Warn("dataplane mode cannot run on this kernel", "mode", m.Mode, "missing", strings.Join(m.Missing, ", "))
		}
	}
	if err := loader.CheckLoad(); err != nil {
		return fmt.Errorf("the datapath does not load on this kernel (kata-dp version lists what it lacks): %w", err)
	}
	return nil
}
