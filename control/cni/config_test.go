package cni

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/netspec"
)

func conf(extra string) []byte {
	return []byte(`{"cniVersion":"1.0.0","name":"net1","type":"kata-dp-cni"` + extra + `}`)
}

func TestParseConfigDefaults(t *testing.T) {
	t.Setenv(api.SocketEnv, "")
	c, err := ParseConfig(conf(""))
	if err != nil {
		t.Fatal(err)
	}
	got := []any{c.Socket, c.TapName, c.StateDir, c.Mode, c.AntiSpoof, c.StrictEgress, c.PrevResult}
	want := []any{api.DefaultSocket, "", DefaultStateDir, "", (*bool)(nil), (*bool)(nil), nil}
	if diff := cmp.Diff(fmt.Sprint(want), fmt.Sprint(got)); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
	t.Setenv(api.SocketEnv, "/run/other.sock")
	if c, err := ParseConfig(conf("")); err != nil || c.Socket != "/run/other.sock" {
		t.Errorf("socket from $%s: %v, %v", api.SocketEnv, c.Socket, err)
	}
}

func TestTapNameFor(t *testing.T) {
	for _, tc := range []struct{ id, want string }{
		{"0123456789abcdef0123456789abcdef", "kdp0123456789ab"},
		{"0123456789ab", "kdp0123456789ab"},
		{"c1", "kdpc1"},
		{"cnitool-20ab", "kdpcnitool-20ab"},
		{"a/b c:d\xffe_f.g-hijk", "kdpa-b-c-d-e_f."},
		{"", "kdp"},
	} {
		got := TapNameFor(tc.id)
		if got != tc.want {
			t.Errorf("TapNameFor(%q) = %q, want %q", tc.id, got, tc.want)
		}
		if err := netspec.ValidName("tap", got); err != nil {
			t.Errorf("TapNameFor(%q): %v", tc.id, err)
		}
	}
	c := &Config{}
	if got := c.tapFor("0123456789abcdef"); got != "kdp0123456789ab" {
		t.Errorf("default tap %q", got)
	}
	c.TapName = "tap0_kata"
	if got := c.tapFor("0123456789abcdef"); got != "tap0_kata" {
		t.Errorf("explicit tap %q", got)
	}
}

func TestParseConfigKeys(t *testing.T) {
	c, err := ParseConfig(conf(`,"socket":"/s.sock","mode":"xdp","antiSpoof":false,"strictEgress":true,"tapName":"tap1_kata","stateDir":"/tmp/x"`))
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprintln(c.Socket, c.Mode, *c.AntiSpoof, *c.StrictEgress, c.TapName, c.StateDir)
	if diff := cmp.Diff("/s.sock xdp false true tap1_kata /tmp/x\n", got); diff != "" {
		t.Errorf("keys (-want +got):\n%s", diff)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		code uint
		want string
	}{
		{[]byte(`{`), types.ErrDecodingFailure, "decode"},
		{conf(`,"antiSpoof":"yes"`), types.ErrDecodingFailure, "antiSpoof"},
		{[]byte(`{"cniVersion":"0.4.0","name":"n"}`), types.ErrIncompatibleCNIVersion, `"0.4.0"`},
		{conf(`,"mode":"warp"`), types.ErrInvalidNetworkConfig, `mode "warp"`},
		{conf(`,"mode":"macvtap"`), types.ErrInvalidNetworkConfig, "macvtap"},
		{conf(`,"mode":"macvtap-bpf"`), types.ErrInvalidNetworkConfig, "macvtap-bpf"},
		{conf(`,"tapName":"tap 0"`), types.ErrInvalidNetworkConfig, "tapName"},
		{conf(`,"tapName":"a_very_long_tap_name"`), types.ErrInvalidNetworkConfig, "tapName"},
		{conf(`,"socket":"rel.sock"`), types.ErrInvalidNetworkConfig, "socket"},
		{conf(`,"stateDir":"state"`), types.ErrInvalidNetworkConfig, "stateDir"},
		{[]byte(`{"cniVersion":"1.0.0","name":"../x"}`), types.ErrInvalidNetworkConfig, "network name"},
		{conf(`,"prevResult":{"cniVersion":"1.0.0","interfaces":"x"}`), types.ErrInvalidNetworkConfig, "prevResult"},
	} {
		_, err := ParseConfig(tc.in)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != tc.code || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseConfig(%s) = %v; want code %d mentioning %q", tc.in, err, tc.code, tc.want)
		}
	}
}

func TestPrevResultRequired(t *testing.T) {
	c, err := ParseConfig(conf(""))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.prevResult()
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), "chained") {
		t.Errorf("prevResult without one: %v", err)
	}
}

func TestParseForDel(t *testing.T) {
	for _, tc := range []struct {
		in     []byte
		ok     bool
		failed bool
	}{
		{conf(`,"mode":"warp","tapName":"tap 0","antiSpoof":"yes"`), true, false}, // keys DEL does not use
		{conf(`,"stateDir":"relative"`), false, false},
		{[]byte(`{"cniVersion":"1.0.0","name":"../x"}`), false, false},
		{[]byte(`{`), false, true},
	} {
		c, ok, err := parseForDel(tc.in)
		if ok != tc.ok || (err != nil) != tc.failed {
			t.Errorf("parseForDel(%s) = %+v, %v, %v; want ok %v, failed %v", tc.in, c, ok, err, tc.ok, tc.failed)
		}
	}
}

func TestAgentError(t *testing.T) {
	e := agentError("list sandboxes", fmt.Errorf("%w at /x.sock: connection refused", api.ErrUnreachable))
	if e.Code != CodeAgentUnreachable || !strings.Contains(e.Details, "/x.sock") {
		t.Errorf("unreachable: %+v", e)
	}
	e = agentError("add-iface", &api.Error{Message: "already exists: device tap0_kata", Code: api.CodeExists})
	if e.Code != CodeAgentFailed || !strings.Contains(e.Error(), "device tap0_kata") {
		t.Errorf("refused: %+v", e)
	}
}
