package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/refprog"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// direction of a case.
type direction int

const (
	h2g direction = iota // host -> guest, one way
	g2h                  // guest -> host, one way
	rr                   // request/response
)

// caseDef is one measurement made in every run of a mode.
type caseDef struct {
	name    string
	dir     direction
	payload int // UDP payload bytes
	busy    bool
	// sock: the host sends from a plain UDP socket instead of AF_PACKET.
	sock bool
	// v6: IPv6 frames (host6 <-> guest6) instead of IPv4.
	v6 bool
	// vip: the frames of an established connection of the guest's to benchVIP, whose real
	// server is vipServer (bench/services.go): from the guest to the VIP (DNAT in a +svc
	// row), from the real server to the guest (reverse NAT). In a kata-dp row without services
	// the strict egress drops the guest's frames to an address it has no route to: vip cases
	// run only in +svc rows and the reference rows (modeDef.runs). like is the case of the
	// same frames to no service, which a +svc row's vip case is compared with (againstBase).
	vip  bool
	like string
}

// The IPv6 addresses of the v6 cases: the guest's is on its endpoint (bench/mode.go), so the
// checks and strict egress pass the frames as they pass the IPv4 ones.
var (
	host6  = netip.MustParseAddr("fd00:199::1")
	guest6 = netip.MustParsePrefix("fd00:199::2/64")
)

// udpFrame is the case's frame from (srcMAC, src port sport) to (dstMAC, dport), IPv4 or
// IPv6; toGuest says which way.
func udpFrame(e *env, c caseDef, toGuest bool) []byte {
	s := e.s
	hostIP, guestIP := s.HostAddr.Addr(), s.GuestAddr.Addr()
	build := guestemu.UDPFrame
	if c.v6 {
		hostIP, guestIP, build = host6, guest6.Addr(), guestemu.UDP6Frame
	}
	if c.vip {
		if toGuest {
			return build(e.hostMAC, e.guestMAC, netip.AddrPortFrom(vipServer(hostIP), vipServerPort), netip.AddrPortFrom(guestIP, vipGuestPort), payloadOf(c.payload))
		}
		return build(e.guestMAC, e.hostMAC, netip.AddrPortFrom(guestIP, vipGuestPort), benchVIP, payloadOf(c.payload))
	}
	if toGuest {
		return build(e.hostMAC, e.guestMAC, netip.AddrPortFrom(hostIP, 40000), netip.AddrPortFrom(guestIP, 40001), payloadOf(c.payload))
	}
	return build(e.guestMAC, e.hostMAC, netip.AddrPortFrom(guestIP, 40001), netip.AddrPortFrom(hostIP, 40000), payloadOf(c.payload))
}

var allCases = []caseDef{
	{name: "h2g-64", dir: h2g, payload: 64},
	{name: "h2g-1400", dir: h2g, payload: 1400},
	{name: "h2g-udp-64", dir: h2g, payload: 64, sock: true},
	{name: "g2h-64", dir: g2h, payload: 64},
	{name: "g2h-1400", dir: g2h, payload: 1400},
	{name: "h2g6-64", dir: h2g, payload: 64, v6: true},
	{name: "g2h6-64", dir: g2h, payload: 64, v6: true},
	{name: "h2g-vip-64", dir: h2g, payload: 64, vip: true, like: "h2g-64"},
	{name: "g2h-vip-64", dir: g2h, payload: 64, vip: true, like: "g2h-64"},
	{name: "lat-block", dir: rr, payload: 64},
	{name: "lat-busy", dir: rr, payload: 64, busy: true},
}

// Sample is one case measured in one run.
type Sample struct {
	Mode  string `json:"mode"`
	Case  string `json:"case"`
	Round int    `json:"round"`
	// Values by metric name (see metricDefs).
	Values map[string]float64 `json:"values"`
	// Hops are the frame counters along the path, for the loss account.
	Hops map[string]uint64 `json:"hops,omitempty"`
	// Flags say why the sample is left out of the medians.
	Flags []string `json:"flags,omitempty"`
}

func (s *Sample) flag(format string, a ...any) { s.Flags = append(s.Flags, fmt.Sprintf(format, a...)) }

// sweepPrefix starts the names of the namespaces and bpffs directories a run makes
// (docs/benchmarks.md, kdptb-*): topo.OwnedName's, which carry the run's pid, so the next run
// removes what a killed one left (topo.SweepStale) and nothing of one still running.
const sweepPrefix = "kdptb"

// runner measures; one per Main.
type runner struct {
	o     Options
	ksoft map[int]int
}

// runMode builds a fresh topology, installs mode m, measures every case
// and tears everything down.
func (r *runner) runMode(ctx context.Context, m modeDef, round int) (out []Sample, err error) {
	s, err := topo.NewSandbox(topo.SandboxConfig{Prefix: sweepPrefix + "-"})
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, s.Close()) }()
	e := &env{s: s}
	if e.ref, err = refprog.Load(); err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, e.close()) }()
	e.hostDev, e.hostMAC = s.Config.HostVeth, s.HostVeth.MAC
	if err := m.setup(e); err != nil {
		return nil, fmt.Errorf("set up %s: %w", m.name, err)
	}
	if err := prepareGuestFds(e); err != nil {
		return nil, err
	}
	if err := s.Host.AddNeigh(e.hostDev, s.GuestAddr.Addr().String(), e.guestMAC); err != nil {
		return nil, err
	}
	for _, c := range r.o.cases {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		if !m.runs(c) {
			continue
		}
		smp := Sample{Mode: m.name, Case: c.name, Round: round, Values: map[string]float64{}, Hops: map[string]uint64{}}
		var err error
		switch c.dir {
		case h2g:
			err = r.oneWayH2G(ctx, e, m, c, &smp)
		case g2h:
			err = r.oneWayG2H(ctx, e, m, c, &smp)
		case rr:
			err = r.requestResponse(ctx, e, c, &smp)
		}
		if err != nil {
			return out, fmt.Errorf("%s %s: %w", m.name, c.name, err)
		}
		out = append(out, smp)
	}
	return out, nil
}

// prepareGuestFds does to the guest-side fds what QEMU does: a 12-byte
// virtio header, and an unlimited send buffer.
func prepareGuestFds(e *env) error {
	for _, f := range e.guest {
		flags, err := netdev.TapFlags(f)
		if err != nil {
			return err
		}
		fd := f.Fd()
		if flags&unix.IFF_VNET_HDR != 0 {
			sz := int32(guestemu.VnetHdrLen)
			if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNSETVNETHDRSZ, uintptr(unsafe.Pointer(&sz))); errno != 0 {
				return fmt.Errorf("TUNSETVNETHDRSZ: %w", errno)
			}
			e.vnetHdr = guestemu.VnetHdrLen
		}
		sndbuf := int32(math.MaxInt32)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNSETSNDBUF, uintptr(unsafe.Pointer(&sndbuf))); errno != 0 {
			return fmt.Errorf("TUNSETSNDBUF: %w", errno)
		}
	}
	return nil
}

// writeFrame writes one frame into the guest's first fd, as the guest would send it.
func writeFrame(e *env, frame []byte) error {
	buf := make([]byte, e.vnetHdr+len(frame))
	copy(buf[e.vnetHdr:], frame)
	_, err := e.guest[0].Write(buf)
	return err
}

// snapshot is every counter read before and after a case.
type snapshot struct {
	ns, host map[string]netlink.LinkStatistics
	tasks    map[int]uint64 // tid or pid -> CPU ns
	ticks    ticks
	emu      guestemu.Stats
	xdp      uint64
	at       time.Time
}

func (r *runner) snap(e *env, emu *guestemu.Counter, emuTids []int) (snapshot, error) {
	var s snapshot
	var err error
	if s.ns, err = linkStats(e.s.NS.Path()); err != nil {
		return s, err
	}
	if s.host, err = linkStats(e.s.Host.Path()); err != nil {
		return s, err
	}
	s.tasks = map[int]uint64{}
	pid := os.Getpid()
	for _, t := range emuTids {
		s.tasks[t] = taskNS(pid, t)
	}
	var ks []int
	for _, p := range r.ksoft {
		s.tasks[-p] = taskNS(p, p)
		ks = append(ks, p)
	}
	s.ticks = readTicks(ks)
	if emu != nil {
		s.emu = emu.Stats()
	}
	s.xdp, _ = e.ref.XDPDropped()
	s.at = time.Now()
	return s, nil
}

func (a snapshot) ksoftNS(b snapshot) (n uint64) {
	for k, v := range b.tasks {
		if k < 0 {
			n += v - a.tasks[k]
		}
	}
	return n
}

func (a snapshot) emuNS(b snapshot) (n uint64) {
	for k, v := range b.tasks {
		if k > 0 {
			n += v - a.tasks[k]
		}
	}
	return n
}

// drops sums every drop counter of every link in both namespaces.
func (a snapshot) drops(b snapshot) uint64 {
	var n uint64
	for _, m := range []struct {
		a, b map[string]netlink.LinkStatistics
	}{{a.ns, b.ns}, {a.host, b.host}} {
		for name, st := range m.b {
			o := m.a[name]
			n += st.RxDropped - o.RxDropped + st.TxDropped - o.TxDropped
		}
	}
	return n
}

// startEmu starts a guest emulator on the guest-side fds, pinned to the
// guest CPU, and returns the ids of its worker threads.
func (r *runner) startEmu(ctx context.Context, e *env, reflect bool) (*guestemu.Counter, []int, error) {
	before := map[int]bool{}
	for _, t := range pinnedTasks(r.o.CPUGuest) {
		before[t] = true
	}
	c, err := guestemu.NewCounter(e.guest, guestemu.CounterOptions{Reflect: reflect, VerifyCsum: true, CPUs: []int{r.o.CPUGuest}})
	if err != nil {
		return nil, nil, err
	}
	if err := c.Start(ctx); err != nil {
		c.Close()
		return nil, nil, err
	}
	var tids []int
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		tids = tids[:0]
		for _, t := range pinnedTasks(r.o.CPUGuest) {
			if !before[t] {
				tids = append(tids, t)
			}
		}
		if len(tids) >= len(e.guest) {
			break
		}
	}
	for _, t := range tids {
		if err := unix.Setpriority(unix.PRIO_PROCESS, t, r.o.Nice); err != nil {
			c.Close()
			return nil, nil, fmt.Errorf("set nice of emulator thread %d: %w", t, err)
		}
	}
	return c, tids, nil
}

// settle is how long frames in flight get to arrive after a sender stops.
const settle = 150 * time.Millisecond

func (r *runner) oneWayH2G(ctx context.Context, e *env, m modeDef, c caseDef, smp *Sample) error {
	s := e.s
	emu, tids, err := r.startEmu(ctx, e, false)
	if err != nil {
		return err
	}
	defer emu.Close()
	if c.vip {
		// The guest opens the connection the host's frames answer: one frame to the VIP
		// (scheduled and DNATed to vipServer in a +svc row).
		if err := writeFrame(e, udpFrame(e, c, false)); err != nil {
			return fmt.Errorf("open the vip connection: %w", err)
		}
		time.Sleep(settle)
	}
	frame := udpFrame(e, c, true)
	vip, err := startVIPCount(e, c)
	if err != nil {
		return err
	}
	a, err := r.snap(e, emu, tids)
	if err != nil {
		return err
	}
	t0 := time.Now()
	var sent, genNS uint64
	if c.sock {
		sent, genNS, err = blastUDP(ctx, s.Host.Path(), r.o.CPUGen, r.o.Batch, s.HostAddr.Addr().As4(), s.GuestAddr.Addr().As4(), 40002, c.payload, r.o.Duration)
	} else {
		sent, genNS, err = blast(ctx, s.Host.Path(), e.hostDev, r.o.CPUGen, r.o.Batch, frame, r.o.Duration)
	}
	elapsed := time.Since(t0)
	if err != nil {
		return err
	}
	time.Sleep(settle)
	b, err := r.snap(e, emu, tids)
	if err != nil {
		return err
	}
	var delivered uint64
	switch m.sink {
	case sinkXDPPeer:
		delivered = b.xdp - a.xdp
	case sinkIngress:
		delivered = b.ns[s.Config.Veth].RxPackets - a.ns[s.Config.Veth].RxPackets
	default:
		delivered = b.emu.RxFrames - a.emu.RxFrames
	}
	smp.Hops["gen_sent"] = sent
	r.hops(e, a, b, smp)
	smp.Hops["emu_rx"] = b.emu.RxFrames - a.emu.RxFrames
	smp.Hops["emu_csum_ok"] = b.emu.CsumOK - a.emu.CsumOK
	smp.Hops["emu_csum_bad"] = b.emu.CsumBad - a.emu.CsumBad
	smp.Hops["delivered"] = delivered
	if err := vip(smp); err != nil {
		return err
	}
	r.finish(e, m, c, smp, a, b, sent, delivered, genNS, elapsed)
	if delivered > 0 && m.sink == sinkGuest {
		smp.Values["reader_ns"] = float64(a.emuNS(b)) / float64(delivered)
	}
	if smp.Hops["emu_csum_bad"] > 0 {
		smp.flag("%d frames with bad checksums at the guest", smp.Hops["emu_csum_bad"])
	}
	return nil
}

func (r *runner) oneWayG2H(ctx context.Context, e *env, m modeDef, c caseDef, smp *Sample) error {
	s := e.s
	// The host end drops what arrives at its ingress: the cheapest sink,
	// the same for every mode, counted in the veth's rx counters.
	sinkLink, err := e.ref.Attach(s.Host.Path(), e.hostDev, refprog.Drop)
	if err != nil {
		return err
	}
	defer sinkLink.Close()
	frame := udpFrame(e, c, false)
	vip, err := startVIPCount(e, c)
	if err != nil {
		return err
	}
	a, err := r.snap(e, nil, nil)
	if err != nil {
		return err
	}
	t0 := time.Now()
	written, failed, wNS, err := writeTap(ctx, e.guest[0], e.vnetHdr, r.o.CPUGuest, frame, r.o.Duration)
	elapsed := time.Since(t0)
	if err != nil {
		return err
	}
	time.Sleep(settle)
	b, err := r.snap(e, nil, nil)
	if err != nil {
		return err
	}
	hd := e.hostDev
	delivered := b.host[hd].RxPackets - a.host[hd].RxPackets
	if m.sink == sinkIngress {
		delivered = b.ns[e.guestDev].RxPackets - a.ns[e.guestDev].RxPackets
	}
	smp.Hops["emu_written"] = written
	smp.Hops["emu_write_errors"] = failed
	r.hops(e, a, b, smp)
	smp.Hops["delivered"] = delivered
	if err := vip(smp); err != nil {
		return err
	}
	r.finish(e, m, c, smp, a, b, written, delivered, wNS, elapsed)
	return nil
}

// startVIPCount reads the VIP service's packet counters before a vip case of a +svc row, and
// returns what records, after the case, how many of its frames the load balancer counted for
// the service (hops vip_in, from the guest, and vip_out, to it): proof that they took the
// DNAT and reverse-NAT path through the real devices.
func startVIPCount(e *env, c caseDef) (done func(*Sample) error, err error) {
	if !c.vip || e.vipStats == nil {
		return func(*Sample) error { return nil }, nil
	}
	in0, out0, err := e.vipStats()
	if err != nil {
		return nil, err
	}
	return func(smp *Sample) error {
		in1, out1, err := e.vipStats()
		if err != nil {
			return err
		}
		smp.Hops["vip_in"], smp.Hops["vip_out"] = in1-in0, out1-out0
		return nil
	}, nil
}

// hops records the counters of the devices on the path.
func (r *runner) hops(e *env, a, b snapshot, smp *Sample) {
	hv, v := e.s.Config.HostVeth, e.s.Config.Veth
	d := func(x, y netlink.LinkStatistics, f func(netlink.LinkStatistics) uint64) uint64 { return f(y) - f(x) }
	rx := func(s netlink.LinkStatistics) uint64 { return s.RxPackets }
	tx := func(s netlink.LinkStatistics) uint64 { return s.TxPackets }
	rxd := func(s netlink.LinkStatistics) uint64 { return s.RxDropped }
	txd := func(s netlink.LinkStatistics) uint64 { return s.TxDropped }
	smp.Hops["hostveth_tx"] = d(a.host[hv], b.host[hv], tx)
	smp.Hops["hostveth_tx_dropped"] = d(a.host[hv], b.host[hv], txd)
	smp.Hops["hostveth_rx"] = d(a.host[hv], b.host[hv], rx)
	if hd := e.hostDev; hd != hv {
		smp.Hops["hostdev_tx"] = d(a.host[hd], b.host[hd], tx)
		smp.Hops["hostdev_rx"] = d(a.host[hd], b.host[hd], rx)
	}
	smp.Hops["veth_rx"] = d(a.ns[v], b.ns[v], rx)
	smp.Hops["veth_tx"] = d(a.ns[v], b.ns[v], tx)
	smp.Hops["veth_tx_dropped"] = d(a.ns[v], b.ns[v], txd)
	g := e.guestDev
	smp.Hops["guestdev_rx"] = d(a.ns[g], b.ns[g], rx)
	smp.Hops["guestdev_tx"] = d(a.ns[g], b.ns[g], tx)
	smp.Hops["guestdev_rx_dropped"] = d(a.ns[g], b.ns[g], rxd)
	smp.Hops["guestdev_tx_dropped"] = d(a.ns[g], b.ns[g], txd)
	smp.Hops["all_dropped"] = a.drops(b)
}

// finish derives the rates and per-frame costs of a one-way case and
// flags it when its counts do not add up or other processes ran.
func (r *runner) finish(e *env, m modeDef, c caseDef, smp *Sample, a, b snapshot, sent, delivered, senderNS uint64, elapsed time.Duration) {
	secs := elapsed.Seconds()
	frameBytes := float64(14 + 20 + 8 + c.payload)
	smp.Values["pps"] = float64(delivered) / secs
	smp.Values["gbps"] = float64(delivered) * frameBytes * 8 / secs / 1e9
	if sent > 0 {
		smp.Values["cpu_ns"] = float64(senderNS+a.ksoftNS(b)) / float64(sent)
		smp.Values["loss_pct"] = 100 * float64(sent-min(sent, delivered)) / float64(sent)
	}
	if sent == 0 || delivered == 0 {
		smp.flag("no frames delivered (%d sent)", sent)
	}
	// The loss account: what was sent and not delivered must show up in
	// some device's drop counter. (XDP redirect drops are not counted in
	// the device counters, so ref-xdp is not checked.)
	if m.sink != sinkXDPPeer && sent >= delivered {
		lost, explained := sent-delivered, smp.Hops["all_dropped"]
		diff := math.Abs(float64(lost) - float64(explained))
		if diff > 0.01*float64(sent)+256 {
			smp.flag("counts do not add up: %d sent, %d delivered, %d counted as dropped", sent, delivered, explained)
		}
	} else if sent+64 < delivered && m.sink != sinkXDPPeer {
		// A few extra frames are the stack's own (IPv6 neighbour discovery,
		// a bridge's multicast); more mean the counters are wrong.
		smp.flag("counts do not add up: %d sent, %d delivered", sent, delivered)
	}
	r.checkOthers(smp, a, b)
}

// waitQuiet waits, up to Options.WaitQuiet, for a quarter second during
// which other processes used less than Options.MaxOther of a CPU, and
// returns the share they used in the last one.
func (r *runner) waitQuiet(ctx context.Context) float64 {
	var ks []int
	for _, p := range r.ksoft {
		ks = append(ks, p)
	}
	deadline := time.Now().Add(r.o.WaitQuiet)
	for {
		a, t0 := readTicks(ks), time.Now()
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(250 * time.Millisecond):
		}
		b := readTicks(ks)
		other := max(0, float64(b.busy-a.busy)-float64(b.ours-a.ours)) / clkTck / time.Since(t0).Seconds()
		if other <= r.o.MaxOther || time.Now().After(deadline) {
			return other
		}
	}
}

// checkOthers flags a sample during which other processes took more than
// maxOtherShare of a CPU.
func (r *runner) checkOthers(smp *Sample, a, b snapshot) {
	secs := b.at.Sub(a.at).Seconds()
	busy := float64(b.ticks.busy - a.ticks.busy)
	ours := float64(b.ticks.ours - a.ticks.ours)
	other := max(0, busy-ours) / clkTck / secs
	smp.Values["other_cpu"] = other
	smp.Values["steal_cpu"] = float64(b.ticks.steal-a.ticks.steal) / clkTck / secs
	if other > r.o.MaxOther {
		smp.flag("other processes used %.0f%% of a CPU", 100*other)
	}
}

func (r *runner) requestResponse(ctx context.Context, e *env, c caseDef, smp *Sample) error {
	s := e.s
	emu, tids, err := r.startEmu(ctx, e, true)
	if err != nil {
		return err
	}
	defer emu.Close()
	a, err := r.snap(e, emu, tids)
	if err != nil {
		return err
	}
	l, err := pingPong(ctx, s.Host.Path(), r.o.CPUGen, s.HostAddr.Addr().As4(), s.GuestAddr.Addr().As4(), 7007, c.payload, r.o.Requests, c.busy)
	if err != nil {
		return err
	}
	b, err := r.snap(e, emu, tids)
	if err != nil {
		return err
	}
	smp.Values["p50_us"] = float64(l.p50) / 1e3
	smp.Values["p99_us"] = float64(l.p99) / 1e3
	smp.Hops["requests"] = uint64(r.o.Requests)
	smp.Hops["lost"] = uint64(l.lost)
	smp.Hops["emu_rx"] = b.emu.RxFrames - a.emu.RxFrames
	smp.Hops["emu_csum_ok"] = b.emu.CsumOK - a.emu.CsumOK
	smp.Hops["emu_csum_bad"] = b.emu.CsumBad - a.emu.CsumBad
	if l.lost > 0 {
		smp.flag("%d of %d requests lost", l.lost, r.o.Requests)
	}
	if smp.Hops["emu_csum_bad"] > 0 {
		smp.flag("%d frames with bad checksums at the guest", smp.Hops["emu_csum_bad"])
	}
	r.checkOthers(smp, a, b)
	return nil
}

// payloadOf is n bytes of UDP payload for the generated frames (the frames themselves are
// built by guestemu.UDPFrame, the one builder the tests use too).
func payloadOf(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}
