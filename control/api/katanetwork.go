package api

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// The kata-network operations (spec/kata-network.md).
const (
	OpAddIface     = "add-iface"
	OpDelIface     = "del-iface"
	OpUpdateIface  = "update-iface"
	OpListIfaces   = "list-ifaces"
	OpAddRoute     = "add-route"
	OpDelRoute     = "del-route"
	OpUpdateRoutes = "update-routes"
	OpListRoutes   = "list-routes"
	// OpListRoutesAll is list-routes --all: the routes of both families (list-routes keeps
	// openEuler's output, IPv4 only, byte for byte). Not a Kata operation, so not in Ops.
	OpListRoutesAll = "list-routes-all"
)

// Ops lists the kata-network operations in the order the help shows them.
var Ops = []string{OpAddIface, OpDelIface, OpUpdateIface, OpListIfaces, OpAddRoute, OpDelRoute, OpUpdateRoutes, OpListRoutes}

// TakesInput reports whether a kata-network operation reads a network file.
func TakesInput(op string) bool {
	return op != OpListIfaces && op != OpListRoutes && op != OpListRoutesAll
}

// Errors of the kata-network contract.
var (
	// ErrUnknownOp: no kata-network operation of that name.
	ErrUnknownOp = errors.New("unknown kata-network operation")
	// ErrDecode: the network file is not the JSON the operation reads.
	ErrDecode = errors.New("decode network file")
)

// KataNetwork runs one kata-network operation on the sandbox id (exact or unique prefix) with
// the raw network file input, through c's typed methods, and returns exactly what the CLI
// prints on stdout, whether or not the operation failed (spec/kata-network.md):
//   - "null" when the sandbox is missing, ambiguous or unhealthy (Kata checks the sandbox
//     before it reads the file), and when an operation fails;
//   - nothing for an unknown operation, a file over 1 MiB, or a file that is not the JSON
//     the operation reads;
//   - del-iface prints null on success and echoes the interface it was given on failure;
//   - the list operations print null for an empty list;
//   - otherwise the operation's result as JSON.
func KataNetwork(ctx context.Context, c *control.Controller, id, op string, input []byte) (stdout []byte, err error) {
	if !slices.Contains(Ops, op) && op != OpListRoutesAll {
		return nil, fmt.Errorf("%w: %q", ErrUnknownOp, op)
	}
	if len(input) > netspec.MaxFileSize {
		return nil, netspec.ErrFileTooBig
	}
	switch op {
	case OpAddIface:
		var req netspec.AddRequest
		if out, err := decode(ctx, c, id, input, &req); err != nil {
			return out, err
		}
		return result(c.AddIface(ctx, id, req))
	case OpDelIface:
		var in netspec.Interface
		if out, err := decode(ctx, c, id, input, &in); err != nil {
			return out, err
		}
		if err := c.DelIface(ctx, id, in); err != nil {
			if sandboxUnavailable(err) {
				return netspec.Null, err
			}
			return netspec.Encode(in), err
		}
		return netspec.Null, nil
	case OpUpdateIface:
		var in netspec.Interface
		if out, err := decode(ctx, c, id, input, &in); err != nil {
			return out, err
		}
		return result(c.UpdateIface(ctx, id, in))
	case OpListIfaces:
		ifaces, err := c.Ifaces(ctx, id)
		if err != nil {
			return netspec.Null, err
		}
		var list []netspec.IfaceInfo
		for _, i := range ifaces {
			list = append(list, netspec.ListIface(i))
		}
		return listed(list)
	case OpAddRoute:
		var r netspec.Route
		if out, err := decode(ctx, c, id, input, &r); err != nil {
			return out, err
		}
		added, err := c.AddRoute(ctx, id, r)
		if err != nil {
			return netspec.Null, err
		}
		return netspec.Encode([]netspec.Route{added}), nil
	case OpDelRoute:
		var r netspec.Route
		if out, err := decode(ctx, c, id, input, &r); err != nil {
			return out, err
		}
		return result(c.DelRoute(ctx, id, r))
	case OpUpdateRoutes:
		var rs []netspec.Route
		if out, err := decode(ctx, c, id, input, &rs); err != nil {
			return out, err
		}
		return result(c.UpdateRoutes(ctx, id, rs))
	default: // OpListRoutes, OpListRoutesAll
		routes, err := c.Routes(ctx, id)
		if err != nil {
			return netspec.Null, err
		}
		var list []netspec.RouteInfo
		for _, r := range routes {
			pr, err := netspec.ValidateRoute(r)
			if err != nil {
				continue
			}
			if op == OpListRoutesAll {
				list = append(list, netspec.ListRouteAll(pr))
			} else if info, ok := netspec.ListRoute(pr); ok {
				list = append(list, info)
			}
		}
		return listed(list)
	}
}

// decode reads the network file into v. A file that is not the JSON the operation reads
// prints nothing, unless the sandbox is missing or unhealthy: Kata checks the sandbox first,
// and then prints null.
func decode(ctx context.Context, c *control.Controller, id string, input []byte, v any) (stdout []byte, err error) {
	if err := netspec.Decode(input, v); err != nil {
		if _, herr := c.Health(ctx, id); herr != nil {
			return netspec.Null, herr
		}
		return nil, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	return nil, nil
}

// result prints an operation's result, or null when it failed.
func result[T any](v T, err error) ([]byte, error) {
	if err != nil {
		return netspec.Null, err
	}
	return netspec.Encode(v), nil
}

// listed prints a listing: null when it is empty.
func listed[T any](list []T) ([]byte, error) {
	if len(list) == 0 {
		return netspec.Null, nil
	}
	return netspec.Encode(list), nil
}

// sandboxUnavailable reports whether err is the sandbox check that starts every operation
// failing (no such sandbox, several match, or not healthy) rather than the operation itself:
// control returns these errors from that check only.
func sandboxUnavailable(err error) bool {
	return errors.Is(err, control.ErrNoSuchSandbox) || errors.Is(err, control.ErrAmbiguous) || errors.Is(err, control.ErrUnhealthy)
}
