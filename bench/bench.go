// Package bench is kata-dp's benchmark harness (`kata-dp bench`): it ranks
// the ways of joining a sandbox's veth to its guest's tap (Kata's tcfilter,
// kata-dp's tc datapath, Kata's macvtap, kata-dp's XDP datapath) against
// each other and against reference BPF programs that do the least possible,
// and kata-dp's direct mode against the standard CNI path (a bridge, a veth
// pair and tcfilter) it replaces.
//
// Every run builds a fresh topology (a stand-in host netns joined by a veth
// pair to a sandbox netns holding the guest's tap) with bench/topo,
// installs one mode, and measures with a generator in the host netns
// (AF_PACKET with sendmmsg, and a plain UDP socket for request/response)
// and bench/guestemu on the tap (non-blocking fd, one read or write per
// frame, as QEMU without vhost). The generator and the guest emulator are
// pinned to different CPUs. Modes are interleaved (a b c a b c ...) so that
// a slow phase of a shared machine hits every mode alike.
//
// Measures, per mode and case: one-way frames per second both ways at 64
// and 1400 B UDP payloads (and Gbit/s at 1400 B), request/response round
// trips p50/p99 with one request outstanding (blocking and busy-polling
// client), the CPU time per frame of the forward path (schedstat of the
// sending thread and the ksoftirqd threads, minus the same for a drop at
// the device's ingress), the emulator's CPU per frame read, and the frames
// lost, counted at every device on the way. A sample whose counts do not
// add up, or during which other processes took a noticeable share of a
// CPU, is flagged and left out of the medians.
//
// Everything runs in namespaces the harness creates (prefix "kdptb-") on
// addresses it assigns; nothing is sent anywhere else. It needs root.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/kata-dp/kata-dp/bench/topo"
)

// Options configure a benchmark.
type Options struct {
	Quick  bool
	Output string
	Rounds int
	Modes  []string
	Cases  []string
	Charts string
	// From re-renders a report saved with -o json instead of measuring.
	From     string
	CPUGen   int
	CPUGuest int
	Duration time.Duration
	Requests int
	MaxOther float64
	// WaitQuiet is how long a run may wait for other processes to quiet
	// down (below MaxOther) before it starts.
	WaitQuiet time.Duration
	// Nice is the nice value of the generator and emulator threads: -20
	// (the default) keeps a busy neighbour from taking their CPUs.
	Nice int
	// Batch is the host-side generator's frames per sendmmsg (host->guest
	// cases): the fewer, the more syscalls, and user/kernel switches, per
	// frame. Guest->host the emulator writes one frame per write() whatever
	// Batch says, as QEMU without vhost does. 0 means DefaultBatch.
	Batch int

	cases []caseDef
}

// DefaultModes returns the standard set `make bench` runs: every mode of the
// dataplane's registry, then the reference rows.
func DefaultModes() []string { return modeNames(func(modeDef) bool { return true }) }

// quickModes leave out the CNI reference and the modes compared with it
// (direct) to stay at about two and a half minutes (2m28s on the busy development machine, 2026-12-05).
func quickModes() []string { return modeNames(func(m modeDef) bool { return !m.slow }) }

var quickCases = []string{"h2g-64", "g2h-64", "h2g6-64", "g2h6-64", "lat-block", "lat-busy"}

// Main runs `kata-dp bench` with args (without the program and subcommand
// names), writing the report to stdout and progress to stderr.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil
		}
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	var rep *Report
	if o.From != "" {
		rep, err = Load(o.From)
	} else {
		if os.Geteuid() != 0 {
			return errors.New("bench: needs root (creates network namespaces, loads BPF programs)")
		}
		rep, err = Run(ctx, o, log)
	}
	if rep != nil {
		if o.Charts != "" {
			if cerr := writeCharts(rep, o.Charts); cerr != nil {
				err = errors.Join(err, cerr)
			} else {
				log.Info("charts written", "dir", o.Charts)
			}
		}
		var werr error
		if o.Output == "json" {
			werr = rep.JSON(stdout)
		} else {
			werr = rep.Markdown(stdout)
		}
		err = errors.Join(err, werr)
	}
	return err
}

func parseFlags(args []string, stderr io.Writer) (Options, error) {
	fs := pflag.NewFlagSet("bench", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	fs.BoolVar(&o.Quick, "quick", false, "3 rounds, 64 B one-way and latency only, shorter cases (about 2-3 minutes)")
	fs.StringVarP(&o.Output, "output", "o", "table", "output format: table (Markdown) or json")
	fs.IntVar(&o.Rounds, "rounds", 5, "rounds: each runs every mode once, in order (3 with --quick unless set)")
	fs.StringSliceVar(&o.Modes, "modes", DefaultModes(), "modes to run, in order; a kata-dp mode with +svc<N> (N 1.."+strconv.Itoa(maxBenchServices)+") runs it with N load-balancer services loaded")
	fs.StringSliceVar(&o.Cases, "cases", nil, "cases to run (default all; with --quick: "+strings.Join(quickCases, ",")+")")
	fs.StringVar(&o.From, "from", "", "render the report saved (with -o json) in this file instead of measuring")
	fs.StringVar(&o.Charts, "charts", "", "write SVG charts of pps, CPU per frame and latency to this directory")
	fs.IntVar(&o.CPUGen, "cpu-gen", 0, "CPU for the generator (host side)")
	fs.IntVar(&o.CPUGuest, "cpu-guest", 1, "CPU for the guest emulator")
	fs.DurationVar(&o.Duration, "duration", 2*time.Second, "length of each one-way case (1s with --quick unless set)")
	fs.IntVar(&o.Requests, "requests", 5000, "requests per latency case (2000 with --quick unless set)")
	fs.DurationVar(&o.WaitQuiet, "wait-quiet", 5*time.Second, "before each run, wait up to this long for other processes to use less than --max-other of a CPU")
	fs.IntVar(&o.Nice, "nice", -20, "nice value of the generator and guest emulator threads")
	fs.IntVar(&o.Batch, "batch", DefaultBatch, "frames per sendmmsg of the host-side generator (host->guest cases), 1.."+strconv.Itoa(maxBatch)+"; guest->host is always one write per frame")
	fs.Float64Var(&o.MaxOther, "max-other", 0.15, "flag a sample when other processes used more than this share of a CPU")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("bench: unexpected arguments %q", fs.Args())
	}
	if o.Batch == 0 { // validate reads 0 as the default; on the command line it is a mistake
		return o, fmt.Errorf("bench: batch 0: want 1..%d frames per sendmmsg", maxBatch)
	}
	if o.Quick {
		if !fs.Changed("rounds") {
			o.Rounds = 3
		}
		if !fs.Changed("duration") {
			o.Duration = time.Second
		}
		if !fs.Changed("requests") {
			o.Requests = 2000
		}
		if !fs.Changed("cases") {
			o.Cases = quickCases
		}
		if !fs.Changed("modes") {
			o.Modes = quickModes()
		}
		if !fs.Changed("wait-quiet") {
			o.WaitQuiet = time.Second
		}
	}
	return o, o.validate()
}

func (o *Options) validate() error {
	if o.Output != "table" && o.Output != "json" {
		return fmt.Errorf("bench: output %q: want table or json", o.Output)
	}
	if o.Rounds < 1 {
		return fmt.Errorf("bench: rounds %d: want at least 1", o.Rounds)
	}
	n := runtime.NumCPU()
	if o.CPUGen < 0 || o.CPUGen >= n || o.CPUGuest < 0 || o.CPUGuest >= n || o.CPUGen == o.CPUGuest {
		return fmt.Errorf("bench: cpus %d and %d: want two different CPUs below %d", o.CPUGen, o.CPUGuest, n)
	}
	if o.Duration < 10*time.Millisecond || o.Requests < 10 {
		return fmt.Errorf("bench: duration %s / requests %d too small", o.Duration, o.Requests)
	}
	if o.Nice < -20 || o.Nice > 19 {
		return fmt.Errorf("bench: nice %d: want -20..19", o.Nice)
	}
	if o.Batch == 0 {
		o.Batch = DefaultBatch
	}
	if o.Batch < 1 || o.Batch > maxBatch {
		return fmt.Errorf("bench: batch %d: want 1..%d frames per sendmmsg", o.Batch, maxBatch)
	}
	if len(o.Modes) == 0 {
		return errors.New("bench: no modes")
	}
	for _, m := range o.Modes {
		if _, ok := modeByName(m); !ok {
			return fmt.Errorf("bench: unknown mode %q (known: %s; or a kata-dp mode with +svc<N>, N 1..%d)", m, strings.Join(DefaultModes(), ","), maxBenchServices)
		}
	}
	o.cases = nil
	for _, c := range allCases {
		if len(o.Cases) == 0 || slices.Contains(o.Cases, c.name) {
			o.cases = append(o.cases, c)
		}
	}
	for _, name := range o.Cases {
		if !slices.ContainsFunc(allCases, func(c caseDef) bool { return c.name == name }) {
			return fmt.Errorf("bench: unknown case %q", name)
		}
	}
	return nil
}

// modeNames are the names of the harness's modes that keep holds for, in report order.
func modeNames(keep func(modeDef) bool) []string {
	var out []string
	for _, m := range modes() {
		if keep(m) {
			out = append(out, m.name)
		}
	}
	return out
}

// Run runs the benchmark and returns its report. A run that fails is noted
// in the report and makes Run return an error after the other runs.
func Run(ctx context.Context, o Options, log *slog.Logger) (*Report, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	// A run killed before its undo (kill -9, a reboot of the agent's cgroup) left its
	// namespaces and pins; they carry its pid, and the next run removes them.
	if swept, err := topo.SweepStale(sweepPrefix); len(swept) > 0 || err != nil {
		log.Info("removed what an earlier, killed run left", "removed", swept, "error", err)
	}
	r := &runner{o: o, ksoft: ksoftirqds()}
	benchNice = o.Nice
	// Every measuring thread is locked to its goroutine and lives in
	// syscalls; with as many Ps as CPUs, a thread returning from a syscall
	// waits for a P that another thread holds, and the harness measures Go's
	// scheduler instead of the path. Plenty of Ps take that out.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(16, 4*runtime.NumCPU())))
	rep := newReport(o)
	skip := map[string]bool{}
	var failed []error
	start := time.Now()
	for round := 1; round <= o.Rounds; round++ {
		for _, name := range o.Modes {
			if skip[name] {
				continue
			}
			if err := ctx.Err(); err != nil {
				return rep.finish(), err
			}
			m, _ := modeByName(name)
			if busy := r.waitQuiet(ctx); busy > o.MaxOther {
				log.Info("machine busy, running anyway", "other_cpu", fmt.Sprintf("%.2f", busy), "waited", o.WaitQuiet)
			}
			t0 := time.Now()
			smps, err := r.runMode(ctx, m, round)
			rep.Samples = append(rep.Samples, smps...)
			switch {
			case errors.Is(err, errSkipMode):
				skip[name] = true
				rep.Notes = append(rep.Notes, fmt.Sprintf("mode %s skipped: %v", name, err))
				log.Warn("mode skipped", "mode", name, "reason", err)
			case err != nil:
				failed = append(failed, fmt.Errorf("round %d: %w", round, err))
				rep.Notes = append(rep.Notes, fmt.Sprintf("round %d mode %s failed: %v", round, name, err))
				log.Error("run failed", "round", round, "mode", name, "err", err)
			default:
				flagged := 0
				for _, s := range smps {
					if len(s.Flags) > 0 {
						flagged++
						log.Warn("sample flagged", "round", round, "mode", name, "case", s.Case, "why", strings.Join(s.Flags, "; "))
					}
				}
				log.Info("run done", "round", round, "mode", name, "samples", len(smps), "flagged", flagged, "took", time.Since(t0).Round(time.Millisecond))
			}
		}
	}
	rep.Elapsed = time.Since(start).Round(time.Second).String()
	return rep.finish(), errors.Join(failed...)
}
