package control

import (
	"context"
	"errors"
	"net"
	"net/netip"

	"github.com/kata-dp/kata-dp/control/netspec"
)

// Endpoint is one NIC of a sandbox as the dataplane sees it.
type Endpoint struct {
	Sandbox      string           // sandbox id
	NetNS        string           // sandbox netns path
	Slot         uint32           // endpoint index 0..63 within the sandbox, allocated by control, persisted, stable
	NIC          string           // guest NIC name ("name")
	Tap          string           // host tap name ("device")
	Uplink       string           // device in the sandbox netns the tap is joined to; "" = not joined
	MAC          net.HardwareAddr // guest MAC
	Addr         netip.Prefix     // guest IPv4/prefix; zero value when none
	Addr6        netip.Prefix     // guest IPv6/prefix (not link-local); zero value when none
	LinkLocal    netip.Addr       // guest link-local given explicitly; zero: the EUI-64 of MAC
	MTU, Queues  int
	Mode         string // "tc" (default), "xdp", "tcfilter", "macvtap", "macvtap-bpf", "direct"; "vhost-user"
	AntiSpoof    bool
	StrictEgress bool
	// Vhost is the tap's vhost-net setting ("auto" or "", "on", "off"): the NIC's own, else
	// the sandbox's.
	Vhost string
	// VhostUserSocket, when set, makes this a vhost-user NIC (mode vhost-user): a vhost-user
	// switch serving that socket moves its frames; there is no tap.
	VhostUserSocket string
}

// Route is one entry of a sandbox's route table as the dataplane sees it.
type Route struct {
	Slot    uint32       // endpoint slot of the route's NIC (routes on "lo" are kept in state but not programmed)
	Dest    netip.Prefix // 0.0.0.0/0 for "default"
	Gateway netip.Addr   // zero when none
}

// DirStats are the counters of one direction of an endpoint.
type DirStats struct {
	Packets, Bytes uint64
	Drops          map[string]uint64 // drop reason -> count
}

// EndpointStats are the counters of an endpoint.
type EndpointStats struct{ FromGuest, ToGuest DirStats }

// Dataplane programs the datapath of sandboxes. Implementations must be safe for concurrent
// use across sandboxes; control never calls it concurrently for one sandbox.
type Dataplane interface {
	EnsureSandbox(ctx context.Context, id, netnsPath string) error // load or re-adopt the pinned BPF collection; idempotent
	RemoveSandbox(ctx context.Context, id string) error            // detach all of kata-dp's programs and pins of the sandbox
	AddEndpoint(ctx context.Context, ep Endpoint) error            // attach programs to tap (+uplink when joined), write maps; undoes its own partial work
	DelEndpoint(ctx context.Context, ep Endpoint) error
	SetRoutes(ctx context.Context, sandbox string, routes []Route) error // replaces the sandbox's route table atomically
	Stats(ctx context.Context, ep Endpoint) (EndpointStats, error)
}

// EndpointUpdater is implemented by dataplanes that can rewrite an endpoint's map entries in
// place (update-iface changes the guest address). Without it control falls back to
// DelEndpoint + AddEndpoint.
type EndpointUpdater interface {
	UpdateEndpoint(ctx context.Context, ep Endpoint) error
}

// Reconciler is implemented by dataplanes that want the whole saved state of a sandbox when the
// agent starts, after EnsureSandbox, to check pinned maps and links against it and fix what
// differs. Without it control only calls EnsureSandbox at start.
type Reconciler interface {
	Reconcile(ctx context.Context, sb Sandbox, eps []Endpoint, routes []Route) error
}

// ModeReporter is implemented by dataplanes that can say which mode an endpoint really runs
// (a requested xdp may have fallen back to tc) and why.
type ModeReporter interface {
	Mode(ep Endpoint) (mode, reason string, err error)
}

// VMDeviceReporter is implemented by dataplanes whose modes give the VM a device other than the
// NIC's tap (the macvtap modes: a macvtap on the uplink): VMDevice returns its name and the
// character device the VM opens, ok false when the endpoint's VM uses its tap. Status shows it.
type VMDeviceReporter interface {
	VMDevice(ep Endpoint) (name, dev string, ok bool)
}

// Hotplugger plugs NICs into a sandbox's VM. Sandboxes without a QMP socket skip hot-plug.
// An endpoint with a VhostUserSocket is plugged as a vhost-user NIC, any other from its tap
// (with vhost-net as ep.Vhost decides).
type Hotplugger interface {
	Plug(ctx context.Context, sb Sandbox, ep Endpoint) (pciAddr string, err error)
	Unplug(ctx context.Context, sb Sandbox, ep Endpoint) error
	Healthy(ctx context.Context, sb Sandbox) error // monitor answers
}

// VMScrubber is implemented by hot-pluggers that can remove everything they may have left in
// a VM for an endpoint, whatever step a plug or unplug stopped at (device, netdev, passed
// files, chardev), recognising their own objects by id; what is not there is not an error.
// Control uses it to finish operations an agent kill interrupted, and for del-iface of a NIC
// the state does not know.
type VMScrubber interface {
	Scrub(ctx context.Context, sb Sandbox, ep Endpoint) error
}

// SandboxForgetter is implemented by hot-pluggers that keep per-sandbox resources (a QMP
// connection): Forget releases them once the sandbox is deleted.
type SandboxForgetter interface {
	Forget(sb Sandbox)
}

// VhostReporter is implemented by hot-pluggers that use vhost-net: what a vhost setting comes
// to on this host now, and what a NIC got when it was plugged, each with the reason (e.g.
// "off: open /dev/vhost-net: no such file or directory").
type VhostReporter interface {
	DecideVhost(mode string) string
	VhostDecision(sb Sandbox, ep Endpoint) (decision string, ok bool)
}

// TapOptions are the properties of a tap control creates.
type TapOptions struct {
	Queues int  // 1 = single queue, more = IFF_MULTI_QUEUE
	MTU    int  // 0 = kernel default
	Vnet   bool // IFF_VNET_HDR (always set by control)
}

// TapManager creates, adopts and deletes taps and looks up links in a sandbox's netns.
type TapManager interface {
	// EnsureTap creates the tap name in the netns, or adopts an existing tap of that name.
	// created reports whether this call created it. A link of that name that is not a tap is
	// an error wrapping ErrNotTap.
	EnsureTap(ctx context.Context, netns, name string, o TapOptions) (created bool, err error)
	// DeleteTap deletes the tap; a missing tap is not an error.
	DeleteTap(ctx context.Context, netns, name string) error
	// LinkExists reports whether a link of that name exists in the netns.
	LinkExists(ctx context.Context, netns, name string) (bool, error)
}

// StateStore keeps one value per key durably (control/store implements it).
type StateStore interface {
	Put(key string, data []byte) error
	Delete(key string) error
	Load() (map[string][]byte, error)
}

// StateLister is implemented by stores that can list their keys and read one value at a time
// (control/store does): New then reads each state on its own, and one that cannot be read
// (an I/O error) makes that sandbox unhealthy instead of stopping the agent.
type StateLister interface {
	Keys() ([]string, error)
	Get(key string) ([]byte, error)
}

// StateQuarantiner is implemented by stores that can move a value aside under another name
// (control/store does): New does so with a saved state it cannot decode, so the next start
// does not trip over it again and a human can inspect it.
type StateQuarantiner interface {
	MoveAside(key string) (to string, err error)
}

// Dataplane modes.
const (
	ModeTC       = "tc"
	ModeXDP      = "xdp"
	ModeTCFilter = "tcfilter"
	ModeMacvtap  = "macvtap"
	// ModeMacvtapBPF: macvtap's plumbing (the VM uses the macvtap) with kata-dp's programs on
	// the uplink's ingress and the macvtap's egress, passing frames on instead of redirecting.
	ModeMacvtapBPF = "macvtap-bpf"
	// ModeDirect: the taps live beside a host uplink (host netns, or one the operator names)
	// and node programs on the uplink steer frames by guest MAC (control/direct).
	ModeDirect = "direct"
)

// DirectDefaultNetNS is where a direct-mode sandbox's taps and uplink are when the operator
// names no netns: the agent's own (normally the host's).
const DirectDefaultNetNS = "/proc/self/ns/net"

// ModeVhostUser is the mode of a NIC with a vhostUserSocket: no tap, no BPF; the vhost-user
// switch moves its frames. It is implied by the socket, never chosen, so Modes leaves it out.
const ModeVhostUser = "vhost-user"

// vhost-net settings of a sandbox (--vhost) or a NIC ("vhost"): auto (the default) uses it
// when /dev/vhost-net can be opened, on refuses a NIC that cannot have it, off never uses it.
const (
	VhostAuto = "auto"
	VhostOn   = "on"
	VhostOff  = "off"
)

// VhostModes lists the valid vhost-net settings.
var VhostModes = []string{VhostAuto, VhostOn, VhostOff}

// Modes lists the valid dataplane modes.
var Modes = []string{ModeTC, ModeXDP, ModeTCFilter, ModeMacvtap, ModeMacvtapBPF, ModeDirect}

// DefaultUplink is the sandbox uplink when none is given (the CNI's veth).
const DefaultUplink = "eth0"

// MaxEndpoints is the number of endpoint slots per sandbox.
const MaxEndpoints = 64

// Sandbox is a registered sandbox.
type Sandbox struct {
	ID           string `json:"id"`
	NetNS        string `json:"netns"`
	QMP          string `json:"qmp,omitempty"` // QMP socket path; "" = no hot-plug
	Uplink       string `json:"uplink"`
	Mode         string `json:"mode"`
	AntiSpoof    bool   `json:"antiSpoof"`
	StrictEgress bool   `json:"strictEgress"`
	// Vhost is the vhost-net setting of the sandbox's tap NICs (auto, on, off; "": auto).
	Vhost string `json:"vhost,omitempty"`
	// Source is SourceDiscovery for a sandbox registered by Kata discovery, "" for one
	// registered by hand (sandbox add). Discovery only ever touches its own.
	Source string `json:"source,omitempty"`
	// NoHotplug says why a sandbox has no QMP socket when that is not the operator's choice
	// (a discovered sandbox whose VM has no extra monitor socket).
	NoHotplug string `json:"noHotplug,omitempty"`
	// Netmon makes the agent watch the sandbox's netns and join the links that appear in it
	// to the VM by themselves (control/netmon), as Kata's enable_netmon does. Off for a sandbox
	// registered by hand unless asked (sandbox add --netmon); meant to be on for the sandboxes
	// Kata discovery registers.
	Netmon bool `json:"netmon,omitempty"`
}

// SandboxSpec is a request to register a sandbox. Nil booleans take their defaults (on).
type SandboxSpec struct {
	ID           string `json:"id"`
	NetNS        string `json:"netns"`
	QMP          string `json:"qmp,omitempty"`
	Uplink       string `json:"uplink,omitempty"`
	Mode         string `json:"mode,omitempty"`
	AntiSpoof    *bool  `json:"antiSpoof,omitempty"`
	StrictEgress *bool  `json:"strictEgress,omitempty"`
	Vhost        string `json:"vhost,omitempty"`     // "" = auto
	Source       string `json:"source,omitempty"`    // SourceDiscovery or "" (by hand)
	NoHotplug    string `json:"noHotplug,omitempty"` // why there is no QMP socket
	Netmon       bool   `json:"netmon,omitempty"`
}

// Where a NIC came from, kept per NIC in state and shown by status: a kata-network add-iface
// (the default, and what a NIC saved before sources existed is), netmon (a link that appeared
// in the sandbox's netns) or Kata discovery. SourceDiscovery also marks the sandboxes Kata
// discovery registered (Sandbox.Source).
const (
	SourceKataNetwork = "kata-network"
	SourceNetmon      = "netmon"
	SourceDiscovery   = "discovery"
)

// Sources lists the valid NIC sources.
var Sources = []string{SourceKataNetwork, SourceNetmon, SourceDiscovery}

type sourceKey struct{}

// WithSource returns a context under which AddIface records src (one of Sources) as the
// source of the NIC it adds. Without it the source is kata-network: the wire API never sets
// it, the agent's own node work (netmon, discovery) does, so status can tell them apart.
func WithSource(ctx context.Context, src string) context.Context {
	return context.WithValue(ctx, sourceKey{}, src)
}

// sourceOf returns the NIC source ctx carries (kata-network when none).
func sourceOf(ctx context.Context) string {
	if s, _ := ctx.Value(sourceKey{}).(string); s != "" {
		return s
	}
	return SourceKataNetwork
}

// Errors of the control plane, matched with errors.Is. The texts of ErrNoSuchSandbox and
// ErrAmbiguous are completed with the id as the kata-network contract prints them.
var (
	// ErrNoSuchSandbox: no sandbox id starts with the given prefix.
	ErrNoSuchSandbox = errors.New("no such container ID")
	// ErrAmbiguous: several sandbox ids start with the given prefix.
	ErrAmbiguous = errors.New("multiple containers found")
	// ErrUnhealthy: the sandbox's netns is gone or its QMP monitor does not answer.
	ErrUnhealthy = errors.New("sandbox not healthy")
	// ErrExists: a sandbox, NIC, device or route is already there.
	ErrExists = errors.New("already exists")
	// ErrNotFound: a NIC or route the request names is not there.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the request is malformed (the same error as netspec.ErrInvalid).
	ErrInvalid = netspec.ErrInvalid
	// ErrNotTap: a link of the requested tap name exists and is not a tap.
	ErrNotTap = errors.New("not a tap device")
	// ErrNoSlot: the sandbox has MaxEndpoints NICs.
	ErrNoSlot = errors.New("no free endpoint slot")
	// ErrNoHotplug: the sandbox has a QMP socket but the agent has no hot-plugger.
	ErrNoHotplug = errors.New("hot-plug not available")
	// ErrNoCounters: kata-dp keeps no counters for the endpoint (a vhost-user NIC: the
	// switch does). Not a failure of the counters.
	ErrNoCounters = errors.New("no counters in kata-dp")
)
