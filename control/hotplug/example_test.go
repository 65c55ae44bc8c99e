package hotplug_test

import (
	"context"
	"fmt"
	"time"

	"github.com/kata-dp/kata-dp/control/hotplug"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/qmp"
)

// Plugging the user guide's NIC into a sandbox's VM and taking it out again.
func Example() {
	ctx := context.Background()
	vm := qmp.New("/run/vc/vm/6ec7a98/qmp.sock") // dials on first use, redials after a restart
	defer vm.Close()

	// One fd per queue, opened in the sandbox netns (vnet_hdr, non-blocking as QEMU wants).
	fds, err := netdev.OpenTap("/var/run/netns/cni-6ec7a98", "tap-test", 5, true, true)
	if err != nil {
		fmt.Println(err)
		return
	}
	// vhost-net where the host has it: one /dev/vhost-net file per queue (none when off).
	vhostFds, vhost, err := hotplug.OpenVhost(hotplug.VhostAuto, 5, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("vhost", vhost.Reason) // e.g. "on: /dev/vhost-net opened"
	pciAddr, err := hotplug.Plug(ctx, vm, hotplug.NIC{ID: "eth-test", MAC: "02:42:20:6f:a3:69", Queues: 5, Fds: fds, VhostFds: vhostFds})
	for _, f := range append(fds, vhostFds...) {
		f.Close() // QEMU holds its own copies now (or nothing, after a failure)
	}
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("pciAddr", pciAddr) // e.g. 02.0/00

	if err := hotplug.Unplug(ctx, vm, "eth-test", 5*time.Second); err != nil {
		fmt.Println(err) // ErrUnplugTimeout: still plugged, call Unplug again later
	}
}

// Plugging the user guide's vhost-user NIC (an OVS-DPDK port) into a VM whose memory is
// shared, and taking it out again.
func ExamplePlugVhostUser() {
	ctx := context.Background()
	vm := qmp.New("/run/vc/vm/6ec7a98/qmp.sock")
	defer vm.Close()
	pciAddr, err := hotplug.PlugVhostUser(ctx, vm, hotplug.VhostUserNIC{
		ID: "eth-test", MAC: "02:42:20:6f:a3:69", Queues: 5,
		Socket: "/usr/local/var/run/openvswitch/vhost-user1",
	})
	if err != nil {
		fmt.Println(err) // e.g. ErrNotShared, ErrSocketInUse, or the switch not listening
		return
	}
	fmt.Println("pciAddr", pciAddr)
	if err := hotplug.UnplugVhostUser(ctx, vm, "eth-test", 5*time.Second); err != nil {
		fmt.Println(err)
	}
}
