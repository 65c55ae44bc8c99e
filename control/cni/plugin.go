package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/loader"
)

// Agent is the part of the agent's API the plugin uses; *api.Client implements it.
type Agent interface {
	Version(ctx context.Context) (string, error)
	Sandboxes(ctx context.Context) ([]control.Sandbox, error)
	AddSandbox(ctx context.Context, spec control.SandboxSpec) (control.Sandbox, error)
	DelSandbox(ctx context.Context, id string) error
	Status(ctx context.Context) ([]control.SandboxStatus, error)
	// KataNetworkExact runs a kata-network operation on the sandbox of exactly this id
	// (never a prefix: the plugin must not touch another container's sandbox).
	KataNetworkExact(ctx context.Context, id, op string, input []byte) ([]byte, error)
}

var _ Agent = (*api.Client)(nil)

// DefaultTimeout bounds one command of the plugin, agent calls included.
const DefaultTimeout = 60 * time.Second

// undoTimeout bounds the rollback of a failed ADD.
const undoTimeout = 30 * time.Second

// Plugin implements the CNI commands. The zero value talks to the agent with api.Client and
// logs warnings to stderr (which runtimes keep beside the error).
type Plugin struct {
	// Dial returns the agent client of a socket; nil means api.NewClient.
	Dial func(socket string) Agent
	// Log receives what the plugin wants the operator to know; nil means warnings to stderr.
	Log *slog.Logger
	// Timeout bounds each command; 0 means DefaultTimeout.
	Timeout time.Duration
}

// Funcs returns the commands for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC}
}

func (p *Plugin) dial(socket string) Agent {
	if p.Dial != nil {
		return p.Dial(socket)
	}
	return api.NewClient(socket)
}

func (p *Plugin) log() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func (p *Plugin) context() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), cmpOr(p.Timeout, DefaultTimeout))
}

func cmpOr(a, b time.Duration) time.Duration {
	if a > 0 {
		return a
	}
	return b
}

// checkArgs validates the CNI_* arguments the plugin relies on: the container id becomes the
// sandbox id and names a state directory, the ifname becomes the guest NIC name.
func checkArgs(args *skel.CmdArgs, needNetNS bool) error {
	if err := control.ValidSandboxID(args.ContainerID); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "kata-dp-cni: invalid CNI_CONTAINERID", err.Error())
	}
	if err := netspec.ValidName("CNI_IFNAME", args.IfName); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "kata-dp-cni: invalid CNI_IFNAME", err.Error())
	}
	if needNetNS && (args.Netns == "" || !strings.HasPrefix(args.Netns, "/")) {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "kata-dp-cni: invalid CNI_NETNS",
			fmt.Sprintf("netns %q is not an absolute path", args.Netns))
	}
	return nil
}

func ioError(err error) *types.Error {
	return types.NewError(types.ErrIOFailure, "kata-dp-cni: state directory", err.Error())
}

// exact returns the sandbox registered under exactly id, or nil. The agent resolves ids by
// prefix; the plugin must never act on another container's sandbox that merely shares one.
func exact(ctx context.Context, a Agent, id string) (*control.Sandbox, error) {
	sbs, err := a.Sandboxes(ctx)
	if err != nil {
		return nil, err
	}
	for _, sb := range sbs {
		if sb.ID == id {
			return &sb, nil
		}
	}
	return nil, nil
}

// endpointOf returns the agent's status of NIC nic in sandbox id.
func endpointOf(ctx context.Context, a Agent, id, nic string) (*control.EndpointStatus, error) {
	st, err := a.Status(ctx)
	if err != nil {
		return nil, err
	}
	for _, sb := range st {
		if sb.ID != id {
			continue
		}
		for _, ep := range sb.Endpoints {
			if ep.NIC == nic {
				return &ep, nil
			}
		}
	}
	return nil, nil
}

// begin is the start ADD and CHECK share: the configuration and the previous result (the
// plugin only works in a chain), the CNI_* arguments, and the command's context.
func (p *Plugin) begin(args *skel.CmdArgs) (*Config, *current.Result, context.Context, context.CancelFunc, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	prev, err := conf.prevResult()
	if err != nil {
		return nil, nil, nil, nil, err
	}
	if err := checkArgs(args, true); err != nil {
		return nil, nil, nil, nil, err
	}
	ctx, cancel := p.context()
	return conf, prev, ctx, cancel, nil
}

// openRecord opens the state directory and reads the record of the attachment args names under
// network (nil when ADD never recorded it). The caller closes the store. Errors are the
// plugin's I/O errors.
func openRecord(stateDir, network string, args *skel.CmdArgs) (*store, *record, error) {
	st, err := openStore(stateDir)
	if err != nil {
		return nil, nil, ioError(err)
	}
	rec, err := st.getRecord(args.ContainerID, network, args.IfName)
	if err != nil {
		st.close()
		return nil, nil, ioError(err)
	}
	return st, rec, nil
}

// Add makes the VM take over the container interface CNI_IFNAME: see the package doc.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, prev, ctx, cancel, err := p.begin(args)
	if err != nil {
		return err
	}
	defer cancel()
	log := p.log().With("container", args.ContainerID, "ifname", args.IfName, "network", conf.Name)

	// Validate first: the container interface, the tap name, the agent, our records.
	idx, err := containerIface(prev, args.IfName, args.Netns)
	if err != nil {
		return types.NewError(CodeNoInterface, "kata-dp-cni: container interface not found", err.Error())
	}
	veth, err := netdev.LookupLink(args.Netns, args.IfName)
	if err != nil {
		return types.NewError(CodeNoInterface, "kata-dp-cni: container interface not found", err.Error())
	}
	if veth.Type == "tuntap" || veth.Type == "tun" || len(veth.MAC) != 6 {
		return types.NewError(CodeNoInterface, "kata-dp-cni: container interface not usable",
			fmt.Sprintf("%s is a %s link with MAC %q; the VM needs an Ethernet interface (a veth) to take over", args.IfName, veth.Type, veth.MAC))
	}
	// The tap: tapName, or one derived from the container id (the agent reserves tap names
	// host-wide). It goes into the record; DEL, CHECK and GC take it from there.
	tapName := conf.tapFor(args.ContainerID)
	if err := netspec.ValidName("tap name", tapName); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: invalid tap name", err.Error())
	}
	if args.IfName == tapName {
		return types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: invalid network configuration",
			fmt.Sprintf("the tap name %q is the container interface's name (set another \"tapName\")", tapName))
	}
	switch _, err := netdev.LookupLink(args.Netns, tapName); {
	case err == nil:
		return types.NewError(CodeConflict, "kata-dp-cni: tap already exists",
			fmt.Sprintf("a link %s already exists in %s; kata-dp-cni only joins a tap it creates (set another \"tapName\")", tapName, args.Netns))
	case !errors.Is(err, netdev.ErrNotFound):
		return types.NewError(CodeNoInterface, "kata-dp-cni: look up tap", err.Error())
	}
	addrs := guestAddrs(prev, idx)

	st, prevRec, err := openRecord(conf.StateDir, conf.Name, args)
	if err != nil {
		return err
	}
	defer st.close()
	if prevRec != nil {
		return types.NewError(CodeConflict, "kata-dp-cni: attachment already added",
			fmt.Sprintf("container %s, network %s, ifname %s was added before and not deleted; DEL it first", args.ContainerID, conf.Name, args.IfName))
	}
	agent := p.dial(conf.Socket)
	existing, err := exact(ctx, agent, args.ContainerID)
	if err != nil {
		return agentError("list sandboxes", err)
	}
	if existing != nil && !sameNetNS(existing.NetNS, args.Netns) {
		return types.NewError(CodeConflict, "kata-dp-cni: sandbox registered with another netns",
			fmt.Sprintf("sandbox %s is registered with netns %s, not %s", existing.ID, existing.NetNS, args.Netns))
	}
	if existing != nil && (existing.Mode == control.ModeMacvtap || existing.Mode == control.ModeMacvtapBPF) {
		return types.NewError(CodeConflict, "kata-dp-cni: sandbox in "+existing.Mode+" mode", fmt.Sprintf("sandbox %s: %v", existing.ID, errMacvtap))
	}
	if existing != nil && conf.Mode != "" && existing.Mode != conf.Mode {
		log.Warn("sandbox was registered by someone else with another mode; keeping it", "sandbox mode", existing.Mode, "config mode", conf.Mode)
	}

	// Apply: the record first, so that a DEL after a crash here knows what to look for, then
	// the sandbox (when nobody registered it), then the NIC. Each failure undoes what came
	// before it.
	rec := record{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName, NetNS: args.Netns,
		Socket: conf.Socket, Tap: tapName, NIC: args.IfName}
	if err := st.putRecord(rec); err != nil {
		return ioError(err)
	}
	register := existing == nil
	var undo []func(context.Context) error
	// keep is set when undoing an agent step failed: the record and the marker then stay, so
	// that the runtime's DEL finishes the job.
	keep := false
	fail := func(e *types.Error) error {
		// Undo even when the command's time is up, within bounds of its own.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		for _, fn := range slices.Backward(undo) {
			if err := fn(rctx); err != nil {
				keep = true
				log.Error("rollback failed", "err", err)
				e.Details += fmt.Sprintf(" (rollback: %v; DEL will retry)", err)
			}
		}
		return e
	}
	undo = append(undo, func(context.Context) error {
		if keep {
			return nil
		}
		return st.delRecord(rec)
	})
	if register {
		if err := st.putOwner(args.ContainerID, owner{NetNS: args.Netns, Socket: conf.Socket}); err != nil {
			return fail(ioError(err))
		}
		undo = append(undo, func(context.Context) error {
			if keep {
				return nil
			}
			return st.delOwner(args.ContainerID)
		})
		spec := control.SandboxSpec{ID: args.ContainerID, NetNS: args.Netns, Uplink: args.IfName, Mode: conf.Mode,
			AntiSpoof: conf.AntiSpoof, StrictEgress: conf.StrictEgress}
		if _, err := agent.AddSandbox(ctx, spec); err != nil {
			return fail(agentError("register sandbox "+args.ContainerID, err))
		}
		undo = append(undo, func(ctx context.Context) error { return agent.DelSandbox(ctx, args.ContainerID) })
	}
	req := netspec.AddRequest{
		Interface: netspec.Interface{Device: tapName, Name: args.IfName, HwAddr: veth.MAC.String(), MTU: veth.MTU},
		Uplink:    args.IfName,
	}
	for _, a := range addrs {
		req.IPAddresses = append(req.IPAddresses, &netspec.IPAddress{Address: a.IP.String(), Mask: maskLen(a.Mask)})
	}
	in, err := json.Marshal(req)
	if err != nil {
		return fail(types.NewError(types.ErrInternal, "kata-dp-cni: encode add-iface", err.Error()))
	}
	if _, err := agent.KataNetworkExact(ctx, args.ContainerID, api.OpAddIface, in); err != nil {
		return fail(agentError("add-iface "+args.IfName+" to sandbox "+args.ContainerID, err))
	}
	if !register {
		undo = append(undo, func(ctx context.Context) error { return delIface(ctx, agent, args.ContainerID, args.IfName) })
	}
	// The agent joins a tap only when it created it: make sure it did and joined it.
	ep, err := endpointOf(ctx, agent, args.ContainerID, args.IfName)
	switch {
	case err != nil:
		return fail(agentError("status", err))
	case ep == nil || ep.Tap != tapName || !ep.TapCreated || ep.Uplink != args.IfName:
		return fail(types.NewError(CodeAgentFailed, "kata-dp-cni: tap not joined",
			fmt.Sprintf("the agent reports NIC %s as %+v, want tap %s created by kata-dp and joined to %s", args.IfName, ep, tapName, args.IfName)))
	}
	tap, err := netdev.LookupLink(args.Netns, tapName)
	if err != nil {
		return fail(types.NewError(CodeAgentFailed, "kata-dp-cni: tap missing after add-iface", err.Error()))
	}
	log.Debug("attached", "tap", tapName, "mac", veth.MAC.String(), "addrs", addrs)
	res := withVM(prev, idx, tapName, tap.MAC.String(), args.Netns, args.ContainerID, veth.MAC.String())
	return types.PrintResult(res, conf.CNIVersion)
}

// delIface removes the guest NIC name from sandbox id; a NIC that is not there is no error.
func delIface(ctx context.Context, a Agent, id, name string) error {
	in, err := json.Marshal(netspec.Interface{Name: name})
	if err != nil {
		return err
	}
	if _, err := a.KataNetworkExact(ctx, id, api.OpDelIface, in); err != nil {
		return fmt.Errorf("del-iface %s of sandbox %s: %w", name, id, err)
	}
	return nil
}

// Del removes what ADD made for the attachment, and nothing else; it succeeds when there is
// nothing (left) to remove.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, ok, err := parseForDel(args.StdinData)
	if err != nil || !ok {
		return err
	}
	if checkArgs(args, false) != nil {
		return nil // ADD refuses such arguments before recording anything
	}
	ctx, cancel := p.context()
	defer cancel()
	st, rec, err := openRecord(conf.StateDir, conf.Name, args)
	if err != nil {
		return err
	}
	defer st.close()
	if rec == nil {
		return nil // ADD never got as far as its record, or DEL ran before
	}
	return p.release(ctx, st, *rec)
}

// release undoes one attachment: the NIC, and the sandbox when the plugin registered it and
// this was the container's last attachment. The record goes last, so a failed release can be
// repeated.
func (p *Plugin) release(ctx context.Context, st *store, rec record) error {
	agent := p.dial(rec.Socket)
	own, err := st.getOwner(rec.ContainerID)
	if err != nil {
		return ioError(err)
	}
	all, err := st.records(rec.ContainerID)
	if err != nil {
		return ioError(err)
	}
	last := !slices.ContainsFunc(all, func(r record) bool { return r.Network != rec.Network || r.IfName != rec.IfName })
	sb, err := exact(ctx, agent, rec.ContainerID)
	if err != nil {
		return agentError("list sandboxes", err)
	}
	switch {
	case sb == nil:
		// Gone already (deleted by the runtime or a previous DEL): nothing of ours is left.
	case own != nil && last:
		if err := agent.DelSandbox(ctx, rec.ContainerID); err != nil && !errors.Is(err, control.ErrNoSuchSandbox) {
			return agentError("remove sandbox "+rec.ContainerID, err)
		}
	default:
		if err := delIface(ctx, agent, rec.ContainerID, rec.NIC); err != nil {
			if !errors.Is(err, control.ErrUnhealthy) {
				return agentError("del-iface", err)
			}
			// The agent refuses to touch a sandbox whose netns is gone or whose VM does not
			// answer (the runtime tears it down): the NIC goes when its owner removes the
			// sandbox, and failing here would only block the runtime's DEL.
			p.log().Warn("sandbox unhealthy: leaving the NIC to the sandbox's owner", "container", rec.ContainerID, "nic", rec.NIC, "err", err)
		}
	}
	if err := st.delRecord(rec); err != nil {
		return ioError(err)
	}
	if own != nil && last {
		if err := st.delOwner(rec.ContainerID); err != nil {
			return ioError(err)
		}
	}
	return nil
}

// Check verifies that the attachment is as ADD left it: the sandbox registered, the NIC listed
// with the veth's MAC and address, the tap created by the agent and joined to the veth, and
// (in the BPF modes) kata-dp's programs attached to both.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, prev, ctx, cancel, err := p.begin(args)
	if err != nil {
		return err
	}
	defer cancel()
	failed := func(format string, a ...any) error {
		return types.NewError(CodeCheckFailed, "kata-dp-cni: check failed", fmt.Sprintf(format, a...))
	}
	st, rec, err := openRecord(conf.StateDir, conf.Name, args)
	if err != nil {
		return err
	}
	st.close()
	if rec == nil {
		return failed("no record of an ADD of container %s, network %s, ifname %s", args.ContainerID, conf.Name, args.IfName)
	}
	// The result ADD returned must still carry the tap and the VM's NIC.
	idx, err := containerIface(prev, args.IfName, args.Netns)
	if err != nil {
		return failed("%v", err)
	}
	if !slices.ContainsFunc(prev.Interfaces, func(i *current.Interface) bool { return i.Name == rec.Tap && i.Sandbox == args.Netns }) ||
		!slices.ContainsFunc(prev.Interfaces, func(i *current.Interface) bool { return i.Name == rec.Tap && i.Sandbox == args.ContainerID }) {
		return failed("prevResult lacks the tap %s and the VM's interface", rec.Tap)
	}
	veth, err := netdev.LookupLink(args.Netns, args.IfName)
	if err != nil {
		return failed("%v", err)
	}
	tap, err := netdev.LookupTap(args.Netns, rec.Tap)
	if err != nil {
		return failed("%v", err)
	}
	if !tap.Up {
		return failed("tap %s is down", rec.Tap)
	}
	agent := p.dial(rec.Socket)
	sb, err := exact(ctx, agent, args.ContainerID)
	if err != nil {
		return agentError("list sandboxes", err)
	}
	if sb == nil {
		return failed("sandbox %s is not registered in the agent", args.ContainerID)
	}
	out, err := agent.KataNetworkExact(ctx, args.ContainerID, api.OpListIfaces, nil)
	if err != nil {
		return failed("list-ifaces: %v", err)
	}
	var list []netspec.IfaceInfo
	if err := json.Unmarshal(out, &list); err != nil {
		return failed("list-ifaces: %v", err)
	}
	i := slices.IndexFunc(list, func(n netspec.IfaceInfo) bool { return n.Name == rec.NIC })
	if i < 0 {
		return failed("the agent does not list NIC %s in sandbox %s", rec.NIC, args.ContainerID)
	}
	var wantIP []string
	for _, a := range guestAddrs(prev, idx) {
		wantIP = append(wantIP, a.IP.String()+"/"+maskLen(a.Mask))
	}
	got := list[i]
	if !strings.EqualFold(got.MAC, veth.MAC.String()) || !slices.Equal(got.IP, wantIP) {
		return failed("NIC %s has MAC %s and addresses %v, want %s and %v", rec.NIC, got.MAC, got.IP, veth.MAC, wantIP)
	}
	ep, err := endpointOf(ctx, agent, args.ContainerID, rec.NIC)
	if err != nil {
		return agentError("status", err)
	}
	if ep == nil || ep.Tap != rec.Tap || ep.Uplink != args.IfName {
		return failed("the agent reports NIC %s as %+v, want tap %s joined to %s", rec.NIC, ep, rec.Tap, args.IfName)
	}
	if ep.StatsError != "" {
		return failed("the datapath's counters of NIC %s cannot be read: %s", rec.NIC, ep.StatsError)
	}
	if dataplane.AttachesPrograms(sb.Mode) {
		for _, dev := range []string{args.IfName, rec.Tap} {
			progs, err := loader.Programs(args.Netns, dev)
			if err != nil {
				return failed("%v", err)
			}
			if len(progs) == 0 {
				return failed("no kata-dp datapath program is attached to %s in %s", dev, args.Netns)
			}
		}
	}
	return nil
}

// Status reports whether the agent answers (CNI 1.1 STATUS): code 50 when it does not.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := p.context()
	defer cancel()
	if _, err := p.dial(conf.Socket).Version(ctx); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "kata-dp-cni: kata-dp agent not available", err.Error())
	}
	return nil
}

// GC releases every attachment of this network the runtime no longer lists as valid
// (CNI 1.1 GC), as DEL would.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := p.context()
	defer cancel()
	valid := make(map[types.GCAttachment]bool, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		valid[a] = true
	}
	st, err := openStore(conf.StateDir)
	if err != nil {
		return ioError(err)
	}
	defer st.close()
	recs, err := st.records("")
	if err != nil {
		return ioError(err)
	}
	var errs []string
	for _, r := range recs {
		if r.Network != conf.Name || valid[types.GCAttachment{ContainerID: r.ContainerID, IfName: r.IfName}] {
			continue
		}
		if err := p.release(ctx, st, r); err != nil {
			errs = append(errs, fmt.Sprintf("%s/%s: %v", r.ContainerID, r.IfName, err))
		}
	}
	if len(errs) > 0 {
		return types.NewError(CodeAgentFailed, "kata-dp-cni: gc failed", strings.Join(errs, "; "))
	}
	return nil
}
