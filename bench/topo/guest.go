package topo

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/kata-dp/kata-dp/bench/guestemu"
)

// GuestConfig configures the emulated guest of a Sandbox.
type GuestConfig struct {
	// Tap is the guest's NIC in the guest netns (default "eth0").
	Tap string
	// Offload turns on checksum and TSO offloads on both taps, like a
	// virtio-net guest that negotiated them.
	Offload bool
	// CPUs pins the emulator's threads.
	CPUs []int
	// Gateway makes HostAddr the guest's default route.
	Gateway bool
}

// Guest is a kernel stack in a netns of its own, joined to the sandbox tap
// by a guestemu.Bridge: it has the sandbox's GuestMAC and GuestAddr, as a
// Kata VM's NIC would.
type Guest struct {
	NS     *NetNS
	Bridge *guestemu.Bridge
	Tap    string
	Addr   netip.Prefix
	cancel context.CancelFunc
}

// StartGuest opens the sandbox tap, creates the guest netns (Prefix+"g"
// plus random) and bridges the two. The guest is closed with the sandbox,
// or earlier with its own Close.
func (s *Sandbox) StartGuest(cfg GuestConfig) (g *Guest, err error) {
	if s.Config.NoTap {
		return nil, fmt.Errorf("start guest: sandbox has no tap: %w", ErrInvalid)
	}
	if cfg.Tap == "" {
		cfg.Tap = "eth0"
	}
	g = &Guest{Tap: cfg.Tap, Addr: s.GuestAddr}
	defer func() {
		if err != nil {
			g.Close()
			g, err = nil, fmt.Errorf("start guest: %w", err)
		}
	}()
	if g.NS, err = NewNetNS(s.Config.Prefix + "g"); err != nil {
		return g, err
	}
	if !s.Config.IPv6 {
		if err = g.NS.DisableIPv6(); err != nil {
			return g, err
		}
	}
	fds, err := s.OpenTap()
	if err != nil {
		return g, err
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	o := guestemu.BridgeOptions{
		MAC:     s.GuestMAC,
		Addrs:   []netip.Prefix{s.GuestAddr},
		MTU:     s.Config.MTU,
		Offload: cfg.Offload,
		CPUs:    cfg.CPUs,
	}
	if cfg.Gateway {
		o.Gateway = s.HostAddr.Addr()
	}
	if g.Bridge, err = guestemu.NewBridge(fds, g.NS.Path(), cfg.Tap, o); err != nil {
		return g, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	if err = g.Bridge.Start(ctx); err != nil {
		return g, err
	}
	s.guests = append(s.guests, g)
	return g, nil
}

// Close stops the bridge and deletes the guest netns. It is idempotent.
func (g *Guest) Close() error {
	var errs []error
	if g.cancel != nil {
		g.cancel()
	}
	if g.Bridge != nil {
		errs = append(errs, g.Bridge.Close())
	}
	if g.NS != nil {
		errs = append(errs, g.NS.Close())
	}
	return errors.Join(errs...)
}

// StartCounter runs a guestemu Counter on the sandbox tap that answers ARP
// for GuestAddr with GuestMAC (unless o says otherwise). It is closed with
// the sandbox.
func (s *Sandbox) StartCounter(o guestemu.CounterOptions) (*guestemu.Counter, error) {
	if s.Config.NoTap {
		return nil, fmt.Errorf("start counter: sandbox has no tap: %w", ErrInvalid)
	}
	if o.GuestMAC == nil && !o.GuestIP.IsValid() {
		o.GuestMAC, o.GuestIP = s.GuestMAC, s.GuestAddr.Addr()
	}
	fds, err := s.OpenTap()
	if err != nil {
		return nil, fmt.Errorf("start counter: %w", err)
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	c, err := guestemu.NewCounter(fds, o)
	if err != nil {
		return nil, fmt.Errorf("start counter: %w", err)
	}
	if err := c.Start(context.Background()); err != nil {
		c.Close()
		return nil, fmt.Errorf("start counter: %w", err)
	}
	s.counters = append(s.counters, c)
	return c, nil
}

// InstallTCFilter installs Kata's own tcfilter plumbing between Veth and
// Tap (an ingress qdisc on each and a u32 match-all filter with a mirred
// egress redirect to the other), the baseline kata-dp replaces. Test and
// benchmark use only: it runs tc.
func (s *Sandbox) InstallTCFilter() error {
	if s.Config.NoTap {
		return fmt.Errorf("install tcfilter: sandbox has no tap: %w", ErrInvalid)
	}
	pairs := [][2]string{{s.Config.Veth, s.Config.Tap}, {s.Config.Tap, s.Config.Veth}}
	for _, p := range pairs {
		for _, cmd := range [][]string{
			{"tc", "qdisc", "add", "dev", p[0], "ingress"},
			{"tc", "filter", "add", "dev", p[0], "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
				"action", "mirred", "egress", "redirect", "dev", p[1]},
		} {
			if _, err := s.NS.Exec(cmd...); err != nil {
				s.RemoveTCFilter()
				return fmt.Errorf("install tcfilter: %w", err)
			}
		}
	}
	return nil
}

// RemoveTCFilter removes the ingress qdiscs InstallTCFilter added.
func (s *Sandbox) RemoveTCFilter() error {
	var errs []error
	for _, dev := range []string{s.Config.Veth, s.Config.Tap} {
		if _, err := s.NS.Exec("tc", "qdisc", "del", "dev", dev, "ingress"); err != nil &&
			!strings.Contains(err.Error(), "Invalid handle") && !strings.Contains(err.Error(), "Cannot find") {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
