package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/netspec"
)

const kataNetworkUse = `NAME:
   kata-dp kata-network - manage interfaces and routes for container

USAGE:
   kata-dp kata-network command [command options] <container-id> [<file|->]

COMMANDS:
     add-iface      add an interface to a container
     del-iface      delete an interface from a container
     update-iface   update an interface of a container (name and IPAddresses only)
     list-ifaces    list the interfaces added to a container
     add-route      add a route to a container
     del-route      delete routes of a container (dest required; device, gateway match any when empty)
     update-routes  replace all routes of a container
     list-routes    list the routes of a container (IPv4; --all: IPv6 too)

<container-id> is a sandbox id or a unique prefix of one. <file> holds one JSON value ("-" reads
standard input, at most 1 MiB). On success the result is printed on stdout and the exit code is
0; on failure the error goes to stderr, stdout holds "null" (del-iface: the interface given) and
the exit code is 1.

OPTIONS:
   --socket PATH  agent socket (default $KATA_DP_SOCKET or /run/kata-dp/kata-dp.sock)
   --all          list-routes: IPv6 routes too

EXAMPLES:
   kata-dp kata-network add-iface 6ec7a98 - < iface.json
   kata-dp kata-network list-ifaces 6ec7a98
   echo '{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}' | kata-dp kata-network add-route 6ec7a98 -
   kata-dp kata-network add-iface --help     (each command's JSON fields and rules)
`

// kataNetworkOpUse is `kata-dp kata-network <command> --help`: what the command takes, with
// the rules of spec/kata-network.md, and an example.
var kataNetworkOpUse = map[string]string{
	"add-iface": `USAGE:
   kata-dp kata-network add-iface <container-id> <file|->

Adds a NIC: creates (or adopts) the tap, joins it to the dataplane, hot-plugs it into the VM.
Prints the interface as configured (with pciAddr and IPAddresses[].Family); null on failure,
which changes nothing.

JSON fields (case-insensitive):
   device           mandatory; host tap name, 1-15 characters [A-Za-z][A-Za-z0-9_.-]*, unique on
                    the host; an existing tap is adopted (and never deleted by kata-dp)
   name             mandatory; NIC name in the guest, same rule, unique in the sandbox
   hwAddr           mandatory; the guest's MAC
   mtu              mandatory; 46..9600
   IPAddresses      at most one {"address": "...", "mask": "<prefix length>"}
   queues           0..16 (0: one queue)
   linkType         empty or "tap"
   vhostUserSocket  an existing unix socket, at most 128 bytes, file name [A-Za-z][A-Za-z0-9.-]*;
                    at most one per sandbox
   uplink, mode     kata-dp's own: the device to join (default: the sandbox's uplink for its
                    first NIC) and the dataplane mode (tc, xdp, tcfilter, macvtap, macvtap-bpf, direct)

EXAMPLE:
   echo '{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}' \
     | kata-dp kata-network add-iface 6ec7a98 -
`,
	"del-iface": `USAGE:
   kata-dp kata-network del-iface <container-id> <file|->

Removes the NIC matched by "name" (or "hwAddr") from the VM, the dataplane and, if kata-dp
created it, the tap. An unknown name succeeds silently. Prints null; on failure the input.

EXAMPLE:
   echo '{"name":"eth-test"}' | kata-dp kata-network del-iface 6ec7a98 -
`,
	"update-iface": `USAGE:
   kata-dp kata-network update-iface <container-id> <file|->

Changes the IPAddresses of the NIC named "name". Only name and IPAddresses may be set.
Prints the updated interface; null on failure.

EXAMPLE:
   echo '{"name":"eth-test","IPAddresses":[{"address":"172.16.0.4","mask":"24"}]}' | kata-dp kata-network update-iface 6ec7a98 -
`,
	"list-ifaces": `USAGE:
   kata-dp kata-network list-ifaces <container-id>

Prints [{"name","mac","ip":["a.b.c.d/len"],"mtu"}, ...] of the NICs added through
kata-network; null when there are none.

EXAMPLE:
   kata-dp kata-network list-ifaces 6ec7a98
`,
	"add-route": `USAGE:
   kata-dp kata-network add-route <container-id> <file|->

Adds one route: "dest" ("default" or a.b.c.d[/len], no /len meaning /32) and "device" (a NIC
of the sandbox or lo) are mandatory; "default" needs "gateway". Prints [route]; null on failure.

EXAMPLE:
   echo '{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}' | kata-dp kata-network add-route 6ec7a98 -
`,
	"del-route": `USAGE:
   kata-dp kata-network del-route <container-id> <file|->

Removes the routes matching "dest" (mandatory); an empty "device" or "gateway" matches any.
Prints the routes removed; null on failure.

EXAMPLE:
   echo '{"dest":"10.0.0.0/8"}' | kata-dp kata-network del-route 6ec7a98 -
`,
	"update-routes": `USAGE:
   kata-dp kata-network update-routes <container-id> <file|->

Replaces the whole route table at once with a JSON array of routes (each as add-route takes).
Prints the routes now in force; null on failure.

EXAMPLE:
   echo '[{"dest":"10.0.0.0/8","device":"eth-test"}]' | kata-dp kata-network update-routes 6ec7a98 -
`,
	"list-routes": `USAGE:
   kata-dp kata-network list-routes [--all] <container-id>

Prints [{"dest","gateway","device"}, ...]; null when there are none. Only IPv4 routes, as
openEuler prints them; --all lists the IPv6 routes too.

EXAMPLE:
   kata-dp kata-network list-routes 6ec7a98
`,
}

func runKataNetwork(e *env, args []string) error {
	// <command> --help: that command's help.
	if op := firstArg(args); kataNetworkOpUse[op] != "" && (slices.Contains(args, "--help") || slices.Contains(args, "-h")) {
		fmt.Fprint(e.stdout, kataNetworkOpUse[op])
		return nil
	}
	fs := e.flagSet("kata-network", kataNetworkUse)
	fs.Usage = func() { fmt.Fprint(e.stdout, kataNetworkUse) }
	sock := socketFlag(fs)
	all := fs.Bool("all", false, "list-routes: list IPv6 routes too")
	if err := parse(fs, args); err != nil {
		return err
	}
	a := fs.Args()
	if len(a) == 0 {
		fmt.Fprint(e.stdout, kataNetworkUse)
		return nil
	}
	op := a[0]
	if !slices.Contains(api.Ops, op) {
		fmt.Fprint(e.stderr, kataNetworkUse)
		return fmt.Errorf("kata-network: unknown command %q", op)
	}
	want := 2
	usage := fmt.Sprintf("usage: kata-dp kata-network %s <container-id>", op)
	if api.TakesInput(op) {
		want = 3
		usage += " <file|->"
	}
	switch {
	case len(a) == 1:
		return fmt.Errorf("missing container ID (%s)", usage)
	case len(a) == 2 && want == 3:
		return fmt.Errorf("missing network file (%s)", usage)
	case len(a) > want:
		return fmt.Errorf("too many arguments (%s)", usage)
	}
	id := a[1]
	c := e.client(*sock)
	var input []byte
	if want == 3 {
		var ferr error
		input, ferr = readNetworkFile(e.stdin, a[2])
		if ferr != nil {
			out, err := c.KataNetworkUnread(e.ctx, id, ferr)
			e.stdout.Write(out)
			return err
		}
	}
	if *all {
		if op != api.OpListRoutes {
			return fmt.Errorf("kata-network: --all is an option of list-routes only")
		}
		op = api.OpListRoutesAll
	}
	out, err := c.KataNetwork(e.ctx, id, op, input)
	e.stdout.Write(out)
	return err
}

// firstArg is the first argument that is not an option (nor --socket's value).
func firstArg(args []string) string {
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--socket":
			i++
		case strings.HasPrefix(a, "-"):
		default:
			return a
		}
	}
	return ""
}

// readNetworkFile reads path ("-": stdin), refusing more than netspec.MaxFileSize bytes.
func readNetworkFile(stdin io.Reader, path string) ([]byte, error) {
	r := stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("open network file: %w", unwrapPath(err))
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && fi.Size() > netspec.MaxFileSize {
			return nil, netspec.ErrFileTooBig
		}
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, netspec.MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read network file: %w", err)
	}
	if len(b) > netspec.MaxFileSize {
		return nil, netspec.ErrFileTooBig
	}
	return b, nil
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Path, pe.Err)
	}
	return err
}
