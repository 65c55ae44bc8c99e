package guestemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Sentinel errors, matched with errors.Is.
var (
	// ErrInvalid is returned for arguments that fail validation.
	ErrInvalid = errors.New("invalid argument")
	// ErrStarted is returned by a second Start.
	ErrStarted = errors.New("already started")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("closed")
)

// bufSize holds the largest frame a tap hands out (a 64 KiB GSO frame) and
// its virtio header.
const bufSize = 65536 + VnetHdrLen + 64

// Stats are the emulator's counters. Bytes count Ethernet frames without
// virtio headers, as the kernel's interface counters do.
type Stats struct {
	// RxFrames and RxBytes: frames read from the host tap (host to guest).
	RxFrames, RxBytes uint64
	// TxFrames and TxBytes: frames written into the host tap (guest to
	// host: reflected, sent, ARP replies, or bridged from the guest tap).
	TxFrames, TxBytes uint64
	// GuestRxFrames and GuestRxBytes (Bridge): frames written into the
	// guest tap.
	GuestRxFrames, GuestRxBytes uint64
	// GuestTxFrames (Bridge): frames read from the guest tap.
	GuestTxFrames uint64
	// WriteErrors: frames that could not be written, either way.
	WriteErrors uint64
	// CsumOK and CsumBad (Counter with VerifyCsum): IPv4 frames whose
	// header and TCP/UDP checksums were right or wrong, after completing
	// the partial ones. Other frames are counted in neither.
	CsumOK, CsumBad uint64
	// CsumCompleted: frames whose partial checksum (NEEDS_CSUM) was
	// completed.
	CsumCompleted uint64
	// ARPReplies (Counter with GuestIP): ARP requests answered.
	ARPReplies uint64
	// GSOFrames: frames read from the host tap that were GSO super-frames.
	GSOFrames uint64
}

// counters of one worker; padded so workers do not share cache lines.
type counters struct {
	rxFrames, rxBytes           atomic.Uint64
	txFrames, txBytes           atomic.Uint64
	guestRxFrames, guestRxBytes atomic.Uint64
	guestTxFrames               atomic.Uint64
	writeErrors                 atomic.Uint64
	csumOK, csumBad, csumDone   atomic.Uint64
	arpReplies, gsoFrames       atomic.Uint64
	_                           [64]byte
}

func (c *counters) addTo(s *Stats) {
	s.RxFrames += c.rxFrames.Load()
	s.RxBytes += c.rxBytes.Load()
	s.TxFrames += c.txFrames.Load()
	s.TxBytes += c.txBytes.Load()
	s.GuestRxFrames += c.guestRxFrames.Load()
	s.GuestRxBytes += c.guestRxBytes.Load()
	s.GuestTxFrames += c.guestTxFrames.Load()
	s.WriteErrors += c.writeErrors.Load()
	s.CsumOK += c.csumOK.Load()
	s.CsumBad += c.csumBad.Load()
	s.CsumCompleted += c.csumDone.Load()
	s.ARPReplies += c.arpReplies.Load()
	s.GSOFrames += c.gsoFrames.Load()
}

// tapFd is a tap queue the emulator owns (a dup of the caller's fd).
type tapFd struct {
	fd    int
	vnet  bool
	hdrsz int // bytes before the frame: VnetHdrLen or 0
}

// adoptTap dups f, makes the dup non-blocking, and sets the virtio header
// size to VnetHdrLen when the tap has IFF_VNET_HDR. offload, when not
// negative, is passed to TUNSETOFFLOAD.
func adoptTap(f *os.File, offload int) (tapFd, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return tapFd{}, fmt.Errorf("adopt %s: %w", f.Name(), err)
	}
	fd := -1
	var cerr error
	if err := rc.Control(func(p uintptr) {
		fd, cerr = unix.FcntlInt(p, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return tapFd{}, fmt.Errorf("adopt %s: %w", f.Name(), err)
	}
	if cerr != nil {
		return tapFd{}, fmt.Errorf("adopt %s: dup: %w", f.Name(), cerr)
	}
	t := tapFd{fd: fd}
	if err := t.setup(offload); err != nil {
		unix.Close(fd)
		return tapFd{}, fmt.Errorf("adopt %s: %w", f.Name(), err)
	}
	return t, nil
}

func (t *tapFd) setup(offload int) error {
	if err := unix.SetNonblock(t.fd, true); err != nil {
		return fmt.Errorf("set non-blocking: %w", err)
	}
	var req struct {
		Name  [unix.IFNAMSIZ]byte
		Flags uint16
		_     [22]byte
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), unix.TUNGETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		return fmt.Errorf("TUNGETIFF (not a tap fd?): %w", errno)
	}
	if req.Flags&unix.IFF_TAP == 0 {
		return fmt.Errorf("flags %#x: not a tap: %w", req.Flags, ErrInvalid)
	}
	if req.Flags&unix.IFF_VNET_HDR != 0 {
		sz := int32(VnetHdrLen)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), unix.TUNSETVNETHDRSZ, uintptr(unsafe.Pointer(&sz))); errno != 0 {
			return fmt.Errorf("TUNSETVNETHDRSZ: %w", errno)
		}
		t.vnet, t.hdrsz = true, VnetHdrLen
	}
	if offload >= 0 {
		if !t.vnet && offload != 0 {
			return fmt.Errorf("offloads need IFF_VNET_HDR: %w", ErrInvalid)
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(t.fd), unix.TUNSETOFFLOAD, uintptr(offload)); errno != 0 {
			return fmt.Errorf("TUNSETOFFLOAD %#x: %w", offload, errno)
		}
	}
	return nil
}

// offloadFlags is what QEMU asks for when the guest negotiates checksum
// and TSO offloads.
const offloadFlags = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6 | unix.TUN_F_TSO_ECN

// runner owns the worker threads of one emulator.
type runner struct {
	cpus []int

	mu      sync.Mutex
	started bool
	closed  bool
	stopfd  int // eventfd that wakes workers blocked in poll
	stop    atomic.Bool
	wg      sync.WaitGroup
	nextCPU int
	unwatch func() bool
	tids    []int
	err     error
}

func newRunner(cpus []int) (*runner, error) {
	for _, c := range cpus {
		if c < 0 || c >= runtime.NumCPU()*64 {
			return nil, fmt.Errorf("cpu %d: %w", c, ErrInvalid)
		}
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return &runner{cpus: cpus, stopfd: efd}, nil
}

// frameFunc handles one frame read into buf[:n] (virtio header included)
// and returns what to write to the paired fd, or nil.
type frameFunc func(buf []byte) []byte

// spawn starts a worker that reads in and writes what fn returns to out.
func (r *runner) spawn(in, out tapFd, c *counters, countOut func(c *counters, frame int), fn frameFunc) {
	cpu := -1
	if len(r.cpus) > 0 {
		cpu = r.cpus[r.nextCPU%len(r.cpus)]
		r.nextCPU++
	}
	r.wg.Add(1)
	ready := make(chan struct{})
	go func() {
		defer r.wg.Done()
		// The thread stays locked to this goroutine and exits with it, so a
		// pinned affinity never leaks to other goroutines.
		runtime.LockOSThread()
		r.mu.Lock()
		r.tids = append(r.tids, unix.Gettid())
		r.mu.Unlock()
		if cpu >= 0 {
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				r.fail(fmt.Errorf("pin to cpu %d: %w", cpu, err))
				close(ready)
				return
			}
		}
		close(ready)
		if err := r.loop(in, out, c, countOut, fn); err != nil {
			r.fail(err)
		}
	}()
	// Start returns with every worker on its (pinned) thread.
	<-ready
}

func (r *runner) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
}

func (r *runner) loop(in, out tapFd, c *counters, countOut func(*counters, int), fn frameFunc) error {
	buf := make([]byte, bufSize)
	pfd := []unix.PollFd{{Fd: int32(in.fd), Events: unix.POLLIN}, {Fd: int32(r.stopfd), Events: unix.POLLIN}}
	for !r.stop.Load() {
		n, err := unix.Read(in.fd, buf)
		switch {
		case err == unix.EAGAIN:
			if _, err := unix.Poll(pfd, -1); err != nil && err != unix.EINTR {
				return fmt.Errorf("poll: %w", err)
			}
			if pfd[1].Revents != 0 {
				return nil
			}
			if pfd[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 && pfd[0].Revents&unix.POLLIN == 0 {
				return fmt.Errorf("tap fd %d: poll events %#x", in.fd, pfd[0].Revents)
			}
			continue
		case err == unix.EINTR:
			continue
		case err != nil:
			if r.stop.Load() {
				return nil
			}
			return fmt.Errorf("read tap: %w", err)
		case n < in.hdrsz:
			continue
		}
		w := fn(buf[:n])
		if w == nil {
			continue
		}
		if _, err := unix.Write(out.fd, w); err != nil {
			c.writeErrors.Add(1)
			continue
		}
		countOut(c, len(w)-out.hdrsz)
	}
	return nil
}

// start marks the runner started; false when it was already.
func (r *runner) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if r.started {
		return ErrStarted
	}
	r.started = true
	return nil
}

// watch stops the workers (without closing anything) when ctx ends.
func (r *runner) watch(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unwatch = context.AfterFunc(ctx, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if !r.closed {
			r.stop.Store(true)
			unix.Write(r.stopfd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}
	})
}

// shutdown stops the workers and waits for them. It reports false when the
// runner was closed already.
func (r *runner) shutdown() bool {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return false
	}
	r.closed = true
	unwatch := r.unwatch
	r.mu.Unlock()
	if unwatch != nil {
		unwatch()
	}
	r.stop.Store(true)
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	unix.Write(r.stopfd, one)
	r.wg.Wait()
	unix.Close(r.stopfd)
	return true
}

// Err returns the first error that stopped a worker.
func (r *runner) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// cpuTime sums the time the worker threads spent on a CPU, from
// /proc/thread-self's schedstat (nanoseconds, not tick based). Threads that
// have exited no longer count.
func (r *runner) cpuTime() time.Duration {
	r.mu.Lock()
	tids := append([]int(nil), r.tids...)
	r.mu.Unlock()
	var total time.Duration
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/schedstat", tid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err == nil {
			total += time.Duration(ns)
		}
	}
	return total
}

func closeFds(fds []tapFd) {
	for _, t := range fds {
		if t.fd >= 0 {
			unix.Close(t.fd)
		}
	}
}
