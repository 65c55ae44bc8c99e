// Package vmplug is control's Hotplugger: it puts a sandbox's NICs into (and takes them out
// of) its QEMU over QMP, the way Kata's runtime does — the tap's queues are opened in the
// sandbox netns and passed to QEMU (getfd), then netdev_add + device_add (control/hotplug).
//
// One QMP client per sandbox socket is kept and reused (it redials by itself when QEMU
// restarts). A Plugger is safe for concurrent use.
package vmplug

import (
	"context"
	"fmt"
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

	mu      sync.Mutex
	clients map[string]*qmp.Client // by QMP socket path
}

var _ control.Hotplugger = (*Plugger)(nil)

// New returns a Plugger.
func New() *Plugger {
	return &Plugger{UnplugTimeout: 5 * time.Second, clients: map[string]*qmp.Client{}}
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

// Plug opens the tap's queues in the sandbox netns and hot-plugs them as a virtio-net device
// with the guest MAC; it returns the PCI path QEMU assigned.
func (p *Plugger) Plug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	queues := max(ep.Queues, 1)
	fds, err := netdev.OpenTap(sb.NetNS, ep.Tap, queues, true, true)
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	defer func() {
		for _, f := range fds {
			f.Close() // QEMU holds its own copies now (or nothing, on failure)
		}
	}()
	addr, err := hotplug.Plug(ctx, p.client(sb.QMP), hotplug.NIC{ID: DeviceID(ep), MAC: ep.MAC.String(), Queues: queues, Fds: fds})
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	return addr, nil
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
