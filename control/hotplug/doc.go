// Package hotplug puts a virtio-net NIC into a running QEMU and takes it out again, over QMP,
// following the sequence Kata's runtime uses. Two kinds of NIC:
//
// A tap NIC (Plug, Unplug): every tap queue fd is passed with getfd; with vhost-net, one
// /dev/vhost-net file per queue is passed beside them (OpenVhost decides auto/on/off and
// opens them; DecideVhost probes). A tap netdev is created from them (netdev_add with
// fd/fds, and vhost=on with vhostfd/vhostfds, else vhost off; or, for a pre-existing tap
// that cannot be opened, with ifname and script/downscript "no").
//
// A vhost-user NIC (PlugVhostUser, UnplugVhostUser): a vhost-user switch (OVS-DPDK, testpmd)
// serves a unix socket and moves the frames to and from guest memory itself, so the VM's
// memory must be shared (checked with query-memdev first) and one socket serves one NIC
// (checked with query-chardev and qom-get). A chardev connects to the socket as a client
// (chardev-add), then netdev_add type vhost-user with that chardev and the queues.
//
// Either way a virtio-net-pci device (mac, mq and vectors=2*queues+2 when multiqueue) is then
// added on a free hot-pluggable slot found with query-pci: an empty pcie-root-port (q35) or a
// free slot of a pci-bridge. The PCI path QEMU really assigned is read back and returned in
// the kata-network form "<bridge slot>.0/<device slot>". Every failure undoes the steps taken
// before it.
//
// Unplug: device_del, wait (bounded) for the DEVICE_DELETED event, then netdev_del (and for
// vhost-user chardev-remove). The subscription is taken before device_del so the event
// cannot be missed. An unplug the guest ignores ends in ErrUnplugTimeout with the device
// still in place: calling Unplug again retries. Unplugging a NIC that is already gone
// succeeds.
//
// Plug and Unplug on the same client are serialised (slot choice must not race); different
// clients (VMs) proceed in parallel.
package hotplug
