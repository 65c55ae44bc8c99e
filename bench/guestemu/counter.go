package guestemu

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// CounterOptions configure a Counter.
type CounterOptions struct {
	// Reflect sends every frame back into the tap it came from, with MACs
	// swapped and, for IPv4 UDP, addresses and ports swapped; the virtio
	// header is written back as read, so a partial checksum stays partial.
	Reflect bool
	// VerifyCsum checks the IPv4, TCP and UDP checksums of received frames,
	// completing partial ones (NEEDS_CSUM) first. GSO super-frames are not
	// checked.
	VerifyCsum bool
	// GuestMAC and GuestIP, when both set, make the Counter answer ARP
	// requests for GuestIP with GuestMAC, so a sender can resolve the guest.
	GuestMAC net.HardwareAddr
	GuestIP  netip.Addr
	// Offload sets checksum and TSO offloads on the tap (TUNSETOFFLOAD), as
	// QEMU does for a guest that negotiates them: the host may then hand out
	// partial checksums and GSO super-frames. Needs IFF_VNET_HDR.
	Offload bool
	// CPUs pins the worker threads, queue i to CPUs[i%len(CPUs)].
	CPUs []int
}

// Counter counts (and optionally reflects) the frames the host sends to the
// guest over a tap. It stands in for a VM that consumes traffic.
type Counter struct {
	o    CounterOptions
	fds  []tapFd
	c    []counters
	r    *runner
	arp  bool
	ipv4 [4]byte
}

// NewCounter adopts the tap queues fds (it dups them: the caller keeps and
// closes its own). It does not read until Start.
func NewCounter(fds []*os.File, o CounterOptions) (*Counter, error) {
	if len(fds) == 0 {
		return nil, fmt.Errorf("new counter: no tap fds: %w", ErrInvalid)
	}
	c := &Counter{o: o, c: make([]counters, len(fds))}
	if o.GuestMAC != nil || o.GuestIP.IsValid() {
		if len(o.GuestMAC) != 6 || !o.GuestIP.Is4() {
			return nil, fmt.Errorf("new counter: guest mac %s and ip %s: %w", o.GuestMAC, o.GuestIP, ErrInvalid)
		}
		c.arp, c.ipv4 = true, o.GuestIP.As4()
	}
	offload := -1
	if o.Offload {
		offload = offloadFlags
	}
	for _, f := range fds {
		t, err := adoptTap(f, offload)
		if err != nil {
			closeFds(c.fds)
			return nil, fmt.Errorf("new counter: %w", err)
		}
		c.fds = append(c.fds, t)
	}
	r, err := newRunner(o.CPUs)
	if err != nil {
		closeFds(c.fds)
		return nil, fmt.Errorf("new counter: %w", err)
	}
	c.r = r
	return c, nil
}

// NewReflector is NewCounter with Reflect set.
func NewReflector(fds []*os.File, o CounterOptions) (*Counter, error) {
	o.Reflect = true
	return NewCounter(fds, o)
}

// Start starts one worker thread per queue. When ctx ends the workers stop
// (Close must still be called).
func (c *Counter) Start(ctx context.Context) error {
	if err := c.r.start(); err != nil {
		return fmt.Errorf("start counter: %w", err)
	}
	for i, t := range c.fds {
		c.r.spawn(t, t, &c.c[i], countTx, c.frameFunc(t, &c.c[i]))
	}
	c.r.watch(ctx)
	if err := c.r.Err(); err != nil {
		return fmt.Errorf("start counter: %w", err)
	}
	return nil
}

func countTx(c *counters, n int) {
	c.txFrames.Add(1)
	c.txBytes.Add(uint64(n))
}

func (c *Counter) frameFunc(t tapFd, k *counters) frameFunc {
	return func(buf []byte) []byte {
		frame := buf[t.hdrsz:]
		k.rxFrames.Add(1)
		k.rxBytes.Add(uint64(len(frame)))
		var h VnetHdr
		if t.vnet {
			h = ParseVnetHdr(buf)
			if h.GSO() {
				k.gsoFrames.Add(1)
			}
		}
		if c.arp && arpReply(frame, c.o.GuestMAC, c.ipv4) {
			k.arpReplies.Add(1)
			if t.vnet {
				clear(buf[:VnetHdrLen])
			}
			return buf
		}
		if c.o.VerifyCsum && !h.GSO() {
			if h.NeedsCsum() && completeCsum(frame, h) {
				k.csumDone.Add(1)
				buf[0] &^= unix.VIRTIO_NET_HDR_F_NEEDS_CSUM
			}
			switch verifyCsum(frame) {
			case csumOK:
				k.csumOK.Add(1)
			case csumBad:
				k.csumBad.Add(1)
			}
		}
		if !c.o.Reflect {
			return nil
		}
		reflect(frame)
		return buf
	}
}

// Send writes one frame into queue q of the tap (to the host), with a
// zeroed virtio header when the tap has one. It may be called while the
// Counter runs.
func (c *Counter) Send(q int, frame []byte) error {
	if q < 0 || q >= len(c.fds) {
		return fmt.Errorf("send: queue %d: %w", q, ErrInvalid)
	}
	t := c.fds[q]
	buf := make([]byte, t.hdrsz+len(frame))
	copy(buf[t.hdrsz:], frame)
	if _, err := unix.Write(t.fd, buf); err != nil {
		c.c[q].writeErrors.Add(1)
		return fmt.Errorf("send on queue %d: %w", q, err)
	}
	countTx(&c.c[q], len(frame))
	return nil
}

// Flood writes frame into queue q of the tap count times (until ctx ends
// when count <= 0), one write per frame with a zeroed virtio header, as fast
// as the tap takes them, and returns how many were written. It runs on the
// calling goroutine: lock and pin it to measure. Write errors are counted
// in Stats().WriteErrors and do not stop the flood.
func (c *Counter) Flood(ctx context.Context, q int, frame []byte, count int) (int, error) {
	if q < 0 || q >= len(c.fds) {
		return 0, fmt.Errorf("flood: queue %d: %w", q, ErrInvalid)
	}
	t := c.fds[q]
	buf := make([]byte, t.hdrsz+len(frame))
	copy(buf[t.hdrsz:], frame)
	k := &c.c[q]
	sent := 0
	for i := 0; count <= 0 || i < count; i++ {
		if i&1023 == 0 && ctx.Err() != nil {
			break
		}
		if _, err := unix.Write(t.fd, buf); err != nil {
			k.writeErrors.Add(1)
			continue
		}
		sent++
		countTx(k, len(frame))
	}
	return sent, nil
}

// CPUTime is the CPU time the Counter's worker threads have used so far
// (from schedstat; precise, unlike tick-based accounting). It is only
// meaningful while the Counter runs.
func (c *Counter) CPUTime() time.Duration { return c.r.cpuTime() }

// Stats returns the counters summed over the queues.
func (c *Counter) Stats() Stats {
	var s Stats
	for i := range c.c {
		c.c[i].addTo(&s)
	}
	return s
}

// Err returns the error that stopped a worker early, if any.
func (c *Counter) Err() error { return c.r.Err() }

// Close stops the workers and closes the emulator's fds. It is idempotent.
func (c *Counter) Close() error {
	if c.r.shutdown() {
		closeFds(c.fds)
	}
	return nil
}
