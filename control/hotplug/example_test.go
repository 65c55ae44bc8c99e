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
	pciAddr, err := hotplug.Plug(ctx, vm, hotplug.NIC{ID: "eth-test", MAC: "02:42:20:6f:a3:69", Queues: 5, Fds: fds})
	for _, f := range fds {
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
