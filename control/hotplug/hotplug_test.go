package hotplug

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
	"golang.org/x/sys/unix"
)

// fakeVM models the parts of QEMU the hot-plug sequence touches.
type fakeVM struct {
	srv *qmptest.Server

	mu      sync.Mutex
	fds     map[string]int     // getfd names -> our dup
	netdevs map[string][]int   // netdev id -> fds it holds
	devices map[string]string  // device id -> "bus/slot"
	buses   map[string]fakeBus // bridge qdev id -> bridge
	failOn  map[string]int     // command -> fail its n-th call (1-based)
	calls   map[string]int     // command -> calls so far
	ignore  bool               // the guest ignores device_del
	killOn  string             // drop the connection on this command
	lastArg map[string]json.RawMessage

	chardevs      map[string]string // chardev id -> unix socket path (vhost-user)
	netdevChardev map[string]string // vhost-user netdev id -> its chardev
	memdevs       []fakeMemdev      // query-memdev; nil: one private pc.ram
}

type fakeMemdev struct {
	ID    string `json:"id"`
	Size  int64  `json:"size"`
	Share bool   `json:"share"`
}

type fakeBus struct {
	slot     int // on pcie.0
	rootPort bool
}

func newFakeVM(t *testing.T, buses map[string]fakeBus) *fakeVM {
	vm := &fakeVM{
		fds:     map[string]int{},
		netdevs: map[string][]int{},
		devices: map[string]string{},
		buses:   buses,
		failOn:  map[string]int{},
		calls:   map[string]int{},
		lastArg: map[string]json.RawMessage{},

		chardevs:      map[string]string{},
		netdevChardev: map[string]string{},
	}
	vm.srv = qmptest.Serve(t, nil)
	vm.srv.Handle(vm.handle)
	t.Cleanup(func() {
		vm.srv.Close()
		vm.mu.Lock()
		defer vm.mu.Unlock()
		for _, fd := range vm.fds {
			unix.Close(fd)
		}
		for _, fds := range vm.netdevs {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	})
	return vm
}

func q35() map[string]fakeBus {
	return map[string]fakeBus{"rp1": {slot: 1, rootPort: true}, "rp2": {slot: 2, rootPort: true}}
}

func (vm *fakeVM) client(t *testing.T) *qmp.Client {
	c := qmp.New(vm.srv.Path())
	t.Cleanup(func() { c.Close() })
	return c
}

func notFound(id string) *qmp.Error {
	return &qmp.Error{Class: "DeviceNotFound", Desc: fmt.Sprintf("Device '%s' not found", id)}
}

func (vm *fakeVM) handle(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.calls[cmd]++
	vm.lastArg[cmd] = args
	if n, ok := vm.failOn[cmd]; ok && n == vm.calls[cmd] {
		return nil, &qmp.Error{Class: "GenericError", Desc: "injected " + cmd + " failure"}
	}
	if cmd == vm.killOn {
		vm.srv.Disconnect()
		return nil, nil
	}
	var a map[string]any
	json.Unmarshal(args, &a)
	str := func(k string) string { s, _ := a[k].(string); return s }
	switch cmd {
	case "getfd":
		if len(fds) != 1 {
			return nil, &qmp.Error{Class: "GenericError", Desc: "No file descriptor supplied via SCM_RIGHTS"}
		}
		d, _ := unix.Dup(fds[0])
		if old, ok := vm.fds[str("fdname")]; ok {
			unix.Close(old)
		}
		vm.fds[str("fdname")] = d
	case "closefd":
		fd, ok := vm.fds[str("fdname")]
		if !ok {
			return nil, &qmp.Error{Class: "GenericError", Desc: "File descriptor named '" + str("fdname") + "' not found"}
		}
		unix.Close(fd)
		delete(vm.fds, str("fdname"))
	case "netdev_add":
		id := str("id")
		if _, ok := vm.netdevs[id]; ok {
			return nil, &qmp.Error{Class: "GenericError", Desc: "Duplicate ID '" + id + "' for netdev"}
		}
		var names []string
		for _, k := range []string{"fd", "fds", "vhostfd", "vhostfds"} {
			if s := str(k); s != "" {
				names = append(names, strings.Split(s, ":")...)
			}
		}
		if v, _ := a["vhost"].(bool); v != (str("vhostfd") != "" || str("vhostfds") != "") {
			return nil, &qmp.Error{Class: "GenericError", Desc: "fake: vhost and vhostfd(s) disagree"}
		}
		if str("type") == "vhost-user" {
			cd := str("chardev")
			if _, ok := vm.chardevs[cd]; !ok {
				return nil, &qmp.Error{Class: "GenericError", Desc: "chardev \"" + cd + "\" not found"}
			}
			for _, c := range vm.netdevChardev {
				if c == cd {
					return nil, &qmp.Error{Class: "GenericError", Desc: "Device '" + cd + "' is in use"}
				}
			}
			vm.netdevs[id] = nil
			vm.netdevChardev[id] = cd
			break
		}
		var held []int
		for _, n := range names {
			fd, ok := vm.fds[n]
			if !ok {
				return nil, &qmp.Error{Class: "GenericError", Desc: "File descriptor named '" + n + "' has not been found"}
			}
			held = append(held, fd)
			delete(vm.fds, n)
		}
		vm.netdevs[id] = held
	case "netdev_del":
		fds, ok := vm.netdevs[str("id")]
		if !ok {
			return nil, notFound(str("id"))
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
		delete(vm.netdevs, str("id"))
		delete(vm.netdevChardev, str("id"))
	case "device_add":
		if _, ok := vm.netdevs[str("netdev")]; !ok {
			return nil, &qmp.Error{Class: "GenericError", Desc: "Property 'virtio-net-device.netdev' can't find value '" + str("netdev") + "'"}
		}
		at := str("bus") + "/" + str("addr")
		for _, d := range vm.devices {
			if d == at {
				return nil, &qmp.Error{Class: "GenericError", Desc: "PCI: slot 0 function 0 not available for virtio-net-pci, in use by virtio-net-pci"}
			}
		}
		vm.devices[str("id")] = at
	case "device_del":
		id := str("id")
		if _, ok := vm.devices[id]; !ok {
			return nil, notFound(id)
		}
		if !vm.ignore {
			go func() {
				time.Sleep(5 * time.Millisecond)
				vm.mu.Lock()
				delete(vm.devices, id)
				vm.mu.Unlock()
				vm.srv.Emit("DEVICE_DELETED", map[string]string{"path": "/machine/peripheral/" + id + "/virtio-backend"})
				vm.srv.Emit("DEVICE_DELETED", map[string]string{"device": id, "path": "/machine/peripheral/" + id})
			}()
		}
	case "query-pci":
		return vm.queryPCI(), nil
	case "query-memdev":
		if vm.memdevs == nil {
			return []fakeMemdev{{ID: "pc.ram", Size: 256 << 20}}, nil
		}
		return vm.memdevs, nil
	case "query-chardev":
		// As QEMU: a unix client's filename names its (unbound) local address.
		ret := []map[string]any{{"label": "compat_monitor0", "filename": "unix:/run/qmp.sock,server=on", "frontend-open": true},
			{"label": "serial0", "filename": "stdio", "frontend-open": true}}
		for id := range vm.chardevs {
			ret = append(ret, map[string]any{"label": id, "filename": "unix:", "frontend-open": true})
		}
		return ret, nil
	case "qom-get":
		label, ok := strings.CutPrefix(str("path"), "/chardevs/")
		if !ok || str("property") != "addr" {
			return nil, &qmp.Error{Class: "GenericError", Desc: "fake: unexpected qom-get " + string(args)}
		}
		if label == "compat_monitor0" {
			return map[string]string{"type": "unix", "path": "/run/qmp.sock"}, nil
		}
		path, ok := vm.chardevs[label]
		if !ok {
			return nil, &qmp.Error{Class: "DeviceNotFound", Desc: "Device '" + str("path") + "' not found"}
		}
		return map[string]string{"type": "unix", "path": path}, nil
	case "chardev-add":
		var ca struct {
			ID      string `json:"id"`
			Backend struct {
				Type string `json:"type"`
				Data struct {
					Addr struct {
						Type string `json:"type"`
						Data struct {
							Path string `json:"path"`
						} `json:"data"`
					} `json:"addr"`
					Server *bool `json:"server"`
				} `json:"data"`
			} `json:"backend"`
		}
		json.Unmarshal(args, &ca)
		if _, ok := vm.chardevs[ca.ID]; ok {
			return nil, &qmp.Error{Class: "GenericError", Desc: "attempt to add duplicate property '" + ca.ID + "' to object (type 'container')"}
		}
		b := ca.Backend
		if b.Type != "socket" || b.Data.Addr.Type != "unix" || b.Data.Server == nil || *b.Data.Server {
			return nil, &qmp.Error{Class: "GenericError", Desc: "fake: want a unix socket client chardev"}
		}
		conn, err := net.Dial("unix", b.Data.Addr.Data.Path)
		if err != nil {
			return nil, &qmp.Error{Class: "GenericError", Desc: "Failed to connect to '" + b.Data.Addr.Data.Path + "': " + err.Error()}
		}
		conn.Close()
		vm.chardevs[ca.ID] = b.Data.Addr.Data.Path
	case "chardev-remove":
		id := str("id")
		if _, ok := vm.chardevs[id]; !ok {
			return nil, &qmp.Error{Class: "GenericError", Desc: "Chardev '" + id + "' not found"}
		}
		for nd, cd := range vm.netdevChardev {
			if cd == id {
				return nil, &qmp.Error{Class: "GenericError", Desc: "Chardev '" + id + "' is busy (netdev " + nd + ")"}
			}
		}
		delete(vm.chardevs, id)
	default:
		return nil, &qmp.Error{Class: "CommandNotFound", Desc: "The command " + cmd + " has not been found"}
	}
	return nil, nil
}

func (vm *fakeVM) queryPCI() any {
	type dev = map[string]any
	root := []dev{{"bus": 0, "slot": 0, "function": 0, "qdev_id": "", "id": dev{"vendor": 0x8086, "device": 0x29c0}}}
	var names []string
	for n := range vm.buses {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return vm.buses[names[i]].slot < vm.buses[names[j]].slot })
	for i, n := range names {
		b := vm.buses[n]
		var behind []dev
		for id, at := range vm.devices {
			bus, addr, _ := strings.Cut(at, "/")
			if bus != n {
				continue
			}
			var s int
			fmt.Sscanf(addr, "%x", &s)
			behind = append(behind, dev{"bus": i + 1, "slot": s, "function": 0, "qdev_id": id, "id": dev{"vendor": 0x1af4, "device": 0x1041}})
		}
		id := dev{"vendor": 0x1b36, "device": 0x0001}
		if b.rootPort {
			id["device"] = 0x000c
		}
		root = append(root, dev{"bus": 0, "slot": b.slot, "function": 0, "qdev_id": n, "id": id,
			"pci_bridge": dev{"bus": dev{"number": 0, "secondary": i + 1, "subordinate": i + 1}, "devices": behind}})
	}
	return []dev{{"bus": 0, "devices": root}}
}

func (vm *fakeVM) arg(cmd string) json.RawMessage {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.lastArg[cmd]
}

// state returns what the VM holds, for checks that nothing leaked.
func (vm *fakeVM) state() (fds, netdevs, devices []string) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for n := range vm.chardevs {
		devices = append(devices, "chardev:"+n)
	}
	for n := range vm.fds {
		fds = append(fds, n)
	}
	for n := range vm.netdevs {
		netdevs = append(netdevs, n)
	}
	for n := range vm.devices {
		devices = append(devices, n)
	}
	sort.Strings(fds)
	sort.Strings(netdevs)
	sort.Strings(devices)
	return
}

func (vm *fakeVM) wantEmpty(t *testing.T) {
	t.Helper()
	fds, netdevs, devices := vm.state()
	if len(fds)+len(netdevs)+len(devices) != 0 {
		t.Errorf("VM still holds fds %v netdevs %v devices %v", fds, netdevs, devices)
	}
}

func pipes(t *testing.T, n int) []*os.File {
	var fs []*os.File
	for range n {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(); w.Close() })
		fs = append(fs, w)
	}
	return fs
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestPlugMultiQueue(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	addr, err := Plug(ctxT(t), c, NIC{ID: "eth-test", MAC: "02:42:20:6f:a3:69", Queues: 5, Fds: pipes(t, 5)})
	if err != nil {
		t.Fatalf("plug: %v", err)
	}
	if addr != "01.0/00" {
		t.Errorf("pciAddr = %q, want 01.0/00", addr)
	}
	want := []string{"query-pci", "getfd", "getfd", "getfd", "getfd", "getfd", "netdev_add", "device_add", "query-pci"}
	if diff := cmp.Diff(want, vm.srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	for i, call := range vm.srv.Calls()[1:6] {
		if call.NumFDs != 1 || string(call.Args) != fmt.Sprintf(`{"fdname":"eth-test-fd%d"}`, i) {
			t.Errorf("getfd %d: %s with %d fds", i, call.Args, call.NumFDs)
		}
	}
	checkJSON(t, "netdev_add", vm.arg("netdev_add"),
		`{"fds":"eth-test-fd0:eth-test-fd1:eth-test-fd2:eth-test-fd3:eth-test-fd4","id":"eth-test-netdev","type":"tap","vhost":false}`)
	checkJSON(t, "device_add", vm.arg("device_add"),
		`{"addr":"00.0","bus":"rp1","driver":"virtio-net-pci","id":"eth-test","mac":"02:42:20:6f:a3:69","mq":true,"netdev":"eth-test-netdev","romfile":"","vectors":12}`)

	// A second NIC goes behind the next free root port.
	addr, err = Plug(ctxT(t), c, NIC{ID: "eth1", MAC: "02:42:20:6f:a3:6a", Fds: pipes(t, 1)})
	if err != nil {
		t.Fatalf("plug second: %v", err)
	}
	if addr != "02.0/00" {
		t.Errorf("second pciAddr = %q, want 02.0/00", addr)
	}
	checkJSON(t, "netdev_add", vm.arg("netdev_add"), `{"fd":"eth1-fd0","id":"eth1-netdev","type":"tap","vhost":false}`)
	checkJSON(t, "device_add", vm.arg("device_add"),
		`{"addr":"00.0","bus":"rp2","driver":"virtio-net-pci","id":"eth1","mac":"02:42:20:6f:a3:6a","netdev":"eth1-netdev","romfile":""}`)

	// The root ports are full.
	_, err = Plug(ctxT(t), c, NIC{ID: "eth2", MAC: "02:42:20:6f:a3:6b", Fds: pipes(t, 1)})
	if !errors.Is(err, ErrNoSlot) {
		t.Errorf("third plug: %v, want ErrNoSlot", err)
	}

	for _, id := range []string{"eth-test", "eth1"} {
		if err := Unplug(ctxT(t), c, id, time.Second); err != nil {
			t.Errorf("unplug %s: %v", id, err)
		}
	}
	vm.wantEmpty(t)
}

func checkJSON(t *testing.T, what string, got json.RawMessage, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	json.Unmarshal([]byte(want), &w)
	if diff := cmp.Diff(w, g); diff != "" {
		t.Errorf("%s arguments (-want +got):\n%s", what, diff)
	}
}

func TestPlugIfname(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Queues: 2, Ifname: "tap-old"}); err != nil {
		t.Fatalf("plug: %v", err)
	}
	checkJSON(t, "netdev_add", vm.arg("netdev_add"),
		`{"downscript":"no","id":"eth0-netdev","ifname":"tap-old","queues":2,"script":"no","type":"tap","vhost":false}`)
	if diff := cmp.Diff([]string{"query-pci", "netdev_add", "device_add", "query-pci"}, vm.srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestPlugPCIBridge(t *testing.T) {
	vm := newFakeVM(t, map[string]fakeBus{"br1": {slot: 3}})
	vm.mu.Lock()
	vm.devices["other"] = "br1/01.0"
	vm.mu.Unlock()
	c := vm.client(t)
	addr, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)})
	if err != nil {
		t.Fatalf("plug: %v", err)
	}
	if addr != "03.0/02" {
		t.Errorf("pciAddr = %q, want 03.0/02", addr)
	}
}

func TestPlugInvalid(t *testing.T) {
	fd := pipes(t, 2)
	for name, nic := range map[string]NIC{
		"empty id":       {MAC: "02:00:00:00:00:01", Fds: fd[:1]},
		"bad id":         {ID: "0eth", MAC: "02:00:00:00:00:01", Fds: fd[:1]},
		"id with comma":  {ID: "eth,x", MAC: "02:00:00:00:00:01", Fds: fd[:1]},
		"bad mac":        {ID: "eth0", MAC: "02:00:00:00:01", Fds: fd[:1]},
		"multicast mac":  {ID: "eth0", MAC: "01:00:5e:00:00:01", Fds: fd[:1]},
		"no backend":     {ID: "eth0", MAC: "02:00:00:00:00:01"},
		"both backends":  {ID: "eth0", MAC: "02:00:00:00:00:01", Fds: fd[:1], Ifname: "tap0"},
		"fds != queues":  {ID: "eth0", MAC: "02:00:00:00:00:01", Fds: fd, Queues: 5},
		"too many queue": {ID: "eth0", MAC: "02:00:00:00:00:01", Ifname: "tap0", Queues: MaxQueues + 1},
		"nil fd":         {ID: "eth0", MAC: "02:00:00:00:00:01", Fds: []*os.File{nil}},
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

func TestPlugRollback(t *testing.T) {
	for _, tc := range []struct {
		failOn  string
		n       int
		wantErr string
		want    []string // commands after the failure
	}{
		{"query-pci", 1, "find a free slot", nil},
		{"getfd", 1, "pass fd 0", nil},
		{"getfd", 3, "pass fd 2", []string{"closefd", "closefd"}},
		{"netdev_add", 1, "add netdev", []string{"closefd", "closefd", "closefd"}},
		{"device_add", 1, "add device", []string{"netdev_del", "closefd", "closefd", "closefd"}},
		{"query-pci", 2, "read back pci address", []string{"device_del", "netdev_del", "closefd", "closefd", "closefd"}},
	} {
		t.Run(fmt.Sprintf("%s#%d", tc.failOn, tc.n), func(t *testing.T) {
			vm := newFakeVM(t, q35())
			vm.mu.Lock()
			vm.failOn[tc.failOn] = tc.n
			vm.mu.Unlock()
			_, err := Plug(ctxT(t), vm.client(t), NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 3)})
			var qe *qmp.Error
			if !errors.As(err, &qe) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("plug: %v, want a qmp error mentioning %q", err, tc.wantErr)
			}
			cmds := vm.srv.Commands()
			i := 0
			for j, c := range cmds {
				if c == tc.failOn {
					i++
					if i == tc.n {
						cmds = cmds[j+1:]
						break
					}
				}
			}
			if diff := cmp.Diff(tc.want, cmds, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("rollback commands (-want +got):\n%s", diff)
			}
			vm.wantEmpty(t)
		})
	}
}

func TestPlugContextCanceledStillRollsBack(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	ctx, cancel := context.WithCancel(ctxT(t))
	vm.srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "device_add" {
			cancel() // the caller gives up while device_add runs
		}
		return vm.handle(cmd, args, fds)
	})
	_, err := Plug(ctx, c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("plug: %v, want canceled", err)
	}
	// device_add may or may not have completed; either way nothing is left behind.
	time.Sleep(20 * time.Millisecond)
	vm.wantEmpty(t)
}

func TestUnplugTimeoutThenRetry(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)}); err != nil {
		t.Fatal(err)
	}
	vm.mu.Lock()
	vm.ignore = true
	vm.mu.Unlock()
	err := Unplug(ctxT(t), c, "eth0", 50*time.Millisecond)
	if !errors.Is(err, ErrUnplugTimeout) {
		t.Fatalf("unplug: %v, want ErrUnplugTimeout", err)
	}
	if want := "unplug eth0: guest did not release the device within 50ms (device and netdev left in place; retry)"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
	if _, netdevs, devices := vm.state(); len(netdevs) != 1 || len(devices) != 1 {
		t.Errorf("after timeout: netdevs %v devices %v, want both in place", netdevs, devices)
	}
	vm.mu.Lock()
	vm.ignore = false
	vm.mu.Unlock()
	if err := Unplug(ctxT(t), c, "eth0", time.Second); err != nil {
		t.Fatalf("retry: %v", err)
	}
	vm.wantEmpty(t)
}

func TestUnplugAlreadyGone(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	if err := Unplug(ctxT(t), c, "eth9", time.Second); err != nil {
		t.Errorf("unplug unknown: %v", err)
	}
	// Device gone but netdev left (an earlier unplug stopped halfway).
	vm.mu.Lock()
	vm.netdevs["eth8-netdev"] = nil
	vm.mu.Unlock()
	if err := Unplug(ctxT(t), c, "eth8", time.Second); err != nil {
		t.Errorf("unplug half-removed: %v", err)
	}
	vm.wantEmpty(t)
	if diff := cmp.Diff([]string{"device_del", "netdev_del", "device_del", "netdev_del"}, vm.srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestUnplugMonitorDies(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)}); err != nil {
		t.Fatal(err)
	}
	vm.mu.Lock()
	vm.killOn = "device_del"
	vm.mu.Unlock()
	err := Unplug(ctxT(t), c, "eth0", 5*time.Second)
	if !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("unplug: %v, want ErrDisconnected", err)
	}
	vm.srv.Close()
	err = Unplug(ctxT(t), c, "eth0", 5*time.Second)
	if !errors.Is(err, qmp.ErrUnavailable) {
		t.Fatalf("unplug with QEMU gone: %v, want ErrUnavailable", err)
	}
}

func TestPCIPath(t *testing.T) {
	devs := []pciDevice{
		{Slot: 0},
		{Slot: 0x1e, QdevID: "br0"},
		{Slot: 2, QdevID: "rp2"},
		{Slot: 5, QdevID: "onroot"},
	}
	devs[1].Bridge = &struct {
		Bus struct {
			Secondary int `json:"secondary"`
		} `json:"bus"`
		Devices []pciDevice `json:"devices"`
	}{Devices: []pciDevice{{Slot: 1, QdevID: "br1", Bridge: &struct {
		Bus struct {
			Secondary int `json:"secondary"`
		} `json:"bus"`
		Devices []pciDevice `json:"devices"`
	}{Devices: []pciDevice{{Slot: 0x1f, QdevID: "deep"}}}}, {Slot: 0x0a, QdevID: "net0"}}}
	for id, want := range map[string]string{"net0": "1e.0/0a", "deep": "1e.0/01/1f", "onroot": "05"} {
		got, ok := pciPath(devs, id, nil)
		if !ok || got != want {
			t.Errorf("pciPath(%s) = %q %v, want %q", id, got, ok, want)
		}
	}
	if _, ok := pciPath(devs, "missing", nil); ok {
		t.Errorf("pciPath(missing) found something")
	}
}

func TestConcurrentPlugsTakeDistinctSlots(t *testing.T) {
	vm := newFakeVM(t, map[string]fakeBus{"rp1": {slot: 1, rootPort: true}, "rp2": {slot: 2, rootPort: true}, "rp3": {slot: 3, rootPort: true}})
	c := vm.client(t)
	addrs := make(chan string, 3)
	errs := make(chan error, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addr, err := Plug(ctxT(t), c, NIC{ID: fmt.Sprintf("eth%d", i), MAC: fmt.Sprintf("02:00:00:00:00:0%d", i), Fds: pipes(t, 1)})
			if err != nil {
				errs <- err
				return
			}
			addrs <- addr
		}()
	}
	wg.Wait()
	close(addrs)
	close(errs)
	for err := range errs {
		t.Errorf("plug: %v", err)
	}
	var got []string
	for a := range addrs {
		got = append(got, a)
	}
	sort.Strings(got)
	if diff := cmp.Diff([]string{"01.0/00", "02.0/00", "03.0/00"}, got); diff != "" {
		t.Errorf("addresses (-want +got):\n%s", diff)
	}
}

func TestPlugDuplicateLeavesFirstAlone(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)}); err != nil {
		t.Fatal(err)
	}
	_, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:02", Fds: pipes(t, 1)})
	var qe *qmp.Error
	if !errors.As(err, &qe) || !strings.Contains(qe.Desc, "Duplicate ID") || !errors.Is(err, ErrDuplicate) {
		t.Fatalf("second plug: %v, want a duplicate id error (ErrDuplicate)", err)
	}
	fds, netdevs, devices := vm.state()
	if diff := cmp.Diff([]string{"eth0-netdev", "eth0"}, append(netdevs, devices...)); diff != "" || len(fds) != 0 {
		t.Errorf("after a failed duplicate plug: fds %v (-want +got netdevs, devices):\n%s", fds, diff)
	}
}

func TestPlugQEMUDiesMidway(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	vm.srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "netdev_add" {
			// QEMU exits for good while it runs the command: the connection drops and no
			// monitor comes back for the rollback.
			vm.srv.Exit()
			return nil, nil
		}
		return vm.handle(cmd, args, fds)
	})
	_, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2)})
	if !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("plug: %v, want ErrDisconnected", err)
	}
	if strings.Contains(err.Error(), "rollback") {
		t.Errorf("rollback errors reported for a VM that is gone: %v", err)
	}
}

// commandsAfter returns the commands received after the first cmd.
func commandsAfter(cmds []string, cmd string) []string {
	for i, c := range cmds {
		if c == cmd {
			return cmds[i+1:]
		}
	}
	return nil
}

func TestPlugMonitorHangsRollsBack(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	c.Timeout = 300 * time.Millisecond
	var hung atomic.Bool
	vm.srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		ret, qerr := vm.handle(cmd, args, fds)
		if cmd == "device_add" && hung.CompareAndSwap(false, true) {
			// QEMU plugs the device but its reply never comes.
			return qmptest.NoReply, nil
		}
		return ret, qerr
	})
	var err error
	qmptest.Within(t, func() {
		_, err = Plug(context.Background(), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2)})
	})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "add device") {
		t.Fatalf("plug: %v, want a deadline error at add device", err)
	}
	if strings.Contains(err.Error(), "rollback") {
		t.Errorf("rollback failed: %v", err)
	}
	if diff := cmp.Diff([]string{"device_del", "netdev_del", "closefd", "closefd"}, commandsAfter(vm.srv.Commands(), "device_add")); diff != "" {
		t.Errorf("rollback commands (-want +got):\n%s", diff)
	}
	vm.wantEmpty(t)

	// The sequence lock was released and the client still works.
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth1", MAC: "02:00:00:00:00:02", Fds: pipes(t, 1)}); err != nil {
		t.Fatalf("plug after the hang: %v", err)
	}
	if err := Unplug(ctxT(t), c, "eth1", 5*time.Second); err != nil {
		t.Fatalf("unplug after the hang: %v", err)
	}
	vm.wantEmpty(t)
}

func TestPlugMonitorStalled(t *testing.T) {
	vm := newFakeVM(t, q35())
	vm.srv.Stall()
	c := vm.client(t)
	c.Timeout = 300 * time.Millisecond
	var err error
	qmptest.Within(t, func() {
		_, err = Plug(context.Background(), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)})
	})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "find a free slot") {
		t.Fatalf("plug: %v, want a deadline error finding a slot", err)
	}
	if cmds := vm.srv.Commands(); len(cmds) != 0 {
		t.Errorf("commands reached a monitor that never negotiated: %v", cmds)
	}
	vm.wantEmpty(t)
	var uerr error
	qmptest.Within(t, func() { uerr = Unplug(context.Background(), c, "eth0", 5*time.Second) })
	if !errors.Is(uerr, context.DeadlineExceeded) {
		t.Fatalf("unplug: %v, want a deadline error", uerr)
	}

	// Another VM's healthy monitor is not held up.
	ok := newFakeVM(t, q35())
	if _, err := Plug(ctxT(t), ok.client(t), NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)}); err != nil {
		t.Fatalf("plug into a healthy VM: %v", err)
	}
}

func TestPlugEndlessReplyRollsBack(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	c.MaxMessage = 1 << 20
	var queries atomic.Int32
	vm.srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		if cmd == "query-pci" {
			if queries.Add(1) == 2 {
				// Reading the device's address back, the monitor sends a reply that never ends.
				return qmptest.Endless, nil
			}
		}
		return vm.handle(cmd, args, fds)
	})
	var err error
	qmptest.Within(t, func() {
		_, err = Plug(context.Background(), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 1)})
	})
	if !errors.Is(err, qmp.ErrTooLarge) || !strings.Contains(err.Error(), "read back pci address") {
		t.Fatalf("plug: %v, want ErrTooLarge reading the address back", err)
	}
	if strings.Contains(err.Error(), "rollback") {
		t.Errorf("rollback failed: %v", err)
	}
	if diff := cmp.Diff([]string{"device_del", "netdev_del", "closefd"}, commandsAfter(commandsAfter(vm.srv.Commands(), "query-pci"), "query-pci")); diff != "" {
		t.Errorf("rollback commands (-want +got):\n%s", diff)
	}
	vm.wantEmpty(t)
	if _, err := Plug(ctxT(t), c, NIC{ID: "eth1", MAC: "02:00:00:00:00:02", Fds: pipes(t, 1)}); err != nil {
		t.Fatalf("plug after the flood: %v", err)
	}
}

func TestPlugMonitorHangsForGoodStillSendsRollback(t *testing.T) {
	vm := newFakeVM(t, q35())
	c := vm.client(t)
	c.Timeout = 300 * time.Millisecond
	vm.srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		ret, qerr := vm.handle(cmd, args, fds)
		if cmd == "device_add" {
			// QEMU plugs the device, then its monitor answers nothing any more.
			vm.srv.Stall()
			return qmptest.NoReply, nil
		}
		return ret, qerr
	})
	var err error
	qmptest.Within(t, func() {
		_, err = Plug(context.Background(), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2)})
	})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "add device") || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("plug: %v, want a deadline error at add device with rollback errors", err)
	}
	// Every undo command reached the monitor, in order, for QEMU to run once it recovers.
	// The fake records them as it reads them, which may trail Plug's return: wait for them
	// (a hang is caught by the bound, not a timing assertion).
	want := []string{"device_del", "netdev_del", "closefd", "closefd"}
	var got []string
	for bound := time.Now().Add(time.Minute); time.Now().Before(bound); time.Sleep(10 * time.Millisecond) {
		if got = commandsAfter(vm.srv.Commands(), "device_add"); len(got) >= len(want) {
			break
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("rollback commands (-want +got):\n%s", diff)
	}
}

// TestScrubAfterPlugStoppedMidway: a plug that stopped midway with no rollback (the agent was
// killed) leaves passed files, or a netdev, behind; a new Plug of that NIC fails with
// ErrDuplicate over the netdev; Scrub removes all of it, and the NIC then plugs.
func TestScrubAfterPlugStoppedMidway(t *testing.T) {
	for _, at := range []string{"netdev_add", "device_add"} {
		t.Run("killed before "+at, func(t *testing.T) {
			vm := newFakeVM(t, q35())
			c := vm.client(t)
			// What Plug had done when it was killed.
			for i, f := range pipes(t, 2) {
				if err := c.GetFD(ctxT(t), fmt.Sprintf("eth0-fd%d", i), f); err != nil {
					t.Fatal(err)
				}
			}
			if at == "device_add" {
				if _, err := c.Execute(ctxT(t), "netdev_add", map[string]any{"type": "tap", "id": "eth0-netdev", "fds": "eth0-fd0:eth0-fd1", "vhost": false}); err != nil {
					t.Fatal(err)
				}
				_, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2)})
				if !errors.Is(err, ErrDuplicate) {
					t.Errorf("plug over a leftover netdev: %v, want ErrDuplicate", err)
				}
			}
			if err := Scrub(ctxT(t), c, "eth0", time.Second); err != nil {
				t.Fatalf("scrub: %v", err)
			}
			vm.wantEmpty(t)
			if err := Scrub(ctxT(t), c, "eth0", time.Second); err != nil {
				t.Errorf("scrub of nothing: %v", err)
			}
			if _, err := Plug(ctxT(t), c, NIC{ID: "eth0", MAC: "02:00:00:00:00:01", Fds: pipes(t, 2)}); err != nil {
				t.Fatalf("plug after scrub: %v", err)
			}
		})
	}
}
