package topo

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/control/netdev"
)

// SandboxConfig describes a Kata-like sandbox topology. Zero fields take
// the defaults noted.
type SandboxConfig struct {
	// Prefix starts the names of the namespaces (default "kdpt-"): the host
	// netns is Prefix+"h.<pid>.<random>", the sandbox netns
	// Prefix+"s.<pid>.<random>", a guest Prefix+"g.<pid>.<random>".
	Prefix string
	// HostVeth is the host end of the veth pair (default "veth0").
	HostVeth string
	// Veth is the sandbox end of the veth pair (default "eth0").
	Veth string
	// Tap is the tap in the sandbox netns (default "tap0_kata").
	Tap string
	// NoTap leaves the tap out (for code that creates it itself).
	NoTap bool
	// TapQueues is the number of tap queues (default 1).
	TapQueues int
	// PlainTap creates the tap without IFF_VNET_HDR.
	PlainTap bool
	// MTU of the veths and the tap (default 1500).
	MTU int
	// HostAddr is put on the host veth (default 10.199.0.1/24).
	HostAddr netip.Prefix
	// GuestAddr is the address the guest will have (default 10.199.0.2/24,
	// same subnet as HostAddr). The topology does not assign it anywhere:
	// the guest (a VM or guestemu) owns it.
	GuestAddr netip.Prefix
	// Host, when set, is an existing namespace to use as the host side
	// (several sandboxes on one "node"; give each a distinct HostVeth and
	// subnet). The sandbox does not delete it on Close.
	Host *NetNS
	// IPv6 keeps IPv6 enabled in the namespaces. By default it is off, so
	// router solicitations and MLD reports do not show up in frame counts.
	IPv6 bool
}

func (c *SandboxConfig) defaults() error {
	if c.Prefix == "" {
		c.Prefix = "kdpt-"
	}
	if c.HostVeth == "" {
		c.HostVeth = "veth0"
	}
	if c.Veth == "" {
		c.Veth = "eth0"
	}
	if c.Tap == "" {
		c.Tap = "tap0_kata"
	}
	if c.TapQueues == 0 {
		c.TapQueues = 1
	}
	if c.MTU == 0 {
		c.MTU = 1500
	}
	if !c.HostAddr.IsValid() {
		c.HostAddr = netip.MustParsePrefix("10.199.0.1/24")
	}
	if !c.GuestAddr.IsValid() {
		c.GuestAddr = netip.MustParsePrefix("10.199.0.2/24")
	}
	for _, n := range []string{c.HostVeth, c.Veth, c.Tap} {
		if err := netdev.ValidateName(n); err != nil {
			return err
		}
	}
	if c.Veth == c.Tap {
		return fmt.Errorf("veth and tap both named %q: %w", c.Tap, ErrInvalid)
	}
	if c.TapQueues < 1 || c.TapQueues > netdev.MaxQueues {
		return fmt.Errorf("tap queues %d: %w", c.TapQueues, ErrInvalid)
	}
	if !c.HostAddr.Addr().Is4() || !c.GuestAddr.Addr().Is4() {
		return fmt.Errorf("host %s and guest %s must be IPv4: %w", c.HostAddr, c.GuestAddr, ErrInvalid)
	}
	if c.HostAddr.Addr() == c.GuestAddr.Addr() {
		return fmt.Errorf("host and guest share address %s: %w", c.HostAddr.Addr(), ErrInvalid)
	}
	return nil
}

// Sandbox is the standard Kata-like topology:
//
//	Host netns            Sandbox netns (NS)
//	HostVeth <--veth--> Veth (eth0)    Tap (tap0_kata)  <- the VM / guestemu
//	HostAddr                           (no datapath between Veth and Tap:
//	                                    that is what kata-dp installs)
//
// Host is a fresh namespace standing in for the node's host/CNI side; the
// real host netns is never touched. GuestMAC is the MAC the guest NIC must
// use: as in Kata, the veth's own MAC. Nothing is attached between Veth and
// Tap; the test or benchmark installs the datapath it is about.
type Sandbox struct {
	Host *NetNS
	NS   *NetNS

	HostVeth netdev.LinkInfo
	Veth     netdev.LinkInfo
	// Tap is zero when SandboxConfig.NoTap was set.
	Tap netdev.LinkInfo

	HostAddr  netip.Prefix
	GuestAddr netip.Prefix
	GuestMAC  net.HardwareAddr

	Config SandboxConfig

	guests     []*Guest
	counters   []*guestemu.Counter
	sharedHost bool
}

// NewSandbox builds the topology. On failure it removes what it made. The
// caller must Close the sandbox.
func NewSandbox(cfg SandboxConfig) (s *Sandbox, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, fmt.Errorf("new sandbox: %w", err)
	}
	s = &Sandbox{HostAddr: cfg.HostAddr, GuestAddr: cfg.GuestAddr, Config: cfg}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
			err = fmt.Errorf("new sandbox: %w", err)
		}
	}()
	if cfg.Host != nil {
		if err = cfg.Host.checkOpen(); err != nil {
			return s, err
		}
		s.Host, s.sharedHost = cfg.Host, true
	} else if s.Host, err = NewNetNS(cfg.Prefix + "h"); err != nil {
		return s, err
	}
	if s.NS, err = NewNetNS(cfg.Prefix + "s"); err != nil {
		return s, err
	}
	if !cfg.IPv6 {
		for _, n := range []*NetNS{s.Host, s.NS} {
			if n == cfg.Host {
				continue
			}
			if err = n.DisableIPv6(); err != nil {
				return s, err
			}
		}
	}
	if err = VethPair(s.Host, cfg.HostVeth, s.NS, cfg.Veth); err != nil {
		return s, err
	}
	if cfg.MTU != 1500 {
		if err = s.Host.SetMTU(cfg.HostVeth, cfg.MTU); err != nil {
			return s, err
		}
		if err = s.NS.SetMTU(cfg.Veth, cfg.MTU); err != nil {
			return s, err
		}
	}
	if err = s.Host.AddAddr(cfg.HostVeth, cfg.HostAddr.String()); err != nil {
		return s, err
	}
	if !cfg.NoTap {
		o := netdev.TapOptions{Queues: cfg.TapQueues, MTU: cfg.MTU, VnetHdr: !cfg.PlainTap}
		if err = netdev.CreateTap(s.NS.Path(), cfg.Tap, o); err != nil {
			return s, err
		}
		if s.Tap, err = s.NS.Link(cfg.Tap); err != nil {
			return s, err
		}
	}
	if s.HostVeth, err = s.Host.Link(cfg.HostVeth); err != nil {
		return s, err
	}
	if s.Veth, err = s.NS.Link(cfg.Veth); err != nil {
		return s, err
	}
	s.GuestMAC = s.Veth.MAC
	return s, nil
}

// Close deletes both namespaces and everything in them. It is idempotent.
func (s *Sandbox) Close() error {
	var errs []error
	for _, g := range s.guests {
		errs = append(errs, g.Close())
	}
	for _, c := range s.counters {
		errs = append(errs, c.Close())
	}
	if s.NS != nil {
		errs = append(errs, s.NS.Close())
	}
	// A shared host netns stays; removing the sandbox netns removed the
	// veth pair from it.
	if s.Host != nil && !s.sharedHost {
		errs = append(errs, s.Host.Close())
	}
	return errors.Join(errs...)
}

// OpenTap opens the sandbox tap's queues the way QEMU does (vnet_hdr as
// configured, non-blocking) and returns the fds; the caller closes them.
func (s *Sandbox) OpenTap() ([]*os.File, error) {
	return netdev.OpenTap(s.NS.Path(), s.Config.Tap, s.Config.TapQueues, !s.Config.PlainTap, true)
}
