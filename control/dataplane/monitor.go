package dataplane

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/kata-dp/kata-dp/maps"
)

// MonitorStream reads one sandbox's monitor events (bpf/lib/monitor.h) for one client. It
// holds its own file descriptors of the sandbox's maps, so the sandbox can be removed while it
// reads (the stream then just sees no more events). Not safe for concurrent use, except Close.
type MonitorStream struct {
	d       *Dataplane
	id      string
	flags   maps.MonitorFlags
	rd      *ringbuf.Reader
	eps     *ebpf.Map
	pending maps.MonitorPending
	closed  bool
}

// Monitor starts reporting the events of flags in sandbox id (the datapath starts emitting
// them now) and returns a stream of them. Several streams may watch one sandbox: the datapath
// reports the union of what they ask, and stops when the last one is closed.
func (d *Dataplane) Monitor(ctx context.Context, id string, flags maps.MonitorFlags) (*MonitorStream, error) {
	s := &MonitorStream{d: d, id: id, flags: flags}
	err := d.read(id, func(sb *Sandbox) error {
		m := sb.lsb.Maps()
		events, err := m.MonEvents.Clone()
		if err != nil {
			return err
		}
		defer events.Close() // the reader keeps its own mapping
		if s.rd, err = ringbuf.NewReader(events); err != nil {
			return err
		}
		if s.eps, err = m.Endpoints.Clone(); err != nil {
			s.rd.Close()
			return err
		}
		rl, err := m.MonRL.Clone()
		if err != nil {
			s.rd.Close()
			s.eps.Close()
			return err
		}
		s.pending = maps.MonitorPending{Map: rl}
		d.monMu.Lock()
		defer d.monMu.Unlock()
		if d.mons == nil {
			d.mons = map[string]map[maps.MonitorFlags]int{}
		}
		if d.mons[id] == nil {
			d.mons[id] = map[maps.MonitorFlags]int{}
		}
		for _, f := range []maps.MonitorFlags{maps.MonitorDrop, maps.MonitorTrace, maps.MonitorLB} {
			if flags&f != 0 {
				d.mons[id][f]++
			}
		}
		if err := (maps.MonitorConfig{Map: m.Mon}).Set(d.monFlags(id), 0, 0); err != nil {
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

// monFlags is the union of what the streams of sandbox id ask; d.monMu held.
func (d *Dataplane) monFlags(id string) maps.MonitorFlags {
	var f maps.MonitorFlags
	for flag, n := range d.mons[id] {
		if n > 0 {
			f |= flag
		}
	}
	return f
}

// release forgets the stream's flags and closes its descriptors; d.monMu held. It does not
// write the config.
func (s *MonitorStream) release() {
	for _, f := range []maps.MonitorFlags{maps.MonitorDrop, maps.MonitorTrace, maps.MonitorLB} {
		if s.flags&f != 0 && s.d.mons[s.id][f] > 0 {
			s.d.mons[s.id][f]--
		}
	}
	if s.d.monFlags(s.id) == 0 {
		delete(s.d.mons, s.id)
	}
	s.rd.Close()
	s.eps.Close()
	s.pending.Map.Close()
}

// Read waits for the next event (until the deadline set with SetDeadline: then an error
// wrapping os.ErrDeadlineExceeded).
func (s *MonitorStream) Read() (maps.Event, error) {
	rec, err := s.rd.Read()
	if err != nil {
		return maps.Event{}, err
	}
	return maps.DecodeEvent(rec.RawSample)
}

// SetDeadline bounds the next Reads.
func (s *MonitorStream) SetDeadline(t time.Time) { s.rd.SetDeadline(t) }

// Slot returns the NIC slot of the device ifindex (lb events name only their device).
func (s *MonitorStream) Slot(ifindex uint32) (uint32, bool) {
	e, err := maps.EndpointMap{Map: s.eps}.Get(ifindex)
	if err != nil {
		return 0, false
	}
	return e.Slot, true
}

// Suppressed takes the events the rate limit suppressed that no event has reported yet
// (kdp_mon_rl's pending counts, summed over the CPUs).
func (s *MonitorStream) Suppressed() (uint64, error) { return s.pending.Take() }

// Close stops the stream; the datapath stops reporting what no other stream asks for.
// Lock order: Sandbox.closing (Dataplane.read), then Dataplane.monMu.
func (s *MonitorStream) Close() error {
	done := func() (maps.MonitorFlags, bool) {
		s.d.monMu.Lock()
		defer s.d.monMu.Unlock()
		if s.closed {
			return 0, false
		}
		s.closed = true
		s.release()
		return s.d.monFlags(s.id), true
	}
	err := s.d.read(s.id, func(sb *Sandbox) error {
		if flags, ok := done(); ok {
			return (maps.MonitorConfig{Map: sb.lsb.Maps().Mon}).Set(flags, 0, 0)
		}
		return nil
	})
	if err != nil {
		done() // the sandbox is gone: nothing to switch off
		if errors.Is(err, ErrNoSandbox) {
			return nil
		}
		return fmt.Errorf("close monitor of %s: %w", s.id, err)
	}
	return nil
}
