package hotplug

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/kata-dp/kata-dp/control/qmp"
)

// devNull is the probe seam for vhost-net on a kernel without it: real files of another
// kind, so passing and closing them is really exercised. It records what it opened.
type devNull struct {
	opened []*os.File
	failAt int // fail the n-th open (1-based; 0: never)
}

func (d *devNull) open() (*os.File, error) {
	if d.failAt == len(d.opened)+1 {
		return nil, &os.PathError{Op: "open", Path: VhostNetPath, Err: fs.ErrNotExist}
	}
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	d.opened = append(d.opened, f)
	return f, nil
}

// allClosed fails the test when a file the opener handed out is still open.
func (d *devNull) allClosed(t *testing.T) {
	t.Helper()
	for i, f := range d.opened {
		if f.Fd() != ^uintptr(0) {
			t.Errorf("vhost file %d left open", i)
		}
	}
}

func TestDecideVhost(t *testing.T) {
	for _, tc := range []struct {
		mode    VhostMode
		failAt  int
		want    VhostDecision
		wantErr error
		opens   int
	}{
		{mode: "", want: VhostDecision{On: true, Reason: "on: /dev/vhost-net opened"}, opens: 1},
		{mode: VhostAuto, want: VhostDecision{On: true, Reason: "on: /dev/vhost-net opened"}, opens: 1},
		{mode: VhostAuto, failAt: 1, want: VhostDecision{Reason: "off: open /dev/vhost-net: file does not exist"}},
		{mode: VhostOn, want: VhostDecision{On: true, Reason: "on: /dev/vhost-net opened"}, opens: 1},
		{mode: VhostOn, failAt: 1, wantErr: ErrVhostUnavailable},
		{mode: VhostOff, want: VhostDecision{Reason: "off: configured off"}},
		{mode: "yes", wantErr: errors.New("vhost \"yes\": want auto, on or off")},
	} {
		t.Run(fmt.Sprintf("%s/fail%d", tc.mode, tc.failAt), func(t *testing.T) {
			d := &devNull{failAt: tc.failAt}
			got, err := DecideVhost(tc.mode, d.open)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("decide: %v", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr) && (err == nil || err.Error() != tc.wantErr.Error()):
				t.Fatalf("decide: %v, want %v", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("decision (-want +got):\n%s", diff)
			}
			if len(d.opened) != tc.opens {
				t.Errorf("opened %d files, want %d", len(d.opened), tc.opens)
			}
			d.allClosed(t)
		})
	}
}

func TestOpenVhostPerQueue(t *testing.T) {
	d := &devNull{}
	fs, dec, err := OpenVhost(VhostAuto, 4, d.open)
	if err != nil || !dec.On || len(fs) != 4 {
		t.Fatalf("open: %d files, %+v, %v; want 4 files, on", len(fs), dec, err)
	}
	closeFiles(fs)
	d.allClosed(t)

	// A queue that cannot have its file: auto goes without vhost, on refuses; either way
	// the files opened before it are closed.
	d = &devNull{failAt: 3}
	fs, dec, err = OpenVhost(VhostAuto, 4, d.open)
	if err != nil || dec.On || len(fs) != 0 || !strings.HasPrefix(dec.Reason, "off: open /dev/vhost-net") {
		t.Errorf("auto, third open fails: %d files, %+v, %v; want off with the reason", len(fs), dec, err)
	}
	d.allClosed(t)
	d = &devNull{failAt: 3}
	fs, _, err = OpenVhost(VhostOn, 4, d.open)
	if !errors.Is(err, ErrVhostUnavailable) || len(fs) != 0 {
		t.Errorf("on, third open fails: %d files, %v; want ErrVhostUnavailable", len(fs), err)
	}
	if want := "vhost-net unavailable: vhost on, but queue 2: open /dev/vhost-net: file does not exist"; err == nil || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
	d.allClosed(t)
}

// heldTarget returns what the fake VM's copy of the fd a netdev holds points at.
func (vm *fakeVM) heldTargets(netdev string) []string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	var ts []string
	for _, fd := range vm.netdevs[netdev] {
		t, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
		ts = append(ts, t)
	}
	return ts
}

func TestPlugVhostNet(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	d := &devNull{}
	vfs, dec, err := OpenVhost(VhostOn, 3, d.open)
	if err != nil || !dec.On {
		t.Fatalf("open vhost: %+v %v", dec, err)
	}
	_, err = Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Queues: 3, Fds: pipes(t, 3), VhostFds: vfs})
	closeFiles(vfs)
	if err != nil {
		t.Fatalf("plug: %v", err)
	}
	want := []string{"query-pci", "getfd", "getfd", "getfd", "getfd", "getfd", "getfd", "netdev_add", "device_add", "query-pci"}
	if diff := cmp.Diff(want, vm.srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	for i, call := range vm.srv.Calls()[4:7] {
		if call.NumFDs != 1 || string(call.Args) != fmt.Sprintf(`{"fdname":"eth0-vhostfd%d"}`, i) {
			t.Errorf("vhost getfd %d: %s with %d fds", i, call.Args, call.NumFDs)
		}
	}
	checkJSON(t, "netdev_add", vm.arg("netdev_add"),
		`{"fds":"eth0-fd0:eth0-fd1:eth0-fd2","id":"eth0-netdev","type":"tap","vhost":true,"vhostfds":"eth0-vhostfd0:eth0-vhostfd1:eth0-vhostfd2"}`)
	// The VM really holds the files: three tap queues (here pipes) and three vhost files.
	held := vm.heldTargets("eth0-netdev")
	if len(held) != 6 || !strings.HasPrefix(held[0], "pipe:") || held[3] != os.DevNull || held[5] != os.DevNull {
		t.Errorf("netdev holds %v, want 3 pipes then 3 %s", held, os.DevNull)
	}

	// One queue: fd and vhostfd.
	vfs, _, _ = OpenVhost(VhostOn, 1, d.open)
	_, err = Plug(ctxT(t), c, NIC{ID: "eth1", MAC: "02:00:00:00:00:02", Fds: pipes(t, 1), VhostFds: vfs})
	closeFiles(vfs)
	if err != nil {
		t.Fatalf("plug single queue: %v", err)
	}
	checkJSON(t, "netdev_add", vm.arg("netdev_add"),
		`{"fd":"eth1-fd0","id":"eth1-netdev","type":"tap","vhost":true,"vhostfd":"eth1-vhostfd0"}`)

	for _, id := range []string{"eth0", "eth1"} {
		if err := Unplug(ctxT(t), c, id, time.Second); err != nil {
			t.Errorf("unplug %s: %v", id, err)
		}
	}
	vm.wantEmpty(t)
	d.allClosed(t)
}

func TestPlugVhostNetRollback(t *testing.T) {
	for _, tc := range []struct {
		failOn  string
		n       int
		wantErr string
		want    []string
	}{
		{"getfd", 3, "pass vhostfd 0", []string{"closefd", "closefd"}},
		{"getfd", 4, "pass vhostfd 1", []string{"closefd", "closefd", "closefd"}},
		{"netdev_add", 1, "add netdev", []string{"closefd", "closefd", "closefd", "closefd"}},
		{"device_add", 1, "add device", []string{"netdev_del", "closefd", "closefd", "closefd", "closefd"}},
	} {
		t.Run(fmt.Sprintf("%s#%d", tc.failOn, tc.n), func(t *testing.T) {
			vm := newFakeVM(t, q35())
			vm.mu.Lock()
			vm.failOn[tc.failOn] = tc.n
			vm.mu.Unlock()
			d := &devNull{}
			vfs, _, _ := OpenVhost(VhostOn, 2, d.open)
			_, err := Plug(ctxT(t), vm.client(t), NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2), VhostFds: vfs})
			closeFiles(vfs)
			var qe *qmp.Error
			if !errors.As(err, &qe) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("plug: %v, want a qmp error mentioning %q", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, after(vm.srv.Commands(), tc.failOn, tc.n), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("rollback commands (-want +got):\n%s", diff)
			}
			vm.wantEmpty(t)
			d.allClosed(t)
		})
	}
}

// after returns the commands after the n-th call of cmd.
func after(cmds []string, cmd string, n int) []string {
	for j, c := range cmds {
		if c == cmd {
			n--
			if n == 0 {
				return cmds[j+1:]
			}
		}
	}
	return nil
}

func TestPlugVhostNetInvalid(t *testing.T) {
	fd := pipes(t, 2)
	for name, nic := range map[string]NIC{
		"vhost fds != tap fds": {ID: "eth0", MAC: "02:00:00:00:00:01", Fds: fd, VhostFds: fd[:1]},
		"vhost with ifname":    {ID: "eth0", MAC: "02:00:00:00:00:01", Ifname: "tap0", VhostFds: fd[:1]},
		"nil vhost fd":         {ID: "eth0", MAC: "02:00:00:00:00:01", Fds: fd[:1], VhostFds: []*os.File{nil}},
	} {
		t.Run(name, func(t *testing.T) {
			vm := newFakeVM(t, q35())
			_, err := Plug(ctxT(t), vm.client(t), nic)
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("plug: %v, want ErrInvalid", err)
			}
			if cmds := vm.srv.Commands(); len(cmds) != 0 {
				t.Errorf("commands sent for an invalid nic: %v", cmds)
			}
		})
	}
}

// vhostUserSocket listens on a unix socket like a vhost-user switch (only accepting).
func vhostUserSocket(t *testing.T) string {
	dir, err := os.MkdirTemp("", "kdptvu")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "vhost-user1")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close(); os.RemoveAll(dir) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return path
}

func sharedVM(t *testing.T) *fakeVM {
	vm := newFakeVM(t, q35())
	vm.mu.Lock()
	vm.memdevs = []fakeMemdev{{ID: "mem0", Size: 256 << 20, Share: true}}
	vm.mu.Unlock()
	return vm
}

func TestPlugVhostUser(t *testing.T) {
	vm := sharedVM(t)
	c := vm.client(t)
	sock := vhostUserSocket(t)
	addr, err := PlugVhostUser(ctxT(t), c, VhostUserNIC{ID: "eth-test", MAC: "02:42:20:6f:a3:69", Queues: 5, Socket: sock})
	if err != nil {
		t.Fatalf("plug: %v", err)
	}
	if addr != "01.0/00" {
		t.Errorf("pciAddr = %q, want 01.0/00", addr)
	}
	want := []string{"query-memdev", "query-chardev", "qom-get", "query-pci", "chardev-add", "netdev_add", "device_add", "query-pci"}
	if diff := cmp.Diff(want, vm.srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	checkJSON(t, "chardev-add", vm.arg("chardev-add"),
		`{"id":"eth-test-chardev","backend":{"type":"socket","data":{"addr":{"type":"unix","data":{"path":"`+sock+`"}},"server":false}}}`)
	checkJSON(t, "netdev_add", vm.arg("netdev_add"),
		`{"chardev":"eth-test-chardev","id":"eth-test-netdev","queues":5,"type":"vhost-user"}`)
	checkJSON(t, "device_add", vm.arg("device_add"),
		`{"addr":"00.0","bus":"rp1","driver":"virtio-net-pci","id":"eth-test","mac":"02:42:20:6f:a3:69","mq":true,"netdev":"eth-test-netdev","romfile":"","vectors":12}`)

	// A second NIC on the same socket is refused before anything is plugged.
	n := len(vm.srv.Commands())
	_, err = PlugVhostUser(ctxT(t), c, VhostUserNIC{ID: "eth1", MAC: "02:42:20:6f:a3:6a", Socket: sock})
	if !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second plug on the socket: %v, want ErrSocketInUse", err)
	}
	if want := "plug eth1: vhost-user socket already in use: " + sock + " is served to the vm through chardev eth-test-chardev"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
	if diff := cmp.Diff([]string{"query-memdev", "query-chardev", "qom-get", "qom-get"}, vm.srv.Commands()[n:]); diff != "" {
		t.Errorf("commands of the refused plug (-want +got):\n%s", diff)
	}

	n = len(vm.srv.Commands())
	if err := UnplugVhostUser(ctxT(t), c, "eth-test", time.Second); err != nil {
		t.Fatalf("unplug: %v", err)
	}
	if diff := cmp.Diff([]string{"device_del", "netdev_del", "chardev-remove"}, vm.srv.Commands()[n:]); diff != "" {
		t.Errorf("unplug commands (-want +got):\n%s", diff)
	}
	vm.wantEmpty(t)
	// Gone already: not an error.
	if err := UnplugVhostUser(ctxT(t), c, "eth-test", time.Second); err != nil {
		t.Errorf("unplug again: %v", err)
	}
}

func TestPlugVhostUserRefused(t *testing.T) {
	sock := vhostUserSocket(t)
	// A socket file nobody listens on any more (the switch died).
	stale := filepath.Join(t.TempDir(), "stale")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	for _, tc := range []struct {
		name     string
		private  bool
		socket   string
		wantErr  error
		wantText string
		wantCmds []string
	}{
		{name: "memory not shared", private: true, socket: sock, wantErr: ErrNotShared,
			wantText: "plug eth0: vm memory is not shared: memory backend pc.ram has share=off (vhost-user needs share=on)",
			wantCmds: []string{"query-memdev"}},
		{name: "no such socket", socket: "/nonexistent/vhost-user1", wantErr: ErrInvalid,
			wantText: "invalid nic: eth0: vhost-user socket: stat /nonexistent/vhost-user1: no such file or directory (is the vhost-user switch serving it?)"},
		{name: "not a socket", socket: os.DevNull, wantErr: ErrInvalid,
			wantText: "invalid nic: eth0: vhost-user socket /dev/null: not a unix socket (Dc---------)"},
		{name: "relative path", socket: "vhost-user1", wantErr: ErrInvalid,
			wantText: `invalid nic: eth0: vhost-user socket "vhost-user1": want a clean absolute path without ','`},
		{name: "nobody listens", socket: stale,
			wantText: "plug eth0: connect to vhost-user socket " + stale + ": qmp chardev-add: GenericError: Failed to connect to '" + stale + "': dial unix " + stale + ": connect: connection refused",
			wantCmds: []string{"query-memdev", "query-chardev", "qom-get", "query-pci", "chardev-add"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := sharedVM(t)
			if tc.private {
				vm.mu.Lock()
				vm.memdevs = nil
				vm.mu.Unlock()
			}
			_, err := PlugVhostUser(ctxT(t), vm.client(t), VhostUserNIC{ID: "eth0", MAC: "02:00:00:00:00:01", Socket: tc.socket})
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Fatalf("plug: %v, want %v", err, tc.wantErr)
			}
			if err.Error() != tc.wantText {
				t.Errorf("error = %q\nwant    %q", err, tc.wantText)
			}
			if diff := cmp.Diff(tc.wantCmds, vm.srv.Commands(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
			vm.wantEmpty(t)
		})
	}
}

func TestPlugVhostUserRollback(t *testing.T) {
	for _, tc := range []struct {
		failOn  string
		n       int
		wantErr string
		want    []string
	}{
		{"query-memdev", 1, "check vm memory", nil},
		{"query-chardev", 1, "check vhost-user socket", nil},
		{"qom-get", 1, "address of chardev compat_monitor0", nil},
		{"chardev-add", 1, "connect to vhost-user socket", nil},
		{"netdev_add", 1, "add netdev", []string{"chardev-remove"}},
		{"device_add", 1, "add device", []string{"netdev_del", "chardev-remove"}},
		{"query-pci", 2, "read back pci address", []string{"device_del", "netdev_del", "chardev-remove"}},
	} {
		t.Run(fmt.Sprintf("%s#%d", tc.failOn, tc.n), func(t *testing.T) {
			vm := sharedVM(t)
			vm.mu.Lock()
			vm.failOn[tc.failOn] = tc.n
			vm.mu.Unlock()
			_, err := PlugVhostUser(ctxT(t), vm.client(t), VhostUserNIC{ID: "eth0", MAC: "02:00:00:00:00:01", Queues: 2, Socket: vhostUserSocket(t)})
			var qe *qmp.Error
			if !errors.As(err, &qe) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("plug: %v, want a qmp error mentioning %q", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, after(vm.srv.Commands(), tc.failOn, tc.n), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("rollback commands (-want +got):\n%s", diff)
			}
			vm.wantEmpty(t)
		})
	}
}
