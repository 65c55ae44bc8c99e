package hotplug

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kata-dp/kata-dp/control/qmp"
)

var (
	// ErrNotShared is returned when the VM's memory is not shared: a vhost-user backend maps
	// the guest's memory, so QEMU must have it in shared, fd-backed memory backends
	// (memory-backend-file or -memfd with share=on, as Kata configures for vhost-user).
	ErrNotShared = errors.New("vm memory is not shared")
	// ErrSocketInUse is returned when the VM already has a chardev on the vhost-user socket:
	// one socket serves one NIC.
	ErrSocketInUse = errors.New("vhost-user socket already in use")
)

// VhostUserNIC describes a NIC backed by a vhost-user switch (a DPDK vhost-user port such as
// OVS-DPDK's dpdkvhostuser ports) instead of a tap: the switch moves the frames straight to
// and from the guest's memory, QEMU only sets the device up.
type VhostUserNIC struct {
	// ID is the QEMU device id, as for NIC; the netdev is NetdevID(ID), the chardev
	// ChardevID(ID).
	ID string
	// MAC is the guest MAC address (unicast).
	MAC string
	// Queues is the number of queue pairs (0: 1).
	Queues int
	// Socket is the absolute path of the switch's vhost-user unix socket; the switch listens
	// on it, QEMU connects as the client.
	Socket string
}

// ChardevID is the id of the chardev a vhost-user NIC's netdev talks through.
func ChardevID(id string) string { return id + "-chardev" }

func (nic VhostUserNIC) validate() (int, error) {
	if err := validateIDMAC(nic.ID, nic.MAC); err != nil {
		return 0, err
	}
	q := max(nic.Queues, 1)
	if nic.Queues < 0 || q > MaxQueues {
		return 0, fmt.Errorf("%w: %s: queues %d: want 1..%d", ErrInvalid, nic.ID, nic.Queues, MaxQueues)
	}
	if !filepath.IsAbs(nic.Socket) || filepath.Clean(nic.Socket) != nic.Socket || strings.ContainsAny(nic.Socket, ",\x00") {
		return 0, fmt.Errorf("%w: %s: vhost-user socket %q: want a clean absolute path without ','", ErrInvalid, nic.ID, nic.Socket)
	}
	fi, err := os.Stat(nic.Socket)
	if err != nil {
		return 0, fmt.Errorf("%w: %s: vhost-user socket: %w (is the vhost-user switch serving it?)", ErrInvalid, nic.ID, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return 0, fmt.Errorf("%w: %s: vhost-user socket %s: not a unix socket (%s)", ErrInvalid, nic.ID, nic.Socket, fi.Mode().Type())
	}
	return q, nil
}

// PlugVhostUser hot-plugs a vhost-user NIC into the VM behind c and returns its PCI path in
// the kata-network form. It checks that the VM's memory is shared (query-memdev) and that no
// chardev of the VM uses the socket yet (query-chardev), then: chardev-add (a unix socket
// client to nic.Socket, connected now, so a switch that does not answer fails here),
// netdev_add type vhost-user with that chardev and the queues, device_add virtio-net-pci as
// for a tap. On failure, what was done is undone.
func PlugVhostUser(ctx context.Context, c *qmp.Client, nic VhostUserNIC) (pciAddr string, err error) {
	queues, err := nic.validate()
	if err != nil {
		return "", err
	}
	defer c.LockSequence()()
	var undo undoList
	defer undo.onError(ctx, c, nic.ID, &err)

	if err := checkShared(ctx, c); err != nil {
		return "", fmt.Errorf("plug %s: %w", nic.ID, err)
	}
	if err := checkSocketFree(ctx, c, nic.Socket); err != nil {
		return "", fmt.Errorf("plug %s: %w", nic.ID, err)
	}
	slot, err := freeSlot(ctx, c)
	if err != nil {
		return "", fmt.Errorf("plug %s: %w", nic.ID, err)
	}

	chardev := ChardevID(nic.ID)
	_, err = c.Execute(ctx, "chardev-add", map[string]any{
		"id": chardev,
		"backend": map[string]any{"type": "socket", "data": map[string]any{
			"addr":   map[string]any{"type": "unix", "data": map[string]any{"path": nic.Socket}},
			"server": false,
		}},
	})
	if mayHaveRun(err) {
		undo.add(func(ctx context.Context) error { return removeChardev(ctx, c, nic.ID) })
	}
	if err != nil {
		return "", fmt.Errorf("plug %s: connect to vhost-user socket %s: %w", nic.ID, nic.Socket, err)
	}
	if err := addNetdev(ctx, c, &undo, nic.ID, map[string]any{
		"type": "vhost-user", "id": NetdevID(nic.ID), "chardev": chardev, "queues": queues,
	}); err != nil {
		return "", err
	}
	return addDevice(ctx, c, &undo, nic.ID, nic.MAC, queues, slot)
}

// UnplugVhostUser removes a vhost-user NIC in the reverse order of PlugVhostUser:
// device_del and the wait for DEVICE_DELETED (as Unplug), netdev_del, chardev-remove. What is
// already gone is not an error.
func UnplugVhostUser(ctx context.Context, c *qmp.Client, id string, timeout time.Duration) error {
	if !validID(id) {
		return fmt.Errorf("%w: id %q", ErrInvalid, id)
	}
	defer c.LockSequence()()
	if err := unplug(ctx, c, id, timeout); err != nil {
		return err
	}
	if err := removeChardev(ctx, c, id); err != nil {
		return fmt.Errorf("unplug %s: %w", id, err)
	}
	return nil
}

func removeChardev(ctx context.Context, c *qmp.Client, id string) error {
	_, err := c.Execute(ctx, "chardev-remove", map[string]string{"id": ChardevID(id)})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("remove chardev: %w", err)
	}
	return nil
}

// checkShared checks that every memory backend of the VM is shared. A VM started with plain
// -m has one backend (pc.ram) that is not.
func checkShared(ctx context.Context, c *qmp.Client) error {
	ret, err := c.Execute(ctx, "query-memdev", nil)
	if err != nil {
		return fmt.Errorf("check vm memory: %w", err)
	}
	var mems []struct {
		ID    string `json:"id"`
		Share bool   `json:"share"`
	}
	if err := json.Unmarshal(ret, &mems); err != nil {
		return fmt.Errorf("check vm memory: decode query-memdev: %w", err)
	}
	if len(mems) == 0 {
		return fmt.Errorf("%w: no memory backend (start QEMU with a shared memory-backend-file or -memfd for vhost-user)", ErrNotShared)
	}
	var private []string
	for _, m := range mems {
		if !m.Share {
			private = append(private, m.ID)
		}
	}
	if len(private) > 0 {
		return fmt.Errorf("%w: memory backend %s has share=off (vhost-user needs share=on)", ErrNotShared, strings.Join(private, ", "))
	}
	return nil
}

// checkSocketFree fails when a chardev of the VM already talks to socket. query-chardev
// names a unix socket chardev "unix:<local path>" ("disconnected:unix:..." while not
// connected), which is empty for a client: the path it connects to is the chardev's "addr"
// property, read with qom-get.
func checkSocketFree(ctx context.Context, c *qmp.Client, socket string) error {
	ret, err := c.Execute(ctx, "query-chardev", nil)
	if err != nil {
		return fmt.Errorf("check vhost-user socket: %w", err)
	}
	var chardevs []struct {
		Label    string `json:"label"`
		Filename string `json:"filename"`
	}
	if err := json.Unmarshal(ret, &chardevs); err != nil {
		return fmt.Errorf("check vhost-user socket: decode query-chardev: %w", err)
	}
	for _, cd := range chardevs {
		if !strings.HasPrefix(strings.TrimPrefix(cd.Filename, "disconnected:"), "unix:") {
			continue
		}
		ret, err := c.Execute(ctx, "qom-get", map[string]string{"path": "/chardevs/" + cd.Label, "property": "addr"})
		if err != nil {
			return fmt.Errorf("check vhost-user socket: address of chardev %s: %w", cd.Label, err)
		}
		var addr struct {
			Type string `json:"type"`
			Path string `json:"path"`
		}
		if err := json.Unmarshal(ret, &addr); err != nil {
			return fmt.Errorf("check vhost-user socket: decode address of chardev %s: %w", cd.Label, err)
		}
		if addr.Type == "unix" && addr.Path == socket {
			return fmt.Errorf("%w: %s is served to the vm through chardev %s", ErrSocketInUse, socket, cd.Label)
		}
	}
	return nil
}
