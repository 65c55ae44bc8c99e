package hotplug

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// VhostMode says whether a tap NIC's queues are served by the kernel's vhost-net instead of
// QEMU's userspace virtio-net backend.
type VhostMode string

// Vhost modes.
const (
	// VhostAuto uses vhost-net when /dev/vhost-net can be opened, and goes without it (with
	// the reason) otherwise. The default, as in Kata.
	VhostAuto VhostMode = "auto"
	// VhostOn requires vhost-net: a NIC that cannot have it is refused.
	VhostOn VhostMode = "on"
	// VhostOff never uses vhost-net.
	VhostOff VhostMode = "off"
)

// VhostNetPath is the kernel's vhost-net device.
const VhostNetPath = "/dev/vhost-net"

// ErrVhostUnavailable is returned when vhost is "on" but /dev/vhost-net cannot be opened.
var ErrVhostUnavailable = errors.New("vhost-net unavailable")

// ParseVhostMode parses "auto", "on" or "off"; "" is auto.
func ParseVhostMode(s string) (VhostMode, error) {
	switch m := VhostMode(s); m {
	case "":
		return VhostAuto, nil
	case VhostAuto, VhostOn, VhostOff:
		return m, nil
	}
	return "", fmt.Errorf("vhost %q: want auto, on or off", s)
}

// VhostOpener opens one vhost-net file, one per queue: each fd is a separate vhost device
// in the kernel. Tests replace it (the seam) with something that hands out other real files.
type VhostOpener func() (*os.File, error)

// OpenVhostNet opens /dev/vhost-net read-write, close-on-exec.
func OpenVhostNet() (*os.File, error) {
	fd, err := unix.Open(VhostNetPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: VhostNetPath, Err: err}
	}
	return os.NewFile(uintptr(fd), VhostNetPath), nil
}

// VhostDecision is what a mode came to on this host.
type VhostDecision struct {
	// On is true when vhost-net is used.
	On bool
	// Reason says why, for logs and status: "on: /dev/vhost-net opened", "off: configured
	// off", "off: open /dev/vhost-net: no such file or directory".
	Reason string
}

func (d VhostDecision) String() string { return d.Reason }

// DecideVhost probes whether mode gives vhost-net on this host: it opens (and closes) one
// vhost-net file with open (nil: OpenVhostNet) unless mode is off. Mode "on" without
// vhost-net is an error wrapping ErrVhostUnavailable; "auto" then decides off with the reason.
func DecideVhost(mode VhostMode, open VhostOpener) (VhostDecision, error) {
	fs, d, err := OpenVhost(mode, 1, open)
	closeFiles(fs)
	return d, err
}

// OpenVhost opens the vhost-net files for a NIC of the given queue count as mode decides: n
// files when vhost-net is used, none otherwise. The decision is taken on the real opens, not
// on an earlier probe, so it cannot go stale. On error nothing is left open. The caller
// closes the files once the NIC is plugged (QEMU holds its own copies) or failed.
func OpenVhost(mode VhostMode, queues int, open VhostOpener) ([]*os.File, VhostDecision, error) {
	mode, err := ParseVhostMode(string(mode))
	if err != nil {
		return nil, VhostDecision{}, err
	}
	if mode == VhostOff {
		return nil, VhostDecision{Reason: "off: configured off"}, nil
	}
	if open == nil {
		open = OpenVhostNet
	}
	var fs []*os.File
	for i := range max(queues, 1) {
		f, err := open()
		if err == nil && f == nil {
			err = errors.New("opener returned no file")
		}
		if err != nil {
			closeFiles(fs)
			if mode == VhostOn {
				return nil, VhostDecision{}, fmt.Errorf("%w: vhost on, but queue %d: %w", ErrVhostUnavailable, i, err)
			}
			return nil, VhostDecision{Reason: "off: " + err.Error()}, nil
		}
		fs = append(fs, f)
	}
	return fs, VhostDecision{On: true, Reason: "on: " + VhostNetPath + " opened"}, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}
