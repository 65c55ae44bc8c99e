package control

import (
	"context"
	"errors"
	"fmt"

	"github.com/kata-dp/kata-dp/control/netdev"
)

// NetdevTaps is the TapManager of the agent, over control/netdev (netlink and tun ioctls in
// the sandbox's netns).
type NetdevTaps struct{}

var _ TapManager = NetdevTaps{}

// EnsureTap implements TapManager: a tap that exists is adopted, anything else of that name
// is ErrNotTap.
func (NetdevTaps) EnsureTap(_ context.Context, netns, name string, o TapOptions) (bool, error) {
	err := netdev.CreateTap(netns, name, netdev.TapOptions{Queues: o.Queues, MTU: o.MTU, VnetHdr: o.Vnet})
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, netdev.ErrExists) {
		return false, err
	}
	li, lerr := netdev.LookupLink(netns, name)
	if lerr != nil {
		return false, fmt.Errorf("adopt tap %s: %w", name, lerr)
	}
	if li.Type != "tuntap" && li.Type != "tun" {
		return false, fmt.Errorf("%w: %s is a %s link", ErrNotTap, name, li.Type)
	}
	return false, nil
}

// DeleteTap implements TapManager.
func (NetdevTaps) DeleteTap(_ context.Context, netns, name string) error {
	if err := netdev.DeleteLink(netns, name); err != nil && !errors.Is(err, netdev.ErrNotFound) {
		return err
	}
	return nil
}

// LinkExists implements TapManager.
func (NetdevTaps) LinkExists(_ context.Context, netns, name string) (bool, error) {
	_, err := netdev.LookupLink(netns, name)
	if errors.Is(err, netdev.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}
