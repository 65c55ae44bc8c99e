package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/internal/faultinject"
)

// TestMain turns the test binary into the real kata-dp command when KDP_TEST_MAIN is set, so
// tests run the CLI as separate processes exactly as scripts do.
func TestMain(m *testing.M) {
	if os.Getenv("KDP_TEST_MAIN") == "1" {
		if v := os.Getenv("KDP_TEST_VERSION"); v != "" {
			version = v // what -ldflags -X sets in a release build (the upgrade test)
		}
		if step := os.Getenv("KDP_TEST_KILL_AT"); step != "" {
			// Only this test binary reads it: the agent itself has no way to enable it.
			faultinject.Hook = func(s string) {
				if s == step {
					syscall.Kill(os.Getpid(), syscall.SIGKILL)
					select {} // the signal is on its way
				}
			}
		}
		main()
		return
	}
	code := m.Run()
	if cniToolsDir != "" {
		os.RemoveAll(cniToolsDir) // installed once per test binary by cniTools
	}
	os.Exit(code)
}

// testAgent is an agent running in-process on a temporary socket and state directory, with a
// fake dataplane and hot-plugger and real taps in a real test netns.
type testAgent struct {
	sock, state string
	ns          *topo.NetNS
	dp          *controltest.MemDataplane
	hp          *controltest.MemHotplugger
	stderr      *syncBuffer
	stop        func()
}

type syncBuffer = controltest.SyncBuffer

func startAgent(t *testing.T) *testAgent {
	t.Helper()
	ns := topotest.MustNetNS(t, "kdptc")
	if _, err := ns.Exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "kdptc-peer"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	a := &testAgent{sock: filepath.Join(dir, "run", "kata-dp.sock"), state: filepath.Join(dir, "state"), ns: ns,
		dp: controltest.NewMemDataplane(), hp: controltest.NewMemHotplugger(), stderr: &syncBuffer{}}
	a.restart(t)
	return a
}

// restart starts the agent (again) over the same state.
func (a *testAgent) restart(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	e := &env{ctx: ctx, stdin: strings.NewReader(""), stdout: io.Discard, stderr: a.stderr, getenv: func(string) string { return "" },
		args: []string{"agent", "--socket", a.sock, "--state-dir", a.state, "--log-level", "warn"},
		newDeps: func(context.Context, agentOptions) (agentDeps, error) {
			return agentDeps{Dataplane: a.dp, Hotplug: a.hp, Taps: control.NetdevTaps{}}, nil
		},
		ready: func() { close(ready) },
	}
	go func() { done <- run(e) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("agent did not start: %v\n%s", err, a.stderr)
	}
	stopped := false
	a.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	}
	t.Cleanup(a.stop)
}

// result of one CLI run.
type result struct {
	stdout, stderr string
	code           int
}

// cli runs the kata-dp binary (this test binary in main mode) against the agent.
func (a *testAgent) cli(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1", "KATA_DP_SOCKET="+a.sock)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("run kata-dp %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return result{out.String(), errb.String(), code}
}

func (a *testAgent) check(t *testing.T, stdin string, args []string, want result) {
	t.Helper()
	got := a.cli(t, stdin, args...)
	if d := cmp.Diff(want, got, cmp.AllowUnexported(result{})); d != "" {
		t.Errorf("kata-dp %s (-want +got):\n%s", strings.Join(args, " "), d)
	}
}

const (
	sandboxID = "6ec7a98f3b2c41d0a6f1e9b7c5d3a201"
	testIface = `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],
 "hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}
`
)

// TestSpecExamples runs every example of spec/kata-network.md, byte for byte, through the CLI.
func TestSpecExamples(t *testing.T) {
	a := startAgent(t)
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", a.ns.Path(), "--qmp", "/run/kdptc-fake-qmp.sock"}, result{stdout: sandboxID + "\n"})

	a.check(t, testIface, []string{"kata-network", "add-iface", "6ec7a98", "-"}, result{
		stdout: `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01","queues":5}` + "\n"})
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{
		stdout: `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["172.16.0.3/16"],"mtu":1500}]` + "\n"})
	a.check(t, `{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}`+"\n", []string{"kata-network", "add-route", "6ec7a98", "-"}, result{
		stdout: `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"})

	// The tap is real: created in the sandbox netns, multi-queue, joined to eth0.
	li, err := a.ns.Link("tap-test")
	if err != nil {
		t.Fatalf("tap not created: %v", err)
	}
	if li.Type != "tuntap" || li.MTU != 1500 {
		t.Errorf("tap: %+v", li)
	}
	if ep := a.dp.Sandbox(sandboxID).Endpoints[0]; ep.Uplink != "eth0" || ep.Queues != 5 || ep.Addr.String() != "172.16.0.3/16" {
		t.Errorf("endpoint: %+v", ep)
	}

	// The user guide's other outputs.
	routeFile := filepath.Join(t.TempDir(), "route.json")
	os.WriteFile(routeFile, []byte(`{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}`), 0o600)
	a.check(t, "", []string{"kata-network", "add-route", "6ec7a98", routeFile}, result{
		stdout: `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}]` + "\n"})
	a.check(t, "", []string{"kata-network", "list-routes", "6ec7a98"}, result{
		stdout: `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"},{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}]` + "\n"})
	a.check(t, "", []string{"kata-network", "del-route", "6ec7a98", routeFile}, result{
		stdout: `[{"dest":"177.17.0.0/24","gateway":"177.17.25.1","device":"eth-test"}]` + "\n"})
	a.check(t, `{"dest":"10.0.0.0/8"}`, []string{"kata-network", "add-route", "6ec7a98", "-"}, result{
		stdout: "null\n", stderr: "route device is required\n", code: 1})

	// del-iface: a failure echoes the interface given, success prints null.
	a.hp.Fail = func(method, _ string) error {
		if method == "Unplug" {
			return errors.New("device_del timed out")
		}
		return nil
	}
	delIn := `{"device":"tapname_fun_012","name":"eth-test","IPAddresses":[{"address":"177.17.0.1","mask":"8"}],"mtu":1500,"hwAddr":"02:42:20:6e:a2:59","linkType":"tap"}`
	a.check(t, delIn, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{
		stdout: `{"device":"tapname_fun_012","name":"eth-test","IPAddresses":[{"Family":0,"Address":"177.17.0.1","Mask":"8"}],"mtu":1500,"hwAddr":"02:42:20:6e:a2:59","linkType":"tap"}` + "\n",
		stderr: "hot-unplug eth-test: device_del timed out\n", code: 1})
	a.hp.Fail = nil
	a.check(t, testIface, []string{"kata-network", "del-iface", "6ec7a98", "-"}, result{stdout: "null\n"})
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec7a98"}, result{stdout: "null\n"})
	if _, err := a.ns.Link("tap-test"); err == nil {
		t.Error("tap created by kata-dp survived del-iface")
	}
}

// TestErrors checks the exit codes, stderr texts and null conventions of failures.
func TestErrors(t *testing.T) {
	a := startAgent(t)
	a.check(t, "", []string{"sandbox", "add", "6ec7a98aaa", "--netns", a.ns.Path()}, result{stdout: "6ec7a98aaa\n"})
	a.check(t, "", []string{"sandbox", "add", "6ec7a98bbb", "--netns", a.ns.Path(), "--mode", "xdp", "--anti-spoof=false"}, result{stdout: "6ec7a98bbb\n"})
	big := filepath.Join(t.TempDir(), "big.json")
	os.WriteFile(big, bytes.Repeat([]byte(" "), 1<<20+1), 0o600)
	for _, tc := range []struct {
		stdin string
		args  []string
		want  result
	}{
		{"", []string{"kata-network", "list-ifaces", "zzz"}, result{"null\n", "no such container ID (zzz)\n", 1}},
		{"", []string{"kata-network", "list-routes", "6ec7a98"}, result{"null\n", "multiple containers found (6ec7a98)\n", 1}},
		{testIface, []string{"kata-network", "add-iface", "zzz", "-"}, result{"null\n", "no such container ID (zzz)\n", 1}},
		{"", []string{"kata-network", "add-iface", "zzz", "/nonexistent.json"}, result{"null\n", "no such container ID (zzz)\n", 1}},
		{"", []string{"kata-network", "add-iface", "6ec7a98a", "/nonexistent.json"}, result{"", "open network file: /nonexistent.json: no such file or directory\n", 1}},
		{"", []string{"kata-network", "add-iface", "6ec7a98a", big}, result{"", "network file too big\n", 1}},
		{strings.Repeat(" ", 1<<20+1), []string{"kata-network", "add-route", "6ec7a98a", "-"}, result{"", "network file too big\n", 1}},
		{"{", []string{"kata-network", "add-iface", "6ec7a98a", "-"}, result{"", "decode network file: unexpected EOF\n", 1}},
		{"", []string{"kata-network", "add-iface", "6ec7a98a", "-"}, result{"", "decode network file: EOF\n", 1}},
		{`{"name":"eth-test","mtu":1500}`, []string{"kata-network", "update-iface", "6ec7a98a", "-"},
			result{"null\n", "device,mtu,hwAddr,linkType,queues and vhostUserSocket should be 0 or empty\n", 1}},
		{`{"device":"tap1","name":"eth1","hwAddr":"02:00:00:00:00:01","mtu":45}`, []string{"kata-network", "add-iface", "6ec7a98a", "-"},
			result{"null\n", "mtu 45 is out of range (46..9600)\n", 1}},
		{`{"device":"eth0","name":"eth1","hwAddr":"02:00:00:00:00:01","mtu":1500}`, []string{"kata-network", "add-iface", "6ec7a98a", "-"},
			result{"null\n", "tap eth0: not a tap device: eth0 is a veth link\n", 1}},
		{`{"name":"nope"}`, []string{"kata-network", "del-iface", "6ec7a98a", "-"}, result{"null\n", "", 0}},
		{"", []string{"kata-network", "list-ifaces", "6ec7a98a"}, result{"null\n", "", 0}},
		{"", []string{"kata-network", "list-routes", "6ec7a98a"}, result{"null\n", "", 0}},
		{"", []string{"kata-network", "frob", "6ec7a98a"}, result{"", kataNetworkUse + "kata-network: unknown command \"frob\"\n", 1}},
		{"", []string{"kata-network", "list-ifaces"}, result{"", "missing container ID (usage: kata-dp kata-network list-ifaces <container-id>)\n", 1}},
		{"", []string{"kata-network", "add-iface", "6ec7a98a"}, result{"", "missing network file (usage: kata-dp kata-network add-iface <container-id> <file|->)\n", 1}},
		{"", []string{"kata-network"}, result{kataNetworkUse, "", 0}},
		{"", []string{"kata-network", "--help"}, result{kataNetworkUse, "", 0}},
		{"", []string{"kata-network", "list-ifaces", "6ec7a98a", "--socket", "/nonexistent/kdp.sock"},
			result{"null\n", "kata-dp agent unreachable at /nonexistent/kdp.sock: dial unix /nonexistent/kdp.sock: connect: no such file or directory\n", 1}},
		{"", []string{"sandbox", "add", "x1", "--netns", "/nonexistent"}, result{"", "add sandbox: invalid request: netns /nonexistent: statfs: no such file or directory\n", 1}},
		{"", []string{"sandbox", "del", "zzz"}, result{"", "del sandbox: no such container ID (zzz)\n", 1}},
	} {
		got := a.cli(t, tc.stdin, tc.args...)
		if d := cmp.Diff(tc.want, got, cmp.AllowUnexported(result{})); d != "" {
			t.Errorf("kata-dp %s (-want +got):\n%s", strings.Join(tc.args, " "), d)
		}
	}
	out := a.cli(t, "", "sandbox", "list")
	want := "ID          NETNS" // header, then one line per sandbox
	if !strings.HasPrefix(out.stdout, want) || !strings.Contains(out.stdout, "6ec7a98bbb  "+a.ns.Path()+"  -    eth0    xdp   off         on") {
		t.Errorf("sandbox list:\n%s", out.stdout)
	}
	// Delete takes the exact id: a unique prefix deletes nothing.
	a.check(t, "", []string{"sandbox", "del", "6ec7a98a"}, result{"", "del sandbox: no such container ID (6ec7a98a)\n", 1})
	a.check(t, "", []string{"sandbox", "del", "6ec7a98aaa"}, result{})
	a.check(t, "", []string{"sandbox", "del", "6ec7a98bbb"}, result{})
	a.check(t, "", []string{"sandbox", "list"}, result{stdout: "ID  NETNS  QMP  UPLINK  MODE  ANTI-SPOOF  STRICT-EGRESS  VHOST  NETMON\n"})
}

// TestStatusAndRestart: status shows endpoints; a restarted agent shows the same state and
// re-creates nothing.
func TestStatusAndRestart(t *testing.T) {
	a := startAgent(t)
	a.cli(t, "", "sandbox", "add", sandboxID, "--netns", a.ns.Path())
	a.check(t, testIface, []string{"kata-network", "add-iface", "6ec", "-"}, result{
		stdout: `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","queues":5}` + "\n"})
	st := a.cli(t, "", "status")
	for _, want := range []string{sandboxID + "  tc    eth0    on", "eth-test  tap-test  0     tc    eth0    02:42:20:6f:a3:69  172.16.0.3/16  -    0/0"} {
		if !strings.Contains(st.stdout, want) {
			t.Errorf("status lacks %q:\n%s", want, st.stdout)
		}
	}
	js := a.cli(t, "", "status", "-o", "json")
	if js.code != 0 || !strings.Contains(js.stdout, `"nic": "eth-test"`) {
		t.Errorf("status -o json:\n%+v", js)
	}
	li, _ := a.ns.Link("tap-test")
	a.stop()
	calls := len(a.dp.Calls())
	a.restart(t)
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec"}, result{stdout: `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["172.16.0.3/16"],"mtu":1500}]` + "\n"})
	li2, err := a.ns.Link("tap-test")
	if err != nil || li2.Index != li.Index {
		t.Errorf("tap re-created across restart: %+v -> %+v (%v)", li, li2, err)
	}
	if got := a.dp.Calls()[calls:]; !cmp.Equal(got, []string{"EnsureSandbox " + sandboxID}) {
		t.Errorf("dataplane calls on restart: %v", got)
	}
	v := a.cli(t, "", "version")
	if !strings.Contains(v.stdout, "kata-dp dev\nagent: dev\n") {
		t.Errorf("version:\n%s", v.stdout)
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
	if _, err := a.ns.Link("tap-test"); err == nil {
		t.Error("tap survived sandbox del")
	}
}

// TestConcurrentCLI runs 50 clients at once, each adding a NIC and a route and half of them
// deleting their NIC again, as separate processes against one agent.
func TestConcurrentCLI(t *testing.T) {
	a := startAgent(t)
	a.cli(t, "", "sandbox", "add", sandboxID, "--netns", a.ns.Path(), "--qmp", "/run/kdptc-fake-qmp.sock")
	const n = 50
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := ifaceJSON(i)
			if r := a.cli(t, in, "kata-network", "add-iface", "6ec7", "-"); r.code != 0 {
				t.Errorf("add-iface %d: %+v", i, r)
				return
			}
			if r := a.cli(t, routeJSON(i), "kata-network", "add-route", "6ec7", "-"); r.code != 0 {
				t.Errorf("add-route %d: %+v", i, r)
			}
			if i%2 == 0 {
				if r := a.cli(t, in, "kata-network", "del-iface", "6ec7", "-"); r.code != 0 || r.stdout != "null\n" {
					t.Errorf("del-iface %d: %+v", i, r)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d clients in %v", n, time.Since(start))
	check := func(when string) {
		var wantIfaces, wantRoutes []string
		for i := 1; i < n; i += 2 {
			wantIfaces = append(wantIfaces, `{"name":"eth`+itoa(i)+`","mac":"02:00:00:00:01:`+hex2(i)+`","ip":["10.1.`+itoa(i)+`.2/24"],"mtu":1500}`)
			wantRoutes = append(wantRoutes, `{"dest":"192.168.`+itoa(i)+`.0/24","gateway":"10.1.`+itoa(i)+`.1","device":"eth`+itoa(i)+`"}`)
		}
		got := a.cli(t, "", "kata-network", "list-ifaces", "6ec7").stdout
		if d := cmp.Diff(sortedItems(strings.Join(wantIfaces, ",")), sortedItems(got)); d != "" {
			t.Errorf("%s: list-ifaces (-want +got):\n%s", when, d)
		}
		got = a.cli(t, "", "kata-network", "list-routes", "6ec7").stdout
		if d := cmp.Diff(sortedItems(strings.Join(wantRoutes, ",")), sortedItems(got)); d != "" {
			t.Errorf("%s: list-routes (-want +got):\n%s", when, d)
		}
		sb := a.dp.Sandbox(sandboxID)
		if len(sb.Endpoints) != n/2 || len(sb.Routes) != n/2 || len(a.hp.Plugged(sandboxID)) != n/2 {
			t.Errorf("%s: dataplane holds %d endpoints and %d routes, VM %d NICs; want %d each", when, len(sb.Endpoints), len(sb.Routes), len(a.hp.Plugged(sandboxID)), n/2)
		}
		slots := map[uint32]bool{}
		for _, ep := range sb.Endpoints {
			if slots[ep.Slot] {
				t.Errorf("slot %d used twice", ep.Slot)
			}
			slots[ep.Slot] = true
		}
		for i := range n {
			_, err := a.ns.Link("tap" + itoa(i))
			if (err == nil) != (i%2 == 1) {
				t.Errorf("%s: tap%d exists=%v", when, i, err == nil)
			}
		}
	}
	check("after the run")
	a.stop()
	a.restart(t)
	check("after a restart")
}

func itoa(i int) string { return strconv.Itoa(i) }

func hex2(i int) string { return fmt.Sprintf("%02x", i) }

func ifaceJSON(i int) string {
	return `{"device":"tap` + itoa(i) + `","name":"eth` + itoa(i) + `","hwAddr":"02:00:00:00:01:` + hex2(i) +
		`","mtu":1500,"IPAddresses":[{"address":"10.1.` + itoa(i) + `.2","mask":"24"}]}`
}

func routeJSON(i int) string {
	return `{"dest":"192.168.` + itoa(i) + `.0/24","gateway":"10.1.` + itoa(i) + `.1","device":"eth` + itoa(i) + `"}`
}

// sortedItems splits a JSON array of flat objects into its sorted items.
func sortedItems(s string) []string {
	s = strings.TrimSpace(s)
	s = strings.TrimPrefix(strings.TrimSuffix(s, "]"), "[")
	items := strings.Split(strings.ReplaceAll(s, "},{", "}\n{"), "\n")
	slices.Sort(items)
	return items
}
