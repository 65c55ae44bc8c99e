// Package vmplug is control's Hotplugger: it puts a sandbox's NICs into (and takes them out
// of) its QEMU over QMP, the way Kata's runtime does — the tap's queues are opened in the
// sandbox netns and passed to QEMU (getfd), with one /dev/vhost-net file per queue beside
// them when vhost-net is to be had (Plugger.Vhost), then netdev_add + device_add
// (control/hotplug).
//
// One QMP client per sandbox socket is kept and reused (it redials by itself when QEMU
// restarts). A Plugger is safe for concurrent use.
package vmplug

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/hotplug"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/qmp"
)

// Plugger implements control.Hotplugger.
type Plugger struct {
	// UnplugTimeout bounds the wait for the guest to release a NIC (DEVICE_DELETED).
	UnplugTimeout time.Duration
	// Vhost says whether tap NICs use vhost-net (default auto: when /dev/vhost-net opens).
	Vhost hotplug.VhostMode
	// OpenVhost opens one vhost-net file; nil opens /dev/vhost-net. A seam for tests.
	OpenVhost hotplug.VhostOpener

	mu      sync.Mutex
	clients map[string]*qmp.Client // by QMP socket path
}

var _ control.Hotplugger = (*Plugger)(nil)

// New returns a Plugger.
func New() *Plugger {
	return &Plugger{UnplugTimeout: 5 * time.Second, Vhost: hotplug.VhostAuto, clients: map[string]*qmp.Client{}}
}

func (p *Plugger) client(path string) *qmp.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.clients[path]
	if !ok {
		c = qmp.New(path)
		p.clients[path] = c
	}
	return c
}

// DeviceID is the QEMU device id of a sandbox NIC: stable, so a retried unplug or an agent
// restart finds the device again.
func DeviceID(ep control.Endpoint) string { return "kdp-" + ep.NIC }

// Plug opens the tap's queues in the sandbox netns (and, as p.Vhost decides, one vhost-net
// file per queue) and hot-plugs them as a virtio-net device with the guest MAC; it returns
// the PCI path QEMU assigned.
func (p *Plugger) Plug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	queues := max(ep.Queues, 1)
	vfs, vhost, err := hotplug.OpenVhost(p.Vhost, queues, p.OpenVhost)
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	defer closeAll(vfs)
	slog.Debug("vhost-net", "sandbox", sb.ID, "nic", ep.NIC, "decision", vhost.Reason)
	fds, err := netdev.OpenTap(sb.NetNS, ep.Tap, queues, true, true)
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	defer closeAll(fds) // QEMU holds its own copies now (or nothing, on failure)
	addr, err := hotplug.Plug(ctx, p.client(sb.QMP), hotplug.NIC{ID: DeviceID(ep), MAC: ep.MAC.String(), Queues: queues, Fds: fds, VhostFds: vfs})
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	return addr, nil
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// Unplug removes the NIC from the VM and waits (bounded) for the guest to let it go.
func (p *Plugger) Unplug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) error {
	if err := hotplug.Unplug(ctx, p.client(sb.QMP), DeviceID(ep), p.UnplugTimeout); err != nil {
		return fmt.Errorf("hot-unplug %s: %w", ep.NIC, err)
	}
	return nil
}

// Healthy checks that the sandbox's monitor answers.
func (p *Plugger) Healthy(ctx context.Context, sb control.Sandbox) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := p.client(sb.QMP).Execute(ctx, "query-status", nil); err != nil {
		return fmt.Errorf("qmp %s: %w", sb.QMP, err)
	}
	return nil
}

// Close closes every QMP connection.
func (p *Plugger) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for path, c := range p.clients {
		c.Close()
		delete(p.clients, path)
	}
	return nil
}
