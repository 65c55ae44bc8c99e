package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/kube"
)

const statusUse = `
Usage: kata-dp status [<id>] [-o table|json] [--watch [--interval 2s]]
       kata-dp status --cluster [-o table|json]

Shows every sandbox (or the one whose id, or unique id prefix, is <id>), its endpoints (NICs
added through kata-network), their dataplane mode and their counters (packets and bytes from
and to the guest, drops by reason), and what vhost-net came to (per sandbox: what a NIC
plugged now gets; per NIC: what it got), with the reason. A vhost-user NIC has mode vhost-user
and no counters in kata-dp: its switch keeps them. docs/operations.md explains every column and
field. The table starts with a one-line summary: sandboxes (and how many are unhealthy), NICs,
packets and bytes each way, and drops by reason.

--watch prints that summary line again every --interval, with the rates since the previous
line (packets/s each way, drops/s), until interrupted: a quick look at a node or a sandbox
without Prometheus.

--cluster shows the cluster table instead (an agent following Kubernetes, docs/kubernetes.md):
whether the first sync is done, whether the API server answers and when it last did, the sync
lag, the objects seen, the virtual services and rules against the limit, the errors, and per
sandbox the cluster services in force and those a kata-ipvs rule hides.

Examples:
  kata-dp status
  kata-dp status --cluster
  kata-dp status 6ec7a98
  kata-dp status -o json | jq '.[].endpoints[] | {nic, runningMode, stats}'
  kata-dp status --watch --interval 1s
`

func runStatus(e *env, args []string) error {
	fs := e.flagSet("status", statusUse)
	sock := socketFlag(fs)
	output := fs.StringP("output", "o", "table", "output format: table or json")
	watch := fs.BoolP("watch", "w", false, "print the one-line summary with rates every --interval until interrupted")
	interval := fs.Duration("interval", 2*time.Second, "time between two lines of --watch")
	cluster := fs.Bool("cluster", false, "show the cluster table (Kubernetes Services) instead of the sandboxes")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *cluster {
		if *watch || fs.NArg() > 0 {
			return errors.New("status: --cluster takes no sandbox id and no --watch")
		}
		return clusterStatus(e, *sock, *output)
	}
	if *watch {
		if *output != "table" {
			return fmt.Errorf("status: --watch prints lines of text: no --output %q", *output)
		}
		if *interval < 100*time.Millisecond {
			return fmt.Errorf("status: --interval %v: want at least 100ms", *interval)
		}
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("status: unexpected arguments %q", fs.Args()[1:])
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("status: --output %q: want table or json", *output)
	}
	get := func() ([]control.SandboxStatus, error) {
		st, err := e.client(*sock).Status(e.ctx)
		if err != nil {
			return nil, err
		}
		if fs.NArg() == 1 {
			return statusOf(st, fs.Arg(0))
		}
		return st, nil
	}
	st, err := get()
	if err != nil {
		return err
	}
	if *watch {
		return watchStatus(e, st, get, *interval)
	}
	if *output == "json" {
		if st == nil {
			st = []control.SandboxStatus{} // [] rather than null: scripts iterate it
		}
		return writeJSON(e.stdout, st)
	}
	return statusTable(e, st)
}

// statusOf keeps the sandbox whose id is id or starts with it (a unique prefix), with the
// errors kata-network uses for the same lookup.
func statusOf(st []control.SandboxStatus, id string) ([]control.SandboxStatus, error) {
	var match []control.SandboxStatus
	for _, s := range st {
		if s.ID == id {
			return []control.SandboxStatus{s}, nil
		}
		if id != "" && strings.HasPrefix(s.ID, id) {
			match = append(match, s)
		}
	}
	switch len(match) {
	case 0:
		return nil, fmt.Errorf("status: %w (%s)", control.ErrNoSuchSandbox, id)
	case 1:
		return match, nil
	}
	return nil, fmt.Errorf("status: %w (%s)", control.ErrAmbiguous, id)
}

// writeJSON writes v indented, the form every -o json listing uses.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// totals are the counters of a status report summed over its endpoints.
type totals struct {
	sandboxes, unhealthy, nics int
	from, to                   control.DirStats
	drops                      map[string]uint64
}

func sum(st []control.SandboxStatus) totals {
	t := totals{sandboxes: len(st), drops: map[string]uint64{}}
	for _, s := range st {
		if s.Unhealthy != "" {
			t.unhealthy++
		}
		for _, ep := range s.Endpoints {
			t.nics++
			if ep.Stats == nil {
				continue
			}
			t.from.Packets += ep.Stats.FromGuest.Packets
			t.from.Bytes += ep.Stats.FromGuest.Bytes
			t.to.Packets += ep.Stats.ToGuest.Packets
			t.to.Bytes += ep.Stats.ToGuest.Bytes
			for _, d := range []map[string]uint64{ep.Stats.FromGuest.Drops, ep.Stats.ToGuest.Drops} {
				for r, n := range d {
					if n > 0 {
						t.drops[r] += n
					}
				}
			}
		}
	}
	return t
}

func (t totals) dropTotal() uint64 {
	var n uint64
	for _, v := range t.drops {
		n += v
	}
	return n
}

// summary is status's one-line summary.
func summary(st []control.SandboxStatus) string {
	t := sum(st)
	sb := fmt.Sprintf("%d sandboxes", t.sandboxes)
	if t.unhealthy > 0 {
		sb += fmt.Sprintf(" (%d unhealthy)", t.unhealthy)
	}
	return fmt.Sprintf("%s, %d NICs; from guests %d pkts %d bytes, to guests %d pkts %d bytes; drops %d%s",
		sb, t.nics, t.from.Packets, t.from.Bytes, t.to.Packets, t.to.Bytes, t.dropTotal(), dropReasons(t.drops))
}

func dropReasons(d map[string]uint64) string {
	if len(d) == 0 {
		return ""
	}
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(d)) {
		parts = append(parts, fmt.Sprintf("%s=%d", r, d[r]))
	}
	return " (" + strings.Join(parts, ",") + ")"
}

// watchStatus prints the summary of the first report, then every interval a line with the
// time, the summary and the rates since the previous line, until the context ends (Ctrl-C).
// A report that fails (the agent restarting) is printed as such and the watch goes on.
func watchStatus(e *env, first []control.SandboxStatus, get func() ([]control.SandboxStatus, error), interval time.Duration) error {
	prev, at := sum(first), time.Now()
	fmt.Fprintf(e.stdout, "%s  %s\n", at.Format("15:04:05"), summary(first))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return nil
		case <-tick.C:
		}
		st, err := get()
		now := time.Now()
		if err != nil {
			fmt.Fprintf(e.stdout, "%s  error: %v\n", now.Format("15:04:05"), err)
			continue
		}
		cur := sum(st)
		dt := now.Sub(at).Seconds()
		rate := func(a, b uint64) float64 {
			if a < b || dt <= 0 {
				return 0 // a counter reset (sandbox re-created)
			}
			return float64(a-b) / dt
		}
		fmt.Fprintf(e.stdout, "%s  %s; rates: from guests %.0f pkt/s, to guests %.0f pkt/s, drops %.0f/s\n", now.Format("15:04:05"),
			summary(st), rate(cur.from.Packets, prev.from.Packets), rate(cur.to.Packets, prev.to.Packets),
			rate(cur.dropTotal(), prev.dropTotal()))
		prev, at = cur, now
	}
}

func statusTable(e *env, st []control.SandboxStatus) error {
	fmt.Fprintln(e.stdout, summary(st))
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SANDBOX\tMODE\tUPLINK\tANTI-SPOOF\tSTRICT-EGRESS\tQMP\tNICS\tROUTES\tNETNS\tVHOST\tNETMON")
	for _, s := range st {
		vhost := cmp.Or(s.Vhost, control.VhostAuto)
		if s.VhostDecision != "" {
			vhost += " (" + s.VhostDecision + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", s.ID, s.Mode, s.Uplink, onOff(s.AntiSpoof),
			onOff(s.StrictEgress), orDash(s.QMP), len(s.Endpoints), s.Routes, s.NetNS, vhost, onOff(s.Netmon))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, s := range st {
		if s.Unhealthy != "" {
			fmt.Fprintf(e.stdout, "sandbox %s unhealthy (delete it with `kata-dp sandbox del %s`): %s\n", s.ID, s.ID, s.Unhealthy)
		}
	}
	n := 0
	for _, s := range st {
		n += len(s.Endpoints)
	}
	if n == 0 {
		return nil
	}
	fmt.Fprintln(e.stdout)
	tw = tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SANDBOX\tNIC\tTAP\tSLOT\tMODE\tUPLINK\tMAC\tADDR\tPCI\tFROM-GUEST pkts/bytes\tTO-GUEST pkts/bytes\tDROPS\tVHOST\tSOURCE")
	for _, s := range st {
		for _, ep := range s.Endpoints {
			from, to, drops := "-", "-", "-"
			if ep.Stats != nil {
				from = fmt.Sprintf("%d/%d", ep.Stats.FromGuest.Packets, ep.Stats.FromGuest.Bytes)
				to = fmt.Sprintf("%d/%d", ep.Stats.ToGuest.Packets, ep.Stats.ToGuest.Bytes)
				drops = formatDrops(ep.Stats)
			} else if ep.VhostUserSocket != "" {
				from, to, drops = "(switch)", "(switch)", "-"
			} else if ep.StatsError != "" {
				drops = "error: " + ep.StatsError
			}
			tap := ep.Tap
			switch {
			case ep.VhostUserSocket != "":
				tap = "- (vhost-user " + ep.VhostUserSocket + ")"
			case ep.Macvtap != "":
				tap = ep.Macvtap + " (macvtap " + ep.MacvtapDev + ")"
			case !ep.TapCreated:
				tap += " (adopted)"
			}
			mode := ep.Mode
			if ep.RunningMode != "" && ep.RunningMode != ep.Mode {
				mode = ep.RunningMode + " (asked " + ep.Mode + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, ep.NIC, tap, ep.Slot,
				mode, orDash(ep.Uplink), ep.MAC, orDash(addrs(ep)), orDash(ep.PCIAddr), from, to, drops, orDash(ep.Vhost), orDash(ep.Source))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return routeTable(e, st)
}

// addrs is a NIC's addresses, IPv4 first.
func addrs(ep control.EndpointStatus) string {
	return strings.Trim(ep.Addr+","+ep.Addr6, ",")
}

// routeTable lists the sandboxes' routes of both families (list-routes shows IPv4 only).
func routeTable(e *env, st []control.SandboxStatus) error {
	n := 0
	for _, s := range st {
		n += len(s.RouteList)
	}
	if n == 0 {
		return nil
	}
	fmt.Fprintln(e.stdout)
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SANDBOX\tDEST\tGATEWAY\tDEVICE")
	for _, s := range st {
		for _, r := range s.RouteList {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.ID, r.Dest, orDash(r.Gateway), r.Device)
		}
	}
	return tw.Flush()
}

// formatDrops renders the drops of both directions as "reason=n,..." ("0" when none).
func formatDrops(st *control.EndpointStats) string {
	sum := map[string]uint64{}
	for _, d := range []map[string]uint64{st.FromGuest.Drops, st.ToGuest.Drops} {
		for r, n := range d {
			if n > 0 {
				sum[r] += n
			}
		}
	}
	if len(sum) == 0 {
		return "0"
	}
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(sum)) {
		parts = append(parts, fmt.Sprintf("%s=%d", r, sum[r]))
	}
	return strings.Join(parts, ",")
}

// clusterStatus prints the agent's cluster table report (GET /v1/cluster).
func clusterStatus(e *env, sock, output string) error {
	var rep kube.Report
	if err := e.client(sock).Do(e.ctx, "GET", "/v1/cluster", nil, &rep); err != nil {
		return fmt.Errorf("status --cluster (is the agent following Kubernetes? --kubeconfig, --kube-in-cluster): %w", err)
	}
	if output == "json" {
		return writeJSON(e.stdout, rep)
	}
	if output != "table" {
		return fmt.Errorf("status: --output %q: want table or json", output)
	}
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	api := "unreachable"
	if rep.Connected {
		api = "up"
	}
	if !rep.LastContact.IsZero() {
		api += ", last answer " + rep.LastContact.UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(w, "node:\t%s\n", rep.Node)
	fmt.Fprintf(w, "synced:\t%v\n", rep.Synced)
	fmt.Fprintf(w, "api server:\t%s\n", api)
	fmt.Fprintf(w, "sync lag:\t%v (max %v)\n", rep.SyncLag, rep.MaxSyncLag)
	fmt.Fprintf(w, "objects:\t%d services, %d endpointslices\n", rep.Services, rep.EndpointSlices)
	fmt.Fprintf(w, "table:\t%d virtual services, %d of %d rules\n", rep.VirtualServices, rep.Rules, rep.MaxRules)
	fmt.Fprintf(w, "errors:\t%d sync, %d write", rep.Errors, rep.WriteErrors)
	if rep.LastError != "" {
		fmt.Fprintf(w, " (last: %s)", rep.LastError)
	}
	fmt.Fprintln(w)
	w.Flush()
	t := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(t, "SANDBOX\tPROGRAMMED\tOVERRIDDEN\tERROR")
	for _, id := range slices.Sorted(maps.Keys(rep.Sandboxes)) {
		s := rep.Sandboxes[id]
		fmt.Fprintf(t, "%s\t%d\t%d\t%s\n", id, s.Programmed, s.Overridden, cmp.Or(s.Err, "-"))
	}
	for _, name := range slices.Sorted(maps.Keys(rep.Skipped)) {
		fmt.Fprintf(t, "skipped %s:\t%s\n", name, strings.Join(rep.Skipped[name], "; "))
	}
	return t.Flush()
}
