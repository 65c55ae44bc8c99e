package ipvs

import (
	"fmt"
	"net/netip"
	"strings"
)

// Limits of the model.
const (
	// MaxRules is the most rules a table holds; every service and every
	// real server is one rule.
	MaxRules = 20000
	// MaxPersistent is the longest persistence timeout, ipvsadm's
	// MAX_TIMEOUT (31 days).
	MaxPersistent = 86400 * 31
	// MaxTimeout is the longest --set timeout the contract accepts (15 days).
	MaxTimeout = 1296000
	// DefaultPersistent is the timeout of a bare -p, IPVS_SVC_PERSISTENT_TIMEOUT.
	DefaultPersistent = 360
	// DefaultScheduler is ipvsadm's DEF_SCHED.
	DefaultScheduler = "wlc"
	// MaxWeight is the largest weight ipvsadm accepts.
	MaxWeight = 65535
)

// DefaultTimeouts are IPVS's connection timeouts before any --set.
var DefaultTimeouts = Timeouts{TCP: 900, TCPFin: 120, UDP: 300}

// Schedulers are the scheduler names the table accepts, in ipvsadm's order.
var Schedulers = []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq"}

func knownScheduler(s string) bool {
	for _, k := range Schedulers {
		if k == s {
			return true
		}
	}
	return false
}

// Proto is a virtual service's transport protocol (the IP protocol number).
type Proto uint8

// The two protocols of the contract.
const (
	TCP Proto = 6
	UDP Proto = 17
)

// String returns "TCP" or "UDP", as the listing prints it.
func (p Proto) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// flag returns ipvsadm's option for the protocol: "-t" or "-u".
func (p Proto) flag() string {
	if p == UDP {
		return "-u"
	}
	return "-t"
}

// MarshalText encodes the protocol as "tcp" or "udp".
func (p Proto) MarshalText() ([]byte, error) {
	switch p {
	case TCP, UDP:
		return []byte(strings.ToLower(p.String())), nil
	}
	return nil, fmt.Errorf("marshal protocol %d: not tcp or udp", uint8(p))
}

// UnmarshalText decodes "tcp" or "udp".
func (p *Proto) UnmarshalText(b []byte) error {
	switch string(b) {
	case "tcp":
		*p = TCP
	case "udp":
		*p = UDP
	default:
		return fmt.Errorf("unmarshal protocol %q: not tcp or udp", b)
	}
	return nil
}

// ServiceKey identifies a virtual service.
type ServiceKey struct {
	Proto Proto          `json:"proto"`
	Addr  netip.AddrPort `json:"addr"`
}

// String returns the key as ipvsadm's save format names it: "-t 1.2.3.4:80".
func (k ServiceKey) String() string { return k.Proto.flag() + " " + k.Addr.String() }

// Timeouts are the connection-entry timeouts in seconds (ipvsadm --set).
type Timeouts struct {
	TCP    uint32 `json:"tcp"`
	TCPFin uint32 `json:"tcpfin"`
	UDP    uint32 `json:"udp"`
}

// Op is the command of an ipvsadm invocation.
type Op int

// The commands of the contract.
const (
	OpNone Op = iota
	OpAddService
	OpEditService
	OpDeleteService
	OpClear
	OpList
	OpAddServer
	OpDeleteServer
	OpEditServer
	OpSet
	OpSave
)

var opNames = [...]string{
	OpNone:          "none",
	OpAddService:    "add-service",
	OpEditService:   "edit-service",
	OpDeleteService: "delete-service",
	OpClear:         "flush",
	OpList:          "list",
	OpAddServer:     "add-server",
	OpDeleteServer:  "delete-server",
	OpEditServer:    "edit-server",
	OpSet:           "set",
	OpSave:          "save",
}

// String returns ipvsadm's name of the command (as in its error messages).
func (o Op) String() string {
	if o >= 0 && int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// Mutates reports whether the command changes the table.
func (o Op) Mutates() bool {
	switch o {
	case OpAddService, OpEditService, OpDeleteService, OpClear,
		OpAddServer, OpDeleteServer, OpEditServer, OpSet:
		return true
	}
	return false
}

// Command is one parsed ipvsadm invocation, with ipvsadm's defaults filled
// in: for add/edit-service the scheduler (wlc) and the netmask
// (255.255.255.255); for add/edit-server the weight (1) and the port (the
// service's when the real server has none). As in ipvsadm, an edit replaces
// every parameter of the service or real server, so an --edit-service
// without -p turns persistence off and an --edit-server without -w sets
// weight 1.
type Command struct {
	Op Op `json:"op"`
	// HasService tells whether -t/-u was given (for --list: list one service).
	HasService bool       `json:"hasService,omitempty"`
	Service    ServiceKey `json:"service,omitempty"`
	Scheduler  string     `json:"scheduler,omitempty"`
	// Persistent is the persistence timeout in seconds, 0 for none.
	Persistent uint32 `json:"persistent,omitempty"`
	// Netmask is the persistence granularity (-M).
	Netmask netip.Addr     `json:"netmask,omitempty"`
	Server  netip.AddrPort `json:"server,omitempty"`
	Weight  int            `json:"weight,omitempty"`
	// Timeouts of --set; 0 leaves a value unchanged.
	Timeouts Timeouts `json:"timeouts,omitempty"`
	// Listing options.
	Numeric bool `json:"numeric,omitempty"`
	Stats   bool `json:"stats,omitempty"`
	Rate    bool `json:"rate,omitempty"`
	Timeout bool `json:"timeout,omitempty"`
	// Line is the 1-based line of a restore input the command came from.
	Line int `json:"line,omitempty"`
}

// Cleanup is a parsed "cleanup --orig-dst IP --protonum tcp|udp": delete
// the connection entries whose original destination is OrigDst and whose
// protocol is Proto.
type Cleanup struct {
	OrigDst netip.Addr
	Proto   Proto
}
