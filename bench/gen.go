package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"
	"unsafe"

	"github.com/kata-dp/kata-dp/control/netdev"
	"golang.org/x/sys/unix"
)

// pinned runs fn on a fresh OS thread pinned to cpu (and inside the netns
// at nsPath when not ""), and returns fn's error and the thread's CPU
// nanoseconds while fn ran. The thread is thrown away afterwards, so the
// affinity and namespace never leak to other goroutines.
func pinned(nsPath string, cpu int, fn func(tid int) error) (cpuNS uint64, err error) {
	return pinnedNice(nsPath, cpu, benchNice, fn)
}

// benchNice is the nice value of the harness's measuring threads; see
// Options.Nice.
var benchNice = -20

func pinnedNice(nsPath string, cpu, nice int, fn func(tid int) error) (cpuNS uint64, err error) {
	type res struct {
		ns  uint64
		err error
	}
	done := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		tid := unix.Gettid()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			done <- res{err: fmt.Errorf("pin to cpu %d: %w", cpu, err)}
			return
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil {
			done <- res{err: fmt.Errorf("set nice %d: %w", nice, err)}
			return
		}
		if nsPath != "" {
			f, err := os.Open(nsPath)
			if err != nil {
				done <- res{err: err}
				return
			}
			err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
			f.Close()
			if err != nil {
				done <- res{err: fmt.Errorf("enter netns %s: %w", nsPath, err)}
				return
			}
		}
		start := taskNS(os.Getpid(), tid)
		err := fn(tid)
		done <- res{taskNS(os.Getpid(), tid) - start, err}
	}()
	r := <-done
	return r.ns, r.err
}

// DefaultBatch is the generator's frames per sendmmsg unless Options.Batch
// says otherwise.
const DefaultBatch = 64

// maxBatch is the most messages one sendmmsg takes (the kernel's UIO_MAXIOV).
const maxBatch = 1024

// blast sends frame out of device ifname (in the netns at nsPath) through
// an AF_PACKET socket with sendmmsg, as fast as it can, for d. The socket
// has a large send buffer and bypasses the qdisc layer, so the generator
// measures the path and not its own backpressure. Each sendmmsg carries
// batch frames: the fewer, the more user/kernel switches per frame. It
// returns the frames the kernel accepted and the sending thread's CPU time.
func blast(ctx context.Context, nsPath, ifname string, cpu, batch int, frame []byte, d time.Duration) (sent uint64, cpuNS uint64, err error) {
	li, err := netdev.LookupLink(nsPath, ifname)
	if err != nil {
		return 0, 0, err
	}
	cpuNS, err = pinned(nsPath, cpu, func(int) error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("af_packet socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 64<<20); err != nil {
			return fmt.Errorf("so_sndbufforce: %w", err)
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: 0, Ifindex: li.Index}); err != nil {
			return fmt.Errorf("bind to %s: %w", ifname, err)
		}
		iov := unix.Iovec{Base: &frame[0]}
		iov.SetLen(len(frame))
		var sa unix.RawSockaddrLinklayer
		sa.Family = unix.AF_PACKET
		sa.Ifindex = int32(li.Index)
		sa.Halen = 6
		copy(sa.Addr[:], frame[0:6])
		msgs := make([]unix.Mmsghdr, batch)
		for i := range msgs {
			msgs[i].Hdr.Name = (*byte)(unsafe.Pointer(&sa))
			msgs[i].Hdr.Namelen = uint32(unsafe.Sizeof(sa))
			msgs[i].Hdr.Iov = &iov
			msgs[i].Hdr.SetIovlen(1)
		}
		n, err := sendLoop(ctx, fd, msgs, d)
		sent += n
		if err != nil {
			return err
		}
		runtime.KeepAlive(frame)
		runtime.KeepAlive(&sa)
		return nil
	})
	return sent, cpuNS, err
}

// blastUDP sends payload bytes datagrams from a plain UDP socket in the
// netns at nsPath to dst:port with sendmmsg, as fast as it can, for d: the
// kernel builds the frames, with checksum offload as any application gets.
// Each sendmmsg carries batch datagrams.
func blastUDP(ctx context.Context, nsPath string, cpu, batch int, src, dst [4]byte, port, payload int, d time.Duration) (sent uint64, cpuNS uint64, err error) {
	cpuNS, err = pinned(nsPath, cpu, func(int) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("udp socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 64<<20); err != nil {
			return fmt.Errorf("so_sndbufforce: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src, Port: port}); err != nil {
			return fmt.Errorf("bind udp: %w", err)
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: dst, Port: port}); err != nil {
			return fmt.Errorf("connect udp: %w", err)
		}
		buf := make([]byte, payload)
		iov := unix.Iovec{Base: &buf[0]}
		iov.SetLen(len(buf))
		msgs := make([]unix.Mmsghdr, batch)
		for i := range msgs {
			msgs[i].Hdr.Iov = &iov
			msgs[i].Hdr.SetIovlen(1)
		}
		n, err := sendLoop(ctx, fd, msgs, d)
		sent += n
		if err != nil {
			return err
		}
		runtime.KeepAlive(buf)
		return nil
	})
	return sent, cpuNS, err
}

// writeTap writes frame (after a zeroed virtio header of hdr bytes) into
// the tap or macvtap fd f, one write per frame as QEMU without vhost does,
// for d. It returns the frames written and the writer's CPU time.
func writeTap(ctx context.Context, f *os.File, hdr int, cpu int, frame []byte, d time.Duration) (written, failed uint64, cpuNS uint64, err error) {
	buf := make([]byte, hdr+len(frame))
	copy(buf[hdr:], frame)
	fd := int(f.Fd())
	cpuNS, err = pinned("", cpu, func(int) error {
		deadline := time.Now().Add(d)
		for i := 0; ; i++ {
			if i%64 == 0 && (time.Now().After(deadline) || ctx.Err() != nil) {
				return nil
			}
			if _, err := unix.Write(fd, buf); err != nil {
				failed++
				continue
			}
			written++
		}
	})
	return written, failed, cpuNS, err
}

// latency is the result of a request/response series.
type latency struct {
	p50, p99 time.Duration
	lost     int
	cpuNS    uint64
}

// pingPong sends n UDP requests of payload bytes from a plain socket in the
// netns at nsPath to dst:port, one outstanding at a time, each answered by
// the reflecting guest emulator. busy spins on a non-blocking receive
// instead of sleeping in the kernel.
func pingPong(ctx context.Context, nsPath string, cpu int, src, dst [4]byte, port int, payload, n int, busy bool) (latency, error) {
	var rtts []time.Duration
	lost := 0
	cpuNS, err := pinned(nsPath, cpu, func(int) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("udp socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src, Port: port}); err != nil {
			return fmt.Errorf("bind udp: %w", err)
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: dst, Port: port}); err != nil {
			return fmt.Errorf("connect udp: %w", err)
		}
		tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		req := make([]byte, payload)
		resp := make([]byte, 2048)
		rtts = make([]time.Duration, 0, n)
		for i := 0; i < n && ctx.Err() == nil; i++ {
			req[0], req[1], req[2], req[3] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
			t0 := time.Now()
			if _, err := unix.Write(fd, req); err != nil {
				return fmt.Errorf("send request: %w", err)
			}
			for {
				var m int
				var err error
				if busy {
					m, _, err = unix.Recvfrom(fd, resp, unix.MSG_DONTWAIT)
					if err == unix.EAGAIN {
						if time.Since(t0) > 100*time.Millisecond {
							lost++
							break
						}
						continue
					}
				} else {
					m, err = unix.Read(fd, resp)
					if err == unix.EAGAIN {
						lost++
						break
					}
				}
				if err == unix.EINTR {
					continue
				}
				if err != nil {
					return fmt.Errorf("receive response: %w", err)
				}
				if m >= 4 && resp[0] == req[0] && resp[1] == req[1] && resp[2] == req[2] && resp[3] == req[3] {
					rtts = append(rtts, time.Since(t0))
					break
				}
				// A late answer to an earlier request: keep waiting.
			}
		}
		return nil
	})
	if err != nil {
		return latency{}, err
	}
	if len(rtts) == 0 {
		return latency{lost: lost, cpuNS: cpuNS}, fmt.Errorf("no responses to %d requests", n)
	}
	slices.Sort(rtts)
	return latency{p50: rtts[len(rtts)/2], p99: rtts[len(rtts)*99/100], lost: lost, cpuNS: cpuNS}, nil
}

// sendLoop calls sendmmsg with msgs on fd as fast as it can for d (or until ctx ends) and
// returns how many datagrams the kernel took; a full queue (ENOBUFS, EAGAIN) is not an error.
func sendLoop(ctx context.Context, fd int, msgs []unix.Mmsghdr, d time.Duration) (sent uint64, err error) {
	deadline := time.Now().Add(d)
	for i := 0; ; i++ {
		if i%16 == 0 && (time.Now().After(deadline) || ctx.Err() != nil) {
			return sent, nil
		}
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), 0, 0, 0)
		switch errno {
		case 0:
			sent += uint64(n)
		case unix.ENOBUFS, unix.EAGAIN, unix.EINTR:
		default:
			return sent, fmt.Errorf("sendmmsg: %w", errno)
		}
	}
}
