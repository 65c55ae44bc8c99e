package ipvs

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"unsafe"
)

// argKind says whether an option takes a value.
type argKind int

const (
	argNone argKind = iota
	argRequired
	argOptional
)

// opt indexes the options of the command/option check, in ipvsadm's
// optnames order (restricted to the options the contract knows).
type opt int

const (
	optNumeric opt = iota
	optService
	optScheduler
	optPersistent
	optNetmask
	optServer
	optForward
	optWeight
	optTimeout
	optStats
	optRate
	numOpts
)

var optNames = [numOpts]string{
	optNumeric:    "numeric",
	optService:    "service-address",
	optScheduler:  "scheduler",
	optPersistent: "persistent",
	optNetmask:    "netmask",
	optServer:     "real-server",
	optForward:    "forwarding-method",
	optWeight:     "weight",
	optTimeout:    "timeout",
	optStats:      "stats",
	optRate:       "rate",
}

// legal is ipvsadm's commands_v_options table for the commands and options
// of the contract: '+' compulsory, 'x' illegal, '1' exclusive, ' ' optional.
var legal = map[Op]string{
	//              n svc s p M r fwd w tmo st rt
	OpAddService:    "x+   xxxxxx",
	OpEditService:   "x+   xxxxxx",
	OpDeleteService: "x+xxxxxxxxx",
	OpClear:         "xxxxxxxxxxx",
	OpList:          " 1xxxxxx1  ",
	OpAddServer:     "x+xxx+  xxx",
	OpDeleteServer:  "x+xxx+xxxxx",
	OpEditServer:    "x+xxx+  xxx",
	OpSet:           "xxxxxxxxxxx",
	OpSave:          " xxxxxxxxxx",
}

// openEulerLegal overrides rows of legal for the kata-ipvs front-end:
// openEuler's API table marks --scheduler and --persistent mandatory for
// add-service and edit-service.
var openEulerLegal = map[Op]string{
	//              n svc s p M r fwd w tmo st rt
	OpAddService:  "x+++ xxxxxx",
	OpEditService: "x+++ xxxxxx",
}

// optDef is one entry of the option table (ipvsadm's popt table).
type optDef struct {
	long  string
	short byte
	arg   argKind
	cmd   Op  // set for commands
	opt   opt // set for options (when cmd == OpNone)
	// unsupported, when set, is why kata-ipvs refuses an option ipvsadm knows.
	unsupported string
}

var optTable = []optDef{
	{long: "add-service", short: 'A', cmd: OpAddService},
	{long: "edit-service", short: 'E', cmd: OpEditService},
	{long: "delete-service", short: 'D', cmd: OpDeleteService},
	{long: "clear", short: 'C', cmd: OpClear},
	{long: "list", short: 'L', cmd: OpList},
	{long: "list", short: 'l', cmd: OpList},
	{long: "add-server", short: 'a', cmd: OpAddServer},
	{long: "edit-server", short: 'e', cmd: OpEditServer},
	{long: "delete-server", short: 'd', cmd: OpDeleteServer},
	{long: "set", cmd: OpSet},
	{long: "save", short: 'S', cmd: OpSave},
	{long: "tcp-service", short: 't', arg: argRequired, opt: optService},
	{long: "udp-service", short: 'u', arg: argRequired, opt: optService},
	{long: "scheduler", short: 's', arg: argRequired, opt: optScheduler},
	{long: "persistent", short: 'p', arg: argOptional, opt: optPersistent},
	{long: "netmask", short: 'M', arg: argRequired, opt: optNetmask},
	{long: "real-server", short: 'r', arg: argRequired, opt: optServer},
	{long: "masquerading", short: 'm', opt: optForward},
	{long: "weight", short: 'w', arg: argRequired, opt: optWeight},
	{long: "numeric", short: 'n', opt: optNumeric},
	{long: "timeout", opt: optTimeout},
	{long: "stats", opt: optStats},
	{long: "rate", opt: optRate},

	// Known to ipvsadm, refused here.
	{long: "gatewaying", short: 'g', unsupported: "only masquerading (NAT) is supported"},
	{long: "ipip", short: 'i', unsupported: "only masquerading (NAT) is supported"},
	{long: "fwmark-service", short: 'f', arg: argRequired, unsupported: "fwmark services are not supported"},
	{long: "zero", short: 'Z', unsupported: "zeroing counters is not supported"},
	{long: "restore", short: 'R', unsupported: "use kata-ipvs ipvsadm --restore -"},
	{long: "connection", short: 'c', unsupported: "listing connections is not supported"},
	{long: "u-threshold", short: 'x', arg: argRequired, unsupported: "connection thresholds are not supported"},
	{long: "l-threshold", short: 'y', arg: argRequired, unsupported: "connection thresholds are not supported"},
}

func lookupLong(name string) *optDef {
	for i := range optTable {
		if optTable[i].long == name {
			return &optTable[i]
		}
	}
	return nil
}

// shortToks holds "-x" for every byte x, one after the other, so naming a short option does
// not allocate. Made on first use: one string instead of 256 allocations at the start of
// every kata-dp process.
var shortToks = sync.OnceValue(func() string {
	b := make([]byte, 512)
	for i := range 256 {
		b[2*i], b[2*i+1] = '-', byte(i)
	}
	return string(b)
})

func shortTok(c byte) string { i := 2 * int(c); return shortToks()[i : i+2] }

func lookupShort(c byte) *optDef {
	for i := range optTable {
		if optTable[i].short == c && c != 0 {
			return &optTable[i]
		}
	}
	return nil
}

// parser is the state of one ParseParameters call.
type parser struct {
	// openEuler applies openEuler's kata-ipvs argument rules on top of
	// ipvsadm's (see ParseKataParameters).
	openEuler  bool
	cmd        Command
	cmdToken   string
	seen       [numOpts]string // token of each option given
	positional []string
	// serverHasPort tells whether -r carried a port; serverTok is -r's value.
	serverHasPort bool
	serverTok     string
}

// ParseParameters parses the argument string of "kata-ipvs ipvsadm
// --parameters" with ipvsadm 1.31's grammar (popt: long options with
// "--opt value" or "--opt=value", short options alone, clustered ("-Ln")
// or with an attached value ("-w5"), -p with an optional value) and its
// checks, and returns the command with ipvsadm's defaults filled in. An
// empty string is a --list, as ipvsadm without arguments. Errors are
// *Error naming the offending token.
func ParseParameters(params string) (Command, error) {
	return parseArgs(strings.Fields(params), false)
}

// ParseKataParameters parses the argument string of "kata-ipvs ipvsadm
// --parameters" as openEuler's kata-runtime front-end accepts it: ipvsadm's
// grammar (ParseParameters) plus the rules of openEuler's API table, which
// makes --scheduler and --persistent mandatory for --add-service and
// --edit-service, with a persistence timeout of 1..2678400 seconds. So
// "-A -t 192.168.0.7:80 -p 3000" is an argument error here, where ipvsadm
// would pick wlc, and "-p 0" (no persistence) is refused. Where openEuler is
// silent ipvsadm's defaults stay: a bare -p is 360 s, -M defaults to /32.
// The errors are ipvsadm's own for the same faults ("You need to supply
// the 'scheduler' option for the 'add-service' command", exit status 2).
// Restore files are ipvsadm-save lines and keep ipvsadm's rules
// (ParseRestore).
func ParseKataParameters(params string) (Command, error) {
	return parseArgs(strings.Fields(params), true)
}

// fields is strings.Fields for ASCII blanks, appending to buf.
func fields(s string, buf []string) []string {
	buf = buf[:0]
	start := -1
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case ' ', '\t', '\r', '\n', '\v', '\f':
			if start >= 0 {
				buf = append(buf, s[start:i])
				start = -1
			}
		default:
			if start < 0 {
				start = i
			}
		}
	}
	if start >= 0 {
		buf = append(buf, s[start:])
	}
	return buf
}

func parseArgs(args []string, openEuler bool) (Command, error) {
	if len(args) == 0 {
		return Command{Op: OpList}, nil
	}
	p := parser{openEuler: openEuler}
	for i := 0; i < len(args); {
		a := args[i]
		i++
		switch {
		case a == "--":
			p.positional = append(p.positional, args[i:]...)
			i = len(args)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			def := lookupLong(name)
			if def == nil {
				return Command{}, &Error{Kind: ErrUsage, Msg: "unknown option", Token: a, Code: ExitFailed}
			}
			switch def.arg {
			case argNone:
				if hasVal {
					return Command{}, &Error{Kind: ErrUsage, Msg: "option does not take an argument", Token: a, Code: ExitFailed}
				}
			case argRequired:
				if !hasVal {
					if i == len(args) {
						return Command{}, &Error{Kind: ErrUsage, Msg: "missing argument", Token: a, Code: ExitFailed}
					}
					val, hasVal = args[i], true
					i++
				}
			case argOptional:
				if !hasVal && i < len(args) && !strings.HasPrefix(args[i], "-") {
					val, hasVal = args[i], true
					i++
				}
			}
			if err := p.handle(def, a[:2+len(name)], val, hasVal); err != nil {
				return Command{}, err
			}
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				tok := shortTok(a[j])
				def := lookupShort(a[j])
				if def == nil {
					return Command{}, &Error{Kind: ErrUsage, Msg: "unknown option", Token: tok, Code: ExitFailed}
				}
				if def.arg == argNone {
					if err := p.handle(def, tok, "", false); err != nil {
						return Command{}, err
					}
					continue
				}
				val := strings.TrimPrefix(a[j+1:], "=")
				hasVal := val != ""
				if !hasVal {
					switch {
					case def.arg == argRequired && i == len(args):
						return Command{}, &Error{Kind: ErrUsage, Msg: "missing argument", Token: tok, Code: ExitFailed}
					case def.arg == argRequired:
						val, hasVal = args[i], true
						i++
					case i < len(args) && !strings.HasPrefix(args[i], "-"):
						val, hasVal = args[i], true
						i++
					}
				}
				if err := p.handle(def, tok, val, hasVal); err != nil {
					return Command{}, err
				}
				break
			}
		default:
			p.positional = append(p.positional, a)
		}
	}
	return p.finish()
}

// handle applies one option, in command-line order, with ipvsadm's checks.
func (p *parser) handle(def *optDef, tok, val string, hasVal bool) error {
	// bad names the offending value, or the option when the value is
	// empty ("--tcp-service=").
	bad := val
	if bad == "" {
		bad = tok
	}
	if def.unsupported != "" {
		return usageErr(tok, "%s not supported by kata-ipvs (%s)", tok, def.unsupported)
	}
	if p.cmd.Op == OpNone {
		if def.cmd == OpNone {
			// ipvsadm: the first option must be a command (tryhelp_exit).
			return &Error{Kind: ErrUsage, Msg: "the first option must be a command", Token: tok, Code: ExitFailed}
		}
		p.cmd.Op = def.cmd
		p.cmdToken = tok
		return nil
	}
	if def.cmd != OpNone {
		return usageErr(tok, "multiple commands specified")
	}
	if p.seen[def.opt] != "" {
		shown := tok
		if hasVal {
			shown = tok + " " + val
		}
		return usageErr(shown, "multiple '%s' options specified", optNames[def.opt])
	}
	p.seen[def.opt] = tok
	c := &p.cmd
	switch def.opt {
	case optService:
		ap, hasPort, ok := parseAddrPort(val)
		if !ok || !hasPort {
			return usageErr(bad, "illegal virtual server address[:port] specified")
		}
		c.HasService = true
		c.Service = ServiceKey{Proto: TCP, Addr: ap}
		if def.short == 'u' {
			c.Service.Proto = UDP
		}
	case optScheduler:
		c.Scheduler = val
	case optPersistent:
		c.Persistent = DefaultPersistent
		if hasVal {
			n, ok := cNumber(val, 0, MaxPersistent)
			if !ok {
				return usageErr(bad, "invalid timeout value `%s' specified", val)
			}
			c.Persistent = uint32(n)
		}
	case optNetmask:
		// As ipvsadm: a prefix length for an IPv6 service given before -M, a dotted
		// quad otherwise.
		if c.HasService && c.Service.Addr.Addr().Is6() {
			n, ok := cNumber(val, 1, 128)
			if !ok {
				return usageErr(bad, "illegal ipv6 netmask specified")
			}
			c.Netmask = prefixMask(n)
			break
		}
		m, err := netip.ParseAddr(val)
		if err != nil || !m.Is4() {
			return usageErr(bad, "illegal virtual server persistent mask specified")
		}
		c.Netmask = m
	case optServer:
		ap, hasPort, ok := parseAddrPort(val)
		if !ok {
			return usageErr(bad, "illegal real server address[:port] specified")
		}
		c.Server = ap
		p.serverHasPort = hasPort
		p.serverTok = val
	case optForward:
		// -m: masquerading, the only forwarding method, implied.
	case optWeight:
		n, ok := cNumber(val, 0, MaxWeight)
		if !ok {
			return usageErr(bad, "illegal weight specified")
		}
		c.Weight = n
	case optNumeric:
		c.Numeric = true
	case optTimeout:
		c.Timeout = true
	case optStats:
		c.Stats = true
	case optRate:
		c.Rate = true
	}
	return nil
}

// finish runs ipvsadm's checks that need the whole command line and fills
// in the defaults.
func (p *parser) finish() (Command, error) {
	c := &p.cmd
	if c.Op == OpNone {
		tok := "--"
		if len(p.positional) > 0 {
			tok = p.positional[0]
		}
		return Command{}, &Error{Kind: ErrUsage, Msg: "no command specified", Token: tok, Code: ExitFailed}
	}
	args := p.positional
	if c.Op == OpSet {
		if len(args) < 3 {
			return Command{}, usageErr(p.cmdToken+" "+strings.Join(args, " "), "--set option requires 3 timeout values")
		}
		var v [3]uint32
		for i := range v {
			n, ok := cNumber(args[i], 0, MaxTimeout)
			if !ok {
				return Command{}, usageErr(args[i], "invalid timeout value `%s' specified", args[i])
			}
			v[i] = uint32(n)
		}
		c.Timeouts = Timeouts{TCP: v[0], TCPFin: v[1], UDP: v[2]}
		args = args[3:]
	}
	if len(args) > 0 {
		return Command{}, usageErr(args[0], "unexpected argument %s", args[0])
	}
	// generic_opt_check
	row := legal[c.Op]
	if p.openEuler {
		if r, ok := openEulerLegal[c.Op]; ok {
			row = r
		}
	}
	last := -1
	for j := opt(0); j < numOpts; j++ {
		tok := p.seen[j]
		switch {
		case tok == "" && row[j] == '+':
			return Command{}, usageErr(p.cmdToken, "You need to supply the '%s' option for the '%s' command", optNames[j], c.Op)
		case tok != "" && row[j] == 'x':
			return Command{}, usageErr(tok, "Illegal '%s' option with the '%s' command", optNames[j], c.Op)
		case tok != "" && row[j] == '1':
			if last >= 0 {
				return Command{}, usageErr(tok, "The option '%s' conflicts with the '%s' option in the '%s' command", optNames[j], optNames[last], c.Op)
			}
			last = int(j)
		}
	}
	if c.Op == OpList && c.Timeout && (c.Stats || c.Rate) {
		tok := p.seen[optStats]
		if tok == "" {
			tok = p.seen[optRate]
		}
		return Command{}, usageErr(tok, "options conflicts in the list command")
	}
	if p.openEuler && (c.Op == OpAddService || c.Op == OpEditService) && c.Persistent == 0 {
		// -p 0: openEuler's range starts at 1.
		return Command{}, usageErr("0", "invalid timeout value `0' specified")
	}
	switch c.Op {
	case OpAddService, OpEditService:
		if c.Scheduler == "" {
			c.Scheduler = DefaultScheduler
		}
		if !c.Netmask.IsValid() {
			c.Netmask = hostMaskOf(c.Service.Addr.Addr())
		}
	case OpAddServer, OpEditServer:
		if p.seen[optWeight] == "" {
			c.Weight = 1
		}
		if c.Service.Addr.Addr().Is4() != c.Server.Addr().Is4() {
			// NAT needs one family (ipvsadm: only tunnels may cross).
			return Command{}, usageErr(p.serverTok, "Different address family is allowed only for tunneling servers")
		}
		fallthrough
	case OpDeleteServer:
		if !p.serverHasPort {
			c.Server = netip.AddrPortFrom(c.Server.Addr(), c.Service.Addr.Port())
		}
	}
	return *c, nil
}

var (
	hostMask  = netip.MustParseAddr("255.255.255.255")
	hostMask6 = prefixMask(128)
)

// hostMaskOf is the default persistence granularity of a service at a: one client address
// (/32, /128).
func hostMaskOf(a netip.Addr) netip.Addr {
	if a.Is6() {
		return hostMask6
	}
	return hostMask
}

// prefixMask returns the IPv6 netmask of an n-bit prefix: IPVS keeps an IPv6 service's
// persistence granularity as a prefix length (-M 64), the table as the mask it stands for.
func prefixMask(n int) netip.Addr {
	return netip.AddrFrom16([16]byte(net.CIDRMask(n, 128)))
}

// PrefixLen returns the prefix length of an IPv6 netmask made by prefixMask (the datapath and
// the listings take the persistence granularity of an IPv6 service as a length).
func PrefixLen(m netip.Addr) int {
	ones, _ := net.IPMask(m.AsSlice()).Size()
	return ones
}

// parseAddrPort parses ipvsadm's "host[:port]" (parse_service) restricted to the contract:
// a dotted-quad IPv4 address with an optional ":port", or an IPv6 address, bracketed with a
// port ("[2001:db8::10]:80") or bare without one ("fd00::4"); ports 1..65535 (no host or
// service names, no zones, no IPv4-mapped IPv6).
func parseAddrPort(s string) (ap netip.AddrPort, hasPort, ok bool) {
	v6 := func(h string) (netip.Addr, bool) {
		a, err := netip.ParseAddr(h)
		return a, err == nil && a.Is6() && !a.Is4In6() && a.Zone() == ""
	}
	if rest, isBracket := strings.CutPrefix(s, "["); isBracket {
		host, port, found := strings.Cut(rest, "]:")
		a, ok6 := v6(host)
		if !found || !ok6 {
			return netip.AddrPort{}, false, false
		}
		n, ok := cNumber(port, 1, 65535)
		if !ok {
			return netip.AddrPort{}, false, false
		}
		return netip.AddrPortFrom(a, uint16(n)), true, true
	}
	// An IPv6 address has two colons or more; trying every IPv4 address as one cost an
	// allocated error per rule (a tenth of a 20000-rule restore's parse).
	if strings.Count(s, ":") >= 2 {
		if a, ok6 := v6(s); ok6 {
			return netip.AddrPortFrom(a, 0), false, true
		}
	}
	host, port, hasPort := strings.Cut(s, ":")
	a, err := netip.ParseAddr(host)
	if err != nil || !a.Is4() {
		return netip.AddrPort{}, false, false
	}
	var n int
	if hasPort {
		if n, ok = cNumber(port, 1, 65535); !ok {
			return netip.AddrPort{}, false, false
		}
	}
	return netip.AddrPortFrom(a, uint16(n)), hasPort, true
}

// cNumber is ipvsadm's string_to_number: a whole decimal integer (strtol:
// optional sign) within [min, max].
func cNumber(s string, min, max int) (int, bool) {
	d := s
	neg := false
	if d != "" && (d[0] == '+' || d[0] == '-') {
		neg = d[0] == '-'
		d = d[1:]
	}
	if d == "" {
		return 0, false
	}
	n := 0
	for i := 0; i < len(d); i++ {
		if d[i] < '0' || d[i] > '9' {
			return 0, false
		}
		n = n*10 + int(d[i]-'0')
		if n > 1<<40 {
			return 0, false
		}
	}
	if neg {
		n = -n
	}
	if n < min || n > max {
		return 0, false
	}
	return n, true
}

// maxRestoreBytes bounds a restore input (20000 rules take about 1 MiB).
const maxRestoreBytes = 16 << 20

// ParseRestore reads ipvsadm-save lines ("-A -t 10.10.11.12:100 -s rr -p
// 3000", "-a -t 10.10.11.12:100 -r 172.16.0.1:80 -m -w 1"), one command a
// line; blank lines and extra blanks between tokens are allowed. Every line
// is parsed before the result is returned; commands that do not change
// rules (list, save) are refused. Input without any rule, or with more
// than MaxRules add-service/add-server lines, is refused. Errors carry the
// line number and the token; with several faults, the first line's.
//
// A large input is parsed as it arrives: every restoreChunkBytes of complete lines go to a
// goroutine of their own (lines are independent) while the rest is read, so the parse ends
// shortly after the last byte instead of starting then. 20000 rules (0.9 MB) took 11-17 ms
// to parse on one CPU, most of a restore's parse-and-validate budget, and arrive from the CLI
// over 2-4 ms.
func ParseRestore(r io.Reader) ([]Command, error) {
	chunks, err := ParseRestoreChunks(r)
	if err != nil {
		return nil, err
	}
	if len(chunks) == 1 {
		return chunks[0], nil
	}
	return slices.Concat(chunks...), nil
}

// ParseRestoreChunks is ParseRestore without the join: the commands in input order, in the
// runs its parsers made of them, which Table.Restore takes as they are. Joining 20000
// commands into one slice (3.4 MB, cleared, then copied with the collector's write barriers)
// took a third of the parse's CPU.
func ParseRestoreChunks(r io.Reader) ([][]Command, error) {
	text, chunks, err := readParse(r)
	if err != nil {
		return nil, err
	}
	// The commands of the lines before the first bad one, in input order.
	var perr error
	cmds := make([][]Command, 0, len(chunks))
	for _, c := range chunks {
		if len(c.cmds) > 0 {
			cmds = append(cmds, c.cmds)
		}
		if c.err != nil {
			perr = c.err
			break
		}
	}
	// The rule limit, counted over the lines parsed before the first error (so a line
	// over the limit reports before a later bad line, as when read in one pass).
	adds := 0
	for _, cs := range cmds {
		for _, c := range cs {
			if c.Op == OpAddService || c.Op == OpAddServer {
				if adds++; adds > MaxRules {
					e := failErr(ErrRuleLimit, strings.TrimSpace(lineOf(text, c.Line)))
					e.Line = c.Line
					return nil, e
				}
			}
		}
	}
	if perr != nil {
		return nil, perr
	}
	if adds == 0 {
		return nil, &Error{Kind: ErrEmptyRestore, Msg: ErrEmptyRestore.Error(), Token: "--restore -", Code: ExitUsage}
	}
	return cmds, nil
}

// chunkEnd returns where the chunk of buf starting at from ends: after the last newline of
// its first restoreChunkBytes, or of a longer line, or -1 when no newline follows from.
func chunkEnd(buf []byte, from int) int {
	if i := bytes.LastIndexByte(buf[from:from+restoreChunkBytes], '\n'); i >= 0 {
		return from + i + 1
	}
	if i := bytes.IndexByte(buf[from+restoreChunkBytes:], '\n'); i >= 0 {
		return from + restoreChunkBytes + i + 1
	}
	return -1
}

// restoreChunkBytes is how much of a restore input, in whole lines, ParseRestore hands to one
// parser goroutine (about 3000 rules): below it a goroutine costs more than it saves.
const restoreChunkBytes = 128 << 10

// readParse reads a restore input whole (in one allocation when r tells its size) and parses
// it as it arrives, in chunks of whole lines (see ParseRestore). It returns the input and
// what each chunk's parser made of it, in input order.
func readParse(r io.Reader) (string, []restoreChunk, error) {
	size := 64 << 10
	if l, ok := r.(interface{ Len() int }); ok {
		size = min(l.Len(), maxRestoreBytes) + 1 // +1: EOF is seen without growing
	}
	buf := make([]byte, 0, max(size, 512))
	var (
		wg      sync.WaitGroup
		chunks  []*restoreChunk
		parsed  int // buf[:parsed] is handed to parsers
		lines   int // lines in buf[:parsed]
		tooLong bool
		rerr    error
	)
	// The parsers read buf through strings that share its memory: buf is only ever appended
	// to, and when it grows the parsers keep the old array, which is not written again.
	dispatch := func(end int) {
		text := unsafe.String(unsafe.SliceData(buf[parsed:end]), end-parsed)
		c := &restoreChunk{}
		chunks = append(chunks, c)
		line0 := lines
		lines += strings.Count(text, "\n")
		parsed = end
		wg.Go(func() { *c = parseRestoreLines(text, line0, 0) })
	}
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)] // grow (copies; see dispatch)
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if len(buf) > maxRestoreBytes {
			tooLong = true
			break
		}
		for len(buf)-parsed >= restoreChunkBytes {
			end := chunkEnd(buf, parsed)
			if end < 0 {
				break
			}
			dispatch(end)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			rerr = err
			break
		}
	}
	if !tooLong && rerr == nil && parsed < len(buf) {
		dispatch(len(buf)) // the rest
	}
	wg.Wait()
	switch {
	case tooLong:
		return "", nil, &Error{Kind: ErrUsage, Msg: "restore input too large", Token: fmt.Sprintf("(more than %d bytes)", maxRestoreBytes), Code: ExitUsage}
	case rerr != nil:
		return "", nil, fmt.Errorf("read restore input: %w", rerr)
	}
	out := make([]restoreChunk, len(chunks))
	for i, c := range chunks {
		out[i] = *c
	}
	return unsafe.String(unsafe.SliceData(buf), len(buf)), out, nil
}

// restoreChunk is what parseRestoreLines made of a run of lines.
type restoreChunk struct {
	cmds []Command // the lines parsed before err
	err  error     // the first line that failed, or nil
}

// parseRestoreLines parses text, whose first line is line number line0+1, up to its first
// bad line, into a slice with room for extra more commands.
func parseRestoreLines(text string, line0, extra int) restoreChunk {
	c := restoreChunk{cmds: make([]Command, 0, min(strings.Count(text, "\n")+1+extra, 2*MaxRules))}
	line := line0
	var args []string
	for rest := text; rest != ""; {
		line++
		var l string
		l, rest, _ = strings.Cut(rest, "\n")
		if args = fields(l, args); len(args) == 0 {
			continue
		}
		cmd, err := parseArgs(args, false)
		if err != nil {
			c.err = atLine(err, line)
			return c
		}
		cmd.Line = line
		if !cmd.Op.Mutates() {
			c.err = &Error{Kind: ErrNotInRestore, Msg: ErrNotInRestore.Error(), Token: args[0], Line: line, Code: ExitUsage}
			return c
		}
		c.cmds = append(c.cmds, cmd)
	}
	return c
}

// lineOf returns line n (1-based) of text.
func lineOf(text string, n int) string {
	for i := 1; i < n; i++ {
		_, text, _ = strings.Cut(text, "\n")
	}
	l, _, _ := strings.Cut(text, "\n")
	return l
}

// ParseCleanup parses the argument string of "kata-ipvs cleanup
// --parameters": "--orig-dst IP --protonum tcp|udp" (conntrack's option
// names; "--opt=value", the short forms -d and -p and the protocol numbers
// 6 and 17 are accepted too). Both options are required.
func ParseCleanup(params string) (Cleanup, error) {
	args := strings.Fields(params)
	var c Cleanup
	var haveDst, haveProto bool
	for i := 0; i < len(args); {
		a := args[i]
		i++
		name, val, hasVal := strings.Cut(a, "=")
		switch name {
		case "--orig-dst", "-d", "--protonum", "-p":
		default:
			return Cleanup{}, usageErr(a, "unknown cleanup option")
		}
		if !hasVal {
			if i == len(args) {
				return Cleanup{}, usageErr(a, "missing argument")
			}
			val = args[i]
			i++
		}
		switch name {
		case "--orig-dst", "-d":
			if haveDst {
				return Cleanup{}, usageErr(a, "multiple '--orig-dst' options specified")
			}
			ip, err := netip.ParseAddr(val)
			if err != nil || ip.Is4In6() || ip.Zone() != "" {
				return Cleanup{}, usageErr(val, "illegal original destination address specified")
			}
			c.OrigDst, haveDst = ip, true
		default:
			if haveProto {
				return Cleanup{}, usageErr(a, "multiple '--protonum' options specified")
			}
			switch val {
			case "tcp", "TCP", "6":
				c.Proto = TCP
			case "udp", "UDP", "17":
				c.Proto = UDP
			default:
				return Cleanup{}, usageErr(val, "illegal protocol specified (tcp or udp)")
			}
			haveProto = true
		}
	}
	switch {
	case !haveDst:
		return Cleanup{}, usageErr("--orig-dst", "You need to supply the '--orig-dst' option")
	case !haveProto:
		return Cleanup{}, usageErr("--protonum", "You need to supply the '--protonum' option")
	}
	return c, nil
}
