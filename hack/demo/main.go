// Command demo is `make demo`: it builds a Kata-like sandbox topology in network namespaces,
// runs the kata-dp agent, and drives it only through the kata-dp CLI, the way a runtime or an
// operator would: a NIC added with kata-network (the user guide's example), traffic both ways
// through the BPF datapath, routes, a kata-ipvs service with three real servers and its spread,
// and the counters. When QEMU and the test guest (hack/guest/build.sh) are available, a second
// sandbox runs a real VM and the NIC is hot-plugged into it over QMP.
//
// Everything it creates (namespaces kdpdemo-*, pins under /sys/fs/bpf/kdpdemo, a temp dir) is
// removed at the end, also on failure.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/control/netdev"
)

func main() {
	bin := flag.String("bin", "bin/kata-dp", "the kata-dp binary")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

type demo struct {
	ctx     context.Context
	bin     string
	dir     string
	socket  string
	cleanup []func()
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

// cli runs `kata-dp args...` with stdin, echoes the command and its output, and returns stdout.
func (d *demo) cli(stdin string, args ...string) (string, error) {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = a
		if strings.ContainsAny(a, " \t") {
			quoted[i] = `"` + a + `"`
		}
	}
	shown := "kata-dp " + strings.Join(quoted, " ")
	if stdin != "" {
		shown = "echo '" + stdin + "' | " + shown
	}
	fmt.Println("$ " + shown)
	cmd := exec.CommandContext(d.ctx, d.bin, args...)
	cmd.Env = append(os.Environ(), "KATA_DP_SOCKET="+d.socket)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	fmt.Print(out.String())
	if errb.Len() > 0 {
		fmt.Print(errb.String())
	}
	if err != nil {
		return out.String(), fmt.Errorf("%s: %w", shown, err)
	}
	return out.String(), nil
}

func run(ctx context.Context, bin string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, BPF)")
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%s: %w (run make build)", bin, err)
	}
	bin, _ = filepath.Abs(bin)
	dir, err := os.MkdirTemp("", "kdpdemo-")
	if err != nil {
		return err
	}
	d := &demo{ctx: ctx, bin: bin, dir: dir, socket: filepath.Join(dir, "kata-dp.sock")}
	defer func() {
		for i := len(d.cleanup) - 1; i >= 0; i-- {
			d.cleanup[i]()
		}
		os.RemoveAll(dir)
	}()
	if err := d.start(); err != nil {
		return err
	}
	if err := d.emulatedGuest(); err != nil {
		return err
	}
	return d.realGuest()
}

// start runs the agent with its state, socket and pins in places of the demo's own.
func (d *demo) start() error {
	step("Start the kata-dp agent")
	bpffs := "/sys/fs/bpf/kdpdemo"
	log, err := os.Create(filepath.Join(d.dir, "agent.log"))
	if err != nil {
		return err
	}
	args := []string{"agent", "--socket", d.socket, "--state-dir", filepath.Join(d.dir, "state"), "--bpffs-root", bpffs}
	fmt.Println("$ kata-dp " + strings.Join(args, " ") + " &")
	agent := exec.Command(d.bin, args...)
	agent.Stdout, agent.Stderr = log, log
	if err := agent.Start(); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() {
		agent.Process.Signal(syscall.SIGTERM)
		agent.Wait()
		os.RemoveAll(bpffs)
		log.Close()
	})
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", d.socket); err == nil {
			c.Close()
			break
		}
		if i > 100 {
			b, _ := os.ReadFile(log.Name())
			return fmt.Errorf("agent did not come up:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, err = d.cli("", "version")
	return err
}

const (
	sandboxID = "6ec7a98e51f0c3b2"
	guestMAC  = "02:42:20:6f:a3:69"
	vip       = "10.96.0.10"
)

// emulatedGuest: a sandbox whose guest is the guest emulator (a real kernel stack in a netns
// of its own behind the tap), so the demo can run traffic from the guest's side too.
func (d *demo) emulatedGuest() error {
	step("Build a sandbox topology: host netns <-veth-> sandbox netns (eth0)")
	sb, err := topo.NewSandbox(topo.SandboxConfig{Prefix: "kdpdemo-", NoTap: true})
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { sb.Close() })
	guest, err := topo.NewNetNS("kdpdemo-g")
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { guest.Close() })
	fmt.Printf("host netns %s (veth0 %s), sandbox netns %s (eth0), guest netns %s\n",
		sb.Host.Name(), sb.HostAddr, sb.NS.Name(), guest.Name())

	step("Register the sandbox and add the user guide's NIC with kata-network")
	if _, err := d.cli("", "sandbox", "add", sandboxID, "--netns", sb.NS.Path()); err != nil {
		return err
	}
	iface := fmt.Sprintf(`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500}`,
		sb.GuestAddr.Addr(), guestMAC)
	if _, err := d.cli(iface, "kata-network", "add-iface", sandboxID[:7], "-"); err != nil {
		return err
	}
	if _, err := d.cli("", "kata-network", "list-ifaces", sandboxID[:7]); err != nil {
		return err
	}
	if _, err := d.cli(`{"dest":"default","gateway":"`+sb.HostAddr.Addr().String()+`","device":"eth-test"}`, "kata-network", "add-route", sandboxID[:7], "-"); err != nil {
		return err
	}
	if _, err := d.cli("", "kata-network", "list-routes", sandboxID[:7]); err != nil {
		return err
	}

	step("Start the guest: the guest emulator joins tap-test to a tap in the guest netns")
	fds, err := netdev.OpenTap(sb.NS.Path(), "tap-test", 1, true, true)
	if err != nil {
		return err
	}
	mac, _ := net.ParseMAC(guestMAC)
	br, err := guestemu.NewBridge(fds, guest.Path(), "eth0", guestemu.BridgeOptions{
		MAC: mac, Addrs: []netip.Prefix{sb.GuestAddr}, Gateway: sb.HostAddr.Addr(), Offload: true,
	})
	for _, f := range fds {
		f.Close()
	}
	if err != nil {
		return err
	}
	bctx, cancel := context.WithCancel(d.ctx)
	d.cleanup = append(d.cleanup, func() { cancel(); br.Close() })
	if err := br.Start(bctx); err != nil {
		return err
	}

	step("Traffic through the BPF datapath, both ways")
	fmt.Printf("$ ping host -> guest %s\n", sb.GuestAddr.Addr())
	if err := sb.Host.Ping(sb.GuestAddr.Addr().String(), 3, 5*time.Second); err != nil {
		return err
	}
	fmt.Printf("$ ping guest -> host %s\n", sb.HostAddr.Addr())
	if err := guest.Ping(sb.HostAddr.Addr().String(), 3, 5*time.Second); err != nil {
		return err
	}
	for _, x := range []struct {
		name           string
		client, server *topo.NetNS
		addr           string
	}{
		{"host -> guest", sb.Host, guest, sb.GuestAddr.Addr().String() + ":5201"},
		{"guest -> host", guest, sb.Host, sb.HostAddr.Addr().String() + ":5202"},
	} {
		start := time.Now()
		if err := topo.TCPTransfer(x.client, x.server, x.addr, 64<<20, 30*time.Second); err != nil {
			return err
		}
		fmt.Printf("TCP %s: 64 MiB in %v (%.2f Gbit/s)\n", x.name, time.Since(start).Round(time.Millisecond),
			float64(64<<20)*8/time.Since(start).Seconds()/1e9)
	}
	fmt.Println("Anti-spoofing: the guest sends from an address that is not its own")
	guest.Exec("ip", "addr", "add", "10.199.0.99/24", "dev", "eth0")
	guest.Exec("ip", "neigh", "replace", sb.HostAddr.Addr().String(), "lladdr", sb.HostVeth.MAC.String(), "dev", "eth0")
	fmt.Printf("$ ping -I 10.199.0.99 %s   (from the guest)\n", sb.HostAddr.Addr())
	out, _ := guest.Exec("ping", "-n", "-q", "-c", "2", "-W", "1", "-I", "10.199.0.99", sb.HostAddr.Addr().String())
	fmt.Print(out)
	guest.Exec("ip", "neigh", "del", sb.HostAddr.Addr().String(), "dev", "eth0")
	guest.Exec("ip", "addr", "del", "10.199.0.99/24", "dev", "eth0")

	step("kata-ipvs: a service with three real servers behind the uplink")
	servers := []string{"10.199.0.11", "10.199.0.12", "10.199.0.13"}
	for _, s := range servers {
		if _, err := sb.Host.Exec("ip", "addr", "add", s+"/24", "dev", sb.HostVeth.Name); err != nil {
			return err
		}
		l, err := sb.Host.Listen("tcp", s+":80")
		if err != nil {
			return err
		}
		d.cleanup = append(d.cleanup, func() { l.Close() })
		go serve(l, s)
	}
	// A service added with --parameters must be persistent (openEuler's API table makes
	// --scheduler and --persistent mandatory), which would send all 30 connections of the one
	// guest address to one server; a restore file (ipvsadm-save lines) may leave persistence
	// off, so the spread over the three servers shows.
	rules := "-A -t " + vip + ":80 -s rr\n"
	for _, s := range servers {
		rules += "-a -t " + vip + ":80 -r " + s + ":80 -m -w 1\n"
	}
	if _, err := d.cli(rules, "kata-ipvs", "ipvsadm", "--restore", "-", sandboxID[:7]); err != nil {
		return err
	}
	spread := map[string]int{}
	for range 30 {
		c, err := guest.Dial("tcp", vip+":80", 3*time.Second)
		if err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			return err
		}
		spread[strings.TrimSpace(line)]++
	}
	fmt.Printf("30 connections from the guest to %s:80 went to:", vip)
	for _, s := range servers {
		fmt.Printf(" %s=%d", s, spread[s])
	}
	fmt.Println()
	if _, err := d.cli("", "kata-ipvs", "ipvsadm", "--parameters", "--list --stats", sandboxID[:7]); err != nil {
		return err
	}
	if _, err := d.cli("", "kata-ipvs", "ipvsadm", "--parameters", "--save", sandboxID[:7]); err != nil {
		return err
	}

	step("Counters")
	if _, err := d.cli("", "status"); err != nil {
		return err
	}
	return nil
}

func serve(l net.Listener, name string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(c, "%s\n", name)
		c.Close()
	}
}

// realGuest hot-plugs a NIC into a real QEMU guest when QEMU and the test guest are there.
func (d *demo) realGuest() error {
	step("A real VM: hot-plug over QMP")
	if err := realGuestDemo(d); err != nil {
		if errors.Is(err, errNoGuest) {
			fmt.Println("skipped:", err)
			return nil
		}
		return err
	}
	return nil
}

var errNoGuest = errors.New("no QEMU test guest (install qemu-system-x86 and run hack/guest/build.sh)")
