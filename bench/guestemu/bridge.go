package guestemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
)

// BridgeOptions configure a Bridge.
type BridgeOptions struct {
	// MAC of the guest tap (the guest NIC's MAC); default random.
	MAC net.HardwareAddr
	// Addrs are assigned to the guest tap.
	Addrs []netip.Prefix
	// Gateway, when valid, becomes the guest's default route.
	Gateway netip.Addr
	// MTU of the guest tap; default 1500.
	MTU int
	// Offload sets checksum and TSO offloads on both taps (TUNSETOFFLOAD),
	// as QEMU does for a guest that negotiates them: partial checksums and
	// GSO super-frames then cross the bridge as they would cross virtio.
	// Needs IFF_VNET_HDR on the host tap.
	Offload bool
	// CPUs pins the worker threads (two per queue) round robin.
	CPUs []int
}

// Bridge joins a host-side tap (whose queues the caller opened, normally in
// the sandbox netns) to a tap it creates in a guest netns, copying frames
// both ways with their virtio headers unchanged. The guest netns's kernel
// stack then plays the guest.
type Bridge struct {
	host, guest []tapFd
	c           []counters
	r           *runner
	guestNS     string
	guestTap    string
}

// NewBridge adopts the host tap queues hostFds (it dups them: the caller
// keeps and closes its own), creates guestTap in the netns at guestNS with
// as many queues and the same IFF_VNET_HDR setting, configures it from o and
// brings it up. On failure nothing is left behind. Frames flow after Start.
func NewBridge(hostFds []*os.File, guestNS, guestTap string, o BridgeOptions) (b *Bridge, err error) {
	if len(hostFds) == 0 {
		return nil, fmt.Errorf("new bridge: no host tap fds: %w", ErrInvalid)
	}
	if guestNS == "" {
		return nil, fmt.Errorf("new bridge: the guest needs a netns of its own: %w", ErrInvalid)
	}
	if err := netdev.ValidateName(guestTap); err != nil {
		return nil, fmt.Errorf("new bridge: %w", err)
	}
	if o.MAC != nil && len(o.MAC) != 6 {
		return nil, fmt.Errorf("new bridge: mac %s: %w", o.MAC, ErrInvalid)
	}
	for _, a := range o.Addrs {
		if !a.IsValid() {
			return nil, fmt.Errorf("new bridge: address %s: %w", a, ErrInvalid)
		}
	}
	// Counters per queue and direction, so the two threads of a queue do
	// not share cache lines.
	b = &Bridge{guestNS: guestNS, c: make([]counters, 2*len(hostFds))}
	created := false
	defer func() {
		if err != nil {
			closeFds(b.host)
			closeFds(b.guest)
			if created {
				_ = netdev.DeleteLink(guestNS, guestTap)
			}
			err = fmt.Errorf("new bridge to %s: %w", guestTap, err)
			b = nil
		}
	}()
	offload := -1
	if o.Offload {
		offload = offloadFlags
	}
	for _, f := range hostFds {
		t, err := adoptTap(f, offload)
		if err != nil {
			return b, err
		}
		b.host = append(b.host, t)
	}
	vnet := b.host[0].vnet
	for _, t := range b.host[1:] {
		if t.vnet != vnet {
			return b, fmt.Errorf("host tap queues disagree on IFF_VNET_HDR: %w", ErrInvalid)
		}
	}
	if err := netdev.CreateTap(guestNS, guestTap, netdev.TapOptions{Queues: len(hostFds), MTU: o.MTU, VnetHdr: vnet}); err != nil {
		return b, err
	}
	created = true
	b.guestTap = guestTap
	if err := configure(guestNS, guestTap, o); err != nil {
		return b, err
	}
	gfds, err := netdev.OpenTap(guestNS, guestTap, len(hostFds), vnet, true)
	if err != nil {
		return b, err
	}
	defer func() {
		for _, f := range gfds {
			f.Close()
		}
	}()
	for _, f := range gfds {
		t, err := adoptTap(f, offload)
		if err != nil {
			return b, err
		}
		b.guest = append(b.guest, t)
	}
	if b.r, err = newRunner(o.CPUs); err != nil {
		return b, err
	}
	return b, nil
}

func configure(nsPath, name string, o BridgeOptions) error {
	return netdev.InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("configure %s: %w", name, err)
		}
		if o.MAC != nil {
			if err := netlink.LinkSetHardwareAddr(link, o.MAC); err != nil {
				return fmt.Errorf("set mac of %s: %w", name, err)
			}
		}
		for _, a := range o.Addrs {
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())}, Flags: 0x02 /* IFA_F_NODAD */}
			if err := netlink.AddrAdd(link, addr); err != nil {
				return fmt.Errorf("add %s to %s: %w", a, name, err)
			}
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
		if o.Gateway.IsValid() {
			r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: o.Gateway.AsSlice()}
			if err := netlink.RouteAdd(r); err != nil {
				return fmt.Errorf("default route via %s: %w", o.Gateway, err)
			}
		}
		return nil
	})
}

// Start starts two worker threads per queue, one each way. When ctx ends
// the workers stop (Close must still be called).
func (b *Bridge) Start(ctx context.Context) error {
	if err := b.r.start(); err != nil {
		return fmt.Errorf("start bridge: %w", err)
	}
	for i := range b.host {
		k, kb := &b.c[2*i], &b.c[2*i+1]
		b.r.spawn(b.host[i], b.guest[i], k, func(c *counters, n int) {
			c.guestRxFrames.Add(1)
			c.guestRxBytes.Add(uint64(n))
		}, func(buf []byte) []byte {
			k.rxFrames.Add(1)
			k.rxBytes.Add(uint64(len(buf) - b.host[i].hdrsz))
			if b.host[i].vnet && ParseVnetHdr(buf).GSO() {
				k.gsoFrames.Add(1)
			}
			return buf
		})
		b.r.spawn(b.guest[i], b.host[i], kb, countTx, func(buf []byte) []byte {
			kb.guestTxFrames.Add(1)
			return buf
		})
	}
	b.r.watch(ctx)
	if err := b.r.Err(); err != nil {
		return fmt.Errorf("start bridge: %w", err)
	}
	return nil
}

// GuestNS is the path of the guest's netns.
func (b *Bridge) GuestNS() string { return b.guestNS }

// GuestTap is the name of the guest tap.
func (b *Bridge) GuestTap() string { return b.guestTap }

// CPUTime is the CPU time the Bridge's worker threads have used so far
// (from schedstat). It is only meaningful while the Bridge runs.
func (b *Bridge) CPUTime() time.Duration { return b.r.cpuTime() }

// Stats returns the counters summed over the queues.
func (b *Bridge) Stats() Stats {
	var s Stats
	for i := range b.c {
		b.c[i].addTo(&s)
	}
	return s
}

// Err returns the error that stopped a worker early, if any.
func (b *Bridge) Err() error { return b.r.Err() }

// Close stops the workers, closes the emulator's fds and deletes the guest
// tap. It is idempotent.
func (b *Bridge) Close() error {
	if !b.r.shutdown() {
		return nil
	}
	closeFds(b.host)
	closeFds(b.guest)
	if err := netdev.DeleteLink(b.guestNS, b.guestTap); err != nil && !errors.Is(err, netdev.ErrNotFound) {
		return fmt.Errorf("close bridge: %w", err)
	}
	return nil
}
