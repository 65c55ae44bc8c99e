package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

const ctlNS = "/run/netns/kdptctl-test"

// failStore is a StateStore that fails Put when failPut is set, after okPuts more Puts.
type failStore struct {
	*store.Store
	mu      sync.Mutex
	failPut bool
	okPuts  int
}

func (f *failStore) Put(key string, data []byte) error {
	f.mu.Lock()
	fail := f.failPut && f.okPuts == 0
	if f.failPut && f.okPuts > 0 {
		f.okPuts--
	}
	f.mu.Unlock()
	if fail {
		return errors.New("disk on fire")
	}
	return f.Store.Put(key, data)
}

type rig struct {
	t     *testing.T
	c     *control.Controller
	dp    *controltest.MemDataplane
	hp    *controltest.MemHotplugger
	taps  *controltest.MemTaps
	st    *failStore
	netns map[string]bool
	fail  map[string]error // "Method" -> error, for dp, hp and taps
	mu    sync.Mutex
}

func (r *rig) failer(method, _ string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fail[method]
}

func (r *rig) setFail(method string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fail[method] = err
}

func newRig(t *testing.T) *rig {
	t.Helper()
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dp: controltest.NewMemDataplane(), hp: controltest.NewMemHotplugger(), taps: controltest.NewMemTaps(), st: &failStore{Store: s},
		netns: map[string]bool{ctlNS: true, "/run/netns/other": true}, fail: map[string]error{}}
	r.dp.Fail, r.hp.Fail, r.taps.Fail = r.failer, r.failer, r.failer
	r.taps.AddLink(ctlNS, "eth0", false)
	r.restart()
	return r
}

// restart builds a new Controller over the same store and fakes, as an agent restart does.
func (r *rig) restart() {
	r.t.Helper()
	c, err := control.New(context.Background(), control.Config{
		Dataplane: r.dp, Taps: r.taps, Store: r.st, Hotplug: r.hp,
		CheckNetNS: func(p string) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			if !r.netns[p] {
				return errors.New("no such file or directory")
			}
			return nil
		},
		CheckVhostSocket: func(p string) error {
			if strings.HasSuffix(p, "missing") {
				return errors.New("no such file or directory")
			}
			return nil
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		r.t.Fatal(err)
	}
	r.c = c
}

func (r *rig) addSandbox(id, qmp string) {
	r.t.Helper()
	if _, err := r.c.AddSandbox(context.Background(), control.SandboxSpec{ID: id, NetNS: ctlNS, QMP: qmp}); err != nil {
		r.t.Fatal(err)
	}
}

// kn runs a kata-network operation and returns stdout and the error text ("" on success).
func (r *rig) kn(id, op, input string) (string, string) {
	out, err := KataNetwork(context.Background(), r.c, id, op, []byte(input))
	msg := ""
	if err != nil {
		msg = netspec.Message(err)
	}
	return string(out), msg
}

func (r *rig) mustKN(id, op, input, want string) {
	r.t.Helper()
	out, msg := r.kn(id, op, input)
	if msg != "" {
		r.t.Fatalf("%s %s: unexpected error %q (stdout %q)", op, input, msg, out)
	}
	if d := cmp.Diff(want, out); d != "" {
		r.t.Fatalf("%s %s: stdout (-want +got):\n%s", op, input, d)
	}
}

const (
	sbID      = "6ec7a98c0ffee"
	exIface   = `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}`
	exAdded   = `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01","queues":5}` + "\n"
	exList    = `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["172.16.0.3/16"],"mtu":1500}]` + "\n"
	exRoute   = `{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}`
	exRouteOK = `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"
)

// TestDualStack: one IPv4 and one IPv6 address per NIC, Family 10 on output, list-ifaces shows
// both, the dataplane endpoint gets both (a link-local one as the NIC's link-local), and IPv6
// routes reach the dataplane while list-routes stays IPv4-only.
func TestDualStack(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "/run/qmp.sock")
	in := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"},{"address":"fd00:5::3","mask":"64"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500}`
	r.mustKN(sbID, OpAddIface, in, `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"},{"Family":10,"Address":"fd00:5::3","Mask":"64"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01"}`+"\n")
	r.mustKN(sbID, OpListIfaces, "", `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["172.16.0.3/16","fd00:5::3/64"],"mtu":1500}]`+"\n")
	ep := r.dp.Sandbox(sbID).Endpoints[0]
	if ep.Addr != netip.MustParsePrefix("172.16.0.3/16") || ep.Addr6 != netip.MustParsePrefix("fd00:5::3/64") || ep.LinkLocal.IsValid() {
		t.Errorf("endpoint addresses %v %v %v", ep.Addr, ep.Addr6, ep.LinkLocal)
	}
	r.mustKN(sbID, OpAddRoute, `{"dest":"default","gateway":"fd00:5::1","device":"eth-test"}`, `[{"dest":"default","gateway":"fd00:5::1","device":"eth-test"}]`+"\n")
	r.mustKN(sbID, OpListRoutes, "", "null\n")
	r.mustKN(sbID, OpListRoutesAll, "", `[{"dest":"default","gateway":"fd00:5::1","device":"eth-test"}]`+"\n")
	if got := r.dp.Sandbox(sbID).Routes; len(got) != 1 || got[0].Dest != netip.MustParsePrefix("::/0") {
		t.Errorf("dataplane routes %v, want the IPv6 default", got)
	}
	// update-iface: an IPv6-only NIC with an explicit link-local.
	r.mustKN(sbID, OpUpdateIface, `{"name":"eth-test","IPAddresses":[{"address":"fe80::5","mask":"64"}]}`,
		`{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":10,"Address":"fe80::5","Mask":"64"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01"}`+"\n")
	ep = r.dp.Sandbox(sbID).Endpoints[0]
	if ep.Addr.IsValid() || ep.Addr6.IsValid() || ep.LinkLocal != netip.MustParseAddr("fe80::5") {
		t.Errorf("endpoint addresses after update %v %v %v", ep.Addr, ep.Addr6, ep.LinkLocal)
	}
}

func TestSpecExamples(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "/run/qmp.sock")
	r.mustKN("6ec7a98", OpAddIface, exIface, exAdded)
	r.mustKN("6ec7a98", OpListIfaces, "", exList)
	r.mustKN("6ec7a98", OpAddRoute, exRoute, exRouteOK)

	sb := r.dp.Sandbox(sbID)
	wantEP := control.Endpoint{Sandbox: sbID, NetNS: ctlNS, Slot: 0, NIC: "eth-test", Tap: "tap-test", Uplink: "eth0",
		MAC: mustMAC("02:42:20:6f:a3:69"), Addr: netip.MustParsePrefix("172.16.0.3/16"), MTU: 1500, Queues: 5,
		Mode: control.ModeTC, AntiSpoof: true, StrictEgress: true}
	if d := cmp.Diff(map[uint32]control.Endpoint{0: wantEP}, sb.Endpoints, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
		t.Errorf("dataplane endpoints (-want +got):\n%s", d)
	}
	wantRoutes := []control.Route{{Slot: 0, Dest: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("172.16.0.1")}}
	if d := cmp.Diff(wantRoutes, sb.Routes, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
		t.Errorf("dataplane routes (-want +got):\n%s", d)
	}
	r.mustKN("6ec7a98", OpListRoutes, "", `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]`+"\n")

	// A restart changes nothing visible.
	r.restart()
	r.mustKN("6ec", OpListIfaces, "", exList)
	r.mustKN("6ec", OpListRoutes, "", `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]`+"\n")

	// del-iface removes NIC, routes through it, endpoint, tap (created by kata-dp) and the VM's device.
	r.mustKN("6ec", OpDelIface, exIface, "null\n")
	r.mustKN("6ec", OpListIfaces, "", "null\n")
	r.mustKN("6ec", OpListRoutes, "", "null\n")
	if got := r.dp.Sandbox(sbID); len(got.Endpoints) != 0 || len(got.Routes) != 0 {
		t.Errorf("dataplane after del-iface: %+v", got)
	}
	if _, ok := r.taps.Links(ctlNS)["tap-test"]; ok {
		t.Error("tap created by kata-dp survived del-iface")
	}
	if p := r.hp.Plugged(sbID); len(p) != 0 {
		t.Errorf("still plugged: %v", p)
	}
	// An unknown name is a silent success.
	r.mustKN("6ec", OpDelIface, exIface, "null\n")
}

func mustMAC(s string) []byte {
	m, err := netspec.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func TestLookup(t *testing.T) {
	r := newRig(t)
	r.addSandbox("abc123", "")
	r.addSandbox("abd456", "")
	r.addSandbox("abc", "")
	for _, tc := range []struct{ id, want string }{
		{"abc123", "abc123"}, {"abc1", "abc123"}, {"abd", "abd456"}, {"abc", "abc"},
		{"ab", "multiple containers found (ab)"}, {"x", "no such container ID (x)"}, {"", "no such container ID ()"},
	} {
		got := ""
		sb, err := r.c.Lookup(tc.id)
		if err != nil {
			got = err.Error()
		} else {
			got = sb.ID
		}
		if got != tc.want {
			t.Errorf("Lookup(%q) = %q, want %q", tc.id, got, tc.want)
		}
	}
	// kata-network prints null for a missing or ambiguous sandbox.
	for _, op := range Ops {
		out, msg := r.kn("zz", op, exIface)
		if out != "null\n" || msg != "no such container ID (zz)" {
			t.Errorf("%s on missing sandbox: stdout %q, error %q", op, out, msg)
		}
	}
}

func TestHealth(t *testing.T) {
	r := newRig(t)
	r.addSandbox("qmpbox", "/run/qmp.sock")
	r.setFail("Healthy", errors.New("monitor gone"))
	out, msg := r.kn("qmp", OpListIfaces, "")
	if out != "null\n" || !strings.Contains(msg, "monitor gone") {
		t.Errorf("unhealthy qmp: stdout %q, error %q", out, msg)
	}
	r.setFail("Healthy", nil)
	r.mu.Lock()
	delete(r.netns, ctlNS)
	r.mu.Unlock()
	out, msg = r.kn("qmp", OpDelIface, exIface)
	if out != "null\n" || !strings.Contains(msg, "sandbox not healthy") || !strings.Contains(msg, "netns") {
		t.Errorf("netns gone: stdout %q, error %q", out, msg)
	}
}

func TestDecodeErrorPrintsNothing(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	for _, op := range []string{OpAddIface, OpDelIface, OpUpdateIface, OpAddRoute, OpDelRoute, OpUpdateRoutes} {
		out, msg := r.kn(sbID, op, "{not json")
		if out != "" || !strings.HasPrefix(msg, "decode network file: ") {
			t.Errorf("%s: stdout %q, error %q", op, out, msg)
		}
	}
	out, msg := r.kn(sbID, OpAddIface, strings.Repeat(" ", netspec.MaxFileSize+1))
	if out != "" || msg != "network file too big" {
		t.Errorf("too big: stdout %q, error %q", out, msg)
	}
}

func TestAddIfaceValidation(t *testing.T) {
	base := map[string]string{
		"device": `"tap0"`, "name": `"eth1"`, "hwAddr": `"02:00:00:00:00:01"`, "mtu": `1500`,
	}
	mk := func(over map[string]string) string {
		var parts []string
		for _, k := range []string{"device", "name", "hwAddr", "mtu", "IPAddresses", "queues", "linkType", "vhostUserSocket", "uplink", "pciAddr", "rawFlags"} {
			v, ok := over[k]
			if !ok {
				v, ok = base[k]
			}
			if ok && v != "" {
				parts = append(parts, fmt.Sprintf("%q:%s", k, v))
			}
		}
		return "{" + strings.Join(parts, ",") + "}"
	}
	long := `"` + strings.Repeat("a", 16) + `"`
	for _, tc := range []struct {
		name string
		over map[string]string
		want string
	}{
		{"no name", map[string]string{"name": ""}, "name is required"},
		{"no device", map[string]string{"device": ""}, "device is required"},
		{"no mtu", map[string]string{"mtu": ""}, "mtu is required"},
		{"no hwAddr", map[string]string{"hwAddr": ""}, "hwAddr is required"},
		{"long name", map[string]string{"name": long}, `name "aaaaaaaaaaaaaaaa" is longer than 15 characters`},
		{"long device", map[string]string{"device": long}, `device "aaaaaaaaaaaaaaaa" is longer than 15 characters`},
		{"name digit first", map[string]string{"name": `"1eth"`}, `name "1eth" must start with a letter and hold only letters, digits, '_', '.' and '-'`},
		{"device bad char", map[string]string{"device": `"tap/0"`}, `device "tap/0" must start with a letter and hold only letters, digits, '_', '.' and '-'`},
		{"mtu low", map[string]string{"mtu": `45`}, "mtu 45 is out of range (46..9600)"},
		{"mtu high", map[string]string{"mtu": `9601`}, "mtu 9601 is out of range (46..9600)"},
		{"bad mac", map[string]string{"hwAddr": `"02:42:zz:6f:a3:69"`}, `hwAddr "02:42:zz:6f:a3:69" is not a valid MAC address`},
		{"multicast mac", map[string]string{"hwAddr": `"01:00:5e:00:00:01"`}, `hwAddr "01:00:5e:00:00:01" is a multicast address`},
		{"two IPs", map[string]string{"IPAddresses": `[{"address":"10.0.0.1","mask":"8"},{"address":"10.0.0.2","mask":"8"}]`}, "at most one IPv4 and one IPv6 address per NIC (got 2 IPv4 addresses)"},
		{"two IPv6", map[string]string{"IPAddresses": `[{"address":"fd00::1","mask":"64"},{"address":"fd00::2","mask":"64"}]`}, "at most one IPv4 and one IPv6 address per NIC (got 2 IPv6 addresses)"},
		{"three IPs", map[string]string{"IPAddresses": `[{"address":"10.0.0.1","mask":"8"},{"address":"fd00::2","mask":"64"},{"address":"fd00::3","mask":"64"}]`}, "at most one IPv4 and one IPv6 address per NIC (got 3 addresses)"},
		{"mask 0", map[string]string{"IPAddresses": `[{"address":"10.0.0.1","mask":"0"}]`}, "mask 0 of IP address 10.0.0.1 is refused: it would take strict egress off"},
		{"bad IP", map[string]string{"IPAddresses": `[{"address":"10.0.0.256","mask":"8"}]`}, `IP address "10.0.0.256" is not valid`},
		{"bad mask", map[string]string{"IPAddresses": `[{"address":"10.0.0.1","mask":"33"}]`}, `mask "33" of IP address 10.0.0.1 is not a prefix length (0..32)`},
		{"no mask", map[string]string{"IPAddresses": `[{"address":"10.0.0.1"}]`}, `mask of IP address 10.0.0.1 is required`},
		{"queues high", map[string]string{"queues": `17`}, "queues 17 is out of range (0..16)"},
		{"queues negative", map[string]string{"queues": `-1`}, "queues -1 is out of range (0..16)"},
		{"linkType", map[string]string{"linkType": `"macvtap"`}, `linkType "macvtap" is not supported (only "tap")`},
		{"vhost long", map[string]string{"vhostUserSocket": `"/` + strings.Repeat("a", 128) + `"`}, "vhostUserSocket is longer than 128 bytes"},
		{"vhost name digit", map[string]string{"vhostUserSocket": `"/run/1sock"`}, `vhostUserSocket "/run/1sock": the file name must start with a letter`},
		{"vhost name char", map[string]string{"vhostUserSocket": `"/run/so_ck"`}, `vhostUserSocket "/run/so_ck": the file name may hold only letters, digits, '-' and '.'`},
		{"vhost missing", map[string]string{"vhostUserSocket": `"/run/missing"`}, `vhostUserSocket "/run/missing": no such file or directory`},
		{"pciAddr set", map[string]string{"pciAddr": `"02.0/01"`}, "pciAddr is assigned by the VM and cannot be set"},
		{"uplink missing", map[string]string{"uplink": `"veth9"`}, "uplink veth9 does not exist in the sandbox netns"},
		{"uplink is tap", map[string]string{"uplink": `"tap0"`}, `uplink "tap0" is the tap itself`},
		{"device not a tap", map[string]string{"device": `"eth0"`}, "tap eth0: not a tap device: eth0"},
		{"name taken", map[string]string{"name": `"eth-test"`}, "already exists: NIC name eth-test is already used in the sandbox"},
		{"device taken", map[string]string{"device": `"tap-test"`}, "already exists: device tap-test is already used by NIC eth-test"},
		{"mac taken", map[string]string{"hwAddr": `"02:42:20:6F:A3:69"`}, "already exists: hwAddr 02:42:20:6F:A3:69 is already used by NIC eth-test"},
		{"device on other sandbox", map[string]string{"device": `"tap-other"`}, "already exists: device tap-other is already used by sandbox other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.addSandbox(sbID, "")
			r.c.AddSandbox(context.Background(), control.SandboxSpec{ID: "other", NetNS: "/run/netns/other"})
			r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
			r.mustKN("other", OpAddIface, `{"device":"tap-other","name":"eth1","hwAddr":"02:00:00:00:00:09","mtu":1500}`,
				`{"device":"tap-other","name":"eth1","mtu":1500,"hwAddr":"02:00:00:00:00:09"}`+"\n")
			before := r.dp.Sandbox(sbID)
			in := mk(tc.over)
			out, msg := r.kn(sbID, OpAddIface, in)
			if out != "null\n" || msg != tc.want {
				t.Errorf("add-iface %s:\nstdout %q\nerror  %q\nwant   %q", in, out, msg, tc.want)
			}
			if d := cmp.Diff(before, r.dp.Sandbox(sbID), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
				t.Errorf("dataplane changed (-before +after):\n%s", d)
			}
			r.mustKN(sbID, OpListIfaces, "", exList)
		})
	}
}

func TestOneVhostSocketPerSandbox(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, `{"device":"tap1","name":"eth1","hwAddr":"02:00:00:00:00:01","mtu":1500,"vhostUserSocket":"/run/vhost-user1"}`,
		`{"device":"tap1","name":"eth1","mtu":1500,"hwAddr":"02:00:00:00:00:01","vhostUserSocket":"/run/vhost-user1"}`+"\n")
	_, msg := r.kn(sbID, OpAddIface, `{"device":"tap2","name":"eth2","hwAddr":"02:00:00:00:00:02","mtu":1500,"vhostUserSocket":"/run/vhost-user2"}`)
	if want := "only one vhostUserSocket per sandbox (NIC eth1 has one)"; msg != want {
		t.Errorf("error %q, want %q", msg, want)
	}
}

// TestAddIfaceRollback fails each step of add-iface in turn and checks that nothing is left.
func TestAddIfaceRollback(t *testing.T) {
	for _, step := range []string{"EnsureTap", "LinkExists", "AddEndpoint", "Plug", "store", "intent"} {
		t.Run(step, func(t *testing.T) {
			r := newRig(t)
			r.addSandbox(sbID, "/run/qmp.sock")
			callsBefore := len(r.dp.Calls())
			switch step {
			case "store": // the commit fails; the intent was saved
				r.st.mu.Lock()
				r.st.failPut, r.st.okPuts = true, 1
				r.st.mu.Unlock()
			case "intent": // nothing can be saved: nothing is done
				r.st.mu.Lock()
				r.st.failPut = true
				r.st.mu.Unlock()
			default:
				r.setFail(step, errors.New("injected"))
			}
			out, msg := r.kn(sbID, OpAddIface, exIface)
			if out != "null\n" || msg == "" {
				t.Fatalf("stdout %q, error %q", out, msg)
			}
			r.setFail(step, nil)
			r.st.mu.Lock()
			r.st.failPut = false
			r.st.mu.Unlock()
			if _, ok := r.taps.Links(ctlNS)["tap-test"]; ok {
				t.Error("tap left behind")
			}
			if eps := r.dp.Sandbox(sbID).Endpoints; len(eps) != 0 {
				t.Errorf("endpoints left behind: %v", eps)
			}
			if p := r.hp.Plugged(sbID); len(p) != 0 {
				t.Errorf("VM device left behind: %v", p)
			}
			calls := r.dp.Calls()[callsBefore:]
			adds, dels := 0, 0
			for _, c := range calls {
				adds += strings.Count(c, "AddEndpoint")
				dels += strings.Count(c, "DelEndpoint")
			}
			if step == "Plug" || step == "store" {
				if adds != 1 || dels != 1 {
					t.Errorf("dataplane calls %v: want one add undone by one del", calls)
				}
			}
			if step == "intent" && adds+dels != 0 {
				t.Errorf("dataplane calls %v with no intent saved: want none", calls)
			}
			r.mustKN(sbID, OpListIfaces, "", "null\n")
			// Everything reserved was released: the same request now succeeds.
			r.mustKN(sbID, OpAddIface, exIface, exAdded)
		})
	}
}

// TestAddIfaceAdoptsExistingTap: an existing tap is reused, not joined, and not deleted.
func TestAddIfaceAdoptsExistingTap(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.taps.AddLink(ctlNS, "tap-test", true)
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	if ep := r.dp.Sandbox(sbID).Endpoints[0]; ep.Uplink != "" {
		t.Errorf("existing tap joined to %q", ep.Uplink)
	}
	r.mustKN(sbID, OpDelIface, `{"name":"eth-test"}`, "null\n")
	if _, ok := r.taps.Links(ctlNS)["tap-test"]; !ok {
		t.Error("existing tap deleted")
	}
}

// TestJoining: the first NIC gets the sandbox uplink, the next one is not joined, an explicit
// uplink is honoured once.
func TestJoining(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.taps.AddLink(ctlNS, "eth9", false)
	add := func(i int, extra string) {
		t.Helper()
		in := fmt.Sprintf(`{"device":"tap%d","name":"eth-%d","hwAddr":"02:00:00:00:00:%02x","mtu":1500%s}`, i, i, i, extra)
		if _, msg := r.kn(sbID, OpAddIface, in); msg != "" {
			t.Fatalf("add %d: %s", i, msg)
		}
	}
	add(1, "")
	add(2, "")
	add(3, `,"uplink":"eth9"`)
	_, msg := r.kn(sbID, OpAddIface, `{"device":"tap4","name":"eth-4","hwAddr":"02:00:00:00:00:04","mtu":1500,"uplink":"eth9"}`)
	if want := "already exists: uplink eth9 is already joined to NIC eth-3"; msg != want {
		t.Errorf("second explicit uplink: %q, want %q", msg, want)
	}
	got := map[string]string{}
	for _, ep := range r.dp.Sandbox(sbID).Endpoints {
		got[ep.NIC] = ep.Uplink
	}
	if d := cmp.Diff(map[string]string{"eth-1": "eth0", "eth-2": "", "eth-3": "eth9"}, got); d != "" {
		t.Errorf("uplinks (-want +got):\n%s", d)
	}
	// Slots are lowest free and stable.
	r.mustKN(sbID, OpDelIface, `{"name":"eth-1"}`, "null\n")
	add(5, "")
	slots := map[string]uint32{}
	for _, ep := range r.dp.Sandbox(sbID).Endpoints {
		slots[ep.NIC] = ep.Slot
	}
	if d := cmp.Diff(map[string]uint32{"eth-2": 1, "eth-3": 2, "eth-5": 0}, slots); d != "" {
		t.Errorf("slots (-want +got):\n%s", d)
	}
	if ep := r.dp.Sandbox(sbID).Endpoints[0]; ep.Uplink != "eth0" {
		t.Errorf("NIC added after the uplink was freed joined %q, want eth0", ep.Uplink)
	}
}

func TestDelIfaceRollback(t *testing.T) {
	for _, step := range []string{"Unplug", "SetRoutes", "DelEndpoint", "DeleteTap", "store"} {
		t.Run(step, func(t *testing.T) {
			r := newRig(t)
			r.addSandbox(sbID, "/run/qmp.sock")
			r.mustKN(sbID, OpAddIface, exIface, exAdded)
			r.mustKN(sbID, OpAddRoute, exRoute, exRouteOK)
			before := r.dp.Sandbox(sbID)
			if step == "store" {
				r.st.failPut = true
			} else {
				r.setFail(step, errors.New("injected"))
			}
			in := `{"name":"eth-test","mtu":1500}`
			out, msg := r.kn(sbID, OpDelIface, in)
			if out != `{"name":"eth-test","mtu":1500}`+"\n" || !strings.Contains(msg, "injected") && !strings.Contains(msg, "disk on fire") {
				t.Fatalf("stdout %q, error %q", out, msg)
			}
			r.setFail(step, nil)
			r.st.mu.Lock()
			r.st.failPut = false
			r.st.mu.Unlock()
			if d := cmp.Diff(before, r.dp.Sandbox(sbID), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
				t.Errorf("dataplane not restored (-before +after):\n%s", d)
			}
			if _, ok := r.taps.Links(ctlNS)["tap-test"]; !ok {
				t.Error("tap not restored")
			}
			if p := r.hp.Plugged(sbID); len(p) != 1 {
				t.Errorf("VM device not restored: %v", p)
			}
			r.mustKN(sbID, OpListIfaces, "", exList)
			r.mustKN(sbID, OpListRoutes, "", exRouteOK)
		})
	}
}

func TestDelIfaceByMAC(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	out, msg := r.kn(sbID, OpDelIface, `{}`)
	if out != "{}\n" || msg != "name is required" {
		t.Errorf("empty del-iface: stdout %q, error %q", out, msg)
	}
	r.mustKN(sbID, OpDelIface, `{"hwAddr":"02:42:20:6F:A3:69"}`, "null\n")
	r.mustKN(sbID, OpListIfaces, "", "null\n")
}

func TestUpdateIface(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "/run/qmp.sock")
	r.mustKN(sbID, OpAddIface, exIface, exAdded)
	for _, in := range []string{
		`{"name":"eth-test","device":"x"}`, `{"name":"eth-test","mtu":1400}`, `{"name":"eth-test","hwAddr":"02:00:00:00:00:01"}`,
		`{"name":"eth-test","linkType":"tap"}`, `{"name":"eth-test","queues":2}`, `{"name":"eth-test","vhostUserSocket":"/a"}`,
	} {
		out, msg := r.kn(sbID, OpUpdateIface, in)
		if out != "null\n" || msg != "device,mtu,hwAddr,linkType,queues and vhostUserSocket should be 0 or empty" {
			t.Errorf("update-iface %s: stdout %q, error %q", in, out, msg)
		}
	}
	out, msg := r.kn(sbID, OpUpdateIface, `{"name":"eth-nope"}`)
	if out != "null\n" || msg != "not found: no NIC named eth-nope in the sandbox" {
		t.Errorf("unknown NIC: stdout %q, error %q", out, msg)
	}
	r.mustKN(sbID, OpUpdateIface, `{"name":"eth-test","IPAddresses":[{"Address":"10.1.2.3","Mask":"24"}]}`,
		`{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"10.1.2.3","Mask":"24"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01","queues":5}`+"\n")
	if got := r.dp.Sandbox(sbID).Endpoints[0].Addr; got != netip.MustParsePrefix("10.1.2.3/24") {
		t.Errorf("dataplane address %v", got)
	}
	r.setFail("UpdateEndpoint", errors.New("injected"))
	out, _ = r.kn(sbID, OpUpdateIface, `{"name":"eth-test"}`)
	if out != "null\n" {
		t.Errorf("failed update: stdout %q", out)
	}
	r.setFail("UpdateEndpoint", nil)
	r.mustKN(sbID, OpListIfaces, "", `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["10.1.2.3/24"],"mtu":1500}]`+"\n")
}

func TestRoutes(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	for _, tc := range []struct{ in, want string }{
		{`{"device":"eth-test"}`, "route dest is required"},
		{`{"dest":"10.0.0.0/8"}`, "route device is required"},
		{`{"dest":"default","device":"eth-test"}`, "a default route needs a gateway"},
		{`{"dest":"0.0.0.0/0","device":"eth-test"}`, "a default route needs a gateway"},
		{`{"dest":"10.0.0.0/33","device":"eth-test"}`, `route dest "10.0.0.0/33" is not "default", an IP address or a prefix`},
		{`{"dest":"10.0.0.1/8","device":"eth-test"}`, `route dest "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)`},
		{`{"dest":"10.0.0.0/8","device":"eth-nope"}`, "route device eth-nope is not a NIC of the sandbox (nor lo)"},
		{`{"dest":"10.0.0.0/8","device":"eth-test","gateway":"nope"}`, `route gateway "nope" is not a valid IP address`},
	} {
		out, msg := r.kn(sbID, OpAddRoute, tc.in)
		if out != "null\n" || msg != tc.want {
			t.Errorf("add-route %s: stdout %q, error %q, want %q", tc.in, out, msg, tc.want)
		}
	}
	r.mustKN(sbID, OpAddRoute, `{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}`, `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}]`+"\n")
	r.mustKN(sbID, OpAddRoute, `{"dest":"10.9.9.9","device":"eth-test"}`, `[{"dest":"10.9.9.9","device":"eth-test"}]`+"\n")
	r.mustKN(sbID, OpAddRoute, `{"dest":"127.0.0.0/8","device":"lo"}`, `[{"dest":"127.0.0.0/8","device":"lo"}]`+"\n")
	r.mustKN(sbID, OpAddRoute, `{"dest":"fd00::/64","device":"eth-test"}`, `[{"dest":"fd00::/64","device":"eth-test"}]`+"\n")
	_, msg := r.kn(sbID, OpAddRoute, `{"dest":"10.9.9.9/32","device":"lo"}`)
	if want := "already exists: a route to 10.9.9.9/32 (device eth-test) already exists"; msg != want {
		t.Errorf("duplicate: %q, want %q", msg, want)
	}
	r.mustKN(sbID, OpListRoutes, "", `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"},{"dest":"10.9.9.9/32","gateway":"","device":"eth-test"},{"dest":"127.0.0.0/8","gateway":"","device":"lo"}]`+"\n")
	// list-routes keeps openEuler's output (IPv4 only); --all adds the IPv6 routes.
	r.mustKN(sbID, OpListRoutesAll, "", `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"},{"dest":"10.9.9.9/32","gateway":"","device":"eth-test"},{"dest":"127.0.0.0/8","gateway":"","device":"lo"},{"dest":"fd00::/64","gateway":"","device":"eth-test"}]`+"\n")
	// Routes on NICs, of both families, reach the dataplane.
	if got := len(r.dp.Sandbox(sbID).Routes); got != 3 {
		t.Errorf("dataplane holds %d routes, want 3", got)
	}
	// Fuzzy delete: a gateway that does not match removes nothing; dest alone removes the route.
	out, msg := r.kn(sbID, OpDelRoute, `{"dest":"177.17.0.0/24","gateway":"177.17.25.2"}`)
	if out != "null\n" || msg != "not found: no route matches dest 177.17.0.0/24" {
		t.Errorf("del-route no match: stdout %q, error %q", out, msg)
	}
	r.mustKN(sbID, OpDelRoute, `{"dest":"177.17.0.0/24"}`, `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}]`+"\n")
	r.mustKN(sbID, OpDelRoute, `{"dest":"10.9.9.9/32","device":"eth-test"}`, `[{"dest":"10.9.9.9","device":"eth-test"}]`+"\n")
	out, msg = r.kn(sbID, OpDelRoute, `{"device":"lo"}`)
	if out != "null\n" || msg != "route dest is required" {
		t.Errorf("del-route without dest: stdout %q, error %q", out, msg)
	}
	// update-routes replaces everything, atomically: one bad route changes nothing.
	out, msg = r.kn(sbID, OpUpdateRoutes, `[{"dest":"10.0.0.0/8","device":"eth-test"},{"dest":"default","device":"eth-test"}]`)
	if out != "null\n" || msg != "a default route needs a gateway" {
		t.Errorf("update-routes bad: stdout %q, error %q", out, msg)
	}
	out, msg = r.kn(sbID, OpUpdateRoutes, `[{"dest":"10.0.0.0/8","device":"eth-test"},{"dest":"10.0.0.0/8","device":"lo"}]`)
	if out != "null\n" || msg != "already exists: two routes to 10.0.0.0/8 (devices eth-test and lo)" {
		t.Errorf("update-routes duplicate: stdout %q, error %q", out, msg)
	}
	r.mustKN(sbID, OpListRoutes, "", `[{"dest":"127.0.0.0/8","gateway":"","device":"lo"}]`+"\n")
	r.setFail("SetRoutes", errors.New("injected"))
	out, _ = r.kn(sbID, OpUpdateRoutes, `[{"dest":"10.0.0.0/8","device":"eth-test"}]`)
	if out != "null\n" {
		t.Errorf("update-routes with failing dataplane: %q", out)
	}
	r.setFail("SetRoutes", nil)
	r.st.failPut = true
	out, _ = r.kn(sbID, OpUpdateRoutes, `[{"dest":"10.0.0.0/8","device":"eth-test"}]`)
	if out != "null\n" {
		t.Errorf("update-routes with failing store: %q", out)
	}
	r.st.failPut = false
	if got := r.dp.Sandbox(sbID).Routes; len(got) != 1 || got[0].Dest != netip.MustParsePrefix("fd00::/64") {
		t.Errorf("dataplane routes not rolled back: %v", got)
	}
	r.mustKN(sbID, OpUpdateRoutes, `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"},{"dest":"10.0.0.0/8","device":"eth-test"}]`,
		`[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"},{"dest":"10.0.0.0/8","device":"eth-test"}]`+"\n")
	r.mustKN(sbID, OpUpdateRoutes, `[]`, "[]\n")
	r.mustKN(sbID, OpListRoutes, "", "null\n")
	out, msg = r.kn(sbID, OpUpdateRoutes, `null`)
	if out != "null\n" || msg != "update-routes needs a JSON array of routes" {
		t.Errorf("update-routes null: stdout %q, error %q", out, msg)
	}
}

func TestSandboxes(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	f := false
	for _, tc := range []struct {
		spec control.SandboxSpec
		want string
	}{
		{control.SandboxSpec{ID: "", NetNS: ctlNS}, `add sandbox: invalid request: sandbox id "" must be 1..128 letters, digits, '_', '.', '-' starting with a letter or digit`},
		{control.SandboxSpec{ID: "../x", NetNS: ctlNS}, `add sandbox: invalid request: sandbox id "../x" must be 1..128 letters, digits, '_', '.', '-' starting with a letter or digit`},
		{control.SandboxSpec{ID: "a"}, "add sandbox: invalid request: netns path is required"},
		{control.SandboxSpec{ID: "a", NetNS: "/run/netns/gone"}, "add sandbox: invalid request: netns /run/netns/gone: no such file or directory"},
		{control.SandboxSpec{ID: "a", NetNS: ctlNS, Mode: "dpdk"}, `add sandbox: invalid request: mode "dpdk" is not one of tc, xdp, tcfilter, macvtap, macvtap-bpf, direct`},
		{control.SandboxSpec{ID: "a", NetNS: ctlNS, QMP: "qmp.sock"}, `add sandbox: invalid request: qmp socket path "qmp.sock" is not absolute`},
	} {
		if _, err := r.c.AddSandbox(ctx, tc.spec); err == nil || err.Error() != tc.want {
			t.Errorf("AddSandbox(%+v) = %v, want %q", tc.spec, err, tc.want)
		}
	}
	sb, err := r.c.AddSandbox(ctx, control.SandboxSpec{ID: "a", NetNS: ctlNS, Mode: control.ModeXDP, AntiSpoof: &f})
	if err != nil {
		t.Fatal(err)
	}
	want := control.Sandbox{ID: "a", NetNS: ctlNS, Uplink: "eth0", Mode: control.ModeXDP, AntiSpoof: false, StrictEgress: true}
	if d := cmp.Diff(want, sb); d != "" {
		t.Errorf("sandbox (-want +got):\n%s", d)
	}
	if _, err := r.c.AddSandbox(ctx, control.SandboxSpec{ID: "a", NetNS: ctlNS}); !errors.Is(err, control.ErrExists) {
		t.Errorf("duplicate AddSandbox = %v", err)
	}
	// A dataplane failure registers nothing; a store failure undoes the dataplane.
	r.setFail("EnsureSandbox", errors.New("injected"))
	if _, err := r.c.AddSandbox(ctx, control.SandboxSpec{ID: "b", NetNS: ctlNS}); err == nil {
		t.Error("AddSandbox with failing dataplane succeeded")
	}
	r.setFail("EnsureSandbox", nil)
	r.st.failPut = true
	if _, err := r.c.AddSandbox(ctx, control.SandboxSpec{ID: "b", NetNS: ctlNS}); err == nil {
		t.Error("AddSandbox with failing store succeeded")
	}
	r.st.failPut = false
	if r.dp.Sandbox("b") != nil {
		t.Error("dataplane of failed sandbox left behind")
	}
	if d := cmp.Diff([]control.Sandbox{want}, r.c.Sandboxes()); d != "" {
		t.Errorf("Sandboxes (-want +got):\n%s", d)
	}

	// Deleting a sandbox removes its endpoints, its taps, its dataplane and its state, and
	// frees its tap names for other sandboxes.
	r.mustKN("a", OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	r.taps.AddLink(ctlNS, "tap-keep", true)
	r.mustKN("a", OpAddIface, `{"device":"tap-keep","name":"eth2","hwAddr":"02:00:00:00:00:02","mtu":1500}`, `{"device":"tap-keep","name":"eth2","mtu":1500,"hwAddr":"02:00:00:00:00:02"}`+"\n")
	r.setFail("RemoveSandbox", errors.New("injected"))
	if err := r.c.DelSandbox(ctx, "a"); err == nil {
		t.Error("DelSandbox with failing dataplane succeeded")
	}
	r.setFail("RemoveSandbox", nil)
	if err := r.c.DelSandbox(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if r.dp.Sandbox("a") != nil {
		t.Error("dataplane left behind")
	}
	links := r.taps.Links(ctlNS)
	if _, ok := links["tap-test"]; ok {
		t.Error("tap created by kata-dp left behind")
	}
	if _, ok := links["tap-keep"]; !ok {
		t.Error("tap not created by kata-dp deleted")
	}
	if got := r.c.Sandboxes(); len(got) != 0 {
		t.Errorf("sandboxes left: %v", got)
	}
	r.restart()
	if got := r.c.Sandboxes(); len(got) != 0 {
		t.Errorf("sandboxes after restart: %v", got)
	}
	if err := r.c.DelSandbox(ctx, "a"); !errors.Is(err, control.ErrNoSuchSandbox) {
		t.Errorf("DelSandbox(missing) = %v", err)
	}
}

// reconciling wraps MemDataplane with a Reconciler.
type reconciling struct {
	*controltest.MemDataplane
	got map[string]int
}

func (r *reconciling) Reconcile(_ context.Context, sb control.Sandbox, eps []control.Endpoint, routes []control.Route) error {
	r.got[sb.ID] = len(eps)*100 + len(routes)
	return nil
}

func TestRestartReconciles(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	r.mustKN(sbID, OpAddRoute, exRoute, exRouteOK)
	rec := &reconciling{MemDataplane: r.dp, got: map[string]int{}}
	c, err := control.New(context.Background(), control.Config{Dataplane: rec, Taps: r.taps, Store: r.st, CheckNetNS: func(string) error { return nil },
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]int{sbID: 101}, rec.got); d != "" {
		t.Errorf("Reconcile calls (-want +got):\n%s", d)
	}
	// The device stays reserved after a restart.
	c.AddSandbox(context.Background(), control.SandboxSpec{ID: "other", NetNS: ctlNS})
	_, err = KataNetwork(context.Background(), c, "other", OpAddIface, []byte(exIface))
	if err == nil || !strings.Contains(err.Error(), "device tap-test is already used by sandbox "+sbID) {
		t.Errorf("device reuse after restart: %v", err)
	}
}

func TestStatus(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	st := r.c.Status(context.Background())
	if len(st) != 1 || len(st[0].Endpoints) != 1 || st[0].Endpoints[0].Addr != "172.16.0.3/16" || st[0].Endpoints[0].Stats == nil {
		t.Errorf("status: %+v", st)
	}
	if eps := r.c.Endpoints(); len(eps) != 1 || eps[0].NIC != "eth-test" {
		t.Errorf("endpoints: %+v", eps)
	}
}

// TestConcurrent runs many operations on one sandbox at once: the final state is consistent.
func TestConcurrent(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "/run/qmp.sock")
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := fmt.Sprintf(`{"device":"tap%d","name":"eth%d","hwAddr":"02:00:00:00:01:%02x","mtu":1500,"IPAddresses":[{"address":"10.0.%d.1","mask":"24"}]}`, i, i, i, i)
			if _, msg := r.kn(sbID[:4], OpAddIface, in); msg != "" {
				t.Errorf("add %d: %s", i, msg)
				return
			}
			if _, msg := r.kn(sbID[:4], OpAddRoute, fmt.Sprintf(`{"dest":"192.168.%d.0/24","device":"eth%d"}`, i, i)); msg != "" {
				t.Errorf("route %d: %s", i, msg)
			}
			if i%2 == 0 {
				if _, msg := r.kn(sbID[:4], OpDelIface, fmt.Sprintf(`{"name":"eth%d"}`, i)); msg != "" {
					t.Errorf("del %d: %s", i, msg)
				}
			}
		}()
	}
	wg.Wait()
	ifaces, _ := r.c.Ifaces(context.Background(), sbID)
	routes, _ := r.c.Routes(context.Background(), sbID)
	dp := r.dp.Sandbox(sbID)
	if len(ifaces) != 20 || len(routes) != 20 || len(dp.Endpoints) != 20 || len(dp.Routes) != 20 || len(r.hp.Plugged(sbID)) != 20 {
		t.Errorf("after concurrent ops: %d ifaces, %d routes, %d endpoints, %d dataplane routes, %d plugged",
			len(ifaces), len(routes), len(dp.Endpoints), len(dp.Routes), len(r.hp.Plugged(sbID)))
	}
}

func TestDelSandboxNetNSGone(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	r.mustKN(sbID, OpAddIface, exIface, strings.Replace(exAdded, `,"pciAddr":"02.0/01"`, "", 1))
	r.mu.Lock()
	delete(r.netns, ctlNS)
	r.mu.Unlock()
	r.setFail("DeleteTap", errors.New("open netns: no such file or directory"))
	r.setFail("DelEndpoint", errors.New("open netns: no such file or directory"))
	if err := r.c.DelSandbox(context.Background(), sbID); err != nil {
		t.Fatalf("DelSandbox with the netns gone: %v", err)
	}
	if r.dp.Sandbox(sbID) != nil {
		t.Error("dataplane not removed")
	}
	if got := r.c.Sandboxes(); len(got) != 0 {
		t.Errorf("sandboxes left: %v", got)
	}
}
