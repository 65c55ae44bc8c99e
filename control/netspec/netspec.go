package netspec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Limits of the contract.
const (
	MaxFileSize      = 1 << 20 // bytes of a network file or of standard input
	MaxNameLen       = 15      // IFNAMSIZ-1
	MinMTU           = 46
	MaxMTU           = 9600
	MaxQueues        = 16
	MaxVhostPathLen  = 128
	FamilyIPv4       = 2  // AF_INET
	FamilyIPv6       = 10 // AF_INET6
	DefaultLinkType  = "tap"
	DefaultRouteDest = "default"
	LoopbackDevice   = "lo"
)

// Errors that callers and tests compare against. The texts are part of the contract.
var (
	// ErrUpdateFields is returned by update-iface when a field other than name and IPAddresses is set.
	ErrUpdateFields = errors.New("device,mtu,hwAddr,linkType,queues and vhostUserSocket should be 0 or empty")
	// ErrFileTooBig is returned for network files larger than MaxFileSize.
	ErrFileTooBig = errors.New("network file too big")
	// ErrInvalid wraps every validation failure, so callers can tell bad input from failed work.
	ErrInvalid = errors.New("invalid request")
)

// IPAddress is one address of an interface. It has no lower-case JSON tags on purpose: Kata
// prints `Family`, `Address` and `Mask`, and reads any case.
type IPAddress struct {
	Family  int
	Address string
	Mask    string
}

// Interface is a NIC as kata-network reads and prints it. Field order and tags are the output
// format.
type Interface struct {
	Device          string       `json:"device,omitempty"`
	Name            string       `json:"name,omitempty"`
	IPAddresses     []*IPAddress `json:"IPAddresses,omitempty"`
	MTU             int          `json:"mtu,omitempty"`
	RawFlags        int          `json:"rawFlags,omitempty"`
	HwAddr          string       `json:"hwAddr,omitempty"`
	PCIAddr         string       `json:"pciAddr,omitempty"`
	LinkType        string       `json:"linkType,omitempty"`
	VhostUserSocket string       `json:"vhostUserSocket,omitempty"`
	Queues          int          `json:"queues,omitempty"`
}

// AddRequest is the add-iface input: an Interface plus kata-dp's optional "uplink", "mode"
// and "vhost" fields, which are accepted but never printed (openEuler's tool ignores unknown
// fields, so scripts stay compatible).
type AddRequest struct {
	Interface
	Uplink string `json:"uplink,omitempty"`
	// Mode overrides the sandbox's dataplane mode for this NIC.
	Mode string `json:"mode,omitempty"`
	// Vhost overrides the sandbox's vhost-net setting (auto, on, off) for this tap NIC.
	Vhost string `json:"vhost,omitempty"`
}

// Route is a route as kata-network reads and prints it.
type Route struct {
	Dest    string `json:"dest,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	Device  string `json:"device,omitempty"`
	Source  string `json:"source,omitempty"`
	Scope   int    `json:"scope,omitempty"`
}

// IfaceInfo is one entry of list-ifaces.
type IfaceInfo struct {
	Name string   `json:"name"`
	MAC  string   `json:"mac"`
	IP   []string `json:"ip"`
	MTU  int      `json:"mtu"`
}

// RouteInfo is one entry of list-routes.
type RouteInfo struct {
	Dest    string `json:"dest"`
	Gateway string `json:"gateway"`
	Device  string `json:"device"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]*$`)

// Decode decodes one JSON value from data into v, the way Kata does (json.Decoder.Decode:
// case-insensitive keys, unknown fields ignored, anything after the first value ignored).
func Decode(data []byte, v any) error {
	return json.NewDecoder(bytes.NewReader(data)).Decode(v)
}

// Encode renders v as kata-network prints it: one line of JSON and a newline.
func Encode(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	if err := enc.Encode(v); err != nil {
		// Only the package's own types are encoded; they always marshal.
		panic(fmt.Sprintf("netspec: encode %T: %v", v, err))
	}
	return b.Bytes()
}

// Null is what kata-network prints on stdout when there is nothing to print or an operation failed.
var Null = []byte("null\n")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Message returns the text of err without the ErrInvalid marker, the way the CLI prints it.
func Message(err error) string {
	if err == nil {
		return ""
	}
	return strings.TrimPrefix(err.Error(), ErrInvalid.Error()+": ")
}

// ValidName checks a device or NIC name: 1..15 characters, a letter first, then letters,
// digits, '_', '.', '-'.
func ValidName(field, s string) error {
	if s == "" {
		return invalid("%s is required", field)
	}
	if len(s) > MaxNameLen {
		return invalid("%s %q is longer than %d characters", field, s, MaxNameLen)
	}
	if !nameRE.MatchString(s) {
		return invalid("%s %q must start with a letter and hold only letters, digits, '_', '.' and '-'", field, s)
	}
	return nil
}

// ParseMAC parses a hwAddr: a 48-bit Ethernet address, unicast.
func ParseMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 {
		return nil, invalid("hwAddr %q is not a valid MAC address", s)
	}
	if mac[0]&1 != 0 {
		return nil, invalid("hwAddr %q is a multicast address", s)
	}
	if bytes.Equal(mac, make([]byte, 6)) {
		return nil, invalid("hwAddr %q is the zero address", s)
	}
	return mac, nil
}

// ParseIPAddress checks one IPAddresses entry and returns it as a prefix (address kept, not
// masked) and its family.
func ParseIPAddress(a *IPAddress) (netip.Prefix, int, error) {
	if a == nil {
		return netip.Prefix{}, 0, invalid("IPAddresses entry is null")
	}
	addr, err := netip.ParseAddr(a.Address)
	if err != nil || addr.Zone() != "" {
		return netip.Prefix{}, 0, invalid("IP address %q is not valid", a.Address)
	}
	addr = addr.Unmap()
	family, max := FamilyIPv4, 32
	if addr.Is6() {
		family, max = FamilyIPv6, 128
	}
	if a.Mask == "" {
		return netip.Prefix{}, 0, invalid("mask of IP address %s is required", a.Address)
	}
	bits, ok := parseBits(a.Mask, max)
	if !ok {
		return netip.Prefix{}, 0, invalid("mask %q of IP address %s is not a prefix length (0..%d)", a.Mask, a.Address, max)
	}
	if addr.IsUnspecified() || addr.IsMulticast() {
		return netip.Prefix{}, 0, invalid("IP address %s cannot be assigned to a NIC", a.Address)
	}
	return netip.PrefixFrom(addr, bits), family, nil
}

func parseBits(s string, max int) (int, bool) {
	if len(s) == 0 || len(s) > 3 {
		return 0, false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n > max {
		return 0, false
	}
	return n, true
}

// Iface is a validated add-iface request.
type Iface struct {
	Spec   Interface // as given, Family filled in, linkType unchanged
	MAC    net.HardwareAddr
	Addr   netip.Prefix // IPv4; zero when none
	Addr6  netip.Prefix // IPv6 (a link-local one is the NIC's link-local); zero when none
	Queues int          // at least 1
	Uplink string       // the optional "uplink" field
	Mode   string       // the optional "mode" field (checked by control)
	Vhost  string       // the optional "vhost" field (checked by control)
}

// VhostChecker reports whether path is an existing unix socket. Validation calls it last.
type VhostChecker func(path string) error

// ValidateAdd checks an add-iface request field by field (everything that does not need the
// sandbox's state) and returns it normalised. The checks that need state (unique name and
// device, one vhost-user socket per sandbox, uplink present) are control's.
func ValidateAdd(req AddRequest, vhost VhostChecker) (Iface, error) {
	in := req.Interface
	if err := ValidName("name", in.Name); err != nil {
		return Iface{}, err
	}
	if err := ValidName("device", in.Device); err != nil {
		return Iface{}, err
	}
	if in.MTU == 0 {
		return Iface{}, invalid("mtu is required")
	}
	if in.MTU < MinMTU || in.MTU > MaxMTU {
		return Iface{}, invalid("mtu %d is out of range (%d..%d)", in.MTU, MinMTU, MaxMTU)
	}
	if in.HwAddr == "" {
		return Iface{}, invalid("hwAddr is required")
	}
	mac, err := ParseMAC(in.HwAddr)
	if err != nil {
		return Iface{}, err
	}
	if in.Queues < 0 || in.Queues > MaxQueues {
		return Iface{}, invalid("queues %d is out of range (0..%d)", in.Queues, MaxQueues)
	}
	if in.LinkType != "" && in.LinkType != DefaultLinkType {
		return Iface{}, invalid("linkType %q is not supported (only %q)", in.LinkType, DefaultLinkType)
	}
	if in.RawFlags < 0 {
		return Iface{}, invalid("rawFlags %d is negative", in.RawFlags)
	}
	if in.PCIAddr != "" {
		return Iface{}, invalid("pciAddr is assigned by the VM and cannot be set")
	}
	if req.Uplink != "" {
		if err := ValidName("uplink", req.Uplink); err != nil {
			return Iface{}, err
		}
		if req.Uplink == in.Device {
			return Iface{}, invalid("uplink %q is the tap itself", req.Uplink)
		}
	}
	out := Iface{Spec: in, MAC: mac, Queues: max(in.Queues, 1), Uplink: req.Uplink, Mode: req.Mode, Vhost: req.Vhost}
	ips, addr, addr6, err := validateIPs(in.IPAddresses)
	if err != nil {
		return Iface{}, err
	}
	out.Spec.IPAddresses, out.Addr, out.Addr6 = ips, addr, addr6
	if in.VhostUserSocket != "" {
		if err := ValidVhostSocket(in.VhostUserSocket, vhost); err != nil {
			return Iface{}, err
		}
	}
	return out, nil
}

// validateIPs checks IPAddresses (at most one IPv4 and one IPv6 address) and returns a copy
// with Family filled in, and the addresses by family (zero when none). A mask of 0 is refused:
// the NIC's prefix is where strict egress lets the guest send without a route, and /0 would
// let it send anywhere.
func validateIPs(in []*IPAddress) (ips []*IPAddress, v4, v6 netip.Prefix, err error) {
	if len(in) > 2 {
		return nil, v4, v6, invalid("at most one IPv4 and one IPv6 address per NIC (got %d addresses)", len(in))
	}
	for _, a := range in {
		p, fam, err := ParseIPAddress(a)
		if err != nil {
			return nil, netip.Prefix{}, netip.Prefix{}, err
		}
		if p.Bits() == 0 {
			return nil, netip.Prefix{}, netip.Prefix{}, invalid("mask 0 of IP address %s is refused: it would take strict egress off", a.Address)
		}
		name, dst := "IPv4", &v4
		if fam == FamilyIPv6 {
			name, dst = "IPv6", &v6
		}
		if dst.IsValid() {
			return nil, netip.Prefix{}, netip.Prefix{}, invalid("at most one IPv4 and one IPv6 address per NIC (got 2 %s addresses)", name)
		}
		*dst = p
		ips = append(ips, &IPAddress{Family: fam, Address: a.Address, Mask: a.Mask})
	}
	return ips, v4, v6, nil
}

// ValidVhostSocket checks a vhostUserSocket path: at most 128 bytes, a file name that starts
// with a letter and holds only letters, digits, '-' and '.', and an existing unix socket.
func ValidVhostSocket(path string, check VhostChecker) error {
	if len(path) > MaxVhostPathLen {
		return invalid("vhostUserSocket is longer than %d bytes", MaxVhostPathLen)
	}
	base := path[strings.LastIndexByte(path, '/')+1:]
	if base == "" || !isLetter(base[0]) {
		return invalid("vhostUserSocket %q: the file name must start with a letter", path)
	}
	for i := 0; i < len(base); i++ {
		c := base[i]
		if !isLetter(c) && !(c >= '0' && c <= '9') && c != '-' && c != '.' {
			return invalid("vhostUserSocket %q: the file name may hold only letters, digits, '-' and '.'", path)
		}
	}
	if check != nil {
		if err := check(path); err != nil {
			return invalid("vhostUserSocket %q: %v", path, err)
		}
	}
	return nil
}

func isLetter(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }

// Update is a validated update-iface request.
type Update struct {
	Name        string
	IPAddresses []*IPAddress // Family filled in; nil removes the addresses
	Addr        netip.Prefix // IPv4; zero when none
	Addr6       netip.Prefix // IPv6; zero when none
}

// ValidateUpdate checks an update-iface request: only name and IPAddresses may be set.
func ValidateUpdate(in Interface) (Update, error) {
	if in.Device != "" || in.MTU != 0 || in.HwAddr != "" || in.LinkType != "" || in.Queues != 0 ||
		in.VhostUserSocket != "" || in.RawFlags != 0 || in.PCIAddr != "" {
		return Update{}, ErrUpdateFields
	}
	if err := ValidName("name", in.Name); err != nil {
		return Update{}, err
	}
	ips, addr, addr6, err := validateIPs(in.IPAddresses)
	if err != nil {
		return Update{}, err
	}
	return Update{Name: in.Name, IPAddresses: ips, Addr: addr, Addr6: addr6}, nil
}

// ParsedRoute is a validated route.
type ParsedRoute struct {
	Spec    Route        // as given
	Dest    netip.Prefix // 0.0.0.0/0 (or ::/0) for "default"
	Gateway netip.Addr   // zero when none
}

// Default reports whether the route is a default route.
func (r ParsedRoute) Default() bool { return r.Dest.Bits() == 0 }

// ParseDest parses a route destination: "default", "a.b.c.d" (a /32) or "a.b.c.d/len" with no
// host bits set. IPv6 is accepted the same way.
func ParseDest(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, invalid("route dest is required")
	}
	if s == DefaultRouteDest {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0), nil
	}
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, invalid("route dest %q is not \"default\", an IP address or a prefix", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, invalid("route dest %q is not \"default\", an IP address or a prefix", s)
	}
	if p.Addr().Is4In6() {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		if p.Bits() < 0 {
			return netip.Prefix{}, invalid("route dest %q is not a valid prefix", s)
		}
	}
	if p.Masked() != p {
		return netip.Prefix{}, invalid("route dest %q has host bits set (did you mean %s?)", s, p.Masked())
	}
	return p, nil
}

// ValidateRoute checks an add-route (or update-routes element) request without sandbox state:
// dest and device mandatory, "default" needs a gateway, addresses valid. Whether the device is
// a NIC of the sandbox is control's check.
func ValidateRoute(r Route) (ParsedRoute, error) {
	dest, err := ParseDest(r.Dest)
	if err != nil {
		return ParsedRoute{}, err
	}
	if r.Device == "" {
		return ParsedRoute{}, invalid("route device is required")
	}
	if err := ValidName("route device", r.Device); err != nil {
		return ParsedRoute{}, err
	}
	out := ParsedRoute{Spec: r, Dest: dest}
	if r.Gateway != "" {
		gw, err := netip.ParseAddr(r.Gateway)
		if err != nil || gw.Zone() != "" {
			return ParsedRoute{}, invalid("route gateway %q is not a valid IP address", r.Gateway)
		}
		gw = gw.Unmap()
		if gw.Is4() != dest.Addr().Is4() && dest.Bits() != 0 {
			return ParsedRoute{}, invalid("route gateway %s and dest %s are of different families", r.Gateway, r.Dest)
		}
		if gw.IsUnspecified() || gw.IsMulticast() {
			return ParsedRoute{}, invalid("route gateway %s is not a unicast address", r.Gateway)
		}
		out.Gateway = gw
		if dest.Bits() == 0 && gw.Is6() {
			out.Dest = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	} else if dest.Bits() == 0 {
		return ParsedRoute{}, invalid("a default route needs a gateway")
	}
	if r.Source != "" {
		if _, err := netip.ParseAddr(r.Source); err != nil {
			return ParsedRoute{}, invalid("route source %q is not a valid IP address", r.Source)
		}
	}
	if r.Scope < 0 || r.Scope > 255 {
		return ParsedRoute{}, invalid("route scope %d is out of range (0..255)", r.Scope)
	}
	return out, nil
}

// RouteFilter is a validated del-route request: dest mandatory, empty device or gateway match
// any route.
type RouteFilter struct {
	Dest    netip.Prefix
	Device  string
	Gateway netip.Addr
}

// ValidateRouteFilter checks a del-route request.
func ValidateRouteFilter(r Route) (RouteFilter, error) {
	dest, err := ParseDest(r.Dest)
	if err != nil {
		return RouteFilter{}, err
	}
	f := RouteFilter{Dest: dest, Device: r.Device}
	if r.Gateway != "" {
		gw, err := netip.ParseAddr(r.Gateway)
		if err != nil {
			return RouteFilter{}, invalid("route gateway %q is not a valid IP address", r.Gateway)
		}
		f.Gateway = gw.Unmap()
	}
	return f, nil
}

// Match reports whether the filter selects route r (fuzzy: empty device or gateway match any).
func (f RouteFilter) Match(r ParsedRoute) bool {
	if f.Dest.Bits() == 0 && r.Dest.Bits() == 0 {
		// "default" matches the default route of either family.
	} else if f.Dest != r.Dest {
		return false
	}
	if f.Device != "" && f.Device != r.Spec.Device {
		return false
	}
	if f.Gateway.IsValid() && f.Gateway != r.Gateway {
		return false
	}
	return true
}

// ListRoute renders a route the way list-routes prints it: canonical prefix, "default" for an
// empty destination. ok is false for IPv6 routes, which list-routes drops as openEuler does
// (ListRouteAll keeps them).
func ListRoute(r ParsedRoute) (RouteInfo, bool) {
	if !r.Dest.Addr().Is4() {
		return RouteInfo{}, false
	}
	return ListRouteAll(r), true
}

// ListRouteAll renders a route of either family for list-routes --all; a default route is
// "default" in both (its gateway tells the family).
func ListRouteAll(r ParsedRoute) RouteInfo {
	info := RouteInfo{Dest: r.Dest.String(), Device: r.Spec.Device}
	if r.Dest.Bits() == 0 {
		info.Dest = DefaultRouteDest
	}
	if r.Gateway.IsValid() {
		info.Gateway = r.Gateway.String()
	}
	return info
}

// ListIface renders an interface the way list-ifaces prints it.
func ListIface(in Interface) IfaceInfo {
	info := IfaceInfo{Name: in.Name, MAC: in.HwAddr, IP: []string{}, MTU: in.MTU}
	for _, a := range in.IPAddresses {
		if a != nil {
			info.IP = append(info.IP, a.Address+"/"+a.Mask)
		}
	}
	return info
}
