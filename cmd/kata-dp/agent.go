package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/clusterlb"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/kata"
	"github.com/kata-dp/kata-dp/control/kube"
	"github.com/kata-dp/kata-dp/control/metrics"
	"github.com/kata-dp/kata-dp/control/netmon"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/control/watch"
	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// agentOptions are the agent's flags.
type agentOptions struct {
	socket      string
	stateDir    string
	bpffsRoot   string
	metricsAddr string
	// metricsRemote allows a non-loopback metrics address (it serves without authentication).
	metricsRemote bool
	logLevel      string
	logFormat     string
	kataDir       string // Kata's runtime directory to discover sandboxes in; "" off
	kataDirSet    bool   // given on the command line or in the config file
	// Kubernetes (docs/kubernetes.md): the cluster's Services become every sandbox's load
	// balancer when kubeconfig is set or kubeInCluster is true.
	kubeconfig      string
	kubeInCluster   bool
	nodeName        string
	clusterMaxRules int
	log             *slog.Logger
}

const agentUse = `
Usage: kata-dp agent [options]

Runs the node agent: serves the API on a unix socket (root only), keeps the state under
--state-dir, re-adopts the pinned datapath of every saved sandbox on start, and leaves the
datapath forwarding when it stops (SIGTERM, SIGINT). Under systemd (deploy/systemd) it tells
the service manager when it serves (Type=notify).

Every option can be set in the config file (default ` + DefaultConfig + `, read when it
exists): a YAML mapping with the option names as keys. Options given here override the file;
an unknown key or a bad value stops the agent with the file, line and key named.

Examples:
  kata-dp agent
  kata-dp agent --config /etc/kata-dp/config.yaml --metrics-addr 127.0.0.1:9464
  kata-dp agent --print-config          # the effective values and where each comes from
  kata-dp agent --log-format json --log-level debug
`

func runAgent(e *env, args []string) error {
	fs := e.flagSet("agent", agentUse)
	o := agentOptions{}
	config := fs.String("config", DefaultConfig, `config file (YAML; "" reads none)`)
	printCfg := fs.Bool("print-config", false, "print the effective configuration (YAML, with each value's source) and exit")
	fs.StringVar(&o.socket, "socket", api.DefaultSocket, "API socket path")
	fs.StringVar(&o.stateDir, "state-dir", store.DefaultDir, "state directory")
	fs.StringVar(&o.bpffsRoot, "bpffs-root", "/sys/fs/bpf/kata-dp", "bpffs directory of the pinned datapath")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus /metrics, /healthz and /readyz on this HOST:PORT (off when empty; loopback only unless --metrics-allow-remote)")
	fs.BoolVar(&o.metricsRemote, "metrics-allow-remote", false, "allow a --metrics-addr that is not loopback (the listener has no authentication: keep it on a management network)")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text (logfmt) or json (one object a line, for log collectors)")
	fs.StringVar(&o.kataDir, "kata-dir", kata.DefaultDir, `Kata's runtime directory: discover its sandboxes and take them over (on when it exists; "" turns discovery off)`)
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file of the cluster whose Services every sandbox balances (off when empty and --kube-in-cluster is false)")
	fs.BoolVar(&o.kubeInCluster, "kube-in-cluster", false, "follow the cluster's Services with the pod's ServiceAccount (the agent runs in a pod of the DaemonSet)")
	fs.StringVar(&o.nodeName, "node-name", "", "this node's name in the cluster, for internalTrafficPolicy Local (default: the hostname)")
	fs.IntVar(&o.clusterMaxRules, "cluster-max-rules", kube.DefaultMaxRules, "rules (services plus real servers) the cluster table holds at most; kata-ipvs keeps its own 20000")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("agent: unexpected arguments %q", fs.Args())
	}
	var bad error
	fs.Visit(func(f *pflag.Flag) {
		if c := agentChecks[f.Name]; c != nil && bad == nil {
			if err := c(f.Value.String()); err != nil {
				bad = fmt.Errorf("agent: --%s %q: %w", f.Name, f.Value.String(), err)
			}
		}
	})
	if bad != nil {
		return bad
	}
	src, err := loadConfig(fs, *config, fs.Changed("config"), agentChecks)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if *printCfg {
		return printConfig(e.stdout, fs, src, *config)
	}
	o.kataDirSet = src["kata-dir"] != fromDefault
	if o.kubeconfig != "" && o.kubeInCluster {
		return errors.New("agent: --kubeconfig and --kube-in-cluster: give one")
	}
	if o.nodeName == "" {
		if o.nodeName, err = os.Hostname(); err != nil {
			return fmt.Errorf("agent: --node-name not given and no hostname: %w", err)
		}
	}
	if o.metricsAddr != "" {
		if err := metrics.CheckAddr(o.metricsAddr, o.metricsRemote); err != nil {
			return fmt.Errorf("agent: --metrics-addr %q: %w", o.metricsAddr, err)
		}
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("agent: --log-level: %w", err)
	}
	hopts := &slog.HandlerOptions{Level: level}
	switch o.logFormat {
	case "text":
		o.log = slog.New(slog.NewTextHandler(e.stderr, hopts))
	case "json":
		o.log = slog.New(slog.NewJSONHandler(e.stderr, hopts))
	default:
		return fmt.Errorf("agent: --log-format %q: want text or json", o.logFormat)
	}
	return agent(e, o)
}

func agent(e *env, o agentOptions) (err error) {
	ctx := e.ctx
	log := o.log
	met := metrics.New(version)
	// Readiness: each start-up step below opens its gate. Long-running parts that must be up
	// before the node counts as ready (Kata discovery) add their own check with health.Add.
	health := &metrics.Health{}
	stateLoaded := health.Gate("state", "loading the saved state")
	readopted := health.Gate("datapaths", "re-adopting the pinned datapaths")
	serving := health.Gate("api", "opening the API socket")
	errc := make(chan error, 2)
	var msrv *http.Server
	if o.metricsAddr != "" {
		// Served from the start, so /healthz answers and /readyz says what the agent waits
		// for while it re-adopts the sandboxes.
		ml, err := metrics.Listen(o.metricsAddr, o.metricsRemote)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		msrv = metrics.NewServer(met, health)
		go func() {
			if err := msrv.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		}()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			msrv.Shutdown(sctx)
		}()
		if metrics.CheckAddr(o.metricsAddr, false) != nil {
			log.Warn("metrics listener is not on loopback: it has no authentication", "addr", ml.Addr().String())
		}
		log.Info("serving metrics", "addr", ml.Addr().String())
	}
	st, err := store.Open(o.stateDir)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	deps, err := e.newDeps(ctx, o)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	defer func() {
		if deps.Close != nil {
			if cerr := deps.Close(); cerr != nil {
				log.Error("close dataplane", "err", cerr)
			}
		}
	}()
	var lbm *ipvsctl.Manager
	// cluster merges the cluster's Services into every sandbox's load balancer, beside its
	// kata-ipvs rules (nil without Kubernetes).
	var cluster *clusterlb.Tables
	kc, err := kubeConfig(o)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	// mon watches the netns of the sandboxes with netmon on; it learns of new and removed
	// sandboxes through the controller's hooks (set before the API and the tasks start).
	var mon *netmon.Monitor
	cfg := control.Config{Dataplane: deps.Dataplane, Taps: deps.Taps, Store: st, Logger: log,
		OnSandboxRemoved: func(id string) {
			if lbm != nil {
				lbm.Forget(id)
			}
			if cluster != nil {
				cluster.Forget(id)
			}
			if mon != nil {
				mon.Sync()
			}
		},
		OnSandboxAdded: func(sb control.Sandbox) {
			if mon != nil {
				mon.Sync()
			}
			if cluster != nil {
				if err := cluster.Reinstall(ctx, sb.ID); err != nil {
					log.Error("new sandbox without the cluster's services", "sandbox", sb.ID, "err", err)
				}
			}
		},
		OnSandboxReadopted: func(id string) {
			if lbm != nil {
				if err := lbm.Reinstall(ctx, id); err != nil {
					log.Error("re-adopted sandbox without its kata-ipvs rules", "sandbox", id, "err", err)
				}
			}
			if cluster != nil {
				if err := cluster.Reinstall(ctx, id); err != nil {
					log.Error("re-adopted sandbox without the cluster's services", "sandbox", id, "err", err)
				}
			}
		}}
	if deps.Hotplug != nil {
		cfg.Hotplug = met.Hotplug(deps.Hotplug)
	}
	ctrl, err := control.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	stateLoaded()
	bad := len(ctrl.Unhealthy())
	met.Reconciled(len(ctrl.Sandboxes())-bad, bad)
	if deps.LB != nil {
		ist, err := store.Open(filepath.Join(o.stateDir, "ipvs"))
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		var lb ipvsctl.LB = deps.LB
		if kc != nil {
			full, ok := deps.LB.(clusterlb.LB)
			if !ok {
				return errors.New("agent: Kubernetes: the dataplane cannot apply one service at a time")
			}
			cluster = clusterlb.New(full, healthySandboxes(ctrl), log)
			lb = cluster
		}
		lbm, err = ipvsctl.New(ctx, lb, ist, ctrl.Health, ctrl.Sandboxes(), log)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		if cluster != nil {
			cluster.Started()
		}
	} else if kc != nil {
		return errors.New("agent: Kubernetes needs the load balancer, which this dataplane lacks")
	}
	readopted()
	src := metrics.Sources{Controller: ctrl}
	if lbm != nil {
		src.LB = lbm
	}
	if dp, ok := deps.Dataplane.(metrics.Datapath); ok {
		src.Datapath = dp
	}
	met.AddSources(src)
	sopts := api.ServerOptions{Version: version, Logger: log, Metrics: met, IPVS: lbm, Monitor: deps.Monitor}
	tasks := watch.New(log)
	mon = netmon.New(ctrl, netmon.Options{Logger: log})
	if err := tasks.Add(met.Task(watch.Task{Name: "netmon", Run: mon.Run})); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	// Sandboxes the start could not re-adopt (netns or QMP not there yet) are retried with
	// backoff (control.RetryBackoffMin..Max); the task only polls what is due.
	if err := tasks.Add(watch.Task{Name: "readopt", Every: time.Second, Run: ctrl.RetryUnhealthy}); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	var clusterReport *kube.Reporter
	if cluster != nil {
		syncer, err := kube.New(cluster, kube.Options{Config: kc, Node: o.nodeName, MaxRules: o.clusterMaxRules, Logger: log})
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		if err := tasks.Add(met.Task(watch.Task{Name: "kubernetes", Run: syncer.Run})); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		health.Add("kubernetes", syncer.Ready)
		// A sandbox whose cluster-table write failed is written whole again until it works.
		if err := tasks.Add(watch.Task{Name: "cluster-retry", Every: 5 * time.Second, Run: cluster.RetryFailed}); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		rep := kube.Reporter{Syncer: syncer, Tables: cluster}
		met.Registry().MustRegister(rep)
		clusterReport = &rep
	}
	for _, t := range deps.Tasks {
		if err := tasks.Add(met.Task(t)); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
	}
	if disc, err := kataDiscovery(ctrl, o); err != nil {
		return fmt.Errorf("agent: %w", err)
	} else if disc != nil {
		sopts.Kata = disc
		if err := tasks.Add(met.Task(watch.Task{Name: "kata-discovery", Run: disc.Run})); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		health.Add("discovery", func(context.Context) error {
			if !disc.Running() {
				return errors.New("not yet: watching Kata's runtime directory " + disc.Dir())
			}
			return nil
		})
	}
	srv := api.NewServer(ctrl, sopts)
	if clusterReport != nil {
		srv.Handle("GET /v1/cluster", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			api.WriteJSON(w, 200, clusterReport.Report())
		}))
	}
	// Deferred after deps.Close: the tasks have stopped before the dataplane is closed.
	defer tasks.Start(ctx)()
	l, err := api.Listen(o.socket)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	go func() { errc <- srv.Serve(l) }()
	serving()
	log.Info("agent started", "version", version, "socket", o.socket, "state", o.stateDir, "sandboxes", len(ctrl.Sandboxes()))
	if nerr := sdNotify(e.getenv, fmt.Sprintf("READY=1\nSTATUS=serving %s, %d sandboxes", o.socket, len(ctrl.Sandboxes()))); nerr != nil {
		log.Warn("cannot tell systemd the agent is ready", "err", nerr)
	}
	if e.ready != nil {
		e.ready()
	}
	select {
	case <-ctx.Done():
		log.Info("agent stopping; the datapath keeps forwarding")
	case err = <-errc:
		log.Error("agent failed", "err", err)
	}
	if nerr := sdNotify(e.getenv, "STOPPING=1"); nerr != nil {
		log.Warn("cannot tell systemd the agent is stopping", "err", nerr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	return nil
}

// kubeConfig returns how to reach the cluster named by --kubeconfig or, with
// --kube-in-cluster, by the pod's ServiceAccount; nil when neither is set. It does not contact
// the API server: the informers do, and retry with backoff while it is unreachable.
func kubeConfig(o agentOptions) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	switch {
	case o.kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", o.kubeconfig, err)
		}
	case o.kubeInCluster:
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("--kube-in-cluster: %w", err)
		}
	default:
		return nil, nil
	}
	cfg.UserAgent = "kata-dp/" + version
	return cfg, nil
}

// healthySandboxes lists the sandboxes the cluster table is written into: the registered ones
// whose datapath is loaded (an unhealthy one gets it when it is re-adopted).
func healthySandboxes(ctrl *control.Controller) func() []string {
	return func() []string {
		bad := ctrl.Unhealthy()
		var ids []string
		for _, sb := range ctrl.Sandboxes() {
			if bad[sb.ID] == "" {
				ids = append(ids, sb.ID)
			}
		}
		return ids
	}
}

// kataDiscovery returns the Kata discovery task for --kata-dir, or nil when it is off: the
// flag set to "", or left at its default while that directory does not exist (a node without
// Kata). A directory the operator named must exist.
func kataDiscovery(ctrl *control.Controller, o agentOptions) (*kata.Discovery, error) {
	if o.kataDir == "" {
		return nil, nil
	}
	if fi, err := os.Stat(o.kataDir); err != nil || !fi.IsDir() {
		if !o.kataDirSet {
			o.log.Info("Kata discovery off: no Kata runtime directory", "kata-dir", o.kataDir)
			return nil, nil
		}
		return nil, fmt.Errorf("--kata-dir %s: not a directory (\"\" turns discovery off)", o.kataDir)
	}
	return kata.New(ctrl, kata.Options{Dir: o.kataDir, StateDir: o.stateDir, Logger: o.log}), nil
}
