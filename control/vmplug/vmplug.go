// Package vmplug is control's Hotplugger: it puts a sandbox's NICs into (and takes them out
// of) its QEMU over QMP, the way Kata's runtime does — the tap's queues (in macvtap modes the
// macvtap's, see Plugger.Device) are opened in the sandbox netns and passed to QEMU (getfd), with one /dev/vhost-net file per queue beside
// them when vhost-net is to be had (the endpoint's Vhost setting), then netdev_add +
// device_add (control/hotplug). An endpoint with a VhostUserSocket is plugged as a
// vhost-user NIC instead: QEMU connects to the vhost-user switch's socket; no tap.
//
// One QMP client per sandbox socket is kept and reused (it redials by itself when QEMU
// restarts) until the sandbox is deleted (Forget). A Plugger is safe for concurrent use.
package vmplug

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
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
	// OpenVhost opens one vhost-net file; nil opens /dev/vhost-net. A seam for tests.
	OpenVhost hotplug.VhostOpener
	// Device opens n queues of the device the VM uses for ep when the dataplane gives it one
	// other than the tap (macvtap and macvtap-bpf modes: the macvtap's /dev/tapN), with the
	// MAC the guest must use there; ok false: the tap. nil: always the tap. The agent sets it
	// from its Dataplane.
	Device func(ep control.Endpoint, n int) (fds []*os.File, mac net.HardwareAddr, ok bool, err error)

	mu      sync.Mutex
	clients map[string]*qmp.Client // by QMP socket path
	vhost   map[nicKey]string      // what vhost-net came to for each NIC plugged
}

type nicKey struct{ qmp, id string }

var (
	_ control.Hotplugger       = (*Plugger)(nil)
	_ control.VhostReporter    = (*Plugger)(nil)
	_ control.VMScrubber       = (*Plugger)(nil)
	_ control.SandboxForgetter = (*Plugger)(nil)
)

// New returns a Plugger.
func New() *Plugger {
	return &Plugger{UnplugTimeout: 5 * time.Second, clients: map[string]*qmp.Client{}, vhost: map[nicKey]string{}}
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

// Plug opens the tap's queues in the sandbox netns (and, as ep.Vhost decides, one vhost-net
// file per queue) and hot-plugs them as a virtio-net device with the guest MAC; an endpoint
// with a VhostUserSocket is plugged as a vhost-user NIC. It returns the PCI path QEMU
// assigned.
func (p *Plugger) Plug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	queues := max(ep.Queues, 1)
	c := p.client(sb.QMP)
	if ep.VhostUserSocket != "" {
		addr, err := hotplug.PlugVhostUser(ctx, c, hotplug.VhostUserNIC{ID: DeviceID(ep), MAC: ep.MAC.String(), Queues: queues, Socket: ep.VhostUserSocket})
		if err != nil {
			return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
		}
		return addr, nil
	}
	vfs, vhost, err := hotplug.OpenVhost(hotplug.VhostMode(ep.Vhost), queues, p.OpenVhost)
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	defer closeAll(vfs)
	fds, mac, err := p.openQueues(sb, ep, queues)
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	defer closeAll(fds) // QEMU holds its own copies now (or nothing, on failure)
	nic := hotplug.NIC{ID: DeviceID(ep), MAC: mac.String(), Queues: queues, Fds: fds, VhostFds: vfs}
	addr, err := hotplug.Plug(ctx, c, nic)
	if errors.Is(err, hotplug.ErrDuplicate) {
		// Control plugs a NIC only when its state says it is not in the VM: what holds the
		// id (kata-dp's own, DeviceID) was left by a plug that never finished (an agent
		// killed midway, a state lost). Remove it and plug again, once.
		slog.Warn("removing what an unfinished plug left in the VM", "sandbox", sb.ID, "nic", ep.NIC, "err", err)
		if serr := hotplug.Scrub(ctx, c, DeviceID(ep), p.UnplugTimeout); serr != nil {
			return "", fmt.Errorf("hotplug %s: %w (removing the leftover: %v)", ep.NIC, err, serr)
		}
		addr, err = hotplug.Plug(ctx, c, nic)
	}
	if err != nil {
		return "", fmt.Errorf("hotplug %s: %w", ep.NIC, err)
	}
	slog.Info("nic plugged", "sandbox", sb.ID, "nic", ep.NIC, "vhost", vhost.Reason)
	p.mu.Lock()
	p.vhost[nicKey{sb.QMP, DeviceID(ep)}] = vhost.Reason
	p.mu.Unlock()
	return addr, nil
}

// openQueues opens the queues of the VM's device: the tap's, opened in the sandbox netns, or
// those of the device Device names, with its MAC.
func (p *Plugger) openQueues(sb control.Sandbox, ep control.Endpoint, n int) ([]*os.File, net.HardwareAddr, error) {
	if p.Device != nil {
		fds, mac, ok, err := p.Device(ep, n)
		if err != nil || ok {
			return fds, mac, err
		}
	}
	fds, err := netdev.OpenTap(sb.NetNS, ep.Tap, n, true, true)
	return fds, ep.MAC, err
}

// DecideVhost says what the vhost setting mode comes to on this host now, with the reason.
func (p *Plugger) DecideVhost(mode string) string {
	d, err := hotplug.DecideVhost(hotplug.VhostMode(mode), p.OpenVhost)
	if err != nil {
		return "refused: " + err.Error()
	}
	return d.Reason
}

// VhostDecision says what vhost-net came to for the NIC when this Plugger plugged it.
func (p *Plugger) VhostDecision(sb control.Sandbox, ep control.Endpoint) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.vhost[nicKey{sb.QMP, DeviceID(ep)}]
	return d, ok
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// Unplug removes the NIC from the VM and waits (bounded) for the guest to let it go.
func (p *Plugger) Unplug(ctx context.Context, sb control.Sandbox, ep control.Endpoint) error {
	unplug := hotplug.Unplug
	if ep.VhostUserSocket != "" {
		unplug = hotplug.UnplugVhostUser
	}
	if err := unplug(ctx, p.client(sb.QMP), DeviceID(ep), p.UnplugTimeout); err != nil {
		return fmt.Errorf("hot-unplug %s: %w", ep.NIC, err)
	}
	p.mu.Lock()
	delete(p.vhost, nicKey{sb.QMP, DeviceID(ep)})
	p.mu.Unlock()
	return nil
}

// Scrub removes everything of the NIC's that may be in the VM, whatever step a plug or
// unplug stopped at (control.VMScrubber): device, netdev, chardev and passed files, found by
// kata-dp's own ids (DeviceID).
func (p *Plugger) Scrub(ctx context.Context, sb control.Sandbox, ep control.Endpoint) error {
	if err := hotplug.Scrub(ctx, p.client(sb.QMP), DeviceID(ep), p.UnplugTimeout); err != nil {
		return fmt.Errorf("scrub %s: %w", ep.NIC, err)
	}
	p.mu.Lock()
	delete(p.vhost, nicKey{sb.QMP, DeviceID(ep)})
	p.mu.Unlock()
	return nil
}

// Forget closes the sandbox's QMP client and forgets what it knew of the sandbox's NICs
// (control.SandboxForgetter): a deleted sandbox must not keep a connection (QEMU serves one
// client per monitor) nor memory for the agent's lifetime.
func (p *Plugger) Forget(sb control.Sandbox) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.clients[sb.QMP]; ok {
		c.Close()
		delete(p.clients, sb.QMP)
	}
	for k := range p.vhost {
		if k.qmp == sb.QMP {
			delete(p.vhost, k)
		}
	}
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
