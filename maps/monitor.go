package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/loader"
)

// MonitorFlags select the monitor's event types (enum kdp_mon_flags).
type MonitorFlags uint32

// Event types the monitor can be asked for.
const (
	MonitorDrop  MonitorFlags = 1 << 0
	MonitorTrace MonitorFlags = 1 << 1
	MonitorLB    MonitorFlags = 1 << 2
)

// EventType is enum kdp_mon_type.
type EventType uint8

// Event types.
const (
	EventDrop  EventType = 1
	EventTrace EventType = 2
	EventLB    EventType = 3
)

func (t EventType) String() string {
	switch t {
	case EventDrop:
		return "drop"
	case EventTrace:
		return "trace"
	case EventLB:
		return "lb"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// NoSlot is the slot of an event that names only its ifindex (lb events).
const NoSlot = 0xffffffff

// Default rate limit of the monitor: per CPU, a burst of MonitorBurst events, refilled at
// MonitorRate events per second.
const (
	MonitorRate  = 2000
	MonitorBurst = 200
)

// MonitorConfig is the kdp_mon map: which events the datapath reports, and its rate limit.
type MonitorConfig struct{ Map *ebpf.Map }

// Set writes the flags (0: off) with the rate limit (rate events/s and burst per CPU; 0 takes
// the defaults). rate is capped at 1e6 (the bucket's arithmetic assumes it).
func (m MonitorConfig) Set(flags MonitorFlags, rate, burst uint32) error {
	if rate == 0 {
		rate = MonitorRate
	}
	if burst == 0 {
		burst = MonitorBurst
	}
	c := loader.DatapathMonCfg{Flags: uint32(flags), Rate: min(rate, 1000000), Burst: burst}
	if err := m.Map.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set monitor: %w", err)
	}
	return nil
}

// Flags reads the flags in force.
func (m MonitorConfig) Flags() (MonitorFlags, error) {
	var c loader.DatapathMonCfg
	if err := m.Map.Lookup(uint32(0), &c); err != nil {
		return 0, fmt.Errorf("read monitor config: %w", err)
	}
	return MonitorFlags(c.Flags), nil
}

// MonitorPending is the kdp_mon_rl map: per-CPU token buckets.
type MonitorPending struct{ Map *ebpf.Map }

// Take returns the events suppressed on every CPU since each CPU's last emitted event, and
// resets them: what no event has reported yet.
func (m MonitorPending) Take() (uint64, error) {
	var per []loader.DatapathMonRl
	if err := m.Map.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read monitor rate limit: %w", err)
	}
	var n uint64
	for i := range per {
		n += per[i].Pending
		per[i].Pending = 0
	}
	if n > 0 {
		// A CPU may suppress one more meanwhile; the next session's count gets it or not.
		if err := m.Map.Update(uint32(0), per, ebpf.UpdateExist); err != nil {
			return n, fmt.Errorf("reset monitor rate limit: %w", err)
		}
	}
	return n, nil
}

// Event is one datapath event of the monitor (struct mon_event).
type Event struct {
	// Time is the kernel's monotonic clock (bpf_ktime_get_ns) at the event.
	Time       time.Duration
	Ifindex    uint32
	Slot       uint32 // NoSlot for lb events
	Len        uint32
	Suppressed uint32 // events this CPU suppressed just before this one
	Type       EventType
	Dir        Direction
	Reason     DropReason // drops
	Ethertype  uint16
	Proto      uint8
	Src, Dst   netip.AddrPort // zero when the frame is not IP; ports 0 when unknown
	// Server is the real server chosen (lb events); Dst is then the VIP.
	Server netip.AddrPort
}

// EventSize is sizeof(struct mon_event).
const EventSize = 88

// ErrShortEvent is returned for a record shorter than an event.
var ErrShortEvent = errors.New("monitor event too short")

// DecodeEvent decodes one ring buffer record (struct mon_event, little-endian host order with
// the frame's fields in network order).
func DecodeEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("%w: %d bytes", ErrShortEvent, len(b))
	}
	le := binary.LittleEndian
	be := binary.BigEndian
	e := Event{
		Time:       time.Duration(le.Uint64(b[0:])),
		Ifindex:    le.Uint32(b[8:]),
		Slot:       le.Uint32(b[12:]),
		Len:        le.Uint32(b[16:]),
		Suppressed: le.Uint32(b[20:]),
		Type:       EventType(b[24]),
		Dir:        Direction(b[25]),
		Reason:     DropReason(b[26]),
		Proto:      b[28],
		Ethertype:  be.Uint16(b[30:]),
	}
	family := b[27]
	sport, dport, rport := be.Uint16(b[32:]), be.Uint16(b[34:]), be.Uint16(b[36:])
	addr := func(off int) netip.Addr {
		switch family {
		case 2: // AF_INET
			return netip.AddrFrom4([4]byte(b[off : off+4]))
		case 10: // AF_INET6
			return netip.AddrFrom16([16]byte(b[off : off+16]))
		}
		return netip.Addr{}
	}
	if s := addr(40); s.IsValid() {
		e.Src = netip.AddrPortFrom(s, sport)
	}
	if d := addr(56); d.IsValid() {
		e.Dst = netip.AddrPortFrom(d, dport)
	}
	if e.Type == EventLB {
		if r := addr(72); r.IsValid() {
			e.Server = netip.AddrPortFrom(r, rport)
		}
	}
	return e, nil
}
