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
	// ErrDuplicate is returned (beside QEMU's error) when the VM already has a netdev of the
	// NIC's id: plugged already, or left by a plug that never finished. Plug leaves it alone;
	// a caller whose ids are its own can Scrub it and plug again.
	ErrDuplicate = errors.New("the VM already has a netdev of that id")
)

// MaxQueues bounds the queue count of a NIC.
const MaxQueues = 64

// RollbackTimeout bounds each undo step taken after a failure; the steps run even when the
// caller's context has ended. Each step gets its own bound, so that after a command timed out
// on a hung monitor the later undo commands are still sent (QEMU runs them in order once it
// answers again) and the whole rollback stays bounded.
const RollbackTimeout = 5 * time.Second

// hungStepTimeout bounds each undo step once one timed out: the monitor is hung, so the rest
// are sent for QEMU to run when it answers again, without waiting RollbackTimeout for each.
const hungStepTimeout = 250 * time.Millisecond

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
	// VhostFds, when set, are open /dev/vhost-net files, one per queue (see OpenVhost): the
	// netdev then gets vhost=on with them, and the kernel moves the queues' frames instead
	// of QEMU's main loop. Only with Fds; Plug does not close them either.
	VhostFds []*os.File
}

// NetdevID is the id of the netdev backing the device with the given id.
func NetdevID(id string) string { return id + "-netdev" }

// idRE and maxIDLen say which ids QEMU takes. The length is checked apart: a bounded repetition
// ({0,56}) compiles into one copy of the class per repetition, 769 allocations and about 1 ms at
// the start of every kata-dp process, the CLI's included.
var idRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]*$`)

const maxIDLen = 57

func validID(id string) bool { return len(id) <= maxIDLen && idRE.MatchString(id) }

// validate checks nic and returns its queue count.
func (nic NIC) validate() (int, error) {
	if err := validateIDMAC(nic.ID, nic.MAC); err != nil {
		return 0, err
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
	if len(nic.VhostFds) > 0 && len(nic.VhostFds) != len(nic.Fds) {
		return 0, fmt.Errorf("%w: %s: %d vhost fds for %d tap fds (want one per queue)", ErrInvalid, nic.ID, len(nic.VhostFds), len(nic.Fds))
	}
	for i, f := range nic.VhostFds {
		if f == nil {
			return 0, fmt.Errorf("%w: %s: vhost fd %d is nil", ErrInvalid, nic.ID, i)
		}
	}
	return q, nil
}

func validateIDMAC(id, mac string) error {
	if !validID(id) {
		return fmt.Errorf("%w: id %q: want a letter then letters, digits, '-', '.', '_' (at most 57)", ErrInvalid, id)
	}
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return fmt.Errorf("%w: mac %q: not an ethernet address", ErrInvalid, mac)
	}
	if hw[0]&1 != 0 {
		return fmt.Errorf("%w: mac %q: multicast", ErrInvalid, mac)
	}
	return nil
}

// Plug hot-plugs nic into the VM behind c and returns its PCI path in the kata-network form,
// e.g. "02.0/00". On failure, what was done is undone.
func Plug(ctx context.Context, c *qmp.Client, nic NIC) (pciAddr string, err error) {
	queues, err := nic.validate()
	if err != nil {
		return "", err
	}
	defer c.LockSequence()()
	var undo undoList
	defer undo.onError(ctx, c, nic.ID, &err)

	slot, err := freeSlot(ctx, c)
	if err != nil {
		return "", fmt.Errorf("plug %s: %w", nic.ID, err)
	}

	netdev := map[string]any{"type": "tap", "id": NetdevID(nic.ID), "vhost": len(nic.VhostFds) > 0}
	if len(nic.Fds) > 0 {
		names, err := passFDs(ctx, c, &undo, nic.ID, "fd", nic.Fds)
		if err != nil {
			return "", err
		}
		vnames, err := passFDs(ctx, c, &undo, nic.ID, "vhostfd", nic.VhostFds)
		if err != nil {
			return "", err
		}
		// QEMU takes one fd as fd/vhostfd and several as fds/vhostfds, never a mix.
		if len(names) == 1 {
			netdev["fd"] = names[0]
			if len(vnames) == 1 {
				netdev["vhostfd"] = vnames[0]
			}
		} else {
			netdev["fds"] = strings.Join(names, ":")
			if len(vnames) > 0 {
				netdev["vhostfds"] = strings.Join(vnames, ":")
			}
		}
	} else {
		netdev["ifname"] = nic.Ifname
		netdev["script"] = "no"
		netdev["downscript"] = "no"
		if queues > 1 {
			netdev["queues"] = queues
		}
	}
	if err := addNetdev(ctx, c, &undo, nic.ID, netdev); err != nil {
		return "", err
	}
	return addDevice(ctx, c, &undo, nic.ID, nic.MAC, queues, slot)
}

// undoList collects the steps that undo what a plug did so far.
type undoList []func(context.Context) error

func (u *undoList) add(f func(context.Context) error) { *u = append(*u, f) }

// onError runs the undo steps in reverse order when *err is set, even when ctx has ended
// (each bounded by RollbackTimeout), and joins their failures to *err.
func (u *undoList) onError(ctx context.Context, c *qmp.Client, id string, err *error) {
	if *err == nil {
		return
	}
	log := slog.With("nic", id, "qmp", c.Path())
	step := RollbackTimeout
	for i := len(*u) - 1; i >= 0; i-- {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), step)
		uerr := (*u)[i](rctx)
		cancel()
		if errors.Is(uerr, context.DeadlineExceeded) {
			step = hungStepTimeout
		}
		if errors.Is(uerr, qmp.ErrUnavailable) || (errors.Is(uerr, qmp.ErrDisconnected) && !errors.Is(uerr, qmp.ErrTooLarge)) {
			// QEMU is gone, and with it everything there was to undo. Which of the two errors
			// the first undo step sees depends on whether the client noticed the closed
			// monitor before it wrote the step (unavailable) or only while it waited for the
			// answer (disconnected): QEMU closes its monitor only when it exits. A monitor
			// dropped for flooding (ErrTooLarge) is not gone: the next step redials.
			log.Warn("hotplug rollback skipped: monitor unavailable", "err", uerr)
			break
		}
		if uerr != nil {
			log.Warn("hotplug rollback step failed", "err", uerr)
			*err = errors.Join(*err, fmt.Errorf("rollback: %w", uerr))
		}
	}
}

// passFDs passes files with getfd under the names "<id>-<kind><i>" and returns the names.
func passFDs(ctx context.Context, c *qmp.Client, undo *undoList, id, kind string, files []*os.File) ([]string, error) {
	var names []string
	for i, f := range files {
		name := fmt.Sprintf("%s-%s%d", id, kind, i)
		err := c.GetFD(ctx, name, f)
		if mayHaveRun(err) {
			undo.add(func(ctx context.Context) error {
				// netdev_add may have consumed the fd already; that is fine.
				_, err := c.Execute(ctx, "closefd", map[string]string{"fdname": name})
				if isNotFound(err) {
					return nil
				}
				return err
			})
		}
		if err != nil {
			return nil, fmt.Errorf("plug %s: pass %s %d: %w", id, kind, i, err)
		}
		names = append(names, name)
	}
	return names, nil
}

// addNetdev runs netdev_add with args (whose id is NetdevID(id)). A netdev of that id that
// is already there fails with ErrDuplicate beside QEMU's error.
func addNetdev(ctx context.Context, c *qmp.Client, undo *undoList, id string, args map[string]any) error {
	_, err := c.Execute(ctx, "netdev_add", args)
	if isDuplicate(err) {
		err = fmt.Errorf("%w: %w", ErrDuplicate, err)
	}
	if mayHaveRun(err) {
		undo.add(func(ctx context.Context) error {
			_, err := c.Execute(ctx, "netdev_del", map[string]string{"id": NetdevID(id)})
			if isNotFound(err) {
				return nil
			}
			return err
		})
	}
	if err != nil {
		return fmt.Errorf("plug %s: add netdev: %w", id, err)
	}
	return nil
}

// addDevice adds the virtio-net-pci device id on NetdevID(id) at slot and returns the PCI
// path QEMU assigned.
func addDevice(ctx context.Context, c *qmp.Client, undo *undoList, id, mac string, queues int, slot slot) (string, error) {
	dev := map[string]any{
		"driver": "virtio-net-pci",
		"id":     id,
		"netdev": NetdevID(id),
		"mac":    mac,
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
	_, err := c.Execute(ctx, "device_add", dev)
	if mayHaveRun(err) {
		undo.add(func(ctx context.Context) error {
			return unplugDevice(ctx, c, id, RollbackTimeout)
		})
	}
	if err != nil {
		return "", fmt.Errorf("plug %s: add device on %s slot %d: %w", id, slot.bus, slot.slot, err)
	}

	devs, err := queryPCI(ctx, c)
	if err != nil {
		return "", fmt.Errorf("plug %s: read back pci address: %w", id, err)
	}
	addr, ok := pciPath(devs, id, nil)
	if !ok {
		return "", fmt.Errorf("plug %s: read back pci address: device not found in query-pci", id)
	}
	slog.Debug("nic plugged", "nic", id, "qmp", c.Path(), "pciAddr", addr, "queues", queues)
	return addr, nil
}

// Unplug removes the NIC with the given device id: device_del, then it waits up to timeout
// for the guest to release it (DEVICE_DELETED), then netdev_del. A NIC that is already gone
// (device, netdev or both) is not an error.
func Unplug(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
	if !validID(id) {
		return fmt.Errorf("%w: id %q", ErrInvalid, id)
	}
	defer c.LockSequence()()
	return unplug(ctx, c, id, timeout)
}

// unplug does device_del, waits for DEVICE_DELETED, then netdev_del.
func unplug(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
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

// Scrub removes everything a plug of the NIC id may have left in the VM, whatever step it
// stopped at: the device, its netdev, a vhost-user chardev, and the files passed with getfd
// under the NIC's names that no netdev took. What is not there is not an error.
func Scrub(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
	if !validID(id) {
		return fmt.Errorf("%w: id %q", ErrInvalid, id)
	}
	defer c.LockSequence()()
	if err := unplug(ctx, c, id, timeout); err != nil {
		return err
	}
	if err := removeChardev(ctx, c, id); err != nil {
		return fmt.Errorf("scrub %s: %w", id, err)
	}
	for _, kind := range []string{"fd", "vhostfd"} {
		// passFDs names them <id>-<kind>0, 1, ... and passes them in order: stop at the
		// first one QEMU does not hold.
		for i := range MaxQueues {
			_, err := c.Execute(ctx, "closefd", map[string]string{"fdname": fmt.Sprintf("%s-%s%d", id, kind, i)})
			if isNotFound(err) {
				break
			}
			if err != nil {
				return fmt.Errorf("scrub %s: closefd: %w", id, err)
			}
		}
	}
	return nil
}

// isDuplicate reports a QMP error saying that the id is already in use.
func isDuplicate(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe) && strings.Contains(qe.Desc, "Duplicate")
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
