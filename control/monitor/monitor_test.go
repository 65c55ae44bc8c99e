package monitor

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/maps"
)

// fakeRegistry has fixed sandboxes and endpoints; remove drops a sandbox.
type fakeRegistry struct {
	mu  sync.Mutex
	sbs []control.Sandbox
	eps []control.Endpoint
}

func (r *fakeRegistry) Lookup(id string) (control.Sandbox, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var found []control.Sandbox
	for _, sb := range r.sbs {
		if sb.ID == id {
			return sb, nil
		}
		if strings.HasPrefix(sb.ID, id) {
			found = append(found, sb)
		}
	}
	if len(found) != 1 {
		return control.Sandbox{}, control.ErrNoSuchSandbox
	}
	return found[0], nil
}

func (r *fakeRegistry) Sandboxes() []control.Sandbox {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]control.Sandbox(nil), r.sbs...)
}

func (r *fakeRegistry) Endpoints() []control.Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]control.Endpoint(nil), r.eps...)
}

func (r *fakeRegistry) remove(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, sb := range r.sbs {
		if sb.ID == id {
			r.sbs = append(r.sbs[:i], r.sbs[i+1:]...)
			return
		}
	}
}

// fakeStream replays events, then waits.
type fakeStream struct {
	events chan maps.Event
	dl     time.Time
	closed chan struct{}
	once   sync.Once
}

func (s *fakeStream) Read() (maps.Event, error) {
	select {
	case e := <-s.events:
		return e, nil
	case <-time.After(time.Until(s.dl)):
		return maps.Event{}, os.ErrDeadlineExceeded
	case <-s.closed:
		return maps.Event{}, errors.New("closed")
	}
}
func (s *fakeStream) SetDeadline(t time.Time)            { s.dl = t }
func (s *fakeStream) Slot(ifindex uint32) (uint32, bool) { return ifindex - 10, true }
func (s *fakeStream) Suppressed() (uint64, error)        { return 0, nil }
func (s *fakeStream) Close() error                       { s.once.Do(func() { close(s.closed) }); return nil }

type fakeSource struct {
	mu      sync.Mutex
	streams map[string]*fakeStream
	flags   maps.MonitorFlags
	onOpen  func(id string)
}

func (f *fakeSource) Monitor(_ context.Context, id string, flags maps.MonitorFlags) (Stream, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.flags = flags
	if f.onOpen != nil {
		f.onOpen(id)
	}
	return f.streams[id], nil
}

func newFakes() (*fakeRegistry, *fakeSource) {
	reg := &fakeRegistry{
		sbs: []control.Sandbox{{ID: "aaa1"}, {ID: "bbb2"}},
		eps: []control.Endpoint{{Sandbox: "aaa1", NIC: "eth0", Slot: 0}, {Sandbox: "aaa1", NIC: "eth1", Slot: 1}, {Sandbox: "bbb2", NIC: "eth0", Slot: 0}},
	}
	src := &fakeSource{streams: map[string]*fakeStream{}}
	for _, id := range []string{"aaa1", "bbb2"} {
		src.streams[id] = &fakeStream{events: make(chan maps.Event, 16), closed: make(chan struct{})}
	}
	return reg, src
}

func TestCheck(t *testing.T) {
	reg, _ := newFakes()
	for _, tc := range []struct {
		f    Filter
		want error
		msg  string
	}{
		{Filter{}, nil, ""},
		{Filter{Sandbox: "aaa", NIC: "eth1", Types: []string{"drop", "lb"}, Reasons: []string{"spoof_ip"}}, nil, ""},
		{Filter{Types: []string{"drops"}}, control.ErrInvalid, `event type "drops": want one of drop, trace, lb`},
		{Filter{Reasons: []string{"nope"}}, control.ErrInvalid, `drop reason "nope": want one of spoof_mac`},
		{Filter{Types: []string{"lb"}, Reasons: []string{"spoof_ip"}}, control.ErrInvalid, "--reason selects drops"},
		{Filter{Sandbox: "zzz"}, control.ErrNoSuchSandbox, ""},
		{Filter{Sandbox: "bbb", NIC: "eth1"}, control.ErrNotFound, `NIC "eth1" in bbb2`},
	} {
		err := Check(reg, tc.f)
		if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.msg)) {
			t.Errorf("Check(%+v) = %v, want %v %q", tc.f, err, tc.want, tc.msg)
		}
	}
	// Node-wide needs no sandbox yet: it picks them up as they come.
	if err := Check(&fakeRegistry{}, Filter{}); err != nil {
		t.Errorf("node-wide Check with no sandboxes = %v", err)
	}
	if err := Check(&fakeRegistry{}, Filter{NIC: "eth0"}); !errors.Is(err, control.ErrNotFound) {
		t.Errorf("Check of a NIC with no sandboxes = %v", err)
	}
}

// TestRun: events are named (sandbox, NIC from the slot or, for lb, from the ifindex) and
// filtered by NIC and reason; the session ends with its context, with the client's error, or
// when its sandboxes are gone.
func TestRun(t *testing.T) {
	reg, src := newFakes()
	a := src.streams["aaa1"]
	ip := netip.MustParseAddrPort("10.0.0.2:4000")
	a.events <- maps.Event{Type: maps.EventDrop, Slot: 1, Reason: maps.DropSpoofIP, Ethertype: 0x0800, Proto: 17, Src: ip, Dst: netip.MustParseAddrPort("10.0.0.1:53"), Len: 60}
	a.events <- maps.Event{Type: maps.EventDrop, Slot: 0, Reason: maps.DropSpoofIP}  // other NIC
	a.events <- maps.Event{Type: maps.EventDrop, Slot: 1, Reason: maps.DropSpoofMAC} // other reason
	a.events <- maps.Event{Type: maps.EventLB, Slot: maps.NoSlot, Ifindex: 11, Proto: 6, Src: ip, Dst: netip.MustParseAddrPort("10.96.0.10:80"),
		Server: netip.MustParseAddrPort("10.0.0.11:80"), Suppressed: 3}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var got []Event
	err := Run(ctx, reg, src, Filter{Sandbox: "aaa", NIC: "eth1", Types: []string{"drop", "lb"}, Reasons: []string{"spoof_ip"}}, func(e Event) error {
		e.Time = time.Time{}
		got = append(got, e)
		if len(got) == 2 {
			return errors.New("client gone")
		}
		return nil
	})
	if err == nil || err.Error() != "client gone" {
		t.Errorf("Run = %v, want the client's error", err)
	}
	want := []Event{
		{Type: "drop", Sandbox: "aaa1", NIC: "eth1", Direction: "from_guest", Reason: "spoof_ip", Ethertype: "0x0800", Proto: "udp", Src: "10.0.0.2:4000", Dst: "10.0.0.1:53", Len: 60},
		{Type: "lb", Sandbox: "aaa1", NIC: "eth1", Direction: "from_guest", Ethertype: "0x0000", Proto: "tcp", Src: "10.0.0.2:4000", Dst: "10.96.0.10:80", Server: "10.0.0.11:80", Suppressed: 3},
	}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("events\n%+v, want\n%+v", got, want)
	}
	if src.flags != maps.MonitorDrop|maps.MonitorLB {
		t.Errorf("flags %v", src.flags)
	}
	select {
	case <-a.closed:
	default:
		t.Error("stream not closed when the session ended")
	}

	// The sandbox is removed once the session runs: ErrGone.
	reg, src = newFakes()
	src.onOpen = reg.remove
	if err := Run(context.Background(), reg, src, Filter{Sandbox: "aaa1"}, func(Event) error { return nil }); !errors.Is(err, ErrGone) {
		t.Errorf("Run after the sandbox went = %v, want ErrGone", err)
	}
}

func (r *fakeRegistry) add(sb control.Sandbox) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sbs = append(r.sbs, sb)
}

// TestRunNodeWide: a session without a sandbox starts with none registered, picks up the
// sandboxes registered later (their events come through), and runs on when they go.
func TestRunNodeWide(t *testing.T) {
	reg, src := newFakes()
	all := reg.sbs
	reg.sbs = nil
	opened := make(chan string, 4)
	src.onOpen = func(id string) { opened <- id }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan Event, 4)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, reg, src, Filter{}, func(e Event) error { got <- e; return nil })
	}()
	for _, sb := range all {
		reg.add(sb)
		select {
		case id := <-opened:
			if id != sb.ID {
				t.Fatalf("opened %s, want %s", id, sb.ID)
			}
		case <-time.After(10 * poll):
			t.Fatalf("sandbox %s registered after the start was not picked up", sb.ID)
		}
		src.streams[sb.ID].events <- maps.Event{Type: maps.EventDrop, Slot: 0, Reason: maps.DropSpoofIP}
		select {
		case e := <-got:
			if e.Sandbox != sb.ID || e.NIC != "eth0" || e.Reason != "spoof_ip" {
				t.Errorf("event %+v, want spoof_ip of %s eth0", e, sb.ID)
			}
		case <-time.After(10 * poll):
			t.Fatalf("no event from %s", sb.ID)
		}
	}
	// Every sandbox goes: the session runs on until its client leaves.
	reg.remove("aaa1")
	reg.remove("bbb2")
	for _, sb := range all {
		select {
		case <-src.streams[sb.ID].closed:
		case <-time.After(10 * poll):
			t.Fatalf("stream of removed %s not closed", sb.ID)
		}
	}
	select {
	case err := <-done:
		t.Fatalf("node-wide session ended when its sandboxes went: %v", err)
	case <-time.After(2 * poll):
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v after the client left, want nil", err)
	}
}
