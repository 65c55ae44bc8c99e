package ipvs

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// run applies ipvsadm parameter strings to t, failing the test on error,
// and returns the output of the last one.
func run(t *testing.T, tb *Table, params ...string) string {
	t.Helper()
	var out string
	for _, p := range params {
		cmd, err := ParseParameters(p)
		if err != nil {
			t.Fatalf("ParseParameters(%q): %v", p, err)
		}
		if out, err = tb.Apply(cmd); err != nil {
			t.Fatalf("Apply(%q): %v", p, err)
		}
	}
	return out
}

// try applies one parameter string and returns the error.
func try(tb *Table, params string) error {
	cmd, err := ParseParameters(params)
	if err != nil {
		return err
	}
	_, err = tb.Apply(cmd)
	return err
}

var tableOpts = []cmp.Option{
	cmpopts.IgnoreUnexported(Table{}),
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

func TestListGolden(t *testing.T) {
	var tb Table
	run(t, &tb,
		"--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000",
		"--add-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 100",
	)
	want := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  172.17.0.7:80 rr persistent 3000\n" +
		"  -> 172.17.0.4:80                Masq    100    0          0         \n"
	if diff := cmp.Diff(want, run(t, &tb, "--list")); diff != "" {
		t.Errorf("--list (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(want, run(t, &tb, "-Ln")); diff != "" {
		t.Errorf("-Ln (-want +got):\n%s", diff)
	}
}

func TestListSortAndFlags(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 10.0.0.1:80",
		"-A -u 10.0.0.1:53 -s rr",
		"-A -t 1.2.3.4:80 -s sh -p",
		"-A -t 192.168.1.1:8080 -s wrr -p 600 -M 255.255.255.0",
		"-A -t 172.17.0.7:443 -s lblcr",
		"-A -t 172.17.0.7:80 -s nq -M 255.255.0.0", // mask without persistence: not shown
		"-A -t 10.0.0.1:8 -s dh",
		"-a -t 10.0.0.1:80 -r 10.1.0.1:8080 -w 3",
		"-a -t 10.0.0.1:80 -r 192.168.0.9 -w 0",
		"-a -t 10.0.0.1:80 -r 10.1.0.1:80",
		"-a -t 10.0.0.1:80 -r 1.1.1.1 -w 65535",
		"-a -t 10.0.0.1:80 -r 10.0.0.255:1 -w 2",
	)
	want := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  172.17.0.7:80 nq\n" +
		"TCP  172.17.0.7:443 lblcr\n" +
		"TCP  192.168.1.1:8080 wrr persistent 600 mask 255.255.255.0\n" +
		"TCP  1.2.3.4:80 sh persistent 360\n" +
		"TCP  10.0.0.1:8 dh\n" +
		"TCP  10.0.0.1:80 wlc\n" +
		"  -> 192.168.0.9:80               Masq    0      0          0         \n" +
		"  -> 1.1.1.1:80                   Masq    65535  0          0         \n" +
		"  -> 10.0.0.255:1                 Masq    2      0          0         \n" +
		"  -> 10.1.0.1:80                  Masq    1      0          0         \n" +
		"  -> 10.1.0.1:8080                Masq    3      0          0         \n" +
		"UDP  10.0.0.1:53 rr\n"
	if diff := cmp.Diff(want, tb.List(FormatPlain, nil)); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	wantSave := "-A -t 172.17.0.7:80 -s nq\n" +
		"-A -t 172.17.0.7:443 -s lblcr\n" +
		"-A -t 192.168.1.1:8080 -s wrr -p 600 -M 255.255.255.0\n" +
		"-A -t 1.2.3.4:80 -s sh -p 360\n" +
		"-A -t 10.0.0.1:8 -s dh\n" +
		"-A -t 10.0.0.1:80 -s wlc\n" +
		"-a -t 10.0.0.1:80 -r 192.168.0.9:80 -m -w 0\n" +
		"-a -t 10.0.0.1:80 -r 1.1.1.1:80 -m -w 65535\n" +
		"-a -t 10.0.0.1:80 -r 10.0.0.255:1 -m -w 2\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.1:8080 -m -w 3\n" +
		"-A -u 10.0.0.1:53 -s rr\n"
	if diff := cmp.Diff(wantSave, run(t, &tb, "--save")); diff != "" {
		t.Errorf("--save (-want +got):\n%s", diff)
	}
	// The saved rules restore to the same listing.
	cmds, err := ParseRestore(strings.NewReader(wantSave))
	if err != nil {
		t.Fatal(err)
	}
	var re Table
	if err := re.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, re.List(FormatPlain, nil)); diff != "" {
		t.Errorf("restored List (-want +got):\n%s", diff)
	}
	wantOne := "Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  192.168.1.1:8080 wrr persistent 600 mask 255.255.255.0\n"
	if diff := cmp.Diff(wantOne, run(t, &tb, "-L -n -t 192.168.1.1:8080")); diff != "" {
		t.Errorf("--list service (-want +got):\n%s", diff)
	}
	if err := try(&tb, "-L -t 192.168.1.1:8081"); !errors.Is(err, ErrNoService) {
		t.Errorf("--list missing service: %v, want ErrNoService", err)
	}
}

// TestSortWrap checks the signed 32-bit address difference of libipvs:
// addresses more than 2^31 apart compare "backwards".
func TestSortWrap(t *testing.T) {
	var tb Table
	for _, a := range []string{"10.0.0.1", "1.2.3.4", "192.168.0.1", "172.16.0.1", "127.0.0.1", "128.0.0.1"} {
		run(t, &tb, "-A -t "+a+":80")
	}
	var got []string
	for _, s := range tb.sortedServices() {
		got = append(got, s.Addr.Addr().String())
	}
	// 128 - 1 wraps (0x7f000000 fits, 128-1 = 0x7f... positive), 172 - 10
	// does not fit in 31 bits: negative, so 172 < 10.
	want := []string{"127.0.0.1", "128.0.0.1", "172.16.0.1", "192.168.0.1", "1.2.3.4", "10.0.0.1"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("order (-want +got):\n%s", diff)
	}
}

// TestMsortMatchesSortWithinWindow: where the comparison is a total order
// (addresses within 2^31) the listing is a plain sort.
func TestMsortMatchesSortWithinWindow(t *testing.T) {
	x := uint32(12345)
	var v []int
	for i := 0; i < 1000; i++ {
		x = x*1103515245 + 12345
		v = append(v, int(x%100000))
	}
	msort(v, func(a, b int) int { return a - b })
	for i := 1; i < len(v); i++ {
		if v[i-1] > v[i] {
			t.Fatalf("not sorted at %d: %d > %d", i, v[i-1], v[i])
		}
	}
}

type fakeCounters map[uint32]ServerCounters

func (f fakeCounters) Service(id uint32) ServiceCounters { return ServiceCounters{Stats: f[id].Stats} }
func (f fakeCounters) Server(id uint32) ServerCounters   { return f[id] }

func TestStatsRateGolden(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 10.0.0.1:443 -s wlc -p 600 -M 255.255.255.0",
		"-a -t 10.0.0.1:443 -r 10.10.1.1:443 -m -w 5",
		"-a -t 10.0.0.1:443 -r 10.10.1.2:443 -m -w 5",
	)
	svc, _ := tb.Service(ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:443")})
	c := fakeCounters{
		svc.ID: {Stats: Stats{Conns: 12, InPkts: 345, OutPkts: 678, InBytes: 123456789, OutBytes: 98765432100,
			CPS: 1, InPPS: 2, OutPPS: 3, InBPS: 4000, OutBPS: 5000}},
		svc.Servers[1].ID: {ActiveConn: 7, InActConn: 2, Stats: Stats{Conns: 12, InPkts: 345, OutPkts: 678, InBytes: 123456789, OutBytes: 98765432100,
			CPS: 1, InPPS: 2, OutPPS: 3, InBPS: 4000, OutBPS: 123456789012345}},
	}
	wantStats := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes\n" +
		"  -> RemoteAddress:Port\n" +
		"TCP  10.0.0.1:443                       12      345      678  123456K   98765M\n" +
		"  -> 10.10.1.1:443                      12      345      678  123456K   98765M\n" +
		"  -> 10.10.1.2:443                       0        0        0        0        0\n"
	out, err := tb.Exec(Command{Op: OpList, Stats: true}, c)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantStats, out); diff != "" {
		t.Errorf("--stats (-want +got):\n%s", diff)
	}
	wantRate := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS\n" +
		"  -> RemoteAddress:Port\n" +
		"TCP  10.0.0.1:443                        1        2        3     4000     5000\n" +
		"  -> 10.10.1.1:443                       1        2        3     4000     123T\n" +
		"  -> 10.10.1.2:443                       0        0        0        0        0\n"
	out, err = tb.Exec(Command{Op: OpList, Rate: true}, c)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantRate, out); diff != "" {
		t.Errorf("--rate (-want +got):\n%s", diff)
	}
	wantList := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  10.0.0.1:443 wlc persistent 600 mask 255.255.255.0\n" +
		"  -> 10.10.1.1:443                Masq    5      7          2         \n" +
		"  -> 10.10.1.2:443                Masq    5      0          0         \n"
	out, _ = tb.Exec(Command{Op: OpList}, c)
	if diff := cmp.Diff(wantList, out); diff != "" {
		t.Errorf("--list with counters (-want +got):\n%s", diff)
	}
	wantSave := "-A -t 10.0.0.1:443 -s wlc -p 600 -M 255.255.255.0\n" +
		"-a -t 10.0.0.1:443 -r 10.10.1.1:443 -m -w 5\n" +
		"-a -t 10.0.0.1:443 -r 10.10.1.2:443 -m -w 5\n"
	if diff := cmp.Diff(wantSave, tb.Save()); diff != "" {
		t.Errorf("--save (-want +got):\n%s", diff)
	}
}

func TestEmptyListAndTimeout(t *testing.T) {
	var tb Table
	want := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
	if diff := cmp.Diff(want, run(t, &tb, "")); diff != "" {
		t.Errorf("empty list (-want +got):\n%s", diff)
	}
	if got := run(t, &tb, "-S"); got != "" {
		t.Errorf("empty save = %q", got)
	}
	if diff := cmp.Diff("Timeout (tcp tcpfin udp): 900 120 300\n", run(t, &tb, "-L --timeout")); diff != "" {
		t.Errorf("--timeout (-want +got):\n%s", diff)
	}
	if got := run(t, &tb, "--set 100 0 200"); got != "" {
		t.Errorf("--set printed %q", got)
	}
	if diff := cmp.Diff("Timeout (tcp tcpfin udp): 100 120 200\n", run(t, &tb, "-L --timeout")); diff != "" {
		t.Errorf("--timeout after --set (-want +got):\n%s", diff)
	}
	run(t, &tb, "--set 0 5 0")
	if got, want := tb.Timeouts(), (Timeouts{100, 5, 200}); got != want {
		t.Errorf("Timeouts() = %+v, want %+v", got, want)
	}
}

func TestSemanticErrors(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 172.17.0.7:80 -s rr",
		"-a -t 172.17.0.7:80 -r 172.17.0.4:80",
	)
	tests := []struct {
		in    string
		kind  error
		msg   string
		token string
	}{
		{"-A -t 172.17.0.7:80 -s bogus", ErrServiceExists, "Service already exists", "-t 172.17.0.7:80"},
		{"-A -t 172.17.0.8:80 -s bogus", ErrSchedulerNotFound, "Scheduler or persistence engine not found", "bogus"},
		{"-E -t 172.17.0.8:80 -s bogus", ErrNoService, "No such service", "-t 172.17.0.8:80"},
		{"-E -t 172.17.0.7:80 -s bogus", ErrSchedulerNotFound, "Scheduler or persistence engine not found", "bogus"},
		{"-D -u 172.17.0.7:80", ErrNoService, "No such service", "-u 172.17.0.7:80"},
		{"-a -t 172.17.0.8:80 -r 172.17.0.4", ErrServiceNotDefined, "Service not defined", "-t 172.17.0.8:80"},
		{"-a -t 172.17.0.7:80 -r 172.17.0.4", ErrDestExists, "Destination already exists", "172.17.0.4:80"},
		{"-e -t 172.17.0.7:80 -r 172.17.0.5", ErrNoDest, "No such destination", "172.17.0.5:80"},
		{"-d -t 172.17.0.7:80 -r 172.17.0.4:81", ErrNoDest, "No such destination", "172.17.0.4:81"},
		{"-d -t 172.17.0.8:80 -r 172.17.0.4:81", ErrServiceNotDefined, "Service not defined", "-t 172.17.0.8:80"},
		{"-a -t 172.17.0.7:80 -r 224.0.0.1", ErrInvalid, ErrInvalid.Error(), "224.0.0.1:80"},
		{"-a -t 172.17.0.7:80 -r 0.0.0.0", ErrInvalid, ErrInvalid.Error(), "0.0.0.0:80"},
		{"-a -t 172.17.0.7:80 -r 255.255.255.255", ErrInvalid, ErrInvalid.Error(), "255.255.255.255:80"},
	}
	before := tb.Clone()
	for _, tt := range tests {
		err := try(&tb, tt.in)
		var e *Error
		if !errors.Is(err, tt.kind) || !errors.As(err, &e) {
			t.Errorf("%q: %v, want %v", tt.in, err, tt.kind)
			continue
		}
		if e.Msg != tt.msg || e.Token != tt.token || e.Code != ExitFailed {
			t.Errorf("%q: msg, token, code = %q, %q, %d; want %q, %q, 255", tt.in, e.Msg, e.Token, e.Code, tt.msg, tt.token)
		}
		if diff := cmp.Diff(before, &tb, tableOpts...); diff != "" {
			t.Errorf("%q changed the table (-before +after):\n%s", tt.in, diff)
		}
	}
}

func TestEditSemanticsAndIDs(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 10.0.0.1:80 -s wrr -p 100 -M 255.255.255.0",
		"-a -t 10.0.0.1:80 -r 10.1.0.1 -w 1",
		"-a -t 10.0.0.1:80 -r 10.1.0.2 -w 2",
		"-a -t 10.0.0.1:80 -r 10.1.0.3:81 -w 3",
		"-A -u 10.0.0.1:80",
	)
	k := ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:80")}
	s, _ := tb.Service(k)
	want := Service{ID: 1, ServiceKey: k, Scheduler: "wrr", Persistent: 100, Netmask: netip.MustParseAddr("255.255.255.0"),
		Servers: []Server{
			{ID: 4, Addr: netip.MustParseAddrPort("10.1.0.3:81"), Weight: 3},
			{ID: 3, Addr: netip.MustParseAddrPort("10.1.0.2:80"), Weight: 2},
			{ID: 2, Addr: netip.MustParseAddrPort("10.1.0.1:80"), Weight: 1},
		}}
	if diff := cmp.Diff(want, s, tableOpts...); diff != "" {
		t.Errorf("service (-want +got):\n%s", diff)
	}
	if got := tb.Rules(); got != 5 {
		t.Errorf("Rules() = %d, want 5", got)
	}
	// An edit replaces everything: no -p drops persistence and the mask,
	// no -w sets weight 1; ids and kernel order stay.
	run(t, &tb, "-E -t 10.0.0.1:80 -s rr", "-e -t 10.0.0.1:80 -r 10.1.0.2")
	s, _ = tb.Service(k)
	want.Scheduler, want.Persistent, want.Netmask = "rr", 0, mask
	want.Servers[1].Weight = 1
	if diff := cmp.Diff(want, s, tableOpts...); diff != "" {
		t.Errorf("after edit (-want +got):\n%s", diff)
	}
	// Delete and re-add: a new id, newest first again.
	run(t, &tb, "-d -t 10.0.0.1:80 -r 10.1.0.1", "-a -t 10.0.0.1:80 -r 10.1.0.1 -w 9")
	s, _ = tb.Service(k)
	if got := s.Servers[0]; got.ID != 6 || got.Weight != 9 {
		t.Errorf("re-added server = %+v, want id 6 weight 9 first", got)
	}
	// Clear keeps the counter.
	run(t, &tb, "-C")
	if tb.Rules() != 0 || len(tb.Services) != 0 {
		t.Errorf("after clear: %d rules", tb.Rules())
	}
	run(t, &tb, "-A -t 10.0.0.1:80")
	s, _ = tb.Service(k)
	if s.ID != 7 {
		t.Errorf("id after clear = %d, want 7", s.ID)
	}
}

func TestJSONRoundTripAndClone(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t 10.0.0.1:80 -s sh -p 100 -M 255.255.0.0",
		"-a -t 10.0.0.1:80 -r 10.1.0.1 -w 4",
		"-A -u 10.0.0.2:53",
		"-a -u 10.0.0.2:53 -r 10.1.0.2:5353",
		"-d -u 10.0.0.2:53 -r 10.1.0.2:5353",
		"--set 10 20 30",
	)
	b, err := json.Marshal(&tb)
	if err != nil {
		t.Fatal(err)
	}
	var back Table
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(&tb, &back, tableOpts...); diff != "" {
		t.Errorf("JSON round trip (-want +got):\n%s\n%s", diff, b)
	}
	if back.Rules() != 3 || back.Timeouts() != (Timeouts{10, 20, 30}) {
		t.Errorf("decoded: %d rules, timeouts %+v", back.Rules(), back.Timeouts())
	}
	if !strings.Contains(string(b), `"proto":"tcp"`) {
		t.Errorf("JSON lacks readable proto: %s", b)
	}
	run(t, &back, "-a -u 10.0.0.2:53 -r 10.1.0.3")
	if s, _ := back.Service(ServiceKey{UDP, netip.MustParseAddrPort("10.0.0.2:53")}); s.Servers[0].ID != 5 {
		t.Errorf("id after decode = %d, want 5 (ids never reused)", s.Servers[0].ID)
	}
	// Clone is deep.
	c := tb.Clone()
	run(t, c, "-e -t 10.0.0.1:80 -r 10.1.0.1 -w 7", "-D -u 10.0.0.2:53")
	if s, _ := tb.Service(ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:80")}); s.Servers[0].Weight != 4 || tb.Rules() != 3 {
		t.Errorf("Clone shares state: weight %d, rules %d", s.Servers[0].Weight, tb.Rules())
	}
}

func TestRuleLimit(t *testing.T) {
	var tb Table
	var in strings.Builder
	for i := 0; i < 5000; i++ {
		svc := fmt.Sprintf("-t 10.%d.%d.1:80", i/256, i%256)
		fmt.Fprintf(&in, "-A %s -s rr\n", svc)
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&in, "-a %s -r 192.168.%d.%d -m -w 1\n", svc, i%250, j)
		}
	}
	cmds, err := ParseRestore(strings.NewReader(in.String()))
	if err != nil {
		t.Fatal(err)
	}
	if err := tb.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if tb.Rules() != MaxRules {
		t.Fatalf("Rules() = %d, want %d", tb.Rules(), MaxRules)
	}
	for _, p := range []string{"-A -t 10.200.0.1:80", "-a -t 10.0.0.1:80 -r 192.168.0.9"} {
		if err := try(&tb, p); !errors.Is(err, ErrRuleLimit) {
			t.Errorf("%q at the limit: %v, want ErrRuleLimit", p, err)
		}
	}
	run(t, &tb, "-d -t 10.0.0.1:80 -r 192.168.0.1", "-a -t 10.0.0.1:80 -r 192.168.0.9")
	if err := tb.Restore(cmds); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("restore into a full table: %v, want ErrNotEmpty", err)
	}
}

func TestRestoreAllOrNothing(t *testing.T) {
	in := "--set 1 2 3\n" +
		"-A -t 10.0.0.1:80 -s rr\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.1 -m\n" +
		"-a -t 10.0.0.2:80 -r 10.1.0.1 -m\n"
	cmds, err := ParseRestore(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	var tb Table
	before := tb.Clone()
	err = tb.Restore(cmds)
	var e *Error
	if !errors.Is(err, ErrServiceNotDefined) || !errors.As(err, &e) || e.Line != 4 || e.Token != "-t 10.0.0.2:80" {
		t.Fatalf("Restore = %v, want Service not defined at line 4", err)
	}
	if diff := cmp.Diff(before, &tb, tableOpts...); diff != "" {
		t.Errorf("failed restore changed the table (-before +after):\n%s", diff)
	}
	if err := tb.Restore(cmds[:3]); err != nil {
		t.Fatal(err)
	}
	if tb.Rules() != 2 || tb.Timeouts() != (Timeouts{1, 2, 3}) {
		t.Errorf("after restore: %d rules, %+v", tb.Rules(), tb.Timeouts())
	}
	if err := tb.Restore(nil); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("second restore: %v, want ErrNotEmpty", err)
	}
	var empty Table
	if err := empty.Restore(cmds[:1]); !errors.Is(err, ErrEmptyRestore) {
		t.Errorf("restore without rules: %v, want ErrEmptyRestore", err)
	}
}

func TestIDSpaceExhausted(t *testing.T) {
	tb := Table{LastID: MaxID - 1}
	run(t, &tb, "-A -t 10.0.0.1:80")
	err := try(&tb, "-a -t 10.0.0.1:80 -r 10.1.0.1")
	var e *Error
	if !errors.Is(err, ErrIDSpace) || !errors.As(err, &e) || e.Token != "10.1.0.1:80" {
		t.Fatalf("add with no ids left: %v, want ErrIDSpace naming the server", err)
	}
	if tb.Rules() != 1 {
		t.Errorf("failed add changed the table: %d rules", tb.Rules())
	}
}

// TestHandBuiltCommands: the agent may build commands without the parser;
// the table applies ipvsadm's service defaults and validates the rest.
func TestHandBuiltCommands(t *testing.T) {
	var tb Table
	k := ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:80")}
	if _, err := tb.Apply(Command{Op: OpAddService, Service: k}); err != nil {
		t.Fatal(err)
	}
	s, _ := tb.Service(k)
	if s.Scheduler != "wlc" || s.Netmask != mask {
		t.Errorf("defaults: scheduler %q, netmask %s", s.Scheduler, s.Netmask)
	}
	for _, c := range []Command{
		{Op: OpAddService, Service: ServiceKey{UDP, netip.MustParseAddrPort("10.0.0.1:0")}},
		{Op: OpAddService, Service: ServiceKey{Proto(1), netip.MustParseAddrPort("10.0.0.1:1")}},
		{Op: OpAddService, Service: ServiceKey{UDP, netip.MustParseAddrPort("[::ffff:10.0.0.1]:1")}},
		{Op: OpAddService, Service: ServiceKey{UDP, netip.MustParseAddrPort("[fd00::1]:1")}, Netmask: mask},
		{Op: OpAddServer, Service: k, Server: netip.MustParseAddrPort("[fd00::1]:1"), Weight: 1},
		{Op: OpAddService, Service: ServiceKey{UDP, netip.MustParseAddrPort("10.0.0.1:1")}, Persistent: MaxPersistent + 1},
		{Op: OpAddService, Service: ServiceKey{UDP, netip.MustParseAddrPort("10.0.0.1:1")}, Netmask: netip.MustParseAddr("::")},
		{Op: OpAddServer, Service: k, Server: netip.MustParseAddrPort("10.1.0.1:0"), Weight: 1},
		{Op: OpAddServer, Service: k, Server: netip.MustParseAddrPort("10.1.0.1:1"), Weight: -1},
		{Op: OpAddServer, Service: k, Server: netip.MustParseAddrPort("10.1.0.1:1"), Weight: MaxWeight + 1},
		{Op: OpSet, Timeouts: Timeouts{TCP: MaxTimeout + 1}},
		{Op: Op(99)},
	} {
		before := tb.Clone()
		_, err := tb.Apply(c)
		var e *Error
		if !errors.As(err, &e) || e.Token == "" {
			t.Errorf("Apply(%+v) = %v, want an *Error naming a token", c, err)
		}
		if diff := cmp.Diff(before, &tb, tableOpts...); diff != "" {
			t.Errorf("Apply(%+v) changed the table (-before +after):\n%s", c, diff)
		}
	}
}

// TestIPv6 (issue 12): IPv6 services and real servers as ipvsadm 1.31 takes and prints them:
// bracketed addresses in the same columns, -M as a prefix length ("mask 64", "-M 64"), IPv4
// services before IPv6 ones and libipvs's wrapping word-by-word address order, a real server
// without a port taking the service's, and the rule limit counting both families.
func TestIPv6(t *testing.T) {
	var tb Table
	run(t, &tb,
		"-A -t [2001:db8::10]:80 -s sh -p 600 -M 64",
		"-a -t [2001:db8::10]:80 -r [fd00::5]:80 -w 3",
		"-a -t [2001:db8::10]:80 -r [fd00::4]:8080",
		"-A -u [2001:db8::10]:53 -s dh -p 60",
		"-A -t [fd00:5::100]:80 -s rr -p 3000 -M 128",
		"-a -t [fd00:5::100]:80 -r fd00:5::1 -w 1",
		"-E -t [fd00:5::100]:80 -s rr -p 3000",
		"-e -t [fd00:5::100]:80 -r fd00:5::1",
		"-d -t [fd00:5::100]:80 -r [fd00:5::1]:80",
		"-a -t [fd00:5::100]:80 -r [fd00:5::1]:8080",
		"-A -u 10.0.0.1:53 -s wrr",
		"-a -u 10.0.0.1:53 -r 10.1.0.2 -w 2",
		"-A -t 10.0.0.1:80 -s rr",
		"-a -t 10.0.0.1:80 -r 10.1.0.1:80",
	)
	wantList := Header +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  10.0.0.1:80 rr\n" +
		"  -> 10.1.0.1:80                  Masq    1      0          0         \n" +
		"UDP  10.0.0.1:53 wrr\n" +
		"  -> 10.1.0.2:53                  Masq    2      0          0         \n" +
		// fd00:5:: sorts before 2001:db8:: (0x20010db8 - 0xfd000005 wraps positive).
		"TCP  [fd00:5::100]:80 rr persistent 3000\n" +
		"  -> [fd00:5::1]:8080             Masq    1      0          0         \n" +
		"TCP  [2001:db8::10]:80 sh persistent 600 mask 64\n" +
		"  -> [fd00::4]:8080               Masq    1      0          0         \n" +
		"  -> [fd00::5]:80                 Masq    3      0          0         \n" +
		"UDP  [2001:db8::10]:53 dh persistent 60\n"
	if got := run(t, &tb, "-L -n"); got != wantList {
		t.Errorf("-L -n:\n%s\nwant:\n%s", got, wantList)
	}
	wantSave := "-A -t 10.0.0.1:80 -s rr\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n" +
		"-A -u 10.0.0.1:53 -s wrr\n" +
		"-a -u 10.0.0.1:53 -r 10.1.0.2:53 -m -w 2\n" +
		"-A -t [fd00:5::100]:80 -s rr -p 3000\n" +
		"-a -t [fd00:5::100]:80 -r [fd00:5::1]:8080 -m -w 1\n" +
		"-A -t [2001:db8::10]:80 -s sh -p 600 -M 64\n" +
		"-a -t [2001:db8::10]:80 -r [fd00::4]:8080 -m -w 1\n" +
		"-a -t [2001:db8::10]:80 -r [fd00::5]:80 -m -w 3\n" +
		"-A -u [2001:db8::10]:53 -s dh -p 60\n"
	if got := run(t, &tb, "-S"); got != wantSave {
		t.Errorf("-S:\n%s\nwant:\n%s", got, wantSave)
	}
	// The save restores to the same table.
	cmds, err := ParseRestore(strings.NewReader(wantSave))
	if err != nil {
		t.Fatal(err)
	}
	var back Table
	if err := back.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if got := back.Save(); got != wantSave {
		t.Errorf("save after restore:\n%s", got)
	}
	wantOne := "Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"UDP  [2001:db8::10]:53 dh persistent 60\n"
	if got := run(t, &tb, "-L -n -u [2001:db8::10]:53"); got != wantOne {
		t.Errorf("-L -u [2001:db8::10]:53:\n%q", got)
	}
	wantStats := fmt.Sprintf("%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n",
		"Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes") +
		"TCP  [fd00:5::100]:80                    0        0        0        0        0\n" +
		"  -> [fd00:5::1]:8080                    0        0        0        0        0\n"
	if got := run(t, &tb, "-L -n --stats -t [fd00:5::100]:80"); got != wantStats {
		t.Errorf("--stats:\n%q\nwant\n%q", got, wantStats)
	}
	// The persistence key of an IPv6 client is its /64.
	s, _ := tb.Service(ServiceKey{TCP, netip.MustParseAddrPort("[2001:db8::10]:80")})
	if got, want := PersistenceKey(netip.MustParseAddr("fd00:1:2:3:4:5:6:7"), s.Netmask), netip.MustParseAddr("fd00:1:2:3::"); got != want {
		t.Errorf("persistence key %s, want %s", got, want)
	}
	// Semantic errors are the kernel's for either family.
	if err := try(&tb, "-a -t [2001:db8::10]:80 -r [fd00::4]:8080"); !errors.Is(err, ErrDestExists) {
		t.Errorf("duplicate IPv6 real server: %v", err)
	}
	if err := try(&tb, "-a -t [2001:db8::10]:80 -r [ff02::1]:80"); !errors.Is(err, ErrInvalid) {
		t.Errorf("multicast IPv6 real server: %v", err)
	}
	if err := try(&tb, "-d -t [2001:db8::10]:80 -r 10.1.0.1:80"); !errors.Is(err, ErrNoDest) {
		t.Errorf("deleting a real server of the other family: %v", err)
	}
	// The limit counts rules of both families.
	if got := tb.Rules(); got != 10 {
		t.Fatalf("%d rules, want 10", got)
	}
	var full Table
	var sb strings.Builder
	for i := range MaxRules {
		if i%2 == 0 {
			fmt.Fprintf(&sb, "-A -t 10.0.%d.%d:80\n", i/256%256, i%256)
		} else {
			fmt.Fprintf(&sb, "-A -t [fd00::%x]:80\n", i)
		}
	}
	cmds, err = ParseRestore(strings.NewReader(sb.String()))
	if err != nil {
		t.Fatal(err)
	}
	if err := full.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	if err := try(&full, "-A -t [fd00::1:0]:80"); !errors.Is(err, ErrRuleLimit) {
		t.Errorf("rule 20001 (IPv6): %v", err)
	}
}

// TestRestoreSlabs: a restored table (services and real servers carved out of two slabs, with
// room for the real servers that follow each service) is the table the same commands make one
// by one, and stays so through later edits: a service whose real servers come later, in
// another run of commands or after other services, or are added afterwards, never writes
// into its neighbour's.
func TestRestoreSlabs(t *testing.T) {
	in := "-A -t 10.0.0.1:80 -s rr\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m\n" +
		"-A -t 10.0.0.2:80 -s wrr\n" +
		"-a -t 10.0.0.1:80 -r 10.1.0.2:80 -m\n" +
		"-a -t 10.0.0.2:80 -r 10.1.0.3:80 -m -w 2\n" +
		"-a -t 10.0.0.2:80 -r 10.1.0.4:80 -m -w 3\n" +
		"-A -u 10.0.0.3:53 -s sh\n" +
		"-A -t 10.0.0.4:80 -s rr\n" +
		"-a -t 10.0.0.4:80 -r 10.1.0.5:80 -m\n"
	cmds, err := ParseRestore(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	for _, split := range []int{0, 1, 2, 4, 5, 8} {
		want := &Table{}
		for _, c := range cmds {
			if _, err := want.Apply(c); err != nil {
				t.Fatal(err)
			}
		}
		var got Table
		if err := got.Restore(cmds[:split], cmds[split:]); err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(want, &got, tableOpts...); d != "" {
			t.Fatalf("split at %d: restored table differs from the commands applied one by one (-want +got):\n%s", split, d)
		}
		for _, p := range []string{
			"-a -t 10.0.0.1:80 -r 10.1.0.9:80 -m",
			"-a -t 10.0.0.4:80 -r 10.1.0.8:80 -m",
			"-a -u 10.0.0.3:53 -r 10.1.0.7:53 -m",
			"-d -t 10.0.0.2:80 -r 10.1.0.3:80",
			"-a -t 10.0.0.2:80 -r 10.1.0.6:80 -m -w 5",
			"-e -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 7",
			"-D -t 10.0.0.1:80",
			"-A -t 10.0.0.5:80 -s rr",
		} {
			c, err := ParseParameters(p)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := want.Apply(c); err != nil {
				t.Fatal(err)
			}
			if _, err := got.Apply(c); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(want, &got, tableOpts...); d != "" {
				t.Fatalf("split at %d, after %s (-want +got):\n%s", split, p, d)
			}
		}
	}
}

// TestIDsAvoidLiveSlots: a new id is the first after LastID whose counter entry (CounterSlot)
// no live id of the table holds, so live ids never share the datapath's counters; a removed
// id's entry is free again, ids are never reused, and a table decoded from JSON (its entries
// rebuilt from its ids) keeps to it.
func TestIDsAvoidLiveSlots(t *testing.T) {
	var tb Table
	run(t, &tb, "-A -t 10.0.0.1:80", "-a -t 10.0.0.1:80 -r 10.1.0.1") // ids 1, 2
	tb.LastID = CounterSlots                                          // the next id, CounterSlots+1, has slot 1
	run(t, &tb, "-a -t 10.0.0.1:80 -r 10.1.0.2")
	k := ServiceKey{TCP, netip.MustParseAddrPort("10.0.0.1:80")}
	s, _ := tb.Service(k)
	if got := s.Servers[0].ID; got != CounterSlots+3 {
		t.Errorf("id after slots 1 and 2 (held by ids 1 and 2): %d, want %d", got, CounterSlots+3)
	}
	// Removing id 2 frees slot 2, but not for an id at or below LastID.
	run(t, &tb, "-d -t 10.0.0.1:80 -r 10.1.0.1")
	tb.LastID = 2*CounterSlots + 1 // next: slot 2 (free now), then slot 3 (held)
	run(t, &tb, "-a -t 10.0.0.1:80 -r 10.1.0.3", "-a -t 10.0.0.1:80 -r 10.1.0.4")
	s, _ = tb.Service(k)
	if a, b := s.Servers[1].ID, s.Servers[0].ID; a != 2*CounterSlots+2 || b != 2*CounterSlots+4 {
		t.Errorf("ids after slot 2 was freed: %d, %d; want %d, %d", a, b, 2*CounterSlots+2, 2*CounterSlots+4)
	}
	// A decoded table rebuilds which entries its ids hold.
	raw, err := json.Marshal(&tb)
	if err != nil {
		t.Fatal(err)
	}
	var dec Table
	if err := json.Unmarshal(raw, &dec); err != nil {
		t.Fatal(err)
	}
	dec.LastID = 3 * CounterSlots // next: slot 1 (service 1), then slot 2 (held), 3 (held), 4 (held): 5
	run(t, &dec, "-A -u 10.0.0.1:80")
	if s, _ := dec.Service(ServiceKey{UDP, netip.MustParseAddrPort("10.0.0.1:80")}); s.ID != 3*CounterSlots+5 {
		t.Errorf("decoded table's next id %d, want %d", s.ID, 3*CounterSlots+5)
	}
	live := map[uint32]uint32{}
	for _, s := range dec.Services {
		for _, id := range append([]uint32{s.ID}, func() (ids []uint32) {
			for _, d := range s.Servers {
				ids = append(ids, d.ID)
			}
			return
		}()...) {
			if o, ok := live[CounterSlot(id)]; ok {
				t.Errorf("ids %d and %d share counter entry %d", o, id, CounterSlot(id))
			}
			live[CounterSlot(id)] = id
		}
	}
}
