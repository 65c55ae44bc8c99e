package hotplug

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/kata-dp/kata-dp/control/qmp"
)

var (
	// ErrInvalid wraps every validation error of a NIC.
	ErrInvalid = errors.New("invalid nic")
	// ErrNoSlot is returned when the VM has no free hot-pluggable PCI slot.
	ErrNoSlot = errors.New("no free hot-pluggable pci slot")
	// ErrUnplugTimeout is returned when the guest did not release the device in time. The
	// device and its netdev are left in place; Unplug may be called again.
	ErrUnplugTimeout = errors.New("guest did not release the device")
)

// MaxQueues bounds the queue count of a NIC.
const MaxQueues = 64

// RollbackTimeout bounds the undo steps taken after a failure, which run even when the
// caller's context has ended.
const RollbackTimeout = 5 * time.Second

// NIC describes the NIC to plug.
type NIC struct {
	// ID is the QEMU device id; the netdev is NetdevID(ID). A letter, then letters, digits,
	// '-', '.', '_'; at most 64 bytes.
	ID string
	// MAC is the guest MAC address (unicast).
	MAC string
	// Queues is the number of queue pairs; 0 means len(Fds) (or 1 with Ifname).
	Queues int
	// Fds are the tap's open queue files, one per queue (vnet_hdr). Plug passes copies to
	// QEMU and does not close them: close them once Plug returned, whatever the outcome.
	Fds []*os.File
	// Ifname names a tap QEMU opens itself, when Fds is empty.
	Ifname string
}

// NetdevID is the id of the netdev backing the device with the given id.
func NetdevID(id string) string { return id + "-netdev" }

func fdName(id string, i int) string { return fmt.Sprintf("%s-fd%d", id, i) }

var idRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]{0,56}$`)

// validate checks nic and returns its queue count.
func (nic NIC) validate() (int, error) {
	if !idRE.MatchString(nic.ID) {
		return 0, fmt.Errorf("%w: id %q: want a letter then letters, digits, '-', '.', '_' (at most 57)", ErrInvalid, nic.ID)
	}
	hw, err := net.ParseMAC(nic.MAC)
	if err != nil || len(hw) != 6 {
		return 0, fmt.Errorf("%w: mac %q: not an ethernet address", ErrInvalid, nic.MAC)
	}
	if hw[0]&1 != 0 {
		return 0, fmt.Errorf("%w: mac %q: multicast", ErrInvalid, nic.MAC)
	}
	if (len(nic.Fds) == 0) == (nic.Ifname == "") {
		return 0, fmt.Errorf("%w: %s: want either fds or ifname", ErrInvalid, nic.ID)
	}
	for i, f := range nic.Fds {
		if f == nil {
			return 0, fmt.Errorf("%w: %s: fd %d is nil", ErrInvalid, nic.ID, i)
		}
	}
	q := nic.Queues
	if q == 0 {
		q = max(len(nic.Fds), 1)
	}
	if q < 1 || q > MaxQueues {
		return 0, fmt.Errorf("%w: %s: queues %d: want 1..%d", ErrInvalid, nic.ID, nic.Queues, MaxQueues)
	}
	if len(nic.Fds) > 0 && len(nic.Fds) != q {
		return 0, fmt.Errorf("%w: %s: %d fds for %d queues", ErrInvalid, nic.ID, len(nic.Fds), q)
	}
	return q, nil
}

// Plug hot-plugs nic into the VM behind c and returns its PCI path in the kata-network form,
// e.g. "02.0/00". On failure, what was done is undone.
func Plug(ctx context.Context, c *qmp.Client, nic NIC) (pciAddr string, err error) {
	queues, err := nic.validate()
	if err != nil {
		return "", err
	}
	defer c.LockSequence()()
	log := slog.With("nic", nic.ID, "qmp", c.Path())

	var undo []func(context.Context) error
	defer func() {
		if err == nil {
			return
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), RollbackTimeout)
		defer cancel()
		for i := len(undo) - 1; i >= 0; i-- {
			uerr := undo[i](rctx)
			if errors.Is(uerr, qmp.ErrUnavailable) {
				// QEMU is gone, and with it everything there was to undo.
				log.Warn("hotplug rollback skipped: monitor unavailable", "err", uerr)
				break
			}
			if uerr != nil {
				log.Warn("hotplug rollback step failed", "err", uerr)
				err = errors.Join(err, fmt.Errorf("rollback: %w", uerr))
			}
		}
	}()

	slot, err := freeSlot(ctx, c)
	if err != nil {
		return "", fmt.Errorf("plug %s: %w", nic.ID, err)
	}

	netdev := map[string]any{"type": "tap", "id": NetdevID(nic.ID), "vhost": false}
	if len(nic.Fds) > 0 {
		var names []string
		for i, f := range nic.Fds {
			name := fdName(nic.ID, i)
			err := c.GetFD(ctx, name, f)
			if mayHaveRun(err) {
				undo = append(undo, func(ctx context.Context) error {
					// netdev_add may have consumed the fd already; that is fine.
					_, err := c.Execute(ctx, "closefd", map[string]string{"fdname": name})
					if isNotFound(err) {
						return nil
					}
					return err
				})
			}
			if err != nil {
				return "", fmt.Errorf("plug %s: pass fd %d: %w", nic.ID, i, err)
			}
			names = append(names, name)
		}
		if len(names) == 1 {
			netdev["fd"] = names[0]
		} else {
			netdev["fds"] = strings.Join(names, ":")
		}
	} else {
		netdev["ifname"] = nic.Ifname
		netdev["script"] = "no"
		netdev["downscript"] = "no"
		if queues > 1 {
			netdev["queues"] = queues
		}
	}
	_, err = c.Execute(ctx, "netdev_add", netdev)
	if mayHaveRun(err) {
		undo = append(undo, func(ctx context.Context) error {
			_, err := c.Execute(ctx, "netdev_del", map[string]string{"id": NetdevID(nic.ID)})
			if isNotFound(err) {
				return nil
			}
			return err
		})
	}
	if err != nil {
		return "", fmt.Errorf("plug %s: add netdev: %w", nic.ID, err)
	}

	dev := map[string]any{
		"driver": "virtio-net-pci",
		"id":     nic.ID,
		"netdev": NetdevID(nic.ID),
		"mac":    nic.MAC,
		"bus":    slot.bus,
		"addr":   fmt.Sprintf("%02x.0", slot.slot),
		// No option ROM: nothing network-boots a running sandbox, and QEMU would read the
		// iPXE image from disk and the guest map its BAR on every plug.
		"romfile": "",
	}
	if queues > 1 {
		dev["mq"] = true
		dev["vectors"] = 2*queues + 2
	}
	_, err = c.Execute(ctx, "device_add", dev)
	if mayHaveRun(err) {
		undo = append(undo, func(ctx context.Context) error {
			return unplugDevice(ctx, c, nic.ID, RollbackTimeout)
		})
	}
	if err != nil {
		return "", fmt.Errorf("plug %s: add device on %s slot %d: %w", nic.ID, slot.bus, slot.slot, err)
	}

	devs, err := queryPCI(ctx, c)
	if err != nil {
		return "", fmt.Errorf("plug %s: read back pci address: %w", nic.ID, err)
	}
	addr, ok := pciPath(devs, nic.ID, nil)
	if !ok {
		return "", fmt.Errorf("plug %s: read back pci address: device not found in query-pci", nic.ID)
	}
	log.Debug("nic plugged", "pciAddr", addr, "queues", queues)
	return addr, nil
}

// Unplug removes the NIC with the given device id: device_del, then it waits up to timeout
// for the guest to release it (DEVICE_DELETED), then netdev_del. A NIC that is already gone
// (device, netdev or both) is not an error.
func Unplug(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("%w: id %q", ErrInvalid, id)
	}
	defer c.LockSequence()()
	if err := unplugDevice(ctx, c, id, timeout); err != nil {
		return err
	}
	if _, err := c.Execute(ctx, "netdev_del", map[string]string{"id": NetdevID(id)}); err != nil && !isNotFound(err) {
		return fmt.Errorf("unplug %s: delete netdev: %w", id, err)
	}
	return nil
}

// unplugDevice does device_del and waits for DEVICE_DELETED.
func unplugDevice(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
	sub := c.Subscribe("DEVICE_DELETED")
	defer sub.Close()
	if _, err := c.Execute(ctx, "device_del", map[string]string{"id": id}); err != nil {
		var qe *qmp.Error
		switch {
		case isNotFound(err):
			return nil
		case errors.As(err, &qe) && strings.Contains(qe.Desc, "process of unplug"):
			// A previous device_del is pending: wait for it.
		default:
			return fmt.Errorf("unplug %s: delete device: %w", id, err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ev, err := sub.Next(wctx)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				return fmt.Errorf("unplug %s: %w within %v (device and netdev left in place; retry)", id, ErrUnplugTimeout, timeout)
			}
			return fmt.Errorf("unplug %s: wait for DEVICE_DELETED: %w", id, err)
		}
		var d struct {
			Device string `json:"device"`
		}
		if json.Unmarshal(ev.Data, &d) == nil && d.Device == id {
			return nil
		}
	}
}

// mayHaveRun reports whether a command that returned err may have taken effect: it did
// when err is nil, it did not when QEMU answered with an error, and nobody knows when the
// call timed out or the connection broke.
func mayHaveRun(err error) bool {
	var qe *qmp.Error
	return !errors.As(err, &qe)
}

func isNotFound(err error) bool {
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		return false
	}
	return qe.Class == "DeviceNotFound" || strings.Contains(qe.Desc, "not found")
}
