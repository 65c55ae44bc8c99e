package control_test

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/store"
)

// macvtapDataplane is a MemDataplane whose NICs in the macvtap modes use a macvtap, as the
// real dataplane's do.
type macvtapDataplane struct{ *controltest.MemDataplane }

func (macvtapDataplane) VMDevice(ep control.Endpoint) (string, string, bool) {
	if ep.Mode != control.ModeMacvtap && ep.Mode != control.ModeMacvtapBPF {
		return "", "", false
	}
	return "kdpmv0", "/dev/tap12", true
}

// TestStatusVMDevice: status names the macvtap (and its character device) of a NIC in a
// macvtap mode, and nothing for a NIC whose VM uses its tap.
func TestStatusVMDevice(t *testing.T) {
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const ns = "/run/netns/vmdev"
	taps := controltest.NewMemTaps()
	taps.AddLink(ns+"mv", "eth0", false)
	taps.AddLink(ns+"tc", "eth0", false)
	ctx := context.Background()
	c, err := control.New(ctx, control.Config{
		Dataplane: macvtapDataplane{controltest.NewMemDataplane()}, Taps: taps, Store: s,
		CheckNetNS: func(string) error { return nil },
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	for id, mode := range map[string]string{"mv": control.ModeMacvtapBPF, "tc": control.ModeTC} {
		if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: id, NetNS: ns + id, Mode: mode}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.AddIface(ctx, id, addReq(t, `{"device":"tap-`+id+`","name":"eth0","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500}`)); err != nil {
			t.Fatal(err)
		}
	}
	if es := endpointStatus(t, c, "mv"); len(es) != 1 || es[0].Macvtap != "kdpmv0" || es[0].MacvtapDev != "/dev/tap12" {
		t.Errorf("macvtap-bpf NIC: %+v", es)
	}
	if es := endpointStatus(t, c, "tc"); len(es) != 1 || es[0].Macvtap != "" || es[0].MacvtapDev != "" {
		t.Errorf("tc NIC: %+v", es)
	}
}
