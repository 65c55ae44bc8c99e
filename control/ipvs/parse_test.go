package ipvs

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/go-cmp/cmp"
)

var (
	vip  = netip.MustParseAddrPort("172.17.0.7:80")
	rip  = netip.MustParseAddrPort("172.17.0.4:80")
	tcp7 = ServiceKey{Proto: TCP, Addr: vip}
	mask = netip.MustParseAddr("255.255.255.255")
)

func TestParseParametersAccepts(t *testing.T) {
	tests := []struct {
		in   string
		want Command
	}{
		// The user guide's examples.
		{"--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000",
			Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "rr", Persistent: 3000, Netmask: mask}},
		{"--edit-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 5000",
			Command{Op: OpEditService, HasService: true, Service: tcp7, Scheduler: "rr", Persistent: 5000, Netmask: mask}},
		{"--delete-service --tcp-service 172.17.0.7:80",
			Command{Op: OpDeleteService, HasService: true, Service: tcp7}},
		{"--add-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 100",
			Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 100}},
		{"--edit-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 200",
			Command{Op: OpEditServer, HasService: true, Service: tcp7, Server: rip, Weight: 200}},
		{"--delete-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80",
			Command{Op: OpDeleteServer, HasService: true, Service: tcp7, Server: rip}},
		{"--list", Command{Op: OpList}},
		{"--set 100 100 200", Command{Op: OpSet, Timeouts: Timeouts{100, 100, 200}}},
		// Short forms, defaults, "=" values, clusters, attached values.
		{"-A -t 172.17.0.7:80", Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "wlc", Netmask: mask}},
		{"-A -u 172.17.0.7:80 -s sh -p", Command{Op: OpAddService, HasService: true,
			Service: ServiceKey{UDP, vip}, Scheduler: "sh", Persistent: 360, Netmask: mask}},
		{"-A -t 172.17.0.7:80 -p -s rr", Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "rr", Persistent: 360, Netmask: mask}},
		{"-A -t 172.17.0.7:80 -p 0", Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "wlc", Netmask: mask}},
		{"-A -t 172.17.0.7:80 -p600 -M 255.255.255.0", Command{Op: OpAddService, HasService: true, Service: tcp7,
			Scheduler: "wlc", Persistent: 600, Netmask: netip.MustParseAddr("255.255.255.0")}},
		{"--add-service --tcp-service=172.17.0.7:80 --scheduler=nq --persistent=2678400 --netmask=255.255.0.0",
			Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "nq", Persistent: 2678400, Netmask: netip.MustParseAddr("255.255.0.0")}},
		{"-E -t 172.17.0.7:80 -s bogus", Command{Op: OpEditService, HasService: true, Service: tcp7, Scheduler: "bogus", Netmask: mask}},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -m", Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 1}},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4:8080 -w 0", Command{Op: OpAddServer, HasService: true, Service: tcp7,
			Server: netip.MustParseAddrPort("172.17.0.4:8080"), Weight: 0}},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -mw5", Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 5}},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -w=+7", Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 7}},
		{"-a -r 172.17.0.4 -t 172.17.0.7:80", Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 1}},
		{"-e -t 172.17.0.7:80 -r 172.17.0.4:80", Command{Op: OpEditServer, HasService: true, Service: tcp7, Server: rip, Weight: 1}},
		{"-d -t 172.17.0.7:80 -r 172.17.0.4", Command{Op: OpDeleteServer, HasService: true, Service: tcp7, Server: rip}},
		{"-Ln", Command{Op: OpList, Numeric: true}},
		{"-l -n --stats", Command{Op: OpList, Numeric: true, Stats: true}},
		{"-L --rate --stats", Command{Op: OpList, Stats: true, Rate: true}},
		{"-L -t 172.17.0.7:80", Command{Op: OpList, HasService: true, Service: tcp7}},
		{"--list --timeout", Command{Op: OpList, Timeout: true}},
		{"-C", Command{Op: OpClear}},
		{"--clear", Command{Op: OpClear}},
		{"-S -n", Command{Op: OpSave, Numeric: true}},
		{"--save", Command{Op: OpSave}},
		{"--set 0 0 1296000", Command{Op: OpSet, Timeouts: Timeouts{0, 0, 1296000}}},
		{"", Command{Op: OpList}},
		{"   \t ", Command{Op: OpList}},
	}
	for _, tt := range tests {
		got, err := ParseParameters(tt.in)
		if err != nil {
			t.Errorf("ParseParameters(%q): %v", tt.in, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
			cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
			t.Errorf("ParseParameters(%q) (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestParseParametersRejects(t *testing.T) {
	tests := []struct {
		in    string
		msg   string
		token string
		code  int
	}{
		{"-A -t 172.17.0.7:80 -w 5", "Illegal 'weight' option with the 'add-service' command", "-w", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -w 65536", "illegal weight specified", "65536", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -w -1", "illegal weight specified", "-1", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -w abc", "illegal weight specified", "abc", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -w", "missing argument", "-w", 255},
		{"-a -t 172.17.0.7:80", "You need to supply the 'real-server' option for the 'add-server' command", "-a", 2},
		{"-A -s rr", "You need to supply the 'service-address' option for the 'add-service' command", "-A", 2},
		{"-A -t 172.17.0.7", "illegal virtual server address[:port] specified", "172.17.0.7", 2},
		{"-A -t 172.17.0.7:0", "illegal virtual server address[:port] specified", "172.17.0.7:0", 2},
		{"-A -t 172.17.0.7:65536", "illegal virtual server address[:port] specified", "172.17.0.7:65536", 2},
		{"-A -t 172.17.0.7:http", "illegal virtual server address[:port] specified", "172.17.0.7:http", 2},
		{"-A -t 300.1.1.1:80", "illegal virtual server address[:port] specified", "300.1.1.1:80", 2},
		{"-A -t [::1]", "illegal virtual server address[:port] specified", "[::1]", 2},
		{"-A -t ::1", "illegal virtual server address[:port] specified", "::1", 2},
		{"-A -t [::1]:0", "illegal virtual server address[:port] specified", "[::1]:0", 2},
		{"-A -t [::ffff:1.2.3.4]:80", "illegal virtual server address[:port] specified", "[::ffff:1.2.3.4]:80", 2},
		{"-A -t [fe80::1%eth0]:80", "illegal virtual server address[:port] specified", "[fe80::1%eth0]:80", 2},
		{"-A -t [1.2.3.4]:80", "illegal virtual server address[:port] specified", "[1.2.3.4]:80", 2},
		{"-A -t [2001:db8::10]:80 -p 60 -M 0", "illegal ipv6 netmask specified", "0", 2},
		{"-A -t [2001:db8::10]:80 -p 60 -M 129", "illegal ipv6 netmask specified", "129", 2},
		{"-A -t [2001:db8::10]:80 -p 60 -M ffff::", "illegal ipv6 netmask specified", "ffff::", 2},
		{"-A -M 64 -t [2001:db8::10]:80", "illegal virtual server persistent mask specified", "64", 2},
		{"-a -t [2001:db8::10]:80 -r 10.0.0.1:80", "Different address family is allowed only for tunneling servers", "10.0.0.1:80", 2},
		{"-e -t 10.0.0.1:80 -r [fd00::4]:8080", "Different address family is allowed only for tunneling servers", "[fd00::4]:8080", 2},
		{"-A -t localhost:80", "illegal virtual server address[:port] specified", "localhost:80", 2},
		{"-A -t 80", "illegal virtual server address[:port] specified", "80", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.400", "illegal real server address[:port] specified", "172.17.0.400", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4:0", "illegal real server address[:port] specified", "172.17.0.4:0", 2},
		{"-A -t 172.17.0.7:80 -p 2678401", "invalid timeout value `2678401' specified", "2678401", 2},
		{"-A -t 172.17.0.7:80 -p x", "invalid timeout value `x' specified", "x", 2},
		{"-A -t 172.17.0.7:80 -p -5", "", "", 0}, // -5 is not taken as -p's value: unknown option -5
		{"-A -t 172.17.0.7:80 -M 24", "illegal virtual server persistent mask specified", "24", 2},
		{"-A -t 172.17.0.7:80 -M 255.255.255.0/24", "illegal virtual server persistent mask specified", "255.255.255.0/24", 2},
		{"-A -t 172.17.0.7:80 -t 172.17.0.8:80", "multiple 'service-address' options specified", "-t 172.17.0.8:80", 2},
		{"-A -t 172.17.0.7:80 -D", "multiple commands specified", "-D", 2},
		{"-t 172.17.0.7:80 -A", "the first option must be a command", "-t", 255},
		{"--add-serv -t 172.17.0.7:80", "unknown option", "--add-serv", 255},
		{"-A --tcp-service", "missing argument", "--tcp-service", 255},
		{"--clear=yes", "option does not take an argument", "--clear=yes", 255},
		{"-C extra", "unexpected argument extra", "extra", 2},
		{"-C -n", "Illegal 'numeric' option with the 'flush' command", "-n", 2},
		{"--set 1 2", "--set option requires 3 timeout values", "--set 1 2", 2},
		{"--set 1 2 3 4", "unexpected argument 4", "4", 2},
		{"--set 1 2 1296001", "invalid timeout value `1296001' specified", "1296001", 2},
		{"--set 1 x 3", "invalid timeout value `x' specified", "x", 2},
		{"--set 1 2 3 -n", "Illegal 'numeric' option with the 'set' command", "-n", 2},
		{"-L --timeout -t 172.17.0.7:80", "The option 'timeout' conflicts with the 'service-address' option in the 'list' command", "--timeout", 2},
		{"-L --timeout --stats", "options conflicts in the list command", "--stats", 2},
		{"-L -s rr", "Illegal 'scheduler' option with the 'list' command", "-s", 2},
		{"-S --stats", "Illegal 'stats' option with the 'save' command", "--stats", 2},
		{"-D -t 172.17.0.7:80 -s rr", "Illegal 'scheduler' option with the 'delete-service' command", "-s", 2},
		{"-d -t 172.17.0.7:80 -r 172.17.0.4 -w 3", "Illegal 'weight' option with the 'delete-server' command", "-w", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -g", "-g not supported by kata-ipvs (only masquerading (NAT) is supported)", "-g", 2},
		{"-A -f 1", "-f not supported by kata-ipvs (fwmark services are not supported)", "-f", 2},
		{"-Z", "-Z not supported by kata-ipvs (zeroing counters is not supported)", "-Z", 2},
		{"-L -c", "-c not supported by kata-ipvs (listing connections is not supported)", "-c", 2},
		{"foo", "no command specified", "foo", 255},
		{"--", "no command specified", "--", 255},
		{"-A -t 172.17.0.7:80 -n", "Illegal 'numeric' option with the 'add-service' command", "-n", 2},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4 -m -m", "multiple 'forwarding-method' options specified", "-m", 2},
	}
	for _, tt := range tests {
		_, err := ParseParameters(tt.in)
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("ParseParameters(%q) = %v, want an *Error", tt.in, err)
			continue
		}
		if !errors.Is(err, ErrUsage) {
			t.Errorf("ParseParameters(%q): %v is not ErrUsage", tt.in, err)
		}
		if e.Token == "" {
			t.Errorf("ParseParameters(%q): error %q names no token", tt.in, err)
		}
		if tt.msg == "" {
			continue
		}
		got := struct {
			Msg, Token string
			Code       int
		}{e.Msg, e.Token, e.Code}
		want := struct {
			Msg, Token string
			Code       int
		}{tt.msg, tt.token, tt.code}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("ParseParameters(%q) error (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestErrorString(t *testing.T) {
	_, err := ParseParameters("-a -t 172.17.0.7:80 -r 172.17.0.4 -w 70000")
	if got, want := err.Error(), `illegal weight specified: "70000"`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	_, err = ParseRestore(strings.NewReader("-A -t 1.2.3.4:80\n\n-a -t 1.2.3.4:80 -r 5.6.7.8 -w x\n"))
	if got, want := err.Error(), `line 3: illegal weight specified: "x"`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestParseRestore(t *testing.T) {
	in := "-A -t 10.10.11.12:100 -s rr -p  3000\n" +
		"-a -t 10.10.11.12:100 -r  172.16.0.1:80 -m  \n" +
		"\n   \t\n" +
		"-a\t-t 10.10.11.12:100 -r 172.16.0.1:81 -m\r\n" +
		"-a -t 10.10.11.12:100 -r 172.16.0.1:82  -m\n"
	cmds, err := ParseRestore(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	svc := ServiceKey{TCP, netip.MustParseAddrPort("10.10.11.12:100")}
	want := []Command{
		{Op: OpAddService, HasService: true, Service: svc, Scheduler: "rr", Persistent: 3000, Netmask: mask, Line: 1},
		{Op: OpAddServer, HasService: true, Service: svc, Server: netip.MustParseAddrPort("172.16.0.1:80"), Weight: 1, Line: 2},
		{Op: OpAddServer, HasService: true, Service: svc, Server: netip.MustParseAddrPort("172.16.0.1:81"), Weight: 1, Line: 5},
		{Op: OpAddServer, HasService: true, Service: svc, Server: netip.MustParseAddrPort("172.16.0.1:82"), Weight: 1, Line: 6},
	}
	if diff := cmp.Diff(want, cmds, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
		cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("ParseRestore (-want +got):\n%s", diff)
	}
}

func TestParseRestoreRejects(t *testing.T) {
	var big strings.Builder
	for i := 0; i <= MaxRules; i++ {
		big.WriteString("-A -t 10.0.0.1:" + strconv.Itoa(1+i%65535) + "\n")
	}
	tests := []struct {
		name, in string
		kind     error
		line     int
		token    string
	}{
		{"empty", "", ErrEmptyRestore, 0, "--restore -"},
		{"blank", "\n  \n", ErrEmptyRestore, 0, "--restore -"},
		{"only set", "--set 1 2 3\n", ErrEmptyRestore, 0, "--restore -"},
		{"bad token", "-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 10.0.0.300\n", ErrUsage, 2, "10.0.0.300"},
		{"list", "-A -t 10.0.0.1:80\n-L -n\n", ErrNotInRestore, 2, "-L"},
		{"too many", big.String(), ErrRuleLimit, MaxRules + 1, "-A -t 10.0.0.1:20001"},
	}
	for _, tt := range tests {
		_, err := ParseRestore(strings.NewReader(tt.in))
		if !errors.Is(err, tt.kind) {
			t.Errorf("%s: ParseRestore = %v, want %v", tt.name, err, tt.kind)
			continue
		}
		var e *Error
		errors.As(err, &e)
		if e.Line != tt.line || e.Token != tt.token {
			t.Errorf("%s: line, token = %d, %q, want %d, %q", tt.name, e.Line, e.Token, tt.line, tt.token)
		}
	}
}

func TestParseCleanup(t *testing.T) {
	dst := netip.MustParseAddr("172.17.0.4")
	for _, in := range []string{
		"--orig-dst 172.17.0.4 --protonum tcp",
		"--protonum=tcp --orig-dst=172.17.0.4",
		"-d 172.17.0.4 -p 6",
	} {
		got, err := ParseCleanup(in)
		if err != nil {
			t.Errorf("ParseCleanup(%q): %v", in, err)
			continue
		}
		if got != (Cleanup{OrigDst: dst, Proto: TCP}) {
			t.Errorf("ParseCleanup(%q) = %+v", in, got)
		}
	}
	if got, err := ParseCleanup("--orig-dst 10.0.0.1 --protonum udp"); err != nil || got.Proto != UDP {
		t.Errorf("udp: %+v, %v", got, err)
	}
	if got, err := ParseCleanup("--orig-dst fd00::4 --protonum udp"); err != nil || got.OrigDst != netip.MustParseAddr("fd00::4") || got.Proto != UDP {
		t.Errorf("IPv6: %+v, %v", got, err)
	}
	for in, token := range map[string]string{
		"":                                      "--orig-dst",
		"--orig-dst 172.17.0.4":                 "--protonum",
		"--protonum tcp":                        "--orig-dst",
		"--orig-dst 172.17.0.4 --protonum icmp": "icmp",
		"--orig-dst 172.17.0 --protonum tcp":    "172.17.0",
		"--orig-dst ::ffff:1.2.3.4 --protonum tcp":             "::ffff:1.2.3.4",
		"--orig-dst 172.17.0.4 --protonum":                     "--protonum",
		"--orig-dst 1.1.1.1 --orig-dst 1.1.1.2 --protonum tcp": "--orig-dst",
		"--orig-src 1.1.1.1":                                   "--orig-src",
	} {
		_, err := ParseCleanup(in)
		var e *Error
		if !errors.As(err, &e) || e.Token != token || e.Code != ExitUsage {
			t.Errorf("ParseCleanup(%q) = %v, want an error naming %q", in, err, token)
		}
	}
}

// TestParseKataParameters: openEuler's API table makes --scheduler and --persistent mandatory
// for add-service and edit-service (issue 18 item 6); ipvsadm's defaults stay elsewhere.
func TestParseKataParameters(t *testing.T) {
	accepts := []struct {
		in   string
		want Command
	}{
		{"--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000",
			Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "rr", Persistent: 3000, Netmask: mask}},
		{"-E -t 172.17.0.7:80 -s sh -p", // bare -p: ipvsadm's 360 s (openEuler is silent)
			Command{Op: OpEditService, HasService: true, Service: tcp7, Scheduler: "sh", Persistent: 360, Netmask: mask}},
		{"-A -t 172.17.0.7:80 -p 1 -s wlc -M 255.255.0.0",
			Command{Op: OpAddService, HasService: true, Service: tcp7, Scheduler: "wlc", Persistent: 1, Netmask: netip.MustParseAddr("255.255.0.0")}},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4", Command{Op: OpAddServer, HasService: true, Service: tcp7, Server: rip, Weight: 1}},
		{"", Command{Op: OpList}},
	}
	for _, tt := range accepts {
		got, err := ParseKataParameters(tt.in)
		if err != nil {
			t.Errorf("ParseKataParameters(%q): %v", tt.in, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
			cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
			t.Errorf("ParseKataParameters(%q) (-want +got):\n%s", tt.in, diff)
		}
	}
	rejects := []struct{ in, msg, token string }{
		{"-A -t 192.168.0.7:80 -p 3000", "You need to supply the 'scheduler' option for the 'add-service' command", "-A"},
		{"--add-service --tcp-service 172.17.0.7:80 --scheduler rr", "You need to supply the 'persistent' option for the 'add-service' command", "--add-service"},
		{"-E -t 172.17.0.7:80 -p 30", "You need to supply the 'scheduler' option for the 'edit-service' command", "-E"},
		{"-E -t 172.17.0.7:80 -s rr", "You need to supply the 'persistent' option for the 'edit-service' command", "-E"},
		{"-A -t 172.17.0.7:80 -s rr -p 0", "invalid timeout value `0' specified", "0"},
		{"-A -t 172.17.0.7:80 -s rr -p 2678401", "invalid timeout value `2678401' specified", "2678401"},
		{"-A -t 172.17.0.7:80 -s rr -p 3 -w 5", "Illegal 'weight' option with the 'add-service' command", "-w"},
	}
	for _, tt := range rejects {
		_, err := ParseKataParameters(tt.in)
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, ErrUsage) {
			t.Errorf("ParseKataParameters(%q) = %v, want a usage *Error", tt.in, err)
			continue
		}
		if e.Msg != tt.msg || e.Token != tt.token || e.Code != ExitUsage {
			t.Errorf("ParseKataParameters(%q) = %q %q %d, want %q %q %d", tt.in, e.Msg, e.Token, e.Code, tt.msg, tt.token, ExitUsage)
		}
		// ipvsadm's own grammar (restore files) keeps its defaults.
		if tt.msg != "invalid timeout value `2678401' specified" && !strings.Contains(tt.msg, "Illegal") {
			if _, err := ParseParameters(tt.in); err != nil {
				t.Errorf("ParseParameters(%q): %v, want ipvsadm's defaults", tt.in, err)
			}
		}
	}
}

// TestParseRestoreChunks: an input large enough to be parsed in several chunks as it
// arrives gives the same commands, line numbers and first error as one pass would, however
// the reads split it.
func TestParseRestoreChunks(t *testing.T) {
	var lines []string
	for i := range 20000 {
		lines = append(lines, fmt.Sprintf("-A -t 10.%d.%d.%d:80 -s rr", i/65536, (i/256)%256, i%256))
		if i%7 == 0 {
			lines = append(lines, "") // blank lines count too
		}
	}
	in := strings.Join(lines, "\n") + "\n"
	readers := map[string]func(string) io.Reader{
		"whole":        func(s string) io.Reader { return strings.NewReader(s) },
		"sized":        func(s string) io.Reader { return sized{strings.NewReader(s), len(s)} },
		"small reads":  func(s string) io.Reader { return iotest.HalfReader(&oddReader{s: s}) },
		"size too low": func(s string) io.Reader { return sized{&oddReader{s: s}, 100} },
	}
	for name, rd := range readers {
		_, chunks, err := readParse(rd(in))
		if err != nil {
			t.Fatal(err)
		}
		if len(chunks) < 3 {
			t.Fatalf("%s: input of %d bytes parsed in %d chunks", name, len(in), len(chunks))
		}
		cmds, err := ParseRestore(rd(in))
		if err != nil {
			t.Fatal(err)
		}
		if len(cmds) != 20000 {
			t.Fatalf("%s: %d commands, want 20000", name, len(cmds))
		}
		runs, err := ParseRestoreChunks(rd(in))
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(cmds, slices.Concat(runs...), cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); d != "" {
			t.Fatalf("%s: ParseRestoreChunks differs from ParseRestore (-want +got):\n%s", name, d)
		}
		for i, c := range cmds {
			if got := strings.Join(strings.Fields(lines[c.Line-1]), " "); got != fmt.Sprintf("-A -t 10.%d.%d.%d:80 -s rr", i/65536, (i/256)%256, i%256) {
				t.Fatalf("%s: command %d has line %d: %q", name, i, c.Line, got)
			}
		}
	}
	// The last line without its newline.
	in = strings.Join(lines[:len(lines)-1], "\n") // the last is blank
	if !strings.HasSuffix(in, " rr") {
		t.Fatalf("input ends in %q", in[len(in)-10:])
	}
	cmds, err := ParseRestore(sized{&oddReader{s: in}, len(in)})
	if err != nil || len(cmds) != 20000 || cmds[19999].Line != len(lines)-1 {
		t.Fatalf("without the last newline: %d commands, %v", len(cmds), err)
	}
	bad := func(at ...int) string {
		l := slices.Clone(lines)
		for _, n := range at {
			l[n-1] = "-a -t 10.0.0.1:80 -r 10.0.0.300"
		}
		return strings.Join(l, "\n")
	}
	n := len(lines)
	tests := []struct {
		name string
		in   string
		line int
	}{
		{"first chunk", bad(10), 10},
		{"last chunk", bad(n - 10), n - 10},
		{"two chunks", bad(n/2-5, n-10), n/2 - 5},
		{"three chunks", bad(n/3, n/2, n-10), n / 3},
		{"last line", bad(n), n},
	}
	for _, tt := range tests {
		for name, rd := range readers {
			_, err := ParseRestore(rd(tt.in))
			var e *Error
			if !errors.As(err, &e) || e.Line != tt.line || e.Token != "10.0.0.300" {
				t.Errorf("%s, %s: ParseRestore = %v, want line %d", tt.name, name, err, tt.line)
			}
		}
	}
	// The limit is reported at the first rule over it, before a later bad line.
	var big strings.Builder
	for i := 0; i <= MaxRules+10; i++ {
		big.WriteString("-A -t 10.0.0.1:" + strconv.Itoa(1+i%65535) + "\n")
	}
	big.WriteString("-x\n")
	_, err = ParseRestore(strings.NewReader(big.String()))
	var e *Error
	if !errors.Is(err, ErrRuleLimit) || !errors.As(err, &e) || e.Line != MaxRules+1 || e.Token != "-A -t 10.0.0.1:20001" {
		t.Errorf("over the limit, then a bad line: %v, want the limit at line %d", err, MaxRules+1)
	}
	// A bad line before the limit is reached wins.
	_, err = ParseRestore(strings.NewReader("-x\n" + big.String()))
	if !errors.As(err, &e) || e.Line != 1 {
		t.Errorf("a bad line, then over the limit: %v, want line 1", err)
	}
}

// sized is a reader that tells a size (as the agent's request body does), right or not.
type sized struct {
	io.Reader
	n int
}

func (s sized) Len() int { return s.n }

// oddReader returns s in reads of varying length (1 byte to 40 KiB), so that reads end in
// the middle of lines and of chunks.
type oddReader struct {
	s string
	i int
}

func (r *oddReader) Read(p []byte) (int, error) {
	if r.s == "" {
		return 0, io.EOF
	}
	r.i++
	n := copy(p[:min(len(p), 1+(r.i*7919)%(40<<10))], r.s)
	r.s = r.s[n:]
	return n, nil
}
