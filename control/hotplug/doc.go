// Package hotplug puts a tap-backed virtio-net NIC into a running QEMU and takes it out again,
// over QMP, following the sequence Kata's runtime uses.
//
// Plug: every tap queue fd is passed with getfd, a tap netdev is created from them (netdev_add
// with fd/fds, vhost off; or, for a pre-existing tap that cannot be opened, with ifname and
// script/downscript "no"), then a virtio-net-pci device (mac, mq and vectors=2*queues+2 when
// multiqueue) is added on a free hot-pluggable slot found with query-pci: an empty
// pcie-root-port (q35) or a free slot of a pci-bridge. The PCI path QEMU really assigned is
// read back and returned in the kata-network form "<bridge slot>.0/<device slot>". Every
// failure undoes the steps taken before it.
//
// Unplug: device_del, wait (bounded) for the DEVICE_DELETED event, then netdev_del. The
// subscription is taken before device_del so the event cannot be missed. An unplug the guest
// ignores ends in ErrUnplugTimeout with the device still in place: calling Unplug again
// retries. Unplugging a NIC that is already gone succeeds.
//
// Plug and Unplug on the same client are serialised (slot choice must not race); different
// clients (VMs) proceed in parallel.
package hotplug
