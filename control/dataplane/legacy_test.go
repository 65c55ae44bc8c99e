package dataplane_test

import (
	"context"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/loader"
)

// TestLegacyClsact runs the datapath the pre-TCX way (clsact + direct-action bpf filters), as
// on kernels without TCX: traffic flows both ways, the filters are kata-dp's, and removing the
// endpoint deletes exactly them.
func TestLegacyClsact(t *testing.T) {
	r := newRigWith(t, "legacy", loader.Options{LegacyTC: true})
	guestIP, hostIP := r.sb.GuestAddr.Addr().String(), r.sb.HostAddr.Addr().String()
	if tx, rx := pingAll(t, r.sb.Host, "-c", "3", "-i", "0.05", "-W", "2", guestIP); rx != tx {
		t.Fatalf("host->guest ping: %d/%d", rx, tx)
	}
	if tx, rx := pingAll(t, r.guest, "-c", "3", "-i", "0.05", "-W", "2", hostIP); rx != tx {
		t.Fatalf("guest->host ping: %d/%d", rx, tx)
	}
	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		if got := tcxPrograms(t, r.sb.NS.Path(), dev); len(got) != 0 {
			t.Errorf("TCX programs on %s in legacy mode: %v", dev, got)
		}
		out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", dev, "ingress")
		if !strings.Contains(out, "kdp_") || !strings.Contains(out, "direct-action") {
			t.Errorf("no kata-dp direct-action filter on %s: %s", dev, out)
		}
	}
	if s := r.stats(t); s.FromGuest.Packets == 0 || s.ToGuest.Packets == 0 {
		t.Errorf("counters did not move: %+v", s)
	}
	// Someone else's filter on the same device survives kata-dp's detach.
	if _, err := r.sb.NS.Exec("tc", "filter", "add", "dev", r.ep.Uplink, "ingress", "prio", "9", "protocol", "ip", "u32", "match", "ip", "dst", "192.0.2.1/32", "flowid", "1:1"); err != nil {
		t.Fatal(err)
	}
	if err := r.dp.DelEndpoint(context.Background(), r.ep); err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{r.ep.Uplink, r.ep.Tap} {
		out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", dev, "ingress")
		if strings.Contains(out, "kdp_") {
			t.Errorf("kata-dp filter left on %s: %s", dev, out)
		}
	}
	if out, _ := r.sb.NS.Exec("tc", "filter", "show", "dev", r.ep.Uplink, "ingress"); !strings.Contains(out, "u32") {
		t.Errorf("another user's filter was removed: %s", out)
	}
}
