package control_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
)

const vhostNS = "/run/netns/vhost"

// vhostPlugger is a MemHotplugger that remembers the endpoints it was given and reports
// vhost-net decisions as vmplug does: what ep.Vhost comes to on a host without vhost-net.
type vhostPlugger struct {
	*controltest.MemHotplugger
	mu  sync.Mutex
	eps []control.Endpoint
}

func (p *vhostPlugger) Plug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	p.mu.Lock()
	p.eps = append(p.eps, ep)
	p.mu.Unlock()
	if ep.Vhost == control.VhostOn {
		return "", errors.New("vhost-net unavailable: vhost on, but queue 0: open /dev/vhost-net: no such file or directory")
	}
	return p.MemHotplugger.Plug(ctx, sb, ep)
}

func (p *vhostPlugger) DecideVhost(mode string) string {
	if mode == control.VhostOff {
		return "off: configured off"
	}
	return "off: open /dev/vhost-net: no such file or directory"
}

func (p *vhostPlugger) VhostDecision(sb control.Sandbox, ep control.Endpoint) (string, bool) {
	return p.DecideVhost(ep.Vhost), true
}

func (p *vhostPlugger) last() control.Endpoint {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.eps[len(p.eps)-1]
}

type vhostRig struct {
	dp    *controltest.MemDataplane
	hp    *vhostPlugger
	taps  *controltest.MemTaps
	store *store.Store
	c     *control.Controller
}

func newVhostRig(t *testing.T) *vhostRig {
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &vhostRig{dp: controltest.NewMemDataplane(), hp: &vhostPlugger{MemHotplugger: controltest.NewMemHotplugger()}, taps: controltest.NewMemTaps(), store: s}
	r.taps.AddLink(vhostNS, "eth0", false)
	r.start(t)
	return r
}

// start builds a Controller over the rig's store and fakes, as an agent (re)start does.
func (r *vhostRig) start(t *testing.T) {
	c, err := control.New(context.Background(), control.Config{
		Dataplane: r.dp, Taps: r.taps, Store: r.store, Hotplug: r.hp,
		CheckNetNS: func(string) error { return nil },
		CheckVhostSocket: func(p string) error {
			if strings.HasSuffix(p, "missing") {
				return errors.New("no such file or directory")
			}
			return nil
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	r.c = c
}

func (r *vhostRig) addSandbox(t *testing.T, id, vhost string) {
	t.Helper()
	if _, err := r.c.AddSandbox(context.Background(), control.SandboxSpec{ID: id, NetNS: vhostNS, QMP: "/run/vc/vm/" + id + "/qmp.sock", Vhost: vhost}); err != nil {
		t.Fatalf("add sandbox %s: %v", id, err)
	}
}

func addReq(t *testing.T, js string) netspec.AddRequest {
	t.Helper()
	var req netspec.AddRequest
	if err := netspec.Decode([]byte(js), &req); err != nil {
		t.Fatal(err)
	}
	return req
}

func endpointStatus(t *testing.T, c *control.Controller, id string) []control.EndpointStatus {
	t.Helper()
	for _, s := range c.Status(context.Background()) {
		if s.ID == id {
			return s.Endpoints
		}
	}
	t.Fatalf("sandbox %s not in status", id)
	return nil
}

// TestVhostUserNIC: a NIC with a vhostUserSocket gets no tap, runs mode vhost-user in the
// dataplane, is plugged with its socket, shows in status, and goes like any NIC.
func TestVhostUserNIC(t *testing.T) {
	r := newVhostRig(t)
	ctx := context.Background()
	r.addSandbox(t, "sb1", "")
	const vu = `{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5,"vhostUserSocket":"/usr/local/var/run/openvswitch/vhost-user1"}`
	out, err := r.c.AddIface(ctx, "sb1", addReq(t, vu))
	if err != nil {
		t.Fatalf("add-iface: %v", err)
	}
	if out.VhostUserSocket != "/usr/local/var/run/openvswitch/vhost-user1" || out.PCIAddr == "" || out.Device != "tap-test" {
		t.Errorf("add-iface output %+v", out)
	}
	if diff := cmp.Diff(map[string]bool{"eth0": false}, r.taps.Links(vhostNS)); diff != "" {
		t.Errorf("links (-want +got): a tap was created for a vhost-user NIC\n%s", diff)
	}
	ep := r.hp.last()
	if ep.Mode != control.ModeVhostUser || ep.VhostUserSocket != "/usr/local/var/run/openvswitch/vhost-user1" || ep.Tap != "" || ep.Uplink != "" || ep.Queues != 5 {
		t.Errorf("plugged endpoint %+v", ep)
	}
	if got := r.dp.Sandbox("sb1").Endpoints[ep.Slot]; got.Mode != control.ModeVhostUser || got.Tap != "" {
		t.Errorf("dataplane endpoint %+v", got)
	}
	es := endpointStatus(t, r.c, "sb1")
	if len(es) != 1 || es[0].Mode != control.ModeVhostUser || es[0].VhostUserSocket != ep.VhostUserSocket || es[0].Vhost != "" || es[0].TapCreated {
		t.Errorf("status %+v", es)
	}

	// A tap NIC beside it is joined to the sandbox's uplink as usual (the vhost-user NIC took
	// none).
	if _, err := r.c.AddIface(ctx, "sb1", addReq(t, `{"device":"tap-two","name":"eth-two","hwAddr":"02:42:20:6f:a3:6a","mtu":1500}`)); err != nil {
		t.Fatalf("add tap nic: %v", err)
	}
	if ep := r.hp.last(); ep.Uplink != "eth0" || ep.Mode != control.ModeTC {
		t.Errorf("tap nic endpoint %+v, want joined to eth0 in tc", ep)
	}

	// update-iface and restart keep it a vhost-user NIC.
	if _, err := r.c.UpdateIface(ctx, "sb1", netspec.Interface{Name: "eth-test", IPAddresses: []*netspec.IPAddress{{Address: "172.16.0.4", Mask: "16"}}}); err != nil {
		t.Fatalf("update-iface: %v", err)
	}
	r.start(t)
	if es := endpointStatus(t, r.c, "sb1"); es[0].Mode != control.ModeVhostUser || es[0].Addr != "172.16.0.4/16" {
		t.Errorf("after update and restart: %+v", es[0])
	}

	if err := r.c.DelIface(ctx, "sb1", netspec.Interface{Name: "eth-test"}); err != nil {
		t.Fatalf("del-iface: %v", err)
	}
	if p := r.hp.Plugged("sb1"); len(p) != 1 {
		t.Errorf("plugged after del-iface: %v", p)
	}
	if _, ok := r.dp.Sandbox("sb1").Endpoints[ep.Slot]; ok {
		t.Errorf("dataplane endpoint left after del-iface")
	}
}

// TestVhostUserRefused: what does not apply to a vhost-user NIC is refused, and a socket
// serves one NIC host-wide; each refusal leaves nothing behind.
func TestVhostUserRefused(t *testing.T) {
	r := newVhostRig(t)
	ctx := context.Background()
	r.addSandbox(t, "sb1", "")
	r.addSandbox(t, "sb2", "")
	const base = `"device":"tap-test","name":"eth-test","hwAddr":"02:42:20:6f:a3:69","mtu":1500,"vhostUserSocket":"/run/vhost-user1"`
	for _, tc := range []struct{ extra, want string }{
		{`"mode":"xdp"`, `invalid request: mode "xdp" does not apply to a vhost-user NIC (vhostUserSocket): the vhost-user switch moves its frames`},
		{`"uplink":"eth0"`, `invalid request: uplink does not apply to a vhost-user NIC (vhostUserSocket): it has no tap`},
		{`"vhost":"on"`, `invalid request: vhost (vhost-net) does not apply to a vhost-user NIC (vhostUserSocket): it has no tap`},
	} {
		_, err := r.c.AddIface(ctx, "sb1", addReq(t, "{"+base+","+tc.extra+"}"))
		if !errors.Is(err, control.ErrInvalid) || err.Error() != tc.want {
			t.Errorf("%s: %v, want %q", tc.extra, err, tc.want)
		}
	}
	if _, err := r.c.AddIface(ctx, "sb1", addReq(t, `{`+base+`,"mode":"vhost-user"}`)); err != nil {
		t.Fatalf("add-iface: %v", err)
	}
	// The same socket for a NIC of another sandbox (another VM).
	_, err := r.c.AddIface(ctx, "sb2", addReq(t, `{"device":"tap-two","name":"eth-test","hwAddr":"02:42:20:6f:a3:6a","mtu":1500,"vhostUserSocket":"/run/vhost-user1"}`))
	if want := "already exists: vhostUserSocket /run/vhost-user1 is already used by sandbox sb1"; !errors.Is(err, control.ErrExists) || err.Error() != want {
		t.Errorf("same socket in sb2: %v, want %q", err, want)
	}
	if len(r.hp.Plugged("sb2")) != 0 || len(r.dp.Sandbox("sb2").Endpoints) != 0 || len(r.taps.Links(vhostNS)) != 1 {
		t.Errorf("refused add-iface left something: plugged %v endpoints %v links %v", r.hp.Plugged("sb2"), r.dp.Sandbox("sb2").Endpoints, r.taps.Links(vhostNS))
	}
	// Once the first NIC is gone (after a restart: the reservation comes from the state), the
	// socket is free.
	r.start(t)
	if err := r.c.DelIface(ctx, "sb1", netspec.Interface{Name: "eth-test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.AddIface(ctx, "sb2", addReq(t, `{"device":"tap-two","name":"eth-test","hwAddr":"02:42:20:6f:a3:6a","mtu":1500,"vhostUserSocket":"/run/vhost-user1"}`)); err != nil {
		t.Errorf("socket freed by del-iface: %v", err)
	}
	// A failed plug releases the socket too.
	r.hp.Fail = func(method, _ string) error {
		if method == "Plug" {
			return errors.New("injected plug failure")
		}
		return nil
	}
	if _, err := r.c.AddIface(ctx, "sb1", addReq(t, `{"device":"tap-three","name":"eth-three","hwAddr":"02:42:20:6f:a3:6b","mtu":1500,"vhostUserSocket":"/run/vhost-user2"}`)); err == nil {
		t.Fatal("add-iface with a failing plug succeeded")
	}
	r.hp.Fail = nil
	if _, err := r.c.AddIface(ctx, "sb1", addReq(t, `{"device":"tap-three","name":"eth-three","hwAddr":"02:42:20:6f:a3:6b","mtu":1500,"vhostUserSocket":"/run/vhost-user2"}`)); err != nil {
		t.Errorf("socket of a failed add-iface still reserved: %v", err)
	}
}

// TestVhostSetting: the sandbox's --vhost and the NIC's "vhost" reach the hot-plugger, what
// they came to is kept with the NIC (across restarts) and shown in status with the reason.
func TestVhostSetting(t *testing.T) {
	r := newVhostRig(t)
	ctx := context.Background()
	if _, err := r.c.AddSandbox(ctx, control.SandboxSpec{ID: "bad", NetNS: vhostNS, Vhost: "yes"}); !errors.Is(err, control.ErrInvalid) ||
		err.Error() != `add sandbox: invalid request: vhost "yes" is not one of auto, on, off` {
		t.Errorf("sandbox with vhost yes: %v", err)
	}
	r.addSandbox(t, "sb1", control.VhostOff)
	r.addSandbox(t, "sb2", "")

	nic := func(name, mac, extra string) netspec.AddRequest {
		return addReq(t, `{"device":"tap-`+name+`","name":"`+name+`","hwAddr":"`+mac+`","mtu":1500`+extra+`}`)
	}
	if _, err := r.c.AddIface(ctx, "sb1", nic("a", "02:00:00:00:00:01", "")); err != nil {
		t.Fatal(err)
	}
	if ep := r.hp.last(); ep.Vhost != control.VhostOff {
		t.Errorf("sandbox off: endpoint vhost %q", ep.Vhost)
	}
	if _, err := r.c.AddIface(ctx, "sb1", nic("b", "02:00:00:00:00:02", `,"vhost":"auto"`)); err != nil {
		t.Fatal(err)
	}
	if ep := r.hp.last(); ep.Vhost != control.VhostAuto {
		t.Errorf("nic auto in an off sandbox: endpoint vhost %q", ep.Vhost)
	}
	if _, err := r.c.AddIface(ctx, "sb2", nic("c", "02:00:00:00:00:03", "")); err != nil {
		t.Fatal(err)
	}
	if ep := r.hp.last(); ep.Vhost != "" {
		t.Errorf("default: endpoint vhost %q, want \"\" (auto)", ep.Vhost)
	}
	// "on" without vhost-net: refused, nothing left.
	_, err := r.c.AddIface(ctx, "sb2", nic("d", "02:00:00:00:00:04", `,"vhost":"on"`))
	if err == nil || !strings.Contains(err.Error(), "vhost-net unavailable") {
		t.Errorf("vhost on without vhost-net: %v", err)
	}
	if _, ok := r.taps.Links(vhostNS)["tap-d"]; ok {
		t.Errorf("tap of the refused NIC left behind")
	}
	if _, err := r.c.AddIface(ctx, "sb2", nic("e", "02:00:00:00:00:05", `,"vhost":"maybe"`)); !errors.Is(err, control.ErrInvalid) ||
		err.Error() != `invalid request: vhost "maybe" is not one of auto, on, off` {
		t.Errorf("vhost maybe: %v", err)
	}

	r.start(t) // decisions are kept with the NICs
	st := r.c.Status(ctx)
	got := map[string]string{}
	for _, s := range st {
		got[s.ID] = s.Vhost + " => " + s.VhostDecision
		for _, e := range s.Endpoints {
			got[s.ID+"/"+e.NIC] = e.Vhost
		}
	}
	want := map[string]string{
		"sb1":   "off => off: configured off",
		"sb1/a": "off: configured off",
		"sb1/b": "off: open /dev/vhost-net: no such file or directory",
		"sb2":   " => off: open /dev/vhost-net: no such file or directory",
		"sb2/c": "off: open /dev/vhost-net: no such file or directory",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("status vhost (-want +got):\n%s", diff)
	}
}
