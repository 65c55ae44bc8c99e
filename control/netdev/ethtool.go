package netdev

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ethtoolValue is struct ethtool_value.
type ethtoolValue struct {
	Cmd  uint32
	Data uint32
}

// ifReqData is struct ifreq with the ifr_data member of the union.
type ifReqData struct {
	Name [unix.IFNAMSIZ]byte
	Data unsafe.Pointer
	_    [24 - 8]byte
}

// ethtool issues one ETHTOOL_G*/S* value command on name in the current
// netns and returns the value.
func ethtool(name string, cmd, data uint32) (uint32, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	v := ethtoolValue{Cmd: cmd, Data: data}
	var req ifReqData
	copy(req.Name[:unix.IFNAMSIZ-1], name)
	req.Data = unsafe.Pointer(&v)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&req))); errno != 0 {
		if errno == unix.ENODEV {
			return 0, ErrNotFound
		}
		return 0, fmt.Errorf("SIOCETHTOOL cmd %#x: %w", cmd, errno)
	}
	return v.Data, nil
}

// SetGRO turns generic receive offload on or off on name in the netns at
// nsPath (ETHTOOL_SGRO). A veth needs GRO on (or an XDP program on its peer)
// for frames that XDP redirects into it to be delivered.
func SetGRO(nsPath, name string, on bool) error {
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("set gro: %w", err)
	}
	var v uint32
	if on {
		v = 1
	}
	err := InNetNS(nsPath, func() error {
		_, err := ethtool(name, unix.ETHTOOL_SGRO, v)
		return err
	})
	if err != nil {
		return fmt.Errorf("set gro %v on %s: %w", on, name, err)
	}
	return nil
}

// GRO reports whether generic receive offload is on for name in the netns at
// nsPath (ETHTOOL_GGRO).
func GRO(nsPath, name string) (bool, error) {
	if err := ValidateName(name); err != nil {
		return false, fmt.Errorf("get gro: %w", err)
	}
	var v uint32
	err := InNetNS(nsPath, func() error {
		var err error
		v, err = ethtool(name, unix.ETHTOOL_GGRO, 0)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("get gro on %s: %w", name, err)
	}
	return v != 0, nil
}
