package dataplane_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestLBPartialChecksum: the guest relies on checksum offload (the tap's frames carry
// CHECKSUM_PARTIAL: only the pseudo header's sum in the L4 checksum field, GSO for large
// writes), and the load balancer's DNAT (on the linear data in kdp_tap_in, lib/csum.h) must
// update that sum for the new address and leave the port out of it. A receiver on a veth never
// checks a partial checksum, so the uplink's checksum offload is turned off here: the stack
// then completes every checksum (and segments GSO frames in software) on the way out of the
// sandbox from the field as the rewrite left it, and the host drops every frame whose field was
// wrong. TCP (a connection, then 1 MiB counted by the server) and UDP, to a VIP whose port
// differs from the real server's.
func TestLBPartialChecksum(t *testing.T) {
	r := newLBRig(t, "lbcsum")
	if out, err := r.sb.NS.Exec("ethtool", "-K", r.sb.Veth.Name, "tx", "off"); err != nil {
		t.Fatalf("turn the uplink's checksum offload off: %v: %s", err, out)
	}
	// A server that counts what it read until the guest's half close.
	l, err := r.sb.Host.Listen("tcp", "10.199.0.11:9000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprintf(c, "%d\n", n)
			}()
		}
	}()
	r.ipvsadm(t, "-A -t "+vipAddr+":8080 -s rr")
	r.ipvsadm(t, "-a -t "+vipAddr+":8080 -r 10.199.0.11:9000 -m")
	r.ipvsadm(t, "-A -u "+vipAddr+":5353 -s rr")
	r.ipvsadm(t, "-a -u "+vipAddr+":5353 -r 10.199.0.12:53 -m")

	c, err := r.guest.Dial("tcp", vipAddr+":8080", 5*time.Second)
	if err != nil {
		t.Fatalf("connect through the VIP (a wrong partial checksum drops the SYN): %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	const size = 1 << 20
	if _, err := c.Write(bytes.Repeat([]byte("kata-dp "), size/8)); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read the server's count: %v", err)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(reply))); n != size {
		t.Errorf("the real server read %q bytes, want %d", strings.TrimSpace(string(reply)), size)
	}

	var u net.Conn
	if err := r.guest.Do(func() error {
		var err error
		u, err = net.Dial("udp", vipAddr+":5353")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	buf := make([]byte, 64)
	var answer string
	for range 3 { // a datagram can be lost on a loaded machine; a wrong checksum loses all three
		u.Write([]byte("q"))
		u.SetReadDeadline(time.Now().Add(2 * time.Second))
		if k, err := u.Read(buf); err == nil {
			answer = string(buf[:k])
			break
		}
	}
	if answer != "10.199.0.12" {
		t.Errorf("UDP through the VIP: answer %q, want 10.199.0.12", answer)
	}
}
