package control_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

const testNS = "/run/netns/kdptctl-typed"

func newController(t *testing.T, hp control.Hotplugger) (*control.Controller, *controltest.MemDataplane) {
	t.Helper()
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	taps := controltest.NewMemTaps()
	taps.AddLink(testNS, "eth0", false)
	dp := controltest.NewMemDataplane()
	c, err := control.New(context.Background(), control.Config{Dataplane: dp, Taps: taps, Store: s, Hotplug: hp,
		CheckNetNS: func(p string) error {
			if p != testNS {
				return errors.New("no such file or directory")
			}
			return nil
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return c, dp
}

// TestTypedMethods: the kata-network operations as typed calls: results as the contract's
// types (pciAddr and Family filled in), each change reaching the dataplane.
func TestTypedMethods(t *testing.T) {
	ctx := context.Background()
	c, dp := newController(t, controltest.NewMemHotplugger())
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "typed1", NetNS: testNS, QMP: "/run/q.sock"}); err != nil {
		t.Fatal(err)
	}
	in := netspec.Interface{Device: "tap0", Name: "eth-t", HwAddr: "02:00:00:00:00:01", MTU: 1500,
		IPAddresses: []*netspec.IPAddress{{Address: "10.0.0.2", Mask: "24"}}}
	got, err := c.AddIface(ctx, "typed", netspec.AddRequest{Interface: in})
	if err != nil {
		t.Fatal(err)
	}
	want := in
	want.PCIAddr = "02.0/01"
	want.IPAddresses = []*netspec.IPAddress{{Family: netspec.FamilyIPv4, Address: "10.0.0.2", Mask: "24"}}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("AddIface (-want +got):\n%s", d)
	}
	if ifs, err := c.Ifaces(ctx, "typed1"); err != nil || len(ifs) != 1 || ifs[0].PCIAddr != "02.0/01" {
		t.Errorf("Ifaces = %+v, %v", ifs, err)
	}
	upd, err := c.UpdateIface(ctx, "typed1", netspec.Interface{Name: "eth-t", IPAddresses: []*netspec.IPAddress{{Address: "10.0.0.3", Mask: "24"}}})
	if err != nil || upd.IPAddresses[0].Address != "10.0.0.3" {
		t.Errorf("UpdateIface = %+v, %v", upd, err)
	}
	if ep := dp.Sandbox("typed1").Endpoints[0]; ep.Addr.String() != "10.0.0.3/24" {
		t.Errorf("endpoint after update: %+v", ep)
	}
	r1 := netspec.Route{Dest: "default", Gateway: "10.0.0.1", Device: "eth-t"}
	if added, err := c.AddRoute(ctx, "typed1", r1); err != nil || added != r1 {
		t.Errorf("AddRoute = %+v, %v", added, err)
	}
	r2 := netspec.Route{Dest: "192.168.0.0/16", Device: "eth-t"}
	now, err := c.UpdateRoutes(ctx, "typed1", []netspec.Route{r1, r2})
	if err != nil || len(now) != 2 {
		t.Errorf("UpdateRoutes = %+v, %v", now, err)
	}
	if got := len(dp.Sandbox("typed1").Routes); got != 2 {
		t.Errorf("dataplane holds %d routes, want 2", got)
	}
	removed, err := c.DelRoute(ctx, "typed1", netspec.Route{Dest: "192.168.0.0/16"})
	if err != nil || len(removed) != 1 || removed[0] != r2 {
		t.Errorf("DelRoute = %+v, %v", removed, err)
	}
	if rs, err := c.Routes(ctx, "typed1"); err != nil || len(rs) != 1 || rs[0] != r1 {
		t.Errorf("Routes = %+v, %v", rs, err)
	}
	if err := c.DelIface(ctx, "typed1", netspec.Interface{Name: "eth-t"}); err != nil {
		t.Fatal(err)
	}
	if err := c.DelIface(ctx, "typed1", netspec.Interface{Name: "eth-t"}); err != nil {
		t.Errorf("DelIface of an unknown NIC = %v, want success", err)
	}
	if ifs, err := c.Ifaces(ctx, "typed1"); err != nil || len(ifs) != 0 {
		t.Errorf("Ifaces after DelIface = %+v, %v", ifs, err)
	}
	if rs, _ := c.Routes(ctx, "typed1"); len(rs) != 0 {
		t.Errorf("routes through the deleted NIC kept: %+v", rs)
	}
}

// TestTypedMethodsCheckTheSandbox: every operation first resolves the sandbox and checks its
// health, and says which failed with control's sentinel errors.
func TestTypedMethodsCheckTheSandbox(t *testing.T) {
	ctx := context.Background()
	hp := controltest.NewMemHotplugger()
	c, _ := newController(t, hp)
	for _, id := range []string{"sick", "sib"} {
		if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: id, NetNS: testNS, QMP: "/run/" + id + ".sock"}); err != nil {
			t.Fatal(err)
		}
	}
	hp.Fail = func(method, sandbox string) error {
		if method == "Healthy" && sandbox == "sick" {
			return errors.New("QMP silent")
		}
		return nil
	}
	for _, tc := range []struct {
		id   string
		want error
	}{{"nope", control.ErrNoSuchSandbox}, {"si", control.ErrAmbiguous}, {"sick", control.ErrUnhealthy}} {
		for name, call := range map[string]func() error{
			"AddIface":     func() error { _, err := c.AddIface(ctx, tc.id, netspec.AddRequest{}); return err },
			"DelIface":     func() error { return c.DelIface(ctx, tc.id, netspec.Interface{Name: "x"}) },
			"UpdateIface":  func() error { _, err := c.UpdateIface(ctx, tc.id, netspec.Interface{Name: "x"}); return err },
			"Ifaces":       func() error { _, err := c.Ifaces(ctx, tc.id); return err },
			"AddRoute":     func() error { _, err := c.AddRoute(ctx, tc.id, netspec.Route{}); return err },
			"DelRoute":     func() error { _, err := c.DelRoute(ctx, tc.id, netspec.Route{}); return err },
			"UpdateRoutes": func() error { _, err := c.UpdateRoutes(ctx, tc.id, nil); return err },
			"Routes":       func() error { _, err := c.Routes(ctx, tc.id); return err },
		} {
			if err := call(); !errors.Is(err, tc.want) {
				t.Errorf("%s(%q) = %v, want %v", name, tc.id, err, tc.want)
			}
		}
	}
}
