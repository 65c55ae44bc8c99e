package topo_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
)

func TestNetNSLifecycle(t *testing.T) {
	topotest.RequireRoot(t, "creates network namespaces")
	n, err := topo.NewNetNS("kdptt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if _, err := os.Stat(n.Path()); err != nil {
		t.Fatalf("netns path: %v", err)
	}
	out, err := n.Exec("ip", "-o", "link", "show", "lo")
	if err != nil {
		t.Fatal(err)
	}
	if want := "UP"; !strings.Contains(out, want) {
		t.Errorf("lo not up in new netns: %s", out)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("netns path after Close: %v, want not exist", err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := n.Exec("true"); !errors.Is(err, topo.ErrClosed) {
		t.Errorf("Exec after Close: %v, want ErrClosed", err)
	}
}

func TestVethPingAndTCP(t *testing.T) {
	a := topotest.MustNetNS(t, "kdptt-a")
	b := topotest.MustNetNS(t, "kdptt-b")
	if err := topo.VethPair(a, "va", b, "vb"); err != nil {
		t.Fatal(err)
	}
	if err := a.AddAddr("va", "10.198.0.1/24"); err != nil {
		t.Fatal(err)
	}
	if err := b.AddAddr("vb", "10.198.0.2/24"); err != nil {
		t.Fatal(err)
	}
	if err := a.Ping("10.198.0.2", 1, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := a.CanDial("10.198.0.2:1", time.Second); err == nil {
		t.Error("CanDial to a closed port succeeded")
	}
	if err := topo.TCPTransfer(a, b, "10.198.0.2:5001", 1<<20, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := topo.TCPTransfer(b, a, "10.198.0.1:5001", 1<<20, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestSandbox(t *testing.T) {
	s := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptt-", TapQueues: 2})
	type view struct {
		Type string
		Up   bool
		MTU  int
	}
	got := map[string]view{
		"hostveth": {s.HostVeth.Type, s.HostVeth.Up, s.HostVeth.MTU},
		"veth":     {s.Veth.Type, s.Veth.Up, s.Veth.MTU},
		"tap":      {s.Tap.Type, s.Tap.Up, s.Tap.MTU},
	}
	want := map[string]view{
		"hostveth": {"veth", true, 1500},
		"veth":     {"veth", true, 1500},
		"tap":      {"tuntap", true, 1500},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("links (-want +got):\n%s", diff)
	}
	if s.GuestMAC.String() != s.Veth.MAC.String() {
		t.Errorf("guest MAC %s, want the veth's %s", s.GuestMAC, s.Veth.MAC)
	}
	fds, err := s.OpenTap()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fds {
		f.Close()
	}
	if len(fds) != 2 {
		t.Errorf("opened %d queues, want 2", len(fds))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{s.Host.Path(), s.NS.Path()} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after Close: %v, want not exist", p, err)
		}
	}
}

func TestSandboxConfigInvalid(t *testing.T) {
	for name, cfg := range map[string]topo.SandboxConfig{
		"long tap name": {Tap: "a-very-long-tap-name"},
		"same names":    {Veth: "x", Tap: "x"},
		"queues":        {TapQueues: 1000},
	} {
		if _, err := topo.NewSandbox(cfg); err == nil {
			t.Errorf("%s: NewSandbox succeeded", name)
		}
	}
}

// TestSweepStale: what a gone process made under a prefix (a netns and a bpffs directory with
// a pin in it) is removed; what this live process made, and what does not carry an owner, is
// not. The prefix is not under topotest.Prefix, so the sweep of another test binary running
// beside this one cannot take the fake stale objects first.
func TestSweepStale(t *testing.T) {
	topotest.RequireRoot(t, "creates network namespaces")
	const prefix = "kdpxsweep"
	live, err := topo.NewNetNS(prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Close() })
	name, err := topo.OwnedName(prefix)
	if err != nil {
		t.Fatal(err)
	}
	liveDir := filepath.Join(topo.BPFFSDir, name)
	if err := os.Mkdir(liveDir, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(liveDir) })
	stale := prefix + "_999999999_abcdef"
	if out, err := exec.Command("ip", "netns", "add", stale).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", stale).Run() })
	staleDir := filepath.Join(topo.BPFFSDir, stale)
	unowned := filepath.Join(topo.BPFFSDir, prefix+"-unowned")
	for _, d := range []string{staleDir, unowned} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(staleDir, "m")); err != nil {
		t.Fatal(err)
	}
	swept, err := topo.SweepStale(prefix)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{filepath.Join(topo.NetnsDir, stale), staleDir}, swept); diff != "" {
		t.Errorf("swept (-want +got):\n%s", diff)
	}
	for _, p := range []string{live.Path(), liveDir, unowned} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("swept what it must not: %v", err)
		}
	}
}
