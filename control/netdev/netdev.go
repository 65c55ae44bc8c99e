package netdev

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Sentinel errors, matched with errors.Is.
var (
	// ErrExists is returned when a link to be created already exists.
	ErrExists = errors.New("link exists")
	// ErrNotFound is returned when a named link does not exist.
	ErrNotFound = errors.New("link not found")
	// ErrInvalid is returned for arguments that fail validation.
	ErrInvalid = errors.New("invalid argument")
	// ErrNotTap is returned when a link exists but is not a tun/tap device.
	ErrNotTap = errors.New("not a tap device")
)

// MaxQueues is the largest number of tap queues accepted (the kernel's
// MAX_TAP_QUEUES is 256).
const MaxQueues = 256

// InNetNS runs fn on a locked OS thread switched into the netns at path
// ("" = current netns). Sockets and devices opened by fn stay in that netns
// after fn returns.
func InNetNS(path string, fn func() error) error {
	if path == "" {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		return fn()
	}
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

// ValidateName checks that name is usable as a Linux interface name.
func ValidateName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("empty interface name: %w", ErrInvalid)
	case len(name) >= unix.IFNAMSIZ:
		return fmt.Errorf("interface name %q longer than %d bytes: %w", name, unix.IFNAMSIZ-1, ErrInvalid)
	case name == "." || name == "..":
		return fmt.Errorf("interface name %q: %w", name, ErrInvalid)
	case strings.ContainsAny(name, "/: \t\n\x00%"):
		return fmt.Errorf("interface name %q has a forbidden character: %w", name, ErrInvalid)
	}
	return nil
}

// TapOptions configures CreateTap.
type TapOptions struct {
	// Queues is the number of queues; 0 or 1 makes a single-queue tap,
	// more sets IFF_MULTI_QUEUE.
	Queues int
	// MTU, 0 keeps the kernel's default (1500). The tun driver accepts
	// 68..65521 (65535 less the Ethernet header).
	MTU int
	// VnetHdr sets IFF_VNET_HDR. kata-dp always sets it (QEMU expects it);
	// it is a field only so that tests can build a plain tap.
	VnetHdr bool
}

func (o TapOptions) validate() error {
	if o.Queues < 0 || o.Queues > MaxQueues {
		return fmt.Errorf("queues %d not in [0, %d]: %w", o.Queues, MaxQueues, ErrInvalid)
	}
	if o.MTU != 0 && (o.MTU < 68 || o.MTU > 65521) {
		return fmt.Errorf("mtu %d not in [68, 65521]: %w", o.MTU, ErrInvalid)
	}
	return nil
}

func tapFlags(multiQueue, vnetHdr bool) uint16 {
	f := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if multiQueue {
		f |= unix.IFF_MULTI_QUEUE
	}
	if vnetHdr {
		f |= unix.IFF_VNET_HDR
	}
	return f
}

// CreateTap creates a persistent tap (IFF_TAP|IFF_NO_PI, IFF_VNET_HDR when
// o.VnetHdr, IFF_MULTI_QUEUE when o.Queues>1) named name in the netns at
// nsPath, sets its MTU and brings it up. It returns an error wrapping
// ErrExists if a link with that name exists. On failure nothing is left
// behind.
func CreateTap(nsPath, name string, o TapOptions) error {
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("create tap: %w", err)
	}
	if err := o.validate(); err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	err := InNetNS(nsPath, func() error {
		if _, err := netlink.LinkByName(name); err == nil {
			return ErrExists
		} else if !isNotFound(err) {
			return fmt.Errorf("look up: %w", err)
		}
		mq := o.Queues > 1
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			// IFF_TUN_EXCL makes the kernel refuse (EBUSY) instead of
			// attaching when the tap appeared since the look-up.
			Flags: netlink.TuntapFlag(tapFlags(mq, o.VnetHdr)) | netlink.TUNTAP_TUN_EXCL,
		}
		// Queues stays 0: the library then opens a single fd with exactly
		// these flags, makes the tap persistent and closes the fd. The
		// other queues of a multi-queue tap are attached by OpenTap.
		if err := netlink.LinkAdd(tap); err != nil {
			// The library formats the errno with %v, so match its text too.
			if errors.Is(err, unix.EBUSY) || strings.Contains(err.Error(), unix.EBUSY.Error()) {
				return ErrExists
			}
			return fmt.Errorf("add: %w", err)
		}
		link, err := netlink.LinkByName(name)
		if err == nil && o.MTU != 0 {
			err = netlink.LinkSetMTU(link, o.MTU)
		}
		if err == nil {
			err = netlink.LinkSetUp(link)
		}
		if err != nil {
			if link != nil {
				_ = netlink.LinkDel(link)
			} else {
				_ = netlink.LinkDel(tap) // by name
			}
			return fmt.Errorf("configure: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	return nil
}

// ifReq is struct ifreq with the flags member of the union.
type ifReq struct {
	Name  [unix.IFNAMSIZ]byte
	Flags uint16
	_     [24 - 2]byte
}

// OpenTap attaches to the existing tap name in the netns at nsPath and
// returns one fd per queue (TUNSETIFF with IFF_TAP|IFF_NO_PI, IFF_VNET_HDR
// when vnetHdr, IFF_MULTI_QUEUE when the tap is multi-queue; more than one
// queue on a single-queue tap is ErrInvalid). nonblock sets O_NONBLOCK, as QEMU does; the tun driver only
// runs a tap's XDP program natively on frames written through a non-blocking
// fd.
//
// IFF_VNET_HDR is a property of the device: opening with a different vnetHdr
// than the tap was created with changes it for every fd.
func OpenTap(nsPath, name string, queues int, vnetHdr, nonblock bool) ([]*os.File, error) {
	if err := ValidateName(name); err != nil {
		return nil, fmt.Errorf("open tap: %w", err)
	}
	if queues < 1 || queues > MaxQueues {
		return nil, fmt.Errorf("open tap %s: queues %d not in [1, %d]: %w", name, queues, MaxQueues, ErrInvalid)
	}
	var files []*os.File
	err := InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			if isNotFound(err) {
				return ErrNotFound
			}
			return fmt.Errorf("look up: %w", err)
		}
		tt, ok := link.(*netlink.Tuntap)
		if !ok {
			return fmt.Errorf("%s is %s: %w", name, link.Type(), ErrNotTap)
		}
		if tt.Mode != netlink.TUNTAP_MODE_TAP {
			return fmt.Errorf("%s is a tun, not a tap: %w", name, ErrNotTap)
		}
		mq := tt.Flags&netlink.TUNTAP_MULTI_QUEUE != 0
		if queues > 1 && !mq {
			return fmt.Errorf("%d queues on a single-queue tap: %w", queues, ErrInvalid)
		}
		for i := 0; i < queues; i++ {
			f, err := openQueue(name, mq, vnetHdr, nonblock)
			if err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
			files = append(files, f)
		}
		if link.Attrs().Flags&net.FlagUp != 0 {
			waitOperUp(name)
		}
		return nil
	})
	if err != nil {
		for _, f := range files {
			f.Close()
		}
		return nil, fmt.Errorf("open tap %s: %w", name, err)
	}
	return files, nil
}

// OperUpTimeout bounds how long OpenTap waits for an up tap to become
// operationally up after its first queue is attached.
var OperUpTimeout = 2 * time.Second

// waitOperUp waits until the link name in the current netns is
// operationally up. Attaching the first fd turns a tap's carrier on, but the
// kernel activates its qdisc later, from the linkwatch work; until then
// frames sent to the tap are dropped (counted as tx_dropped), which costs a
// first ARP request a one-second retransmission. Waiting here closes that
// window for every caller. It gives up silently after OperUpTimeout.
func waitOperUp(name string) {
	deadline := time.Now().Add(OperUpTimeout)
	for delay := 100 * time.Microsecond; ; delay = min(2*delay, 20*time.Millisecond) {
		l, err := netlink.LinkByName(name)
		if err != nil || l.Attrs().OperState == netlink.OperUp || time.Now().After(deadline) {
			return
		}
		time.Sleep(delay)
	}
}

func openQueue(name string, mq, vnetHdr, nonblock bool) (*os.File, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if nonblock {
		flags |= unix.O_NONBLOCK
	}
	fd, err := unix.Open("/dev/net/tun", flags, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	var req ifReq
	copy(req.Name[:unix.IFNAMSIZ-1], name)
	req.Flags = tapFlags(mq, vnetHdr)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF: %w", errno)
	}
	// os.NewFile registers a non-blocking fd with the runtime poller.
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}

// TapFlags returns the IFF_* flags of the tap f is attached to (TUNGETIFF).
func TapFlags(f *os.File) (uint16, error) {
	var req ifReq
	var errno unix.Errno
	if err := control(f, func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNGETIFF, uintptr(unsafe.Pointer(&req)))
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, fmt.Errorf("TUNGETIFF: %w", errno)
	}
	return req.Flags, nil
}

func control(f *os.File, fn func(fd uintptr)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("syscall conn %s: %w", f.Name(), err)
	}
	if err := rc.Control(fn); err != nil {
		return fmt.Errorf("control %s: %w", f.Name(), err)
	}
	return nil
}

// DeleteLink deletes the link name in the netns at nsPath. It returns an
// error wrapping ErrNotFound when the link does not exist.
func DeleteLink(nsPath, name string) error {
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("delete link: %w", err)
	}
	err := InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			if isNotFound(err) {
				return ErrNotFound
			}
			return fmt.Errorf("look up: %w", err)
		}
		if err := netlink.LinkDel(link); err != nil {
			if errors.Is(err, unix.ENODEV) {
				return ErrNotFound
			}
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// LinkInfo describes a link.
type LinkInfo struct {
	Name  string
	Index int
	// Type is the netlink kind: "tuntap", "veth", "bridge", "device", ...
	Type string
	MAC  net.HardwareAddr
	MTU  int
	Up   bool
}

// LookupLink returns the link name in the netns at nsPath. It returns an
// error wrapping ErrNotFound when the link does not exist.
func LookupLink(nsPath, name string) (LinkInfo, error) {
	if err := ValidateName(name); err != nil {
		return LinkInfo{}, fmt.Errorf("look up link: %w", err)
	}
	var li LinkInfo
	err := InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			if isNotFound(err) {
				return ErrNotFound
			}
			return err
		}
		a := link.Attrs()
		li = LinkInfo{
			Name:  a.Name,
			Index: a.Index,
			Type:  link.Type(),
			MAC:   append(net.HardwareAddr(nil), a.HardwareAddr...),
			MTU:   a.MTU,
			Up:    a.Flags&net.FlagUp != 0,
		}
		return nil
	})
	if err != nil {
		return LinkInfo{}, fmt.Errorf("look up link %s: %w", name, err)
	}
	return li, nil
}

// TapInfo describes a tun/tap device.
type TapInfo struct {
	LinkInfo
	// Tun is set for a tun (layer 3) device, clear for a tap.
	Tun        bool
	MultiQueue bool
	VnetHdr    bool
	NoPI       bool
	Persistent bool
	// Queues is the number of queues attached (open fds) now.
	Queues int
}

// LookupTap returns the tun/tap device name in the netns at nsPath. It
// returns an error wrapping ErrNotFound when the link does not exist and
// ErrNotTap when it is not a tun/tap device.
func LookupTap(nsPath, name string) (TapInfo, error) {
	li, err := LookupLink(nsPath, name)
	if err != nil {
		return TapInfo{}, fmt.Errorf("look up tap: %w", err)
	}
	if li.Type != "tuntap" {
		return TapInfo{}, fmt.Errorf("look up tap %s: is %s: %w", name, li.Type, ErrNotTap)
	}
	var ti TapInfo
	err = InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			if isNotFound(err) {
				return ErrNotFound
			}
			return err
		}
		tt, ok := link.(*netlink.Tuntap)
		if !ok || link.Attrs().Index != li.Index {
			return fmt.Errorf("replaced while looking it up: %w", ErrNotFound)
		}
		ti = TapInfo{
			LinkInfo:   li,
			Tun:        tt.Mode == netlink.TUNTAP_MODE_TUN,
			MultiQueue: tt.Flags&netlink.TUNTAP_MULTI_QUEUE != 0,
			VnetHdr:    tt.Flags&netlink.TUNTAP_VNET_HDR != 0,
			NoPI:       tt.Flags&netlink.TUNTAP_NO_PI != 0,
			Persistent: !tt.NonPersist,
			Queues:     tt.Queues,
		}
		return nil
	})
	if err != nil {
		return TapInfo{}, fmt.Errorf("look up tap %s: %w", name, err)
	}
	return ti, nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}
