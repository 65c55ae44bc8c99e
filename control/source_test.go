package control_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

// TestNetmonOptionAndSource: a sandbox's netmon option and each NIC's source are kept in
// state (they survive a restart of the controller) and shown by Status; a NIC added without
// WithSource is kata-network's; netmon does not apply to direct mode.
func TestNetmonOptionAndSource(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	open := func() *control.Controller {
		t.Helper()
		s, err := store.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		taps := controltest.NewMemTaps()
		c, err := control.New(ctx, control.Config{Dataplane: controltest.NewMemDataplane(), Taps: taps, Store: s,
			CheckNetNS: func(string) error { return nil },
			Logger:     slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := open()
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "nm1", NetNS: testNS, Netmon: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "nm2", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "nm3", Mode: control.ModeDirect, Netmon: true}); !errors.Is(err, control.ErrInvalid) {
		t.Errorf("netmon with mode direct: err = %v, want ErrInvalid", err)
	}
	add := func(ctx context.Context, name, mac string) error {
		_, err := c.AddIface(ctx, "nm1", netspec.AddRequest{Interface: netspec.Interface{Device: "tap-" + name, Name: name, HwAddr: mac, MTU: 1500}})
		return err
	}
	if err := add(ctx, "a", "02:00:00:00:00:01"); err != nil {
		t.Fatal(err)
	}
	if err := add(control.WithSource(ctx, control.SourceNetmon), "b", "02:00:00:00:00:02"); err != nil {
		t.Fatal(err)
	}
	if err := add(control.WithSource(ctx, control.SourceDiscovery), "c", "02:00:00:00:00:03"); err != nil {
		t.Fatal(err)
	}
	if err := add(control.WithSource(ctx, "cni"), "d", "02:00:00:00:00:04"); !errors.Is(err, control.ErrInvalid) {
		t.Errorf("source cni: err = %v, want ErrInvalid", err)
	}
	check := func(c *control.Controller) {
		t.Helper()
		st := c.Status(ctx)
		if len(st) != 2 || !st[0].Netmon || st[1].Netmon {
			t.Fatalf("status: netmon of nm1, nm2 = %+v", st)
		}
		var got []string
		for _, ep := range st[0].Endpoints {
			got = append(got, ep.NIC+"="+ep.Source)
		}
		if want := []string{"a=kata-network", "b=netmon", "c=discovery"}; !slices.Equal(got, want) {
			t.Errorf("sources = %q, want %q", got, want)
		}
	}
	check(c)
	check(open()) // from the saved state
}
