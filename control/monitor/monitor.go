// Package monitor runs `kata-dp monitor` sessions in the agent: it checks a client's filter
// against the sandboxes and NICs that exist, opens the event streams of the sandboxes it
// selects (control/dataplane's Monitor: the datapath reports only while someone listens),
// names each event's sandbox and NIC, filters by NIC and reason, and hands the events to the
// caller (the API streams them as JSON lines).
//
// One ring buffer per sandbox (bpf/lib/monitor.h), rather than one per node, so a session that
// watches one sandbox switches on the reporting of that sandbox only, the others keep paying
// nothing; and the sandbox of an event is the ring it came from, not a field the datapath would
// need to be told. docs/metrics.md has the reasoning with the numbers.
//
// A session without a sandbox is node-wide: it watches every sandbox registered when it starts
// and every one registered later (it looks every poll interval), and runs on when they go, as
// a node's operator expects of `kata-dp monitor` left running while sandboxes come and go. A
// session on one sandbox ends when that sandbox goes (ErrGone).
//
// Run is safe for concurrent use (each call is one session); every session on a sandbox gets
// each of its events (the dataplane reads a sandbox's ring once and hands each event to every
// stream that asked for its type), from the moment the session opened its stream.
package monitor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/maps"
)

// Types are the event types a session may ask for.
var Types = []string{"drop", "trace", "lb"}

// Filter selects events. The zero value is every drop of every sandbox.
type Filter struct {
	Sandbox string   // sandbox id or unique prefix; "" = every sandbox, now and later
	NIC     string   // kata-network NIC name; "" = every NIC
	Types   []string // drop, trace, lb; none = drop
	Reasons []string // drop reasons; none = all
}

// Event is one monitor event as a client sees it.
type Event struct {
	Time      time.Time `json:"time"`
	Type      string    `json:"type"` // drop, trace, lb; "suppressed" for a count alone
	Sandbox   string    `json:"sandbox"`
	NIC       string    `json:"nic,omitempty"`
	Direction string    `json:"direction,omitempty"` // from_guest, to_guest
	Reason    string    `json:"reason,omitempty"`    // drops
	Ethertype string    `json:"ethertype,omitempty"` // 0x0800, ...
	Proto     string    `json:"proto,omitempty"`     // tcp, udp, icmp, or the number
	Src       string    `json:"src,omitempty"`       // address, or address:port
	Dst       string    `json:"dst,omitempty"`       // for lb: the VIP
	Server    string    `json:"server,omitempty"`    // lb: the real server chosen
	Len       uint32    `json:"len,omitempty"`
	// Suppressed is how many events the session missed before this one: those the datapath's
	// rate limit dropped (on the same CPU) and those the session was too slow to take; for a
	// "suppressed" record, how many it missed that no event reported.
	Suppressed uint64 `json:"suppressed,omitempty"`
}

// Source opens a sandbox's event stream (control/dataplane.Dataplane).
type Source interface {
	Monitor(ctx context.Context, id string, flags maps.MonitorFlags) (Stream, error)
}

// Stream is one sandbox's events (control/dataplane.MonitorStream).
type Stream interface {
	Read() (maps.Event, error)
	SetDeadline(time.Time)
	Slot(ifindex uint32) (uint32, bool)
	Suppressed() (uint64, error)
	// Close may be called more than once, and while Read waits: it interrupts the wait.
	Close() error
}

// Registry is what a session needs of the control plane (control.Controller).
type Registry interface {
	Lookup(id string) (control.Sandbox, error)
	Sandboxes() []control.Sandbox
	Endpoints() []control.Endpoint
}

// Errors of a session.
var (
	// ErrGone: the sandbox a session watched was removed.
	ErrGone = errors.New("monitored sandboxes removed")
)

// plan is a checked filter.
type plan struct {
	ids     []string // the sandboxes to watch now
	all     bool     // node-wide: also every sandbox registered later
	nic     string
	flags   maps.MonitorFlags
	reasons map[string]bool
}

// Check validates f: known types and reasons, an existing sandbox (exact id or unique prefix)
// and NIC. Its errors wrap control.ErrInvalid, control.ErrNoSuchSandbox (or ErrAmbiguous) and
// control.ErrNotFound.
func Check(reg Registry, f Filter) error {
	_, err := check(reg, f)
	return err
}

func check(reg Registry, f Filter) (plan, error) {
	p := plan{nic: f.NIC}
	types := f.Types
	if len(types) == 0 {
		types = []string{"drop"}
	}
	for _, t := range types {
		switch t {
		case "drop":
			p.flags |= maps.MonitorDrop
		case "trace":
			p.flags |= maps.MonitorTrace
		case "lb":
			p.flags |= maps.MonitorLB
		default:
			return p, fmt.Errorf("%w: event type %q: want one of %s", control.ErrInvalid, t, strings.Join(Types, ", "))
		}
	}
	if len(f.Reasons) > 0 {
		known := map[string]bool{}
		var names []string
		for _, r := range maps.DropReasons() {
			known[r.String()] = true
			names = append(names, r.String())
		}
		p.reasons = map[string]bool{}
		for _, r := range f.Reasons {
			if !known[r] {
				return p, fmt.Errorf("%w: drop reason %q: want one of %s", control.ErrInvalid, r, strings.Join(names, ", "))
			}
			p.reasons[r] = true
		}
		if p.flags&maps.MonitorDrop == 0 {
			return p, fmt.Errorf("%w: --reason selects drops: add --type drop", control.ErrInvalid)
		}
	}
	if f.Sandbox != "" {
		sb, err := reg.Lookup(f.Sandbox)
		if err != nil {
			return p, err
		}
		p.ids = []string{sb.ID}
	} else {
		p.all = true
		for _, sb := range reg.Sandboxes() {
			p.ids = append(p.ids, sb.ID)
		}
	}
	if f.NIC != "" {
		found := false
		for _, ep := range reg.Endpoints() {
			if ep.NIC == f.NIC && slices.Contains(p.ids, ep.Sandbox) {
				found = true
			}
		}
		if !found {
			return p, fmt.Errorf("%w: NIC %q in %s", control.ErrNotFound, f.NIC, strings.Join(p.ids, ", "))
		}
	}
	return p, nil
}

// poll is how often a waiting session looks at its context, the sandboxes it watches and the
// rate limit's unreported count.
const poll = 500 * time.Millisecond

// item is what a sandbox's reader hands the session: an event, or the error that ended its
// stream (of sandbox id).
type item struct {
	ev  Event
	id  string
	err error
}

// Run runs one session until ctx ends (nil), emit fails (the client left: that error), or the
// one sandbox it watches is removed (ErrGone). The filter is checked first (Check's errors).
// A node-wide session (no sandbox in f) picks up the sandboxes registered after it started,
// and forgets one whose stream ended (removed, or a read error): it is opened again at the next
// poll if it is still registered.
func Run(ctx context.Context, reg Registry, src Source, f Filter, emit func(Event) error) error {
	p, err := check(reg, f)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	watched := map[string]Stream{}
	defer func() {
		// Closing the streams interrupts the readers' waits at once: the datapath stops
		// reporting what no other session asks for now, not up to a poll interval later.
		cancel()
		for _, s := range watched {
			s.Close()
		}
		wg.Wait()
	}()
	names := newNames(reg)
	out := make(chan item, 64)
	open := func(id string) error {
		s, err := src.Monitor(ctx, id, p.flags)
		if err != nil {
			return fmt.Errorf("monitor %s: %w", id, err)
		}
		watched[id] = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.Close()
			read(ctx, reg, s, id, p, names, out)
		}()
		return nil
	}
	for _, id := range p.ids {
		if err := open(id); err != nil {
			return err // the deferred cancel closes the streams opened so far
		}
	}
	var tick <-chan time.Time
	if p.all {
		t := time.NewTicker(poll)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick:
			for _, sb := range reg.Sandboxes() {
				if _, ok := watched[sb.ID]; !ok {
					open(sb.ID) // a sandbox not ready yet is tried again at the next tick
				}
			}
		case it := <-out:
			if it.err != nil {
				delete(watched, it.id)
				if p.all {
					continue
				}
				return it.err
			}
			if err := emit(it.ev); err != nil {
				return err
			}
		}
	}
}

// read forwards the events of one sandbox's stream until ctx ends or the sandbox goes.
func read(ctx context.Context, reg Registry, s Stream, id string, p plan, names *names, out chan<- item) {
	send := func(it item) bool {
		select {
		case out <- it:
			return true
		case <-ctx.Done():
			return false
		}
	}
	boot := bootTime()
	for ctx.Err() == nil {
		s.SetDeadline(time.Now().Add(poll))
		e, err := s.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if sb, err := reg.Lookup(id); err != nil || sb.ID != id {
				send(item{id: id, err: fmt.Errorf("%w: %s", ErrGone, id)})
				return
			}
			if n, err := s.Suppressed(); err == nil && n > 0 {
				if !send(item{ev: Event{Time: time.Now(), Type: "suppressed", Sandbox: id, Suppressed: n}}) {
					return
				}
			}
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				send(item{id: id, err: fmt.Errorf("read events of %s: %w", id, err)})
			}
			return
		}
		slot := e.Slot
		if slot == maps.NoSlot {
			var ok bool
			if slot, ok = s.Slot(e.Ifindex); !ok {
				slot = maps.NoSlot
			}
		}
		ev := Event{
			Time: boot.Add(e.Time), Type: e.Type.String(), Sandbox: id, NIC: names.nic(id, slot),
			Direction: e.Dir.String(), Ethertype: fmt.Sprintf("0x%04x", e.Ethertype), Proto: protoName(e.Proto),
			Src: addr(e.Src), Dst: addr(e.Dst), Server: addr(e.Server), Len: e.Len, Suppressed: uint64(e.Suppressed),
		}
		if e.Type == maps.EventDrop {
			ev.Reason = e.Reason.String()
		}
		if p.nic != "" && ev.NIC != p.nic {
			continue
		}
		if p.reasons != nil && e.Type == maps.EventDrop && !p.reasons[ev.Reason] {
			continue
		}
		if !send(item{ev: ev}) {
			return
		}
	}
}

func addr(a netip.AddrPort) string {
	switch {
	case !a.IsValid():
		return ""
	case a.Port() == 0:
		return a.Addr().String()
	}
	return a.String()
}

func protoName(p uint8) string {
	switch p {
	case 0:
		return ""
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	}
	return fmt.Sprint(p)
}

// names maps (sandbox, slot) to NIC names, re-reading the registry for a slot it does not know
// (a NIC added during the session).
type names struct {
	reg Registry
	mu  sync.Mutex
	m   map[string]map[uint32]string
}

func newNames(reg Registry) *names {
	n := &names{reg: reg}
	n.load()
	return n
}

func (n *names) load() {
	n.m = map[string]map[uint32]string{}
	for _, ep := range n.reg.Endpoints() {
		if n.m[ep.Sandbox] == nil {
			n.m[ep.Sandbox] = map[uint32]string{}
		}
		n.m[ep.Sandbox][ep.Slot] = ep.NIC
	}
}

func (n *names) nic(id string, slot uint32) string {
	if slot == maps.NoSlot {
		return ""
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if name, ok := n.m[id][slot]; ok {
		return name
	}
	n.load()
	if name, ok := n.m[id][slot]; ok {
		return name
	}
	return fmt.Sprintf("slot%d", slot)
}

// bootTime is the wall time of the monotonic clock's zero (bpf_ktime_get_ns counts from boot).
func bootTime() time.Time {
	return time.Now().Add(-time.Duration(maps.MonotonicNow()))
}
