package main

import (
	"context"
	"fmt"
)

// Feature is one kernel feature the dataplane relies on, as found on this machine.
type Feature struct {
	Name      string
	Supported bool
	Detail    string // e.g. the fallback used when not supported
}

// probeFeatures finds the kernel features. Integrator: set it (in an init of a file of this
// package) to the loader's probe; nil prints that this build cannot probe.
var probeFeatures func(ctx context.Context) ([]Feature, error)

const versionUse = `
Usage: kata-dp version

Prints kata-dp's version, the agent's (when it answers) and the kernel features found.
`

func runVersion(e *env, args []string) error {
	fs := e.flagSet("version", versionUse)
	sock := socketFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "kata-dp %s\n", version)
	if v, err := e.client(*sock).Version(e.ctx); err == nil {
		fmt.Fprintf(e.stdout, "agent: %s\n", v)
	} else {
		fmt.Fprintf(e.stdout, "agent: not reachable (%v)\n", err)
	}
	if probeFeatures == nil {
		fmt.Fprintln(e.stdout, "kernel features: no probe in this build")
		return nil
	}
	feats, err := probeFeatures(e.ctx)
	if err != nil {
		return fmt.Errorf("probe kernel features: %w", err)
	}
	fmt.Fprintln(e.stdout, "kernel features:")
	for _, f := range feats {
		state := "yes"
		if !f.Supported {
			state = "no"
		}
		if f.Detail != "" {
			state += " (" + f.Detail + ")"
		}
		fmt.Fprintf(e.stdout, "  %-24s %s\n", f.Name+":", state)
	}
	return nil
}
