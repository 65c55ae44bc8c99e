package dataplane

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/kata-dp/kata-dp/maps"
)

// The monitor of a sandbox (bpf/lib/monitor.h) is read by one ring buffer reader, however many
// streams watch it, which hands every event to each stream that asked for its type.
//
// Why one reader: a BPF ring buffer has one consumer position, in a page every reader of the
// ring maps. Two readers split the events between them, and race on that position (each loads
// it, reads a record and stores its own next position: one may move it back). Worse, the
// kernel wakes a waiting reader only when it commits a record at the consumer position, i.e.
// when the reader had caught up. And the datapath's flags must be written under the same lock
// as the counts they are the union of: when a closing stream computed "off" under the lock and
// wrote it after releasing it, a stream opening meanwhile could write "drops" first and then
// never see a drop (TestMonitorCloseBesideOpen, TestMonitorE2E's "second session saw no drop").

// monQueue is how many events a stream holds for its client: about what the ring holds
// (64 KiB of 96-byte records). A client slower than that loses events, counted (Suppressed),
// and never holds back the reader or the other streams.
const monQueue = 512

// monTypes are the event types a stream may ask for, one bit each.
var monTypes = []maps.MonitorFlags{maps.MonitorDrop, maps.MonitorTrace, maps.MonitorLB}

// monHub is the one reader of a sandbox's ring while any stream watches it. Its fields other
// than the descriptors are under Dataplane.monMu.
type monHub struct {
	rd      *ringbuf.Reader
	eps     *ebpf.Map // the sandbox's endpoints: lb events name only their device
	pending maps.MonitorPending
	streams map[*MonitorStream]struct{}
	done    chan struct{} // closed when the reader has stopped: err says why, unless closed
	err     error
}

// MonitorStream is one client's events of one sandbox (bpf/lib/monitor.h): each stream gets
// every event of the types it asked for that the datapath reported after it opened. It holds
// its own file descriptors of the sandbox's maps (through its hub), so the sandbox can be
// removed while it reads (the stream then just sees no more events). Not safe for concurrent
// use, except Close.
type MonitorStream struct {
	d     *Dataplane
	sb    *Sandbox
	id    string
	flags maps.MonitorFlags
	since time.Duration // the monotonic clock when it opened: older events are not its own
	hub   *monHub
	ch    chan maps.Event
	stop  chan struct{} // closed by Close

	deadline time.Time
	// Under Dataplane.monMu:
	lost   uint64 // events this stream missed (rate limit, or its queue was full) not yet reported
	closed bool
}

// Monitor starts reporting the events of flags in sandbox id (the datapath starts emitting
// them now) and returns a stream of them. Several streams may watch one sandbox: the datapath
// reports the union of what they ask, each stream gets all of it that it asked for, and the
// datapath stops when the last one is closed.
func (d *Dataplane) Monitor(ctx context.Context, id string, flags maps.MonitorFlags) (*MonitorStream, error) {
	s := &MonitorStream{d: d, id: id, flags: flags, ch: make(chan maps.Event, monQueue), stop: make(chan struct{})}
	err := d.read(id, func(sb *Sandbox) error {
		s.sb = sb
		d.monMu.Lock()
		defer d.monMu.Unlock()
		// Taken under the lock the hub hands events out under: an event stamped later was
		// committed later, so the hub hands it out after this stream joined. CLOCK_MONOTONIC
		// is bpf_ktime_get_ns's clock, which stamps the events.
		s.since = time.Duration(maps.MonotonicNow())
		var err error
		if sb.mon == nil {
			if sb.mon, err = openHub(d, sb); err != nil {
				return err
			}
		}
		s.hub = sb.mon
		s.hub.streams[s] = struct{}{}
		if sb.monWant == nil {
			sb.monWant = map[maps.MonitorFlags]int{}
		}
		for _, f := range monTypes {
			if flags&f != 0 {
				sb.monWant[f]++
			}
		}
		if err := (maps.MonitorConfig{Map: sb.lsb.Maps().Mon}).Set(sb.monFlags(), 0, 0); err != nil {
			s.release()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("monitor %s: %w", id, err)
	}
	return s, nil
}

// openHub opens the reader of sb's ring and starts handing out its events; d.monMu held.
func openHub(d *Dataplane, sb *Sandbox) (*monHub, error) {
	m := sb.lsb.Maps()
	events, err := m.MonEvents.Clone()
	if err != nil {
		return nil, err
	}
	defer events.Close() // the reader keeps its own mapping
	h := &monHub{streams: map[*MonitorStream]struct{}{}, done: make(chan struct{})}
	if h.rd, err = ringbuf.NewReader(events); err != nil {
		return nil, err
	}
	if h.eps, err = m.Endpoints.Clone(); err != nil {
		h.rd.Close()
		return nil, err
	}
	rl, err := m.MonRL.Clone()
	if err != nil {
		h.rd.Close()
		h.eps.Close()
		return nil, err
	}
	h.pending = maps.MonitorPending{Map: rl}
	go h.run(d, sb)
	return h, nil
}

// run reads the ring until the hub is closed (or the read fails) and hands each event to the
// streams that want it, without ever waiting for one. A hub whose read failed ends its streams
// with the error (Read) and leaves the sandbox: the next Monitor opens a new one.
func (h *monHub) run(d *Dataplane, sb *Sandbox) {
	var rec ringbuf.Record
	for {
		err := h.rd.ReadInto(&rec)
		if err != nil {
			d.monMu.Lock()
			if !errors.Is(err, os.ErrClosed) {
				h.err = err
				if sb.mon == h {
					sb.mon = nil
				}
			}
			close(h.done)
			d.monMu.Unlock()
			return
		}
		e, err := maps.DecodeEvent(rec.RawSample)
		if err != nil {
			continue // not an event of this datapath: nothing to hand out
		}
		d.monMu.Lock()
		for s := range h.streams {
			s.offer(e)
		}
		d.monMu.Unlock()
	}
}

// offer queues e when s asked for its type and e happened after s opened; d.monMu held. A full
// queue loses e, and the next event queued carries the count.
func (s *MonitorStream) offer(e maps.Event) {
	if s.flags&typeFlag(e.Type) == 0 || e.Time < s.since {
		return
	}
	e.Suppressed = uint32(min(uint64(e.Suppressed)+s.lost, math.MaxUint32))
	select {
	case s.ch <- e:
		s.lost = 0
	default:
		s.lost++
	}
}

func typeFlag(t maps.EventType) maps.MonitorFlags {
	switch t {
	case maps.EventDrop:
		return maps.MonitorDrop
	case maps.EventTrace:
		return maps.MonitorTrace
	case maps.EventLB:
		return maps.MonitorLB
	}
	return 0
}

// monFlags is the union of what the streams of sb ask; Dataplane.monMu held.
func (sb *Sandbox) monFlags() maps.MonitorFlags {
	var f maps.MonitorFlags
	for flag, n := range sb.monWant {
		if n > 0 {
			f |= flag
		}
	}
	return f
}

// release forgets the stream: its types and its place in the hub, closing the hub (its reader
// and descriptors) when it was the last; d.monMu held. It does not write the config. The
// reader is closed before release returns, so the next hub's reader never runs beside it.
func (s *MonitorStream) release() {
	s.closed = true
	close(s.stop)
	for _, f := range monTypes {
		if s.flags&f != 0 && s.sb.monWant[f] > 0 {
			s.sb.monWant[f]--
		}
	}
	delete(s.hub.streams, s)
	if len(s.hub.streams) > 0 {
		return
	}
	if s.sb.mon == s.hub {
		s.sb.mon = nil
	}
	s.hub.rd.Close() // waits for a read in progress; the reader then waits for d.monMu
	s.hub.eps.Close()
	s.hub.pending.Map.Close()
}

// Read waits for the next event (until the deadline set with SetDeadline: then an error
// wrapping os.ErrDeadlineExceeded). Events already queued come first, even after the deadline.
func (s *MonitorStream) Read() (maps.Event, error) {
	select {
	case e := <-s.ch:
		return e, nil
	default:
	}
	var timeout <-chan time.Time
	if !s.deadline.IsZero() {
		t := time.NewTimer(time.Until(s.deadline))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case e := <-s.ch:
		return e, nil
	case <-s.stop:
		return maps.Event{}, fmt.Errorf("monitor %s: %w", s.id, os.ErrClosed)
	case <-s.hub.done:
		select {
		case e := <-s.ch:
			return e, nil
		default:
		}
		if s.hub.err == nil { // the hub closed under the stream: only Close does that
			return maps.Event{}, fmt.Errorf("monitor %s: %w", s.id, os.ErrClosed)
		}
		return maps.Event{}, fmt.Errorf("monitor %s: read events: %w", s.id, s.hub.err)
	case <-timeout:
		return maps.Event{}, fmt.Errorf("monitor %s: %w", s.id, os.ErrDeadlineExceeded)
	}
}

// SetDeadline bounds the next Reads.
func (s *MonitorStream) SetDeadline(t time.Time) { s.deadline = t }

// Slot returns the NIC slot of the device ifindex (lb events name only their device).
func (s *MonitorStream) Slot(ifindex uint32) (uint32, bool) {
	e, err := maps.EndpointMap{Map: s.hub.eps}.Get(ifindex)
	if err != nil {
		return 0, false
	}
	return e.Slot, true
}

// Suppressed takes the events this stream missed that no event has reported yet: those the
// rate limit suppressed (kdp_mon_rl's pending counts, summed over the CPUs, which every stream
// of the sandbox is told of) and those its queue had no room for.
func (s *MonitorStream) Suppressed() (uint64, error) {
	s.d.monMu.Lock()
	defer s.d.monMu.Unlock()
	if s.closed {
		return 0, fmt.Errorf("monitor %s: %w", s.id, os.ErrClosed)
	}
	n, err := s.hub.pending.Take()
	for o := range s.hub.streams {
		o.lost += n
	}
	n, s.lost = s.lost, 0
	return n, err
}

// Close stops the stream; the datapath stops reporting what no other stream asks for. Close
// may be called more than once, and while Read waits: it interrupts the wait.
// Lock order: Sandbox.closing, then Dataplane.monMu.
func (s *MonitorStream) Close() error {
	s.sb.closing.RLock()
	defer s.sb.closing.RUnlock()
	s.d.monMu.Lock()
	defer s.d.monMu.Unlock()
	if s.closed {
		return nil
	}
	s.release()
	if s.sb.closed {
		return nil // the sandbox is gone: nothing to switch off
	}
	if err := (maps.MonitorConfig{Map: s.sb.lsb.Maps().Mon}).Set(s.sb.monFlags(), 0, 0); err != nil {
		return fmt.Errorf("close monitor of %s: %w", s.id, err)
	}
	return nil
}
