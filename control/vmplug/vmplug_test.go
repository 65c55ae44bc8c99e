package vmplug

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug"
	"github.com/kata-dp/kata-dp/control/macvtap"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
	"golang.org/x/sys/unix"
)

// TestMain fails the run when a tap or vhost file leaks.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }

// monitor is a fake VM with one root port that keeps what it is given, so the test can see
// which files arrived.
type monitor struct {
	srv *qmptest.Server

	mu      sync.Mutex
	fds     map[string]int   // getfd name -> our dup
	netdev  json.RawMessage  // last netdev_add
	held    map[string][]int // netdev id -> fds
	plugged string           // device id
	device  json.RawMessage  // last device_add
}

func newMonitor(t *testing.T) *monitor {
	m := &monitor{fds: map[string]int{}, held: map[string][]int{}}
	m.srv = qmptest.Serve(t, m.handle)
	t.Cleanup(func() {
		m.srv.Close()
		for _, fd := range m.fds {
			unix.Close(fd)
		}
		for _, fds := range m.held {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	})
	return m
}

func (m *monitor) handle(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var a map[string]any
	json.Unmarshal(args, &a)
	str := func(k string) string { s, _ := a[k].(string); return s }
	switch cmd {
	case "getfd":
		d, _ := unix.Dup(fds[0])
		m.fds[str("fdname")] = d
	case "netdev_add":
		m.netdev = args
		var held []int
		for _, k := range []string{"fd", "fds", "vhostfd", "vhostfds"} {
			for _, n := range strings.Split(str(k), ":") {
				if fd, ok := m.fds[n]; ok {
					held = append(held, fd)
					delete(m.fds, n)
				}
			}
		}
		m.held[str("id")] = held
	case "device_add":
		m.plugged = str("id")
		m.device = args
	case "query-pci":
		var behind []any
		if m.plugged != "" {
			behind = append(behind, map[string]any{"bus": 1, "slot": 0, "function": 0, "qdev_id": m.plugged})
		}
		return []any{map[string]any{"bus": 0, "devices": []any{map[string]any{
			"bus": 0, "slot": 1, "function": 0, "qdev_id": "rp1", "id": map[string]int{"vendor": 0x1b36, "device": 0x000c},
			"pci_bridge": map[string]any{"bus": map[string]int{"secondary": 1}, "devices": behind},
		}}}}, nil
	default:
		return nil, &qmp.Error{Class: "CommandNotFound", Desc: cmd}
	}
	return nil, nil
}

// heldTargets returns what the files held by the netdev point at.
func (m *monitor) heldTargets(id string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ts []string
	for _, fd := range m.held[id] {
		t, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
		ts = append(ts, t)
	}
	return ts
}

// devNull stands in for /dev/vhost-net, which this kernel lacks: real files, so passing and
// closing them is exercised.
type devNull struct {
	mu     sync.Mutex
	opened []*os.File
	fail   bool
}

func (d *devNull) open() (*os.File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fail {
		return nil, &os.PathError{Op: "open", Path: hotplug.VhostNetPath, Err: fs.ErrNotExist}
	}
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err == nil {
		d.opened = append(d.opened, f)
	}
	return f, err
}

func (d *devNull) allClosed(t *testing.T) {
	t.Helper()
	for i, f := range d.opened {
		if f.Fd() != ^uintptr(0) {
			t.Errorf("vhost file %d left open", i)
		}
	}
}

func TestPlugVhost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: netns, tap")
	}
	ns := fmt.Sprintf("kdptv-%d", os.Getpid())
	exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("netns: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	nsPath := "/var/run/netns/" + ns
	if err := netdev.CreateTap(nsPath, "kdptv-tap0", netdev.TapOptions{Queues: 2, VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC("02:00:00:00:00:01")
	ep := control.Endpoint{NIC: "eth0", Tap: "kdptv-tap0", MAC: mac, Queues: 2}
	for _, tc := range []struct {
		mode      hotplug.VhostMode
		fail      bool
		wantArgs  string // netdev_add
		wantHeld  int    // vhost files QEMU holds
		wantError error
		decision  string
	}{
		{mode: hotplug.VhostAuto, wantHeld: 2, decision: "on: /dev/vhost-net opened",
			wantArgs: `{"fds":"kdp-eth0-fd0:kdp-eth0-fd1","id":"kdp-eth0-netdev","type":"tap","vhost":true,"vhostfds":"kdp-eth0-vhostfd0:kdp-eth0-vhostfd1"}`},
		{mode: hotplug.VhostAuto, fail: true, decision: "off: open /dev/vhost-net: file does not exist",
			wantArgs: `{"fds":"kdp-eth0-fd0:kdp-eth0-fd1","id":"kdp-eth0-netdev","type":"tap","vhost":false}`},
		{mode: hotplug.VhostOff, decision: "off: configured off",
			wantArgs: `{"fds":"kdp-eth0-fd0:kdp-eth0-fd1","id":"kdp-eth0-netdev","type":"tap","vhost":false}`},
		{mode: hotplug.VhostOn, fail: true, wantError: hotplug.ErrVhostUnavailable},
	} {
		t.Run(fmt.Sprintf("%s/fail=%v", tc.mode, tc.fail), func(t *testing.T) {
			m := newMonitor(t)
			d := &devNull{fail: tc.fail}
			p := New()
			p.OpenVhost = d.open
			defer p.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ep := ep
			ep.Vhost = string(tc.mode)
			sb := control.Sandbox{ID: "sb", NetNS: nsPath, QMP: m.srv.Path()}
			addr, err := p.Plug(ctx, sb, ep)
			d.allClosed(t)
			if tc.wantError != nil {
				if !errors.Is(err, tc.wantError) {
					t.Fatalf("plug: %v, want %v", err, tc.wantError)
				}
				if cmds := m.srv.Commands(); len(cmds) != 0 {
					t.Errorf("commands sent for a refused nic: %v", cmds)
				}
				return
			}
			if err != nil || addr != "01.0/00" {
				t.Fatalf("plug: %q %v", addr, err)
			}
			var got, want any
			json.Unmarshal(m.netdev, &got)
			json.Unmarshal([]byte(tc.wantArgs), &want)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("netdev_add (-want +got):\n%s", diff)
			}
			held := m.heldTargets("kdp-eth0-netdev")
			var taps, vhost int
			for _, h := range held {
				switch h {
				case "/dev/net/tun":
					taps++
				case os.DevNull:
					vhost++
				}
			}
			if taps != 2 || vhost != tc.wantHeld {
				t.Errorf("qemu holds %v, want 2 tap queues and %d vhost files", held, tc.wantHeld)
			}
			if d, ok := p.VhostDecision(sb, ep); !ok || d != tc.decision {
				t.Errorf("VhostDecision = %q %v, want %q", d, ok, tc.decision)
			}
			if d := p.DecideVhost(string(tc.mode)); d != tc.decision {
				t.Errorf("DecideVhost(%s) = %q, want %q", tc.mode, d, tc.decision)
			}
		})
	}
}

// TestPlugMacvtap: where the dataplane gives the VM a macvtap (Plugger.Device), QEMU gets the
// macvtap's queues and the NIC its MAC, not the tap's.
func TestPlugMacvtap(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: netns, macvtap")
	}
	ns := fmt.Sprintf("kdptvm-%d", os.Getpid())
	exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("netns: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	nsPath := "/var/run/netns/" + ns
	if out, err := exec.Command("ip", "-n", ns, "link", "add", "kdptvd0", "type", "veth", "peer", "name", "kdptvd1").CombinedOutput(); err != nil {
		t.Fatalf("veth: %v %s", err, out)
	}
	mv, err := macvtap.Create(nsPath, "kdptvd0", "kdptvmv0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { macvtap.Delete(nsPath, "kdptvd0", "kdptvmv0") })

	m := newMonitor(t)
	p := New()
	defer p.Close()
	p.Device = func(ep control.Endpoint, n int) ([]*os.File, net.HardwareAddr, bool, error) {
		fds, err := macvtap.Open(mv, n, true)
		return fds, mv.MAC, true, err
	}
	mac, _ := net.ParseMAC("02:00:00:00:00:09")
	ep := control.Endpoint{NIC: "eth0", Tap: "no-such-tap", MAC: mac, Queues: 2, Vhost: string(hotplug.VhostOff)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.Plug(ctx, control.Sandbox{ID: "sb", NetNS: nsPath, QMP: m.srv.Path()}, ep); err != nil {
		t.Fatal(err)
	}
	held := m.heldTargets("kdp-eth0-netdev")
	if len(held) != 2 || held[0] != mv.DevPath || held[1] != mv.DevPath {
		t.Errorf("qemu holds %v, want 2 queues of %s", held, mv.DevPath)
	}
	var dev map[string]any
	json.Unmarshal(m.device, &dev)
	if dev["mac"] != mv.MAC.String() {
		t.Errorf("device_add mac %v, want the macvtap's %s", dev["mac"], mv.MAC)
	}
}
