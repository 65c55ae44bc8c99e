// Package macvtap builds Kata Containers' older "macvtap" network model, kept
// by kata-dp as a baseline mode: a macvtap device in bridge mode on top of
// the sandbox's veth, whose character device (/dev/tapN, N = the macvtap's
// ifindex) QEMU opens instead of a tap.
//
// As Kata does, the MACs are swapped: the macvtap takes the veth's MAC (the
// MAC the CNI side expects the guest to use, and the MAC the guest NIC
// gets), and the veth gets a generated, locally administered one, so frames
// for the guest are steered into the macvtap by its MAC. Delete undoes both.
//
// Nothing on a minimal host creates /dev/tapN (udev does on a full one, and
// only for devices in the host netns), so Create makes the node itself when
// it is missing, reading the device number from a sysfs mounted privately
// in the sandbox netns, and Delete removes the node again. Ifindexes are
// per netns, so two sandboxes' macvtaps can both be tapN: when /dev/tapN is
// another device's node, Create makes the node under FallbackDir instead
// (named by the device number, which is unique) and says so in DevPath.
//
// The functions switch the calling goroutine's thread into the namespace;
// they may be called concurrently for different devices.
package macvtap

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Errors callers can test for.
var (
	// ErrNotMacvtap is returned by Delete for a device that is no macvtap.
	ErrNotMacvtap = errors.New("not a macvtap")
)

// DevDir is where the character devices are made.
var DevDir = "/dev"

// FallbackDir holds the nodes of macvtaps whose /dev/tapN is taken.
var FallbackDir = "/run/kata-dp/macvtap"

// Macvtap is a macvtap device made by Create.
type Macvtap struct {
	Name    string
	Ifindex int
	// DevPath is the character device the VM side opens: /dev/tapN, or a
	// node under FallbackDir when /dev/tapN is another device's.
	DevPath string
	// MAC is the macvtap's (and so the guest's) MAC: the veth's original.
	MAC net.HardwareAddr
}

// Create makes the macvtap name in bridge mode on veth in the network
// namespace at nsPath ("" = the caller's), swaps the MACs as Kata does,
// brings it up and makes sure its /dev/tapN exists. On failure nothing is
// left behind.
func Create(nsPath, veth, name string) (Macvtap, error) {
	if err := netdev.ValidateName(name); err != nil {
		return Macvtap{}, fmt.Errorf("create macvtap: %w", err)
	}
	var m Macvtap
	err := netdev.InNetNS(nsPath, func() (err error) {
		lower, err := netlink.LinkByName(veth)
		if err != nil {
			return fmt.Errorf("find %s: %w", veth, err)
		}
		orig := lower.Attrs().HardwareAddr
		la := netlink.NewLinkAttrs()
		la.Name = name
		la.ParentIndex = lower.Attrs().Index
		la.MTU = lower.Attrs().MTU
		la.TxQLen = lower.Attrs().TxQLen
		mv := &netlink.Macvtap{Macvlan: netlink.Macvlan{LinkAttrs: la, Mode: netlink.MACVLAN_MODE_BRIDGE}}
		if err := netlink.LinkAdd(mv); err != nil {
			return fmt.Errorf("add macvtap: %w", err)
		}
		swapped := false
		defer func() {
			if err != nil {
				_ = netlink.LinkDel(mv)
				if swapped {
					_ = netlink.LinkSetHardwareAddr(lower, orig)
				}
			}
		}()
		link, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s: %w", name, err)
		}
		// The veth gets a new MAC first: macvlan refuses a MAC its lower
		// device already has.
		if err := netlink.LinkSetHardwareAddr(lower, generateMAC()); err != nil {
			return fmt.Errorf("set mac of %s: %w", veth, err)
		}
		swapped = true
		if err := netlink.LinkSetHardwareAddr(link, orig); err != nil {
			return fmt.Errorf("set mac of %s: %w", name, err)
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
		m = Macvtap{Name: name, Ifindex: link.Attrs().Index, MAC: append(net.HardwareAddr(nil), orig...)}
		return nil
	})
	if err != nil {
		return Macvtap{}, fmt.Errorf("create macvtap %s on %s: %w", name, veth, err)
	}
	path, err := makeNode(nsPath, m)
	if err != nil {
		_ = netdev.InNetNS(nsPath, func() error {
			l, lerr := netlink.LinkByName(name)
			if lerr == nil {
				_ = netlink.LinkDel(l)
			}
			if v, lerr := netlink.LinkByName(veth); lerr == nil {
				_ = netlink.LinkSetHardwareAddr(v, m.MAC)
			}
			return nil
		})
		return Macvtap{}, fmt.Errorf("create macvtap %s on %s: %w", name, veth, err)
	}
	m.DevPath = path
	return m, nil
}

// Delete removes the macvtap name from veth, gives veth its MAC back (the
// macvtap's), and removes /dev/tapN when it is this device's node. A
// macvtap that is already gone is not an error.
func Delete(nsPath, veth, name string) error {
	var dev uint64
	var idx int
	err := netdev.InNetNS(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
				return nil
			}
			return fmt.Errorf("find %s: %w", name, err)
		}
		if link.Type() != "macvtap" {
			return fmt.Errorf("%s is a %s: %w", name, link.Type(), ErrNotMacvtap)
		}
		mac := link.Attrs().HardwareAddr
		idx = link.Attrs().Index
		dev, _ = devNumber(name, idx) // best effort: the node check below needs it
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("delete %s: %w", name, err)
		}
		lower, err := netlink.LinkByName(veth)
		if err != nil {
			return nil // the veth went too: nothing to restore
		}
		if err := netlink.LinkSetHardwareAddr(lower, mac); err != nil {
			return fmt.Errorf("restore mac of %s: %w", veth, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete macvtap %s: %w", name, err)
	}
	if idx > 0 && dev != 0 {
		for _, path := range []string{filepath.Join(DevDir, "tap"+strconv.Itoa(idx)), fallbackPath(idx, dev)} {
			var st unix.Stat_t
			if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == dev {
				if err := os.Remove(path); err != nil {
					return fmt.Errorf("delete macvtap %s: %w", name, err)
				}
			}
		}
	}
	return nil
}

// Open opens n queues of m's character device the way QEMU does
// (non-blocking when nonblock is set). The caller closes the files.
func Open(m Macvtap, n int, nonblock bool) ([]*os.File, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if nonblock {
		flags |= unix.O_NONBLOCK
	}
	var fs []*os.File
	for i := 0; i < n; i++ {
		fd, err := unix.Open(m.DevPath, flags, 0)
		if err != nil {
			for _, f := range fs {
				f.Close()
			}
			return nil, fmt.Errorf("open %s: %w", m.DevPath, err)
		}
		fs = append(fs, os.NewFile(uintptr(fd), m.DevPath))
	}
	return fs, nil
}

// makeNode makes sure m's character device has a node, /dev/tapN when that
// is free or already this device's, a node under FallbackDir otherwise, and
// returns its path.
func makeNode(nsPath string, m Macvtap) (string, error) {
	var dev uint64
	err := inSysfs(nsPath, func(sys string) error {
		var err error
		dev, err = readDev(sys, m.Name, m.Ifindex)
		return err
	})
	if err != nil {
		return "", err
	}
	path := filepath.Join(DevDir, "tap"+strconv.Itoa(m.Ifindex))
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err == nil {
		if st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == dev {
			return path, nil
		}
		path = fallbackPath(m.Ifindex, dev)
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return "", err
		}
		_ = os.Remove(path) // a stale node of a device number now reused
	}
	if err := unix.Mknod(path, unix.S_IFCHR|0o600, int(dev)); err != nil {
		return "", fmt.Errorf("mknod %s: %w", path, err)
	}
	return path, nil
}

func fallbackPath(ifindex int, dev uint64) string {
	return filepath.Join(FallbackDir, fmt.Sprintf("tap%d-%d_%d", ifindex, unix.Major(dev), unix.Minor(dev)))
}

// devNumber reads the device number of the macvtap name (ifindex idx) in
// the calling thread's netns.
func devNumber(name string, idx int) (uint64, error) {
	var dev uint64
	err := inSysfs("", func(sys string) error {
		var err error
		dev, err = readDev(sys, name, idx)
		return err
	})
	return dev, err
}

func readDev(sys, name string, idx int) (uint64, error) {
	p := filepath.Join(sys, "class", "net", name, "macvtap", "tap"+strconv.Itoa(idx), "dev")
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("read device number: %w", err)
	}
	maj, min, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	a, err1 := strconv.ParseUint(maj, 10, 32)
	c, err2 := strconv.ParseUint(min, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("device number %q in %s: malformed", b, p)
	}
	return unix.Mkdev(uint32(a), uint32(c)), nil
}

// inSysfs runs fn with the path of a sysfs that shows the network devices
// of the netns at nsPath ("" = the calling thread's): sysfs shows the devices of the netns it was mounted in, so
// this mounts a fresh one inside a private mount namespace on a thread that
// is thrown away afterwards.
func inSysfs(nsPath string, fn func(sys string) error) error {
	if nsPath == "" {
		nsPath = fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
	}
	nsf, err := os.Open(nsPath)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer nsf.Close()
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread's mount and network namespaces are
		// changed, so it must exit with this goroutine.
		runtime.LockOSThread()
		done <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
				return fmt.Errorf("unshare mount namespace: %w", err)
			}
			if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
				return fmt.Errorf("make mounts private: %w", err)
			}
			if err := unix.Setns(int(nsf.Fd()), unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("enter netns: %w", err)
			}
			dir, err := os.MkdirTemp("", "kata-dp-sysfs")
			if err != nil {
				return err
			}
			defer os.Remove(dir)
			if err := unix.Mount("sysfs", dir, "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
				return fmt.Errorf("mount sysfs: %w", err)
			}
			defer unix.Unmount(dir, unix.MNT_DETACH)
			return fn(dir)
		}()
	}()
	return <-done
}

// generateMAC returns a random locally administered unicast MAC.
func generateMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	if _, err := rand.Read(m); err != nil {
		panic(err)
	}
	m[0] = m[0]&^0x01 | 0x02
	return m
}
