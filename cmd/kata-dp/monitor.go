package main

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kata-dp/kata-dp/control/monitor"
	"github.com/kata-dp/kata-dp/maps"
)

const monitorUse = `
Usage: kata-dp monitor [--sandbox <id>] [--nic <name>] [--type drop|trace|lb]... [--reason <r>]... [-o text|json]

Streams the datapath's events live until interrupted: every dropped frame with its reason,
sandbox, NIC, direction, ethertype, addresses, ports and protocol; with --type trace every
forwarded frame; with --type lb every new load-balanced connection (VIP and the real server
chosen). --type and --reason take several values (repeated or comma-separated). The datapath
reports only while someone listens, and at most a burst of events per CPU (a token bucket):
"(N suppressed)" says how many it left out before an event, and a "suppressed" line how many
it left out that no event reported. Without --sandbox, every sandbox: those registered now
and those added while it runs.

Drop reasons: ` + "{{reasons}}" + `
docs/operations.md shows how to follow a lost frame with it.

Examples:
  kata-dp monitor                                   # every drop of every sandbox, and of those added later
  kata-dp monitor --sandbox 6ec7a98 --type drop,lb
  kata-dp monitor --sandbox 6ec7a98 --nic eth0 --reason spoof_ip -o json
`

func runMonitor(e *env, args []string) error {
	var names []string
	for _, r := range maps.DropReasons() {
		names = append(names, r.String())
	}
	fs := e.flagSet("monitor", strings.Replace(monitorUse, "{{reasons}}", strings.Join(names, ", "), 1))
	sock := socketFlag(fs)
	var f monitor.Filter
	fs.StringVar(&f.Sandbox, "sandbox", "", "only this sandbox (id or unique prefix)")
	fs.StringVar(&f.NIC, "nic", "", "only this NIC (kata-network name)")
	fs.StringSliceVar(&f.Types, "type", nil, "event types: drop (default), trace, lb")
	fs.StringSliceVar(&f.Reasons, "reason", nil, "only drops for these reasons")
	output := fs.StringP("output", "o", "text", "output format: text or json (one object a line)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("monitor: unexpected arguments %q (the sandbox is --sandbox)", fs.Args())
	}
	if *output != "text" && *output != "json" {
		return fmt.Errorf("monitor: --output %q: want text or json", *output)
	}
	err := e.client(*sock).Monitor(e.ctx, f, func(ev monitor.Event) error {
		if *output == "json" {
			return writeJSONLine(e, ev)
		}
		_, err := fmt.Fprintln(e.stdout, formatEvent(ev))
		return err
	})
	if err != nil {
		return fmt.Errorf("monitor: %w", err)
	}
	return nil
}

func writeJSONLine(e *env, ev monitor.Event) error {
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	_, err = e.stdout.Write(append(b, '\n'))
	return err
}

// formatEvent is one event as a line of text:
//
//	15:04:05.000000 drop spoof_ip 6ec7a98e eth0 from_guest 0x0800 udp 10.0.0.99:40000 -> 10.0.0.1:53 len 60
func formatEvent(ev monitor.Event) string {
	var b strings.Builder
	b.WriteString(ev.Time.Format("15:04:05.000000"))
	b.WriteString(" " + ev.Type)
	if ev.Type == "suppressed" {
		fmt.Fprintf(&b, " %s: %d events left out by the rate limit", ev.Sandbox, ev.Suppressed)
		return b.String()
	}
	if ev.Reason != "" {
		b.WriteString(" " + ev.Reason)
	}
	b.WriteString(" " + ev.Sandbox)
	if ev.NIC != "" {
		b.WriteString(" " + ev.NIC)
	}
	b.WriteString(" " + ev.Direction + " " + ev.Ethertype)
	if ev.Proto != "" {
		b.WriteString(" " + ev.Proto)
	}
	if ev.Src != "" || ev.Dst != "" {
		fmt.Fprintf(&b, " %s -> %s", orDash(ev.Src), orDash(ev.Dst))
	}
	if ev.Server != "" {
		b.WriteString(" via " + ev.Server)
	}
	fmt.Fprintf(&b, " len %d", ev.Len)
	if ev.Suppressed > 0 {
		fmt.Fprintf(&b, " (%d suppressed)", ev.Suppressed)
	}
	return b.String()
}
