package maps

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/loader"
)

// XDPPort is a device whose XDP program redirects (struct xdp_port).
//
// MaxLen is the longest frame, Ethernet header included, that XDP redirects; longer frames
// (GSO super-frames) are passed on to the tc program. 0 = target MTU + 18. Flags are
// XDPFlag* bits.
type XDPPort = loader.DatapathXdpPort

// XDPFlagCsum makes the program complete partial TCP/UDP checksums (frames from sockets
// relying on checksum offload) before it redirects: XDP frames lose the skb's note that the
// checksum is partial, and the receiver would see a bad one.
const XDPFlagCsum = 1

// XDPPorts is the view of xdp mode's two maps: kdp_xdp_ports (which devices redirect, and
// how) and kdp_xdp_tx (the DEVMAP_HASH of their targets), both keyed by ingress ifindex.
type XDPPorts struct {
	Ports *ebpf.Map
	Tx    *ebpf.Map
}

// Set lets the XDP program of device src redirect to device dst, both ifindexes in the netns
// at nsPath: the kernel resolves a devmap entry's ifindex in the netns of the thread writing
// it, so the write happens there. The devmap entry goes first, then the port, so the program
// never finds a port without its target.
func (x XDPPorts) Set(nsPath string, src, dst uint32, p XDPPort) error {
	val := loader.DatapathBpfDevmapVal{Ifindex: dst}
	err := netdev.InNetNS(nsPath, func() error { return x.Tx.Put(src, val) })
	if err != nil {
		return fmt.Errorf("set xdp target %d -> %d: %w", src, dst, err)
	}
	if err := x.Ports.Put(src, p); err != nil {
		return fmt.Errorf("set xdp port %d: %w", src, err)
	}
	return nil
}

// Delete stops the XDP program of device src redirecting: from then on it passes every frame
// on to the tc program. Missing entries are not an error.
func (x XDPPorts) Delete(src uint32) error {
	if err := x.Ports.Delete(src); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete xdp port %d: %w", src, err)
	}
	if err := x.Tx.Delete(src); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete xdp target %d: %w", src, err)
	}
	return nil
}

// All lists the XDP ports by ifindex.
func (x XDPPorts) All() (map[uint32]XDPPort, error) {
	out := map[uint32]XDPPort{}
	var (
		k uint32
		v XDPPort
	)
	it := x.Ports.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list xdp ports: %w", err)
	}
	return out, nil
}
