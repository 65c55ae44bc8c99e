package main

import (
	"cmp"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/kata-dp/kata-dp/control"
)

const sandboxUse = `
Usage:
  kata-dp sandbox add <id> --netns <path> [--qmp <socket>] [--uplink <dev>] [--mode tc|xdp|tcfilter|macvtap|macvtap-bpf|direct]
                           [--anti-spoof=true|false] [--strict-egress=true|false] [--vhost auto|on|off] [--netmon]
  kata-dp sandbox del <id>
  kata-dp sandbox list [-o table|json]
  kata-dp sandbox release <id>
  kata-dp sandbox adopt <id>

Registers a sandbox with the agent (add), removes it with everything kata-dp created for it
(del: endpoints, the taps kata-dp created, the datapath, the state), or lists them.
del takes the exact id (never a prefix: it destroys). With --mode direct the taps live beside --uplink (a host
device: a veth toward a bridge or router, a NIC, a bond) in --netns, which defaults to the
agent's own netns; BPF on the uplink steers frames by MAC straight into them (docs/direct.md).
Sandboxes that the agent's Kata discovery registered (--kata-dir; source "discovery" in list -o
json) are not deleted by hand: release hands one back to Kata's own u32 + mirred plumbing under
traffic and detaches kata-dp (it stays with Kata, across agent restarts, until adopt), and adopt
lets discovery take it over again (docs/kata.md).
--vhost says whether the taps hot-plugged into the VM use the kernel's vhost-net: auto (on when
/dev/vhost-net can be opened, otherwise off, with the reason in status), on (a NIC that cannot
have it is refused), off; "vhost" in add-iface overrides it per NIC (docs/vhost.md).
--netmon makes the agent watch the sandbox's netns: a link that appears there (a second CNI
network's veth, a macvlan, ...) and is up with a MAC joins the VM by itself, as add-iface and
add-route would add it, follows its address and route changes, and leaves when the link goes
(docs/netmon.md). Off unless given.

Examples:
  kata-dp sandbox add 6ec7a98f3b2c --netns /run/netns/sb1 --qmp /run/vc/vm/6ec7a98f3b2c/qmp.sock
  kata-dp sandbox add sb2 --netns /run/netns/sb2 --mode xdp --strict-egress=false
  kata-dp sandbox add sb3 --netns /run/netns/sb3 --qmp /run/vc/vm/sb3/qmp.sock --netmon
  kata-dp sandbox list -o json
  kata-dp sandbox del 6ec7a98f3b2c
  kata-dp sandbox release 6ec7a98f3b2c     # a discovered Kata sandbox back to Kata's tcfilter
`

func runSandbox(e *env, args []string) error {
	fs := e.flagSet("sandbox", sandboxUse)
	sock := socketFlag(fs)
	netns := fs.String("netns", "", "sandbox network namespace path (add)")
	qmp := fs.String("qmp", "", "QMP socket of the sandbox's VM; without it hot-plug is skipped (add)")
	uplink := fs.String("uplink", control.DefaultUplink, "device in the netns the first NIC is joined to (add)")
	mode := fs.String("mode", control.ModeTC, "dataplane mode: "+strings.Join(control.Modes, ", ")+" (add)")
	antiSpoof := fs.Bool("anti-spoof", true, "drop guest frames with a foreign source MAC or IP (add)")
	strictEgress := fs.Bool("strict-egress", true, "drop guest frames with no route on their NIC (add)")
	vhost := fs.String("vhost", control.VhostAuto, "vhost-net for the hot-plugged taps: "+strings.Join(control.VhostModes, ", ")+" (add)")
	netmon := fs.Bool("netmon", false, "join links that appear in the netns to the VM by themselves (add)")
	output := fs.StringP("output", "o", "table", "output format: table or json (list)")
	if err := parse(fs, args); err != nil {
		return err
	}
	c := e.client(*sock)
	a := fs.Args()
	if len(a) == 0 {
		fs.Usage()
		return errHelp
	}
	switch a[0] {
	case "add":
		if len(a) != 2 {
			return fmt.Errorf("usage: kata-dp sandbox add <id> --netns <path> [options]")
		}
		spec := control.SandboxSpec{ID: a[1], NetNS: *netns, QMP: *qmp, Uplink: *uplink, Mode: *mode,
			AntiSpoof: antiSpoof, StrictEgress: strictEgress, Vhost: *vhost, Netmon: *netmon}
		sb, err := c.AddSandbox(e.ctx, spec)
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, sb.ID)
		return nil
	case "del", "rm", "delete":
		if len(a) != 2 {
			return fmt.Errorf("usage: kata-dp sandbox del <id>")
		}
		return c.DelSandbox(e.ctx, a[1])
	case "release", "adopt":
		if len(a) != 2 {
			return fmt.Errorf("usage: kata-dp sandbox %s <id>", a[0])
		}
		call := c.ReleaseSandbox
		if a[0] == "adopt" {
			call = c.AdoptSandbox
		}
		res, err := call(e.ctx, a[1])
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, res.ID)
		return nil
	case "list", "ls":
		if len(a) != 1 {
			return fmt.Errorf("usage: kata-dp sandbox list [-o table|json]")
		}
		if *output != "table" && *output != "json" {
			return fmt.Errorf("sandbox list: --output %q: want table or json", *output)
		}
		sbs, err := c.Sandboxes(e.ctx)
		if err != nil {
			return err
		}
		if *output == "json" {
			if sbs == nil {
				sbs = []control.Sandbox{} // [] rather than null: scripts iterate it
			}
			return writeJSON(e.stdout, sbs)
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tNETNS\tQMP\tUPLINK\tMODE\tANTI-SPOOF\tSTRICT-EGRESS\tVHOST\tNETMON")
		for _, sb := range sbs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", sb.ID, sb.NetNS, orDash(sb.QMP), sb.Uplink, sb.Mode, onOff(sb.AntiSpoof), onOff(sb.StrictEgress), cmp.Or(sb.Vhost, control.VhostAuto), onOff(sb.Netmon))
		}
		return tw.Flush()
	}
	return fmt.Errorf("sandbox: unknown subcommand %q (want add, del, list, release or adopt)", a[0])
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
