package topo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/vishvananda/netlink"
)

// Sentinel errors, matched with errors.Is.
var (
	// ErrClosed is returned by methods of a NetNS that was closed.
	ErrClosed = errors.New("netns closed")
	// ErrInvalid is returned for arguments that fail validation.
	ErrInvalid = errors.New("invalid argument")
	// ErrMismatch is returned when data sent did not arrive intact.
	ErrMismatch = errors.New("data mismatch")
)

// NetnsDir is where named network namespaces are bind-mounted (iproute2's
// convention).
const NetnsDir = "/run/netns"

// ExecTimeout bounds every command run through Exec.
var ExecTimeout = 30 * time.Second

// NetNS is a named network namespace made by NewNetNS.
type NetNS struct {
	name string

	mu     sync.Mutex
	closed bool
}

// UniqueName returns prefix followed by n random hex digits.
func UniqueName(prefix string, n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b)[:n]
}

// OwnedName returns "<prefix>_<pid>_<6 random hex digits>": a name for a kernel object (a
// network namespace, a bpffs directory) that says which process made it, so that SweepStale
// can remove what a killed process left and nothing of a live one. prefix must be 1-40
// characters without '/', '.', '_' or white space (bpffs refuses names with a dot).
func OwnedName(prefix string) (string, error) {
	if prefix == "" || strings.ContainsAny(prefix, "/._ \t\n\x00") || len(prefix) > 40 {
		return "", fmt.Errorf("prefix %q: %w", prefix, ErrInvalid)
	}
	return UniqueName(fmt.Sprintf("%s_%d_", prefix, os.Getpid()), 6), nil
}

// ownerGone reports whether name is an OwnedName starting with prefix whose process is gone.
func ownerGone(name, prefix string) bool {
	f := strings.Split(name, "_")
	if !strings.HasPrefix(name, prefix) || len(f) != 3 {
		return false
	}
	pid, rnd := f[1], f[2]
	if pid == "" || strings.Trim(pid, "0123456789") != "" || len(rnd) != 6 || strings.Trim(rnd, "0123456789abcdef") != "" {
		return false
	}
	_, err := os.Stat(filepath.Join("/proc", pid))
	return errors.Is(err, os.ErrNotExist)
}

// NewNetNS creates a named network namespace called OwnedName(prefix), with its loopback up.
// The caller must Close it; SweepStale removes the ones a killed process left.
func NewNetNS(prefix string) (*NetNS, error) {
	name, err := OwnedName(prefix)
	if err != nil {
		return nil, fmt.Errorf("new netns: %w", err)
	}
	if out, err := run("ip", "netns", "add", name); err != nil {
		return nil, fmt.Errorf("new netns %s: %w: %s", name, err, out)
	}
	n := &NetNS{name: name}
	if _, err := n.Exec("ip", "link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, fmt.Errorf("new netns %s: %w", name, err)
	}
	return n, nil
}

// Name is the namespace's name, as ip netns knows it.
func (n *NetNS) Name() string { return n.name }

// Path is the namespace's bind mount, usable with setns and netdev.
func (n *NetNS) Path() string { return filepath.Join(NetnsDir, n.name) }

func (n *NetNS) String() string { return n.name }

func (n *NetNS) checkOpen() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return fmt.Errorf("netns %s: %w", n.name, ErrClosed)
	}
	return nil
}

// Do runs fn on a locked OS thread inside the namespace. Sockets opened by
// fn stay in the namespace.
func (n *NetNS) Do(fn func() error) error {
	if err := n.checkOpen(); err != nil {
		return err
	}
	return netdev.InNetNS(n.Path(), fn)
}

// Exec runs a command inside the namespace (ip netns exec) and returns its
// combined output. A failure's error holds the output.
func (n *NetNS) Exec(cmd ...string) (string, error) {
	if err := n.checkOpen(); err != nil {
		return "", err
	}
	if len(cmd) == 0 {
		return "", fmt.Errorf("exec in %s: no command: %w", n.name, ErrInvalid)
	}
	out, err := run("ip", append([]string{"netns", "exec", n.name}, cmd...)...)
	if err != nil {
		return out, fmt.Errorf("exec in %s: %s: %w: %s", n.name, strings.Join(cmd, " "), err, strings.TrimSpace(out))
	}
	return out, nil
}

// Close deletes every link in the namespace (so that a leaked tap fd cannot
// keep devices alive) and then the namespace. It is idempotent.
func (n *NetNS) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	n.mu.Unlock()

	var errs []error
	err := netdev.InNetNS(n.Path(), func() error {
		links, err := netlink.LinkList()
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
		for _, l := range links {
			if l.Attrs().Name == "lo" {
				continue
			}
			// The peer of a veth deleted just before is gone already.
			_ = netlink.LinkDel(l)
		}
		return nil
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("delete links: %w", err))
	}
	if out, err := run("ip", "netns", "del", n.name); err != nil {
		errs = append(errs, fmt.Errorf("%w: %s", err, strings.TrimSpace(out)))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close netns %s: %w", n.name, err)
	}
	return nil
}

// BPFFSDir is where the BPF filesystem is mounted; kata-dp's tests pin under directories
// of it named with OwnedName.
const BPFFSDir = "/sys/fs/bpf"

// SweepStale removes what a process that was killed before its cleanups ran (a test binary
// at go test's timeout) left behind: the network namespaces made by NewNetNS and the
// directories of BPFFSDir whose OwnedName starts with prefix and names a process that is
// gone. Removing a bpffs directory unpins its maps, programs and links, and a link no process
// holds detaches. What live processes made is left alone. It returns what it removed.
func SweepStale(prefix string) ([]string, error) {
	var swept []string
	var errs []error
	for _, dir := range []string{NetnsDir, BPFFSDir} {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("sweep %s: %w", dir, err))
			continue
		}
		for _, e := range ents {
			if !ownerGone(e.Name(), prefix) {
				continue
			}
			if dir == NetnsDir {
				err = (&NetNS{name: e.Name()}).Close()
			} else {
				err = os.RemoveAll(filepath.Join(dir, e.Name()))
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("sweep: %w", err))
				continue
			}
			swept = append(swept, filepath.Join(dir, e.Name()))
		}
	}
	return swept, errors.Join(errs...)
}

func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ExecTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// ip runs "ip -n <ns> args...".
func (n *NetNS) ip(args ...string) error {
	if err := n.checkOpen(); err != nil {
		return err
	}
	out, err := run("ip", append([]string{"-n", n.name}, args...)...)
	if err != nil {
		return fmt.Errorf("ip -n %s %s: %w: %s", n.name, strings.Join(args, " "), err, strings.TrimSpace(out))
	}
	return nil
}

// DisableIPv6 turns IPv6 off for all current and future links of the
// namespace.
func (n *NetNS) DisableIPv6() error {
	_, err := n.Exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	return err
}

// Up brings dev up.
func (n *NetNS) Up(dev string) error { return n.ip("link", "set", dev, "up") }

// AddAddr adds an address in CIDR form ("10.0.0.1/24") to dev.
func (n *NetNS) AddAddr(dev, cidr string) error {
	return n.ip("addr", "add", cidr, "dev", dev, "nodad")
}

// SetMAC sets dev's MAC address.
func (n *NetNS) SetMAC(dev string, mac net.HardwareAddr) error {
	return n.ip("link", "set", dev, "address", mac.String())
}

// SetMTU sets dev's MTU.
func (n *NetNS) SetMTU(dev string, mtu int) error {
	return n.ip("link", "set", dev, "mtu", fmt.Sprint(mtu))
}

// AddNeigh adds a permanent neighbour entry, so tests need not wait for ARP.
func (n *NetNS) AddNeigh(dev, ip string, mac net.HardwareAddr) error {
	return n.ip("neigh", "replace", ip, "lladdr", mac.String(), "dev", dev, "nud", "permanent")
}

// LinkStats are a link's kernel counters.
type LinkStats struct {
	RxPackets, RxBytes, RxDropped uint64
	TxPackets, TxBytes, TxDropped uint64
}

// Stats returns dev's kernel counters.
func (n *NetNS) Stats(dev string) (LinkStats, error) {
	var st LinkStats
	err := n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		s := l.Attrs().Statistics
		if s == nil {
			return fmt.Errorf("no statistics for %s", dev)
		}
		st = LinkStats{s.RxPackets, s.RxBytes, s.RxDropped, s.TxPackets, s.TxBytes, s.TxDropped}
		return nil
	})
	if err != nil {
		return LinkStats{}, fmt.Errorf("stats of %s in %s: %w", dev, n.name, err)
	}
	return st, nil
}

// Link looks dev up.
func (n *NetNS) Link(dev string) (netdev.LinkInfo, error) {
	if err := n.checkOpen(); err != nil {
		return netdev.LinkInfo{}, err
	}
	return netdev.LookupLink(n.Path(), dev)
}

// VethPair creates a veth pair with end nameA in a and nameB in b, and
// brings both ends up. a and b may be the same namespace.
func VethPair(a *NetNS, nameA string, b *NetNS, nameB string) error {
	if a == nil || b == nil {
		return fmt.Errorf("veth pair %s/%s: nil netns: %w", nameA, nameB, ErrInvalid)
	}
	if err := netdev.ValidateName(nameA); err != nil {
		return fmt.Errorf("veth pair: %w", err)
	}
	if err := netdev.ValidateName(nameB); err != nil {
		return fmt.Errorf("veth pair: %w", err)
	}
	if err := b.checkOpen(); err != nil {
		return err
	}
	if err := a.ip("link", "add", nameA, "type", "veth", "peer", "name", nameB, "netns", b.name); err != nil {
		return fmt.Errorf("veth pair: %w", err)
	}
	if err := a.Up(nameA); err != nil {
		_ = a.ip("link", "del", nameA)
		return fmt.Errorf("veth pair: %w", err)
	}
	if err := b.Up(nameB); err != nil {
		_ = a.ip("link", "del", nameA)
		return fmt.Errorf("veth pair: %w", err)
	}
	return nil
}

// Ping sends count ICMP echo requests (200 ms apart) to addr from inside
// the namespace and succeeds when count replies came back within timeout
// (ping -c count -w timeout). ping gives up before its deadline when the
// neighbour cannot be resolved (three unanswered ARP or NDP probes: a slow
// peer, such as a TCG guest on a loaded machine, that is not listening yet);
// Ping then starts it again, so the whole timeout is used either way.
func (n *NetNS) Ping(addr string, count int, timeout time.Duration) error {
	if count < 1 {
		count = 1
	}
	deadline := time.Now().Add(timeout)
	for {
		w := int(time.Until(deadline) / time.Second)
		if w < 1 {
			w = 1
		}
		_, err := n.Exec("ping", "-n", "-q", "-c", fmt.Sprint(count), "-i", "0.2", "-w", fmt.Sprint(w), addr)
		if err == nil || time.Until(deadline) < time.Second {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Dial opens a connection from inside the namespace.
func (n *NetNS) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s from %s: %w", network, addr, n.name, err)
	}
	return c, nil
}

// CanDial reports whether a TCP connection to addr can be made from inside
// the namespace within timeout; it closes the connection at once.
func (n *NetNS) CanDial(addr string, timeout time.Duration) error {
	c, err := n.Dial("tcp", addr, timeout)
	if err != nil {
		return err
	}
	return c.Close()
}

// Listen opens a listener inside the namespace.
func (n *NetNS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, addr, n.name, err)
	}
	return l, nil
}

// ListenPacket opens a packet socket inside the namespace.
func (n *NetNS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := n.Do(func() error {
		var err error
		c, err = net.ListenPacket(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, addr, n.name, err)
	}
	return c, nil
}

// TCPTransfer listens on listenAddr (ip:port) in server, connects from
// client, sends size bytes of a known pattern from client to server and
// checks that all of them arrived intact, all within timeout.
func TCPTransfer(client, server *NetNS, listenAddr string, size int64, timeout time.Duration) error {
	l, err := server.Listen("tcp", listenAddr)
	if err != nil {
		return fmt.Errorf("tcp transfer: %w", err)
	}
	defer l.Close()
	deadline := time.Now().Add(timeout)
	l.(*net.TCPListener).SetDeadline(deadline)

	type result struct {
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(deadline)
		n, err := io.Copy(&patternChecker{}, c)
		got <- result{n, err}
	}()

	c, err := client.Dial("tcp", l.Addr().String(), time.Until(deadline))
	if err != nil {
		return fmt.Errorf("tcp transfer: %w", err)
	}
	c.SetDeadline(deadline)
	_, werr := io.Copy(c, io.LimitReader(&patternReader{}, size))
	cerr := c.Close()
	r := <-got
	switch {
	case werr != nil:
		return fmt.Errorf("tcp transfer to %s: send: %w", listenAddr, werr)
	case cerr != nil:
		return fmt.Errorf("tcp transfer to %s: close: %w", listenAddr, cerr)
	case r.err != nil:
		return fmt.Errorf("tcp transfer to %s: receive after %d bytes: %w", listenAddr, r.n, r.err)
	case r.n != size:
		return fmt.Errorf("tcp transfer to %s: got %d bytes, want %d: %w", listenAddr, r.n, size, ErrMismatch)
	}
	return nil
}

// patternReader yields byte i = i*7+i>>11 (mod 256), a pattern that catches
// reordered or duplicated segments.
type patternReader struct{ off int64 }

func patternByte(i int64) byte { return byte(i*7 + i>>11) }

func (p *patternReader) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = patternByte(p.off + int64(i))
	}
	p.off += int64(len(b))
	return len(b), nil
}

type patternChecker struct{ off int64 }

func (p *patternChecker) Write(b []byte) (int, error) {
	for i := range b {
		if b[i] != patternByte(p.off+int64(i)) {
			return i, fmt.Errorf("byte %d: %w", p.off+int64(i), ErrMismatch)
		}
	}
	p.off += int64(len(b))
	return len(b), nil
}
