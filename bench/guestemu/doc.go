// Package guestemu stands in for QEMU on a sandbox's tap, so integration
// tests and benchmarks can run traffic through the dataplane without a VM.
//
// It reads and writes the tap the way QEMU does without vhost: one read(2)
// or write(2) per frame on a non-blocking tap fd, each frame preceded by a
// 12-byte virtio_net_hdr (struct virtio_net_hdr_mrg_rxbuf) when the tap has
// IFF_VNET_HDR; the emulator sets TUNSETVNETHDRSZ to 12 itself, as QEMU
// does. Frames are handled on dedicated locked OS threads, one per queue and
// direction, that can be pinned to CPUs, so the emulator costs about what
// QEMU's I/O thread costs and benchmarks can account for it.
//
// Two modes:
//
//   - Counter (and Reflector, a Counter that sends every frame back with
//     MACs swapped, and IPv4 addresses and ports swapped for UDP) counts the
//     frames and bytes the host sends to the guest, optionally verifying
//     IPv4/TCP/UDP checksums (completing partial ones the virtio header
//     marks NEEDS_CSUM), and optionally answers ARP for the guest address.
//   - Bridge joins the host-side tap to a second tap it creates in a
//     separate "guest" network namespace by copying frames both ways with
//     their virtio headers, so a real kernel stack (ping, TCP) runs on the
//     guest side.
//
// Start, Stats and Close may be called from any goroutine. Stats are
// counters updated with atomics while the emulator runs.
package guestemu
