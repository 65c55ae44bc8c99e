package api

import (
	"context"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/control"
)

// TestPerNICMode: "mode" in add-iface overrides the sandbox's mode for that NIC (and is not
// echoed), survives a restart, and an unknown mode is refused with nothing changed.
func TestPerNICMode(t *testing.T) {
	r := newRig(t)
	r.addSandbox(sbID, "")
	_, msg := r.kn(sbID, OpAddIface, strings.Replace(exIface, `"mtu":1500`, `"mtu":1500,"mode":"fast"`, 1))
	if want := `mode "fast" is not one of tc, xdp`; !strings.HasPrefix(msg, want) {
		t.Errorf("bad mode: %q, want %q", msg, want)
	}
	out, msg := r.kn(sbID, OpAddIface, strings.Replace(exIface, `"mtu":1500`, `"mtu":1500,"mode":"xdp"`, 1))
	if msg != "" || strings.Contains(out, "mode") {
		t.Fatalf("add-iface with mode: %q %q", out, msg)
	}
	check := func() {
		t.Helper()
		st := r.c.Status(context.Background())
		if len(st) != 1 || len(st[0].Endpoints) != 1 || st[0].Endpoints[0].Mode != control.ModeXDP || st[0].Mode != control.ModeTC {
			t.Fatalf("status: %+v", st)
		}
		if eps := r.dp.Sandbox(sbID).Endpoints; len(eps) != 1 || eps[0].Mode != control.ModeXDP {
			t.Errorf("dataplane endpoints: %+v", eps)
		}
	}
	check()
	r.restart()
	check()
}
