package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/kata-dp/kata-dp/control"
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
     list-routes    list the routes of a container

<container-id> is a sandbox id or a unique prefix of one. <file> holds one JSON value ("-" reads
standard input, at most 1 MiB). On success the result is printed on stdout and the exit code is
0; on failure the error goes to stderr, stdout holds "null" (del-iface: the interface given) and
the exit code is 1.

OPTIONS:
   --socket PATH  agent socket (default $KATA_DP_SOCKET or /run/kata-dp/kata-dp.sock)
`

func runKataNetwork(e *env, args []string) error {
	fs := e.flagSet("kata-network", kataNetworkUse)
	fs.Usage = func() { fmt.Fprint(e.stdout, kataNetworkUse) }
	sock := socketFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	a := fs.Args()
	if len(a) == 0 {
		fmt.Fprint(e.stdout, kataNetworkUse)
		return nil
	}
	op := a[0]
	if !slices.Contains(control.Ops, op) {
		fmt.Fprint(e.stderr, kataNetworkUse)
		return fmt.Errorf("kata-network: unknown command %q", op)
	}
	want := 2
	usage := fmt.Sprintf("usage: kata-dp kata-network %s <container-id>", op)
	if control.TakesInput(op) {
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
			// As in Kata the sandbox is checked first: a missing or unhealthy one prints null.
			if _, err := c.Health(e.ctx, id); err != nil {
				e.stdout.Write(netspec.Null)
				return err
			}
			return ferr
		}
	}
	out, err := c.KataNetwork(e.ctx, id, op, input)
	if errors.Is(err, api.ErrUnreachable) {
		out = netspec.Null
	}
	e.stdout.Write(out)
	return err
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
