package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// runIn runs a subcommand in-process against the test agent.
func (a *testAgent) runIn(stdin string, args ...string) result {
	var out, errb bytes.Buffer
	e := &env{ctx: context.Background(), stdin: strings.NewReader(stdin), stdout: &out, stderr: &errb, args: args,
		getenv: func(k string) string {
			if k == "KATA_DP_SOCKET" {
				return a.sock
			}
			return ""
		}}
	code := e.main()
	return result{out.String(), errb.String(), code}
}

func TestInProcess(t *testing.T) {
	a := startAgent(t)
	for _, tc := range []struct {
		stdin string
		args  []string
		want  result
	}{
		{"", []string{"sandbox", "add", sandboxID, "--netns", a.ns.Path(), "--uplink", "eth9", "--strict-egress=false"}, result{stdout: sandboxID + "\n"}},
		{testIface, []string{"kata-network", "add-iface", "6ec7a98", "-"}, result{stdout: `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","queues":5}` + "\n"}},
		{`{"name":"eth-test","IPAddresses":[{"Address":"172.16.0.4","Mask":"24"}]}`, []string{"kata-network", "update-iface", "6ec7a98", "-"},
			result{stdout: `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.4","Mask":"24"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","queues":5}` + "\n"}},
		{`[{"dest":"10.0.0.0/8","device":"eth-test"},{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]`, []string{"kata-network", "update-routes", "6ec7a98", "-"},
			result{stdout: `[{"dest":"10.0.0.0/8","device":"eth-test"},{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"}},
		{"", []string{"kata-network", "list-routes", "6ec7a98"}, result{stdout: `[{"dest":"10.0.0.0/8","gateway":"","device":"eth-test"},{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"}},
		{"", []string{"frobnicate"}, result{stderr: "unknown command \"frobnicate\"\n", code: 1}},
	} {
		got := a.runIn(tc.stdin, tc.args...)
		if tc.args[0] == "frobnicate" {
			got.stderr = got.stderr[strings.LastIndex(strings.TrimSuffix(got.stderr, "\n"), "\n")+1:]
		}
		if d := cmp.Diff(tc.want, got, cmp.AllowUnexported(result{})); d != "" {
			t.Errorf("kata-dp %s (-want +got):\n%s", strings.Join(tc.args, " "), d)
		}
	}
	// The sandbox's uplink eth9 does not exist: the NIC is not joined; its options reach the
	// dataplane.
	ep := a.dp.Sandbox(sandboxID).Endpoints[0]
	if ep.Uplink != "" || ep.StrictEgress || !ep.AntiSpoof || ep.Addr.String() != "172.16.0.4/24" {
		t.Errorf("endpoint: %+v", ep)
	}
	for _, args := range [][]string{{"agent", "--help"}, {"sandbox", "--help"}, {"status", "--help"}, {"version", "--help"}, {"--help"}} {
		got := a.runIn("", args...)
		if got.code != 0 || !strings.Contains(got.stdout, "Usage") || got.stderr != "" {
			t.Errorf("kata-dp %s: %+v", strings.Join(args, " "), got)
		}
	}
}
