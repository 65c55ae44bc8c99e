package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"golang.org/x/sys/unix"
)

// Feature is one kernel feature the dataplane relies on, as found on this machine.
type Feature struct {
	Name      string   `json:"name"`
	Supported bool     `json:"supported"`
	Fallback  string   `json:"fallback,omitempty"` // what runs instead when not supported
	UsedBy    []string `json:"usedBy,omitempty"`   // the BPF objects that use it
	Error     string   `json:"error,omitempty"`    // why not (the verifier's last lines)
}

// ModeReport says whether a dataplane mode can run here and what it lacks.
type ModeReport struct {
	Mode    string   `json:"mode"`
	OK      bool     `json:"ok"`
	Missing []string `json:"missing"`
}

// kernelReport is what the probe found.
type kernelReport struct {
	Features []Feature    `json:"features"`
	Modes    []ModeReport `json:"modes"`
}

// versionReport is `kata-dp version -o json`.
type versionReport struct {
	Version      string       `json:"version"`
	Agent        string       `json:"agent,omitempty"`
	AgentError   string       `json:"agentError,omitempty"`
	Kernel       string       `json:"kernel"`
	Features     []Feature    `json:"features"`
	Modes        []ModeReport `json:"modes"`
	FeatureError string       `json:"featureError,omitempty"`
}

// probeFeatures finds the kernel features; nil prints that this build cannot probe.
var probeFeatures func(ctx context.Context) (kernelReport, error)

const versionUse = `
Usage: kata-dp version [-o text|json] [--socket PATH]

Prints kata-dp's version, the running agent's (when it answers), the kernel release, every
kernel feature the datapath uses (program and map types, each helper per program type, read from
the compiled BPF objects, and TCX) with whether this kernel has it, whether its verifier
accepts each object (loaded once, unpinned, then closed; a refusal comes with the verifier's last
lines), and per dataplane mode what is missing. Probing needs root (it loads tiny test programs); 'kata-dp --version' prints only
the version.

Examples:
  kata-dp version
  kata-dp version -o json | jq '.modes[] | select(.ok | not)'
`

func runVersion(e *env, args []string) error {
	fs := e.flagSet("version", versionUse)
	sock := socketFlag(fs)
	output := fs.StringP("output", "o", "text", "output format: text or json")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("version: unexpected arguments %q", fs.Args())
	}
	if *output != "text" && *output != "json" {
		return fmt.Errorf("version: --output %q: want text or json", *output)
	}
	r := versionReport{Version: version, Features: []Feature{}, Modes: []ModeReport{}}
	if v, err := e.client(*sock).Version(e.ctx); err == nil {
		r.Agent = v
	} else {
		r.AgentError = err.Error()
	}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		r.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	if probeFeatures == nil {
		r.FeatureError = "no probe in this build"
	} else if k, err := probeFeatures(e.ctx); err != nil {
		r.FeatureError = fmt.Sprintf("probe kernel features: %v", err)
	} else {
		r.Features, r.Modes = k.Features, k.Modes
	}
	if *output == "json" {
		return writeJSON(e.stdout, r)
	}
	fmt.Fprintf(e.stdout, "kata-dp %s\n", r.Version)
	if r.Agent != "" {
		fmt.Fprintf(e.stdout, "agent: %s\n", r.Agent)
	} else {
		fmt.Fprintf(e.stdout, "agent: not reachable (%s); %s\n", r.AgentError, unreachableHint)
	}
	fmt.Fprintf(e.stdout, "kernel: %s\n", r.Kernel)
	if r.FeatureError != "" {
		fmt.Fprintf(e.stdout, "kernel features: %s\n", r.FeatureError)
		return nil
	}
	fmt.Fprintln(e.stdout, "kernel features:")
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	for _, f := range r.Features {
		state := "yes"
		if !f.Supported {
			state = "NO"
			if f.Fallback != "" {
				state += " (falls back to " + f.Fallback + ")"
			}
		}
		used := ""
		if len(f.UsedBy) > 0 {
			used = "used by " + strings.Join(f.UsedBy, ", ")
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", f.Name, state, used)
	}
	tw.Flush()
	for _, f := range r.Features {
		if f.Error != "" {
			fmt.Fprintf(e.stdout, "%s: %s\n", f.Name, f.Error)
		}
	}
	fmt.Fprintln(e.stdout, "modes:")
	tw = tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	for _, m := range r.Modes {
		state := "ok"
		if !m.OK {
			state = "cannot run: missing " + strings.Join(m.Missing, ", ")
		}
		fmt.Fprintf(tw, "  %s\t%s\n", m.Mode, state)
	}
	return tw.Flush()
}
