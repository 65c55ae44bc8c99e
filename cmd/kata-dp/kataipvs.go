package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
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
   kata-dp kata-ipvs ipvsadm --parameters "-A -t 172.17.0.7:80 -s rr" 6ec7a98
   kata-dp kata-ipvs ipvsadm --parameters "-a -t 172.17.0.7:80 -r 172.17.0.8:80 -m -w 2" 6ec7a98
   kata-dp kata-ipvs ipvsadm --parameters "--list --numeric --stats" 6ec7a98
   kata-dp kata-ipvs ipvsadm --restore - 6ec7a98 < rules
   kata-dp kata-ipvs cleanup --parameters "--orig-dst 172.17.0.7 --protonum tcp" 6ec7a98
`

// ipvsRequest is the body of the kata-ipvs API calls.
type ipvsRequest struct {
	Parameters string `json:"parameters,omitempty"`
	Rules      string `json:"rules,omitempty"`
}

type ipvsResult struct {
	Stdout string `json:"stdout"`
}

// maxRestoreSize bounds a restore file: 20000 rules of at most ~100 bytes each, with room.
const maxRestoreSize = 8 << 20

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
	if op != "ipvsadm" && op != "cleanup" {
		fmt.Fprint(e.stderr, kataIPVSUse)
		return fmt.Errorf("kata-ipvs: unknown command %q", op)
	}
	if len(a) != 2 {
		return fmt.Errorf("kata-ipvs %s: want exactly one container ID after the options, got %d arguments", op, len(a)-1)
	}
	id := a[1]
	c := e.client(*sock)
	var req ipvsRequest
	path := "/v1/sandboxes/" + id + "/kata-ipvs/" + op
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
		b, err := io.ReadAll(io.LimitReader(e.stdin, maxRestoreSize+1))
		if err != nil {
			return fmt.Errorf("kata-ipvs: read rules: %w", err)
		}
		if len(b) > maxRestoreSize {
			return fmt.Errorf("kata-ipvs: rules file too big (more than %d bytes)", maxRestoreSize)
		}
		req.Rules = string(b)
		path = "/v1/sandboxes/" + id + "/kata-ipvs/restore"
	case fs.Changed("parameters"):
		req.Parameters = *params
	default:
		return fmt.Errorf("kata-ipvs %s: --parameters is required", op)
	}
	var res ipvsResult
	if err := c.Do(e.ctx, http.MethodPost, path, req, &res); err != nil {
		return err
	}
	fmt.Fprint(e.stdout, res.Stdout)
	return nil
}

// registerKataIPVS adds the kata-ipvs calls to the agent's API.
func registerKataIPVS(srv *api.Server, m *ipvsctl.Manager, metrics *api.Metrics) {
	handle := func(op string, fn func(r *http.Request, req ipvsRequest) (string, error)) {
		srv.Handle("POST /v1/sandboxes/{id}/kata-ipvs/"+op, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			var req ipvsRequest
			err := json.NewDecoder(io.LimitReader(r.Body, maxRestoreSize+1<<10)).Decode(&req)
			var out string
			if err == nil {
				out, err = fn(r, req)
			} else {
				err = fmt.Errorf("kata-ipvs: bad request: %w", err)
			}
			metrics.Observe("kata-ipvs-"+op, time.Since(start), err)
			if err != nil {
				api.WriteError(w, err, nil)
				return
			}
			api.WriteJSON(w, http.StatusOK, ipvsResult{Stdout: out})
		}))
	}
	handle("ipvsadm", func(r *http.Request, req ipvsRequest) (string, error) {
		return m.Ipvsadm(r.Context(), r.PathValue("id"), req.Parameters)
	})
	handle("restore", func(r *http.Request, req ipvsRequest) (string, error) {
		return "", m.Restore(r.Context(), r.PathValue("id"), strings.NewReader(req.Rules))
	})
	handle("cleanup", func(r *http.Request, req ipvsRequest) (string, error) {
		return m.Cleanup(r.Context(), r.PathValue("id"), req.Parameters)
	})
}
