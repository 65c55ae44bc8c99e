package dataplane_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
)

// reuseAddr lets a real server's connected reply socket share the port of its listener.
var reuseAddr = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
	if err != nil {
		return err
	}
	return serr
}}

// TestLBICMPErrorsThroughDevices (issue 12): real ICMP and ICMPv6 errors about a kata-ipvs
// connection, through real devices in tc and xdp mode, reach the socket they are about.
//
//   - To the guest: a connected UDP socket in the guest sends to a VIP whose real server (the
//     host) has the port closed; the host's port unreachable quotes guest -> real server, and
//     only translated (quoting guest -> VIP, from the VIP) does the guest's socket see
//     ECONNREFUSED.
//   - From the guest: the real server answers a guest socket that has since closed; the
//     guest's port unreachable quotes VIP -> guest, and only translated (quoting real server
//     -> guest, to the real server) does the real server's connected reply socket see
//     ECONNREFUSED.
func TestLBICMPErrorsThroughDevices(t *testing.T) {
	for _, c := range []struct {
		name string
		opts rigOpts
	}{
		{"tc", rigOpts{mode: control.ModeTC, offload: true}},
		{"xdp", rigOpts{mode: control.ModeXDP, offload: true, peerGRO: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newRig6(t, "lbicmp"+c.name, c.opts)
			host4 := r.sb.HostAddr.Addr()
			if _, err := r.guest.Exec("ip", "route", "add", "default", "via", host4.String()); err != nil {
				t.Fatal(err)
			}
			if _, err := r.guest.Exec("ip", "-6", "route", "add", "default", "via", host6.Addr().String()); err != nil {
				t.Fatal(err)
			}
			table := &ipvs.Table{}
			for _, p := range []string{
				"-A -u 10.96.0.10:53 -s rr",
				"-a -u 10.96.0.10:53 -r " + host4.String() + ":5399", // closed
				"-A -u 10.96.0.10:54 -s rr",
				"-a -u 10.96.0.10:54 -r " + host4.String() + ":5354",
				"-A -u [2001:db8::10]:53 -s rr",
				"-a -u [2001:db8::10]:53 -r [" + host6.Addr().String() + "]:5399", // closed
				"-A -u [2001:db8::10]:54 -s rr",
				"-a -u [2001:db8::10]:54 -r [" + host6.Addr().String() + "]:5354",
			} {
				cmd, err := ipvs.ParseParameters(p)
				if err != nil {
					t.Fatalf("%s: %v", p, err)
				}
				if _, err := table.Apply(cmd); err != nil {
					t.Fatalf("%s: %v", p, err)
				}
			}
			if err := r.dp.SetLB(context.Background(), r.ep.Sandbox, table); err != nil {
				t.Fatal(err)
			}
			for _, fam := range []struct {
				name, vip string
				server    netip.AddrPort
			}{
				{"IPv4", "10.96.0.10", netip.AddrPortFrom(host4, 5354)},
				{"IPv6", "[2001:db8::10]", netip.AddrPortFrom(host6.Addr(), 5354)},
			} {
				t.Run(fam.name+"/to guest", func(t *testing.T) {
					var conn net.Conn
					if err := r.guest.Do(func() (err error) {
						conn, err = net.Dial("udp", fam.vip+":53")
						return err
					}); err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					// A first datagram may be lost to neighbour resolution; the error
					// comes on a later read.
					var err error
					for range 3 {
						conn.Write([]byte("q"))
						conn.SetReadDeadline(time.Now().Add(2 * time.Second))
						if _, err = conn.Read(make([]byte, 64)); err == nil || errors.Is(err, syscall.ECONNREFUSED) {
							break
						}
					}
					if !errors.Is(err, syscall.ECONNREFUSED) {
						t.Fatalf("guest's read after a datagram to a closed real server port: %v, want ECONNREFUSED", err)
					}
				})
				t.Run(fam.name+"/from guest", func(t *testing.T) {
					var ln net.PacketConn
					if err := r.sb.Host.Do(func() (err error) {
						ln, err = reuseAddr.ListenPacket(context.Background(), "udp", fam.server.String())
						return err
					}); err != nil {
						t.Fatal(err)
					}
					defer ln.Close()
					var conn net.Conn
					if err := r.guest.Do(func() (err error) {
						conn, err = net.Dial("udp", fam.vip+":54")
						return err
					}); err != nil {
						t.Fatal(err)
					}
					conn.Write([]byte("q"))
					ln.SetReadDeadline(time.Now().Add(5 * time.Second))
					_, from, err := ln.ReadFrom(make([]byte, 64))
					if err != nil {
						t.Fatalf("real server: no datagram from the guest: %v", err)
					}
					conn.Close() // the guest's port is closed now: an answer gets port unreachable
					var reply net.Conn
					if err := r.sb.Host.Do(func() (err error) {
						d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(fam.server), Control: reuseAddr.Control}
						reply, err = d.Dial("udp", from.String())
						return err
					}); err != nil {
						t.Fatal(err)
					}
					defer reply.Close()
					for range 3 {
						reply.Write([]byte("a"))
						reply.SetReadDeadline(time.Now().Add(2 * time.Second))
						if _, err = reply.Read(make([]byte, 64)); err == nil || errors.Is(err, syscall.ECONNREFUSED) {
							break
						}
					}
					if !errors.Is(err, syscall.ECONNREFUSED) {
						t.Fatalf("real server's read after answering a closed guest port: %v, want ECONNREFUSED", err)
					}
				})
			}
		})
	}
}
