package dataplane_test

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestMonitorStreams: the datapath reports the union of what the open streams of a sandbox
// ask and nothing once the last is closed; a sandbox removed under an open stream leaves the
// stream closable (no use of closed descriptors: TestMain counts them); an unknown sandbox is
// ErrNoSandbox.
func TestMonitorStreams(t *testing.T) {
	topotest.RequireRoot(t, "loads BPF programs")
	root := topotest.BPFFS(t, "kdpt-dpmon")
	dp, err := dataplane.New(root)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	ctx := context.Background()
	if err := dp.EnsureSandbox(ctx, "mon", "/proc/self/ns/net"); err != nil {
		t.Fatal(err)
	}
	pins, err := loader.Open(root, "mon") // a second view of the pinned maps, to read the flags
	if err != nil {
		t.Fatal(err)
	}
	defer pins.Close()
	flags := func() maps.MonitorFlags {
		t.Helper()
		f, err := maps.MonitorConfig{Map: pins.Maps().Mon}.Flags()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	if f := flags(); f != 0 {
		t.Fatalf("flags %v before any stream", f)
	}
	s1, err := dp.Monitor(ctx, "mon", maps.MonitorDrop)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := dp.Monitor(ctx, "mon", maps.MonitorDrop|maps.MonitorTrace)
	if err != nil {
		t.Fatal(err)
	}
	if f := flags(); f != maps.MonitorDrop|maps.MonitorTrace {
		t.Errorf("flags %v with two streams, want drop|trace", f)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if f := flags(); f != maps.MonitorDrop {
		t.Errorf("flags %v after the trace stream closed, want drop", f)
	}
	s1.SetDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := s1.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Read with nothing to read = %v, want a deadline error", err)
	}
	if n, err := s1.Suppressed(); err != nil || n != 0 {
		t.Errorf("Suppressed = %d, %v", n, err)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if f := flags(); f != 0 {
		t.Errorf("flags %v after the last stream closed, want 0", f)
	}

	s3, err := dp.Monitor(ctx, "mon", maps.MonitorLB)
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.RemoveSandbox(ctx, "mon"); err != nil {
		t.Fatal(err)
	}
	s3.SetDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := s3.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Read after the sandbox went = %v, want a deadline error", err)
	}
	if err := s3.Close(); err != nil {
		t.Errorf("Close after the sandbox went: %v", err)
	}
	if _, err := dp.Monitor(ctx, "mon", maps.MonitorDrop); !errors.Is(err, dataplane.ErrNoSandbox) {
		t.Errorf("Monitor of a removed sandbox = %v, want ErrNoSandbox", err)
	}
}

// monRig is a dataplane with one sandbox ("mon", in this netns, nothing attached) and a second
// view of its pins: to read the monitor flags and to run its tap program on crafted frames,
// which report drops as the datapath does for a real guest.
type monRig struct {
	dp    *dataplane.Dataplane
	pins  *loader.Sandbox
	tapIn *ebpf.Program
}

// dropStream opens a stream of the rig's drops, closed at the test's end (Close may be
// called again before that).
func (r *monRig) dropStream(t *testing.T) *dataplane.MonitorStream {
	t.Helper()
	s, err := r.dp.Monitor(context.Background(), "mon", maps.MonitorDrop)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newMonRig(t *testing.T) *monRig {
	t.Helper()
	topotest.RequireRoot(t, "loads BPF programs")
	root := topotest.BPFFS(t, "kdpt-dpmon")
	dp, err := dataplane.New(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	if err := dp.EnsureSandbox(context.Background(), "mon", "/proc/self/ns/net"); err != nil {
		t.Fatal(err)
	}
	pins, err := loader.Open(root, "mon")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pins.Close() })
	tapIn, err := pins.Program(loader.ProgTapIn)
	if err != nil {
		t.Fatal(err)
	}
	// The frames "arrive" on lo (ifindex 1), the tap of a guest with an anti-spoof endpoint.
	ep := maps.Endpoint{PeerIfindex: 42, Slot: 5, Role: maps.RoleTap, Flags: maps.FlagAntiSpoof,
		Addr: netip.MustParsePrefix("172.16.0.3/16")}
	ep.SetMAC(net.HardwareAddr{0x02, 0x42, 0x20, 0x6f, 0xa3, 0x69})
	if err := (maps.EndpointMap{Map: pins.Maps().Endpoints}).Put(1, ep); err != nil {
		t.Fatal(err)
	}
	return &monRig{dp: dp, pins: pins, tapIn: tapIn}
}

func (r *monRig) flags(t *testing.T) maps.MonitorFlags {
	t.Helper()
	f, err := maps.MonitorConfig{Map: r.pins.Maps().Mon}.Flags()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// drop runs one frame from the guest with a spoofed source MAC and source address 10.99.0.n
// (so a test can tell the events apart): a spoof_mac drop.
func (r *monRig) drop(t *testing.T, n uint8) {
	t.Helper()
	f := make([]byte, 14+20+8)
	copy(f, []byte{2, 0, 0, 0, 0, 0xfe, 2, 0, 0, 0, 0, 1, 0x08, 0x00}) // not the guest's MAC
	ip := f[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], 28)
	copy(ip[12:], []byte{10, 99, 0, n, 172, 16, 0, 1})
	ret, err := r.tapIn.Run(&ebpf.RunOptions{Data: f, Context: skbCtx{Ifindex: 1}})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if ret != 2 { // TC_ACT_SHOT
		t.Fatalf("spoofed frame: verdict %d, want a drop", int32(ret))
	}
}

// skbCtx is the head of struct __sk_buff as BPF_PROG_TEST_RUN takes it (only ifindex set).
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority uint32
	IngressIfindex, Ifindex                                                               uint32
}

// events reads n events of s (waiting up to 10 s for them), checks that no more come in the
// next 50 ms, and returns the last address byte of each one's source, in order.
func events(t *testing.T, s *dataplane.MonitorStream, n int) []uint8 {
	t.Helper()
	var out []uint8
	s.SetDeadline(time.Now().Add(10 * time.Second))
	for len(out) < n {
		e, err := s.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%d of %d events: %v", len(out), n, out)
		}
		if err != nil {
			t.Fatal(err)
		}
		if e.Type != maps.EventDrop || e.Reason != maps.DropSpoofMAC {
			t.Fatalf("event %+v, want a spoof_mac drop", e)
		}
		out = append(out, e.Src.Addr().As4()[3])
	}
	s.SetDeadline(time.Now().Add(50 * time.Millisecond))
	if e, err := s.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("after %v: event %+v (%v), want no more", out, e, err)
	}
	return out
}

// TestMonitorCloseBesideOpen: a stream closed while another opens leaves the datapath
// reporting what the open one asks. (Before the monitor of a sandbox was one hub, the closing
// stream computed the flags under the lock and wrote them after it: its "off" could land after
// the opening stream's "drops", and the new stream never saw a drop; TestMonitorE2E's "second
// session saw no drop".)
func TestMonitorCloseBesideOpen(t *testing.T) {
	r := newMonRig(t)
	ctx := context.Background()
	rounds := 2000
	if testing.Short() {
		rounds = 200
	}
	for i := range rounds {
		a, err := r.dp.Monitor(ctx, "mon", maps.MonitorDrop)
		if err != nil {
			t.Fatal(err)
		}
		closed := make(chan error)
		go func() { closed <- a.Close() }()
		b, err := r.dp.Monitor(ctx, "mon", maps.MonitorDrop)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		if f := r.flags(t); f != maps.MonitorDrop {
			b.Close()
			t.Fatalf("round %d: flags %v with a drop stream open, want drop", i, f)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if f := r.flags(t); f != 0 {
		t.Errorf("flags %v after every stream closed", f)
	}
}

// TestMonitorFanOut: every open stream of a sandbox gets every event; a stream opened later
// gets the events after it opened only, none that were waiting when it opened (its own or a
// closed stream's); a stream that does not read loses its events, counted in Suppressed, and
// holds back no other stream.
func TestMonitorFanOut(t *testing.T) {
	r := newMonRig(t)
	a := r.dropStream(t)
	b := r.dropStream(t)
	r.drop(t, 1)
	r.drop(t, 2)
	if ev := events(t, a, 2); !slices.Equal(ev, []uint8{1, 2}) {
		t.Errorf("first stream got %v, want [1 2]", ev)
	}
	if ev := events(t, b, 2); !slices.Equal(ev, []uint8{1, 2}) {
		t.Errorf("second stream got %v, want [1 2]", ev)
	}
	// b leaves with events unread; c opens: it sees the new event only.
	r.drop(t, 3)
	r.drop(t, 4)
	c := r.dropStream(t)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	r.drop(t, 5)
	if ev := events(t, c, 1); !slices.Equal(ev, []uint8{5}) {
		t.Errorf("stream opened later got %v, want [5]", ev)
	}
	if ev := events(t, a, 3); !slices.Equal(ev, []uint8{3, 4, 5}) {
		t.Errorf("first stream got %v, want [3 4 5]", ev)
	}
}

// TestMonitorReopen: the last stream of a sandbox closes with events it did not read; a stream
// opened afterwards sees the new events only.
func TestMonitorReopen(t *testing.T) {
	r := newMonRig(t)
	a := r.dropStream(t)
	r.drop(t, 1)
	r.drop(t, 2)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b := r.dropStream(t)
	r.drop(t, 3)
	if ev := events(t, b, 1); !slices.Equal(ev, []uint8{3}) {
		t.Errorf("stream opened after the last one closed got %v, want [3]", ev)
	}
}

// TestMonitorSlowStream: a stream whose client does not keep up loses the events its queue has
// no room for, and says how many (the next event it gets carries the count; Suppressed has it
// when no event came); the other streams of the sandbox get every event meanwhile.
func TestMonitorSlowStream(t *testing.T) {
	r := newMonRig(t)
	slow := r.dropStream(t)
	fast := r.dropStream(t)
	// A rate limit the test's floods stay under, so every drop is reported.
	if err := (maps.MonitorConfig{Map: r.pins.Maps().Mon}).Set(maps.MonitorDrop, 1000000, 100000); err != nil {
		t.Fatal(err)
	}
	// flood reports n drops in batches the ring holds, the fast stream reading each batch.
	flood := func(n int) {
		t.Helper()
		for n > 0 {
			b := min(n, 100)
			for i := range b {
				r.drop(t, uint8(i))
			}
			events(t, fast, b)
			n -= b
		}
	}
	const over = 88
	flood(dataplane.MonitorQueue + over)
	events(t, slow, dataplane.MonitorQueue) // and no more: the rest was lost
	r.drop(t, 1)
	slow.SetDeadline(time.Now().Add(time.Second))
	if e, err := slow.Read(); err != nil || e.Suppressed != over {
		t.Errorf("slow stream's next event: %+v, %v; want one carrying %d suppressed", e, err, over)
	}
	if n, err := slow.Suppressed(); err != nil || n != 0 {
		t.Errorf("Suppressed after an event carried the count = %d, %v; want 0", n, err)
	}
	events(t, fast, 1)
	// Lost, and no event since: Suppressed has the count.
	flood(dataplane.MonitorQueue + over)
	events(t, slow, dataplane.MonitorQueue) // and no more: the rest was lost
	if n, err := slow.Suppressed(); err != nil || n != over {
		t.Errorf("Suppressed = %d, %v; want %d", n, err, over)
	}
	if n, err := fast.Suppressed(); err != nil || n != 0 {
		t.Errorf("fast stream's Suppressed = %d, %v; want 0", n, err)
	}
}
