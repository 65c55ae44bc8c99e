package main

import (
	"fmt"
	"os"

	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/internal/headstart"
)

const kataIPVSUse = `NAME:
   kata-dp kata-ipvs - manage the IPVS-style load balancer of a sandbox (drop-in for kata-runtime kata-ipvs)

USAGE:
   kata-dp kata-ipvs ipvsadm --parameters "<ipvsadm arguments>" <container-id>
   kata-dp kata-ipvs ipvsadm --restore - <container-id>          (rules on standard input)
   kata-dp kata-ipvs cleanup --parameters "--orig-dst <ip> --protonum tcp|udp" <container-id>

The rules run in the sandbox's BPF datapath (NAT mode): a frame from the guest to a virtual
service is DNATed to a real server picked by the service's scheduler, replies are reverse-NATed.
--parameters takes ipvsadm's arguments (long or short, --opt value or --opt=value): add, edit,
delete services and real servers, --list [--stats|--rate], --save, --clear, --set tcp tcpfin udp.
As in openEuler, --add-service and --edit-service need --scheduler and --persistent (1..2678400).
--restore - reads ipvsadm-save lines; it is refused unless the sandbox has no rules, and applies
all of them at once or none. cleanup deletes the connection entries of an original destination
(the virtual service, or a real server) so the next packet is scheduled afresh. A sandbox holds
at most 20000 rules. <container-id> is a sandbox id or a unique prefix of one.

On success the command's output (if any) is printed on stdout and the exit code is 0; on failure
the error goes to stderr, nothing is changed and the exit code is 1.

OPTIONS:
   --parameters ARGS  the ipvsadm (or cleanup) arguments, as one string
   --restore -        read rules from standard input (only "-" is accepted)
   --socket PATH      agent socket (default $KATA_DP_SOCKET or /run/kata-dp/kata-dp.sock)

EXAMPLES:
   kata-dp kata-ipvs ipvsadm --parameters "-A -t 172.17.0.7:80 -s rr -p 3000" 6ec7a98
   kata-dp kata-ipvs ipvsadm --parameters "-a -t 172.17.0.7:80 -r 172.17.0.8:80 -m -w 2" 6ec7a98
   kata-dp kata-ipvs ipvsadm --parameters "-A -t [2001:db8::10]:80 -s sh -p 600 -M 64" 6ec7a98
   kata-dp kata-ipvs ipvsadm --parameters "--list --numeric --stats" 6ec7a98
   kata-dp kata-ipvs ipvsadm --restore - 6ec7a98 < rules
   kata-dp kata-ipvs cleanup --parameters "--orig-dst 172.17.0.7 --protonum tcp" 6ec7a98
`

func runKataIPVS(e *env, args []string) error {
	fs := e.flagSet("kata-ipvs", kataIPVSUse)
	fs.Usage = func() { fmt.Fprint(e.stdout, kataIPVSUse) }
	sock := socketFlag(fs)
	params := fs.String("parameters", "", "ipvsadm (or cleanup) arguments")
	restore := fs.String("restore", "", `read rules from standard input ("-")`)
	if err := parse(fs, args); err != nil {
		return err
	}
	a := fs.Args()
	if len(a) == 0 {
		fmt.Fprint(e.stdout, kataIPVSUse)
		return nil
	}
	op := a[0]
	if op != api.IPVSOpIpvsadm && op != api.IPVSOpCleanup {
		fmt.Fprint(e.stderr, kataIPVSUse)
		return fmt.Errorf("kata-ipvs: unknown command %q", op)
	}
	if len(a) != 2 {
		return fmt.Errorf("kata-ipvs %s: want exactly one container ID after the options, got %d arguments", op, len(a)-1)
	}
	id := a[1]
	c := e.client(*sock)
	var req api.IPVSRequest
	switch {
	case fs.Changed("restore"):
		if op != "ipvsadm" {
			return fmt.Errorf("kata-ipvs cleanup: --restore is an ipvsadm option")
		}
		if *restore != "-" {
			return fmt.Errorf("kata-ipvs ipvsadm: --restore accepts only \"-\" (standard input), not %q", *restore)
		}
		if fs.Changed("parameters") {
			return fmt.Errorf("kata-ipvs ipvsadm: --restore and --parameters exclude each other")
		}
		if u := headstart.Restore(); u != nil && e.stdin == os.Stdin {
			// The rules went to the agent while this process started (package headstart),
			// from the same command line; it cannot have read another one.
			if u.Socket != c.Path() || u.ID != id {
				return fmt.Errorf("kata-ipvs ipvsadm: internal error: the restore started for %q at %s, the command line names %q at %s", u.ID, u.Socket, id, c.Path())
			}
			return c.FinishRestore(e.ctx, u, e.stdin)
		}
		return c.KataIPVSRestore(e.ctx, id, e.stdin)
	case fs.Changed("parameters"):
		req.Parameters = *params
	default:
		return fmt.Errorf("kata-ipvs %s: --parameters is required", op)
	}
	out, err := c.KataIPVS(e.ctx, id, op, req)
	if err != nil {
		return err
	}
	fmt.Fprint(e.stdout, out)
	return nil
}
