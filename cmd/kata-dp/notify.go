package main

import (
	"fmt"
	"net"
	"strings"
)

// sdNotify sends state (e.g. "READY=1") to the service manager over the socket named in
// $NOTIFY_SOCKET, the sd_notify protocol: one datagram to a unix socket, "@" standing for the
// abstract namespace. With Type=notify systemd starts the units ordered after kata-dp
// (containerd, kubelet) only once the agent serves its socket, so the runtime's first
// kata-network call does not race the agent's start. Without $NOTIFY_SOCKET (not started by
// systemd, or another Type) it does nothing.
func sdNotify(getenv func(string) string, state string) error {
	addr := getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if !strings.HasPrefix(addr, "/") && !strings.HasPrefix(addr, "@") {
		return fmt.Errorf("sd_notify: NOTIFY_SOCKET %q is not a unix socket path", addr)
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", getenv("NOTIFY_SOCKET"), err)
	}
	return nil
}
