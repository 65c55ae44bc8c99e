// Command kata-dp is kata-dp's one binary: the node agent (`kata-dp agent`) and its thin
// clients (`sandbox`, `kata-network`, `status`, `version`), which talk to the agent over its
// unix socket.
//
// Each subcommand lives in its own file and runs against an env (standard streams, arguments,
// environment, context and the agent's dependencies), so tests run every subcommand
// in-process.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/kata-dp/kata-dp/control/api"
	// Maps the heap and binary pages the packages' init touches in a few calls instead of a
	// page fault each (every kata-network and kata-ipvs call is a process of its own).
	_ "github.com/kata-dp/kata-dp/internal/prefault"
	"github.com/spf13/pflag"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// env is what a subcommand runs against.
type env struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	args   []string // without the program name
	getenv func(string) string
	// newDeps builds the agent's dataplane, hot-plugger and tap manager (see deps.go); tests
	// replace it.
	newDeps func(ctx context.Context, o agentOptions) (agentDeps, error)
	// ready, when set, is called by the agent once it serves (tests).
	ready func()
	// onFlagSet, when set, sees every FlagSet a subcommand makes: `kata-dp completion` reads
	// the flags from it, so the scripts come from the same definitions the commands parse.
	onFlagSet func(*pflag.FlagSet)
	// fs is the subcommand's FlagSet (the last flagSet made): client reads --timeout from it.
	fs *pflag.FlagSet
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	e := &env{ctx: ctx, stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, args: os.Args[1:],
		getenv: os.Getenv, newDeps: newAgentDeps}
	code := e.main()
	stop()
	os.Exit(code)
}

// unreachableHint follows the error of a kata-dp client command that found no agent on its
// socket.
const unreachableHint = "is the agent running? (systemctl start kata-dp)"

// main runs the command line and returns the exit code: the error text on stderr, exit 1.
func (e *env) main() int {
	if err := run(e); err != nil {
		fmt.Fprintln(e.stderr, err)
		// kata-network and kata-ipvs keep their stderr byte for byte the contract's.
		if errors.Is(err, api.ErrUnreachable) && e.args[0] != "kata-network" && e.args[0] != "kata-ipvs" {
			fmt.Fprintln(e.stderr, unreachableHint)
		}
		return 1
	}
	return 0
}

// command is one subcommand: the one table that run, usage and the completion scripts read.
type command struct {
	name, help string
	run        func(e *env, args []string) error
	// words are what the first argument after the command may be (completion).
	words []string
}

var commands []command

func init() {
	// Set in init: runCompletion reads the table.
	commands = []command{
		{"agent", "run the node agent (the only process that changes state)", runAgent, nil},
		{"sandbox", "register, remove and list sandboxes", runSandbox, []string{"add", "del", "list", "release", "adopt"}},
		{"kata-network", "manage the interfaces and routes of a sandbox (drop-in for kata-runtime kata-network)", runKataNetwork, api.Ops},
		{"kata-ipvs", "manage the load balancer of a sandbox (drop-in for kata-runtime kata-ipvs)", runKataIPVS, []string{"ipvsadm", "cleanup"}},
		{"status", "show sandboxes, endpoints, modes and counters", runStatus, nil},
		{"monitor", "stream the datapath's events live: drops with their reason, traces, new load-balanced connections", runMonitor, nil},
		{"bench", "benchmark the dataplane modes against Kata's tc mirred (see --help)", runBench, nil},
		{"version", "show the version and the kernel features found", runVersion, nil},
		{"completion", "print a shell completion script: bash, zsh or fish", runCompletion, []string{"bash", "zsh", "fish"}},
	}
}

const topUsage = `kata-dp: the eBPF dataplane of VM-based sandboxes

Usage:
  kata-dp <command> [arguments]

Commands:
`

func usage(w io.Writer) {
	fmt.Fprint(w, topUsage)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-13s %s\n", c.name, c.help)
	}
	fmt.Fprintf(w, "\nClient commands talk to the agent's socket: --socket PATH, or $%s, or %s.\n", api.SocketEnv, api.DefaultSocket)
	fmt.Fprint(w, "Run 'kata-dp <command> --help' for a command's options; 'kata-dp --version' prints the version.\n")
}

func run(e *env) error {
	if len(e.args) == 0 {
		usage(e.stdout)
		return nil
	}
	name := e.args[0]
	if name == "help" || name == "-h" || name == "--help" {
		usage(e.stdout)
		return nil
	}
	if name == "--version" {
		fmt.Fprintf(e.stdout, "kata-dp %s\n", version)
		return nil
	}
	for _, c := range commands {
		if c.name == name {
			if err := c.run(e, e.args[1:]); !errors.Is(err, errHelp) {
				return err
			}
			return nil
		}
	}
	usage(e.stderr)
	return fmt.Errorf("unknown command %q", name)
}

// flagSet returns a FlagSet for a subcommand whose usage prints use and the flags.
func (e *env) flagSet(name, use string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(e.stderr)
	e.fs = fs
	if e.onFlagSet != nil {
		e.onFlagSet(fs)
	}
	fs.Usage = func() {
		fmt.Fprint(e.stdout, strings.TrimLeft(use, "\n"))
		if fs.HasFlags() {
			fmt.Fprint(e.stdout, "\nOptions:\n"+fs.FlagUsages())
		}
	}
	return fs
}

// errHelp is returned by parse after --help was printed; run turns it into success.
var errHelp = errors.New("help printed")

// parse parses args; --help prints the usage on stdout and returns errHelp.
func parse(fs *pflag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, pflag.ErrHelp) {
		return errHelp // pflag printed the usage
	}
	if err != nil {
		return fmt.Errorf("%s: %w", fs.Name(), err)
	}
	return nil
}

// socketFlag adds --socket to fs, and --timeout, the bound of each call to the agent (see
// api.DefaultTimeout for how the default was chosen), which client reads.
func socketFlag(fs *pflag.FlagSet) *string {
	fs.Duration("timeout", api.DefaultTimeout, "give up when the agent has not answered within this long (0: wait forever)")
	return fs.String("socket", "", fmt.Sprintf("agent socket (default $%s or %s)", api.SocketEnv, api.DefaultSocket))
}

// client returns the API client for the --socket flag value, bounded by --timeout.
func (e *env) client(flag string) *api.Client {
	path := flag
	if path == "" {
		path = e.getenv(api.SocketEnv)
	}
	if path == "" {
		path = api.DefaultSocket
	}
	c := api.NewClient(path)
	if e.fs != nil {
		if d, err := e.fs.GetDuration("timeout"); err == nil {
			c.Timeout = d
		}
	}
	return c
}
