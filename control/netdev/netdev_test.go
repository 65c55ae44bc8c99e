package netdev_test

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/netdev"
	"golang.org/x/sys/unix"
)

// newNS makes a named netns "kdptn_<pid>_..." and deletes it when the test ends.
func newNS(t *testing.T) string {
	t.Helper()
	n := topotest.MustNetNS(t, "kdptn")
	t.Cleanup(func() {
		// Delete links first so a leaked fd cannot keep a tap alive.
		for _, l := range []string{"kdptap0", "kdptap1", "kv0"} {
			exec.Command("ip", "-n", n.Name(), "link", "del", l).Run()
		}
	})
	return n.Path()
}

func TestCreateOpenDeleteTap(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    netdev.TapOptions
		queues  int
		vnetHdr bool
	}{
		{"single", netdev.TapOptions{VnetHdr: true}, 1, true},
		{"single-plain", netdev.TapOptions{MTU: 9000}, 1, false},
		{"multi", netdev.TapOptions{Queues: 4, VnetHdr: true, MTU: 1400}, 4, true},
		{"multi-open-one", netdev.TapOptions{Queues: 4, VnetHdr: true}, 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNS(t)
			if err := netdev.CreateTap(ns, "kdptap0", tc.opts); err != nil {
				t.Fatal(err)
			}
			li, err := netdev.LookupLink(ns, "kdptap0")
			if err != nil {
				t.Fatal(err)
			}
			wantMTU := tc.opts.MTU
			if wantMTU == 0 {
				wantMTU = 1500
			}
			type view struct {
				Name string
				Type string
				MTU  int
				Up   bool
			}
			if diff := cmp.Diff(view{"kdptap0", "tuntap", wantMTU, true}, view{li.Name, li.Type, li.MTU, li.Up}); diff != "" {
				t.Errorf("link (-want +got):\n%s", diff)
			}
			if li.Index == 0 || len(li.MAC) != 6 {
				t.Errorf("link index %d mac %s", li.Index, li.MAC)
			}
			// Not visible in the test's own netns.
			if _, err := netdev.LookupLink("", "kdptap0"); !errors.Is(err, netdev.ErrNotFound) {
				t.Errorf("LookupLink in the current netns: %v, want ErrNotFound", err)
			}

			fds, err := netdev.OpenTap(ns, "kdptap0", tc.queues, tc.vnetHdr, true)
			if err != nil {
				t.Fatal(err)
			}
			if len(fds) != tc.queues {
				t.Errorf("got %d fds, want %d", len(fds), tc.queues)
			}
			for i, f := range fds {
				flags, err := netdev.TapFlags(f)
				if err != nil {
					t.Fatal(err)
				}
				want := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
				if tc.vnetHdr {
					want |= unix.IFF_VNET_HDR
				}
				if tc.opts.Queues > 1 {
					want |= unix.IFF_MULTI_QUEUE
				}
				mask := uint16(unix.IFF_TAP | unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE)
				if got := flags & mask; got != want {
					t.Errorf("queue %d: TUNGETIFF flags %#x, want %#x", i, got, want)
				}
				fl, err := unix.FcntlInt(uintptr(fdOf(t, f)), unix.F_GETFL, 0)
				if err != nil {
					t.Fatal(err)
				}
				if fl&unix.O_NONBLOCK == 0 {
					t.Errorf("queue %d: not O_NONBLOCK", i)
				}
			}
			for _, f := range fds {
				f.Close()
			}
			// Persistent: still there after the fds are closed.
			if _, err := netdev.LookupLink(ns, "kdptap0"); err != nil {
				t.Errorf("tap gone after closing fds: %v", err)
			}
			if err := netdev.CreateTap(ns, "kdptap0", tc.opts); !errors.Is(err, netdev.ErrExists) {
				t.Errorf("second CreateTap: %v, want ErrExists", err)
			}
			if err := netdev.DeleteLink(ns, "kdptap0"); err != nil {
				t.Fatal(err)
			}
			if _, err := netdev.LookupLink(ns, "kdptap0"); !errors.Is(err, netdev.ErrNotFound) {
				t.Errorf("LookupLink after delete: %v, want ErrNotFound", err)
			}
			if err := netdev.DeleteLink(ns, "kdptap0"); !errors.Is(err, netdev.ErrNotFound) {
				t.Errorf("second DeleteLink: %v, want ErrNotFound", err)
			}
		})
	}
}

func fdOf(t *testing.T, f *os.File) int {
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	rc.Control(func(p uintptr) { fd = int(p) })
	return fd
}

func TestErrors(t *testing.T) {
	ns := newNS(t)
	if _, err := netdev.OpenTap(ns, "kdptap0", 1, true, true); !errors.Is(err, netdev.ErrNotFound) {
		t.Errorf("OpenTap of a missing tap: %v, want ErrNotFound", err)
	}
	if _, err := netdev.LookupLink(ns, "kdptap0"); !errors.Is(err, netdev.ErrNotFound) {
		t.Errorf("LookupLink of a missing link: %v, want ErrNotFound", err)
	}
	if err := netdev.SetGRO(ns, "kdptap0", true); !errors.Is(err, netdev.ErrNotFound) {
		t.Errorf("SetGRO of a missing link: %v, want ErrNotFound", err)
	}
	for name, err := range map[string]error{
		"long name":  netdev.CreateTap(ns, "0123456789abcdef", netdev.TapOptions{}),
		"empty name": netdev.CreateTap(ns, "", netdev.TapOptions{}),
		"slash":      netdev.CreateTap(ns, "a/b", netdev.TapOptions{}),
		"queues":     netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{Queues: 1000}),
		"mtu":        netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{MTU: 10}),
	} {
		if !errors.Is(err, netdev.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if _, err := netdev.OpenTap(ns, "kdptap0", 0, true, true); !errors.Is(err, netdev.ErrInvalid) {
		t.Errorf("OpenTap 0 queues: %v, want ErrInvalid", err)
	}
	if _, err := netdev.LookupLink(ns, "lo"); err != nil {
		t.Fatal(err)
	}
	if _, err := netdev.OpenTap(ns, "lo", 1, true, true); !errors.Is(err, netdev.ErrNotTap) {
		t.Errorf("OpenTap lo: %v, want ErrNotTap", err)
	}
	// A single-queue tap cannot be opened with several queues.
	if err := netdev.CreateTap(ns, "kdptap1", netdev.TapOptions{VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := netdev.OpenTap(ns, "kdptap1", 2, true, true); !errors.Is(err, netdev.ErrInvalid) {
		t.Errorf("OpenTap with 2 queues on a single-queue tap: %v, want ErrInvalid", err)
	}
	if err := netdev.CreateTap("/nonexistent/netns", "kdptap0", netdev.TapOptions{}); err == nil {
		t.Error("CreateTap in a missing netns succeeded")
	}
}

func TestInNetNSIsolation(t *testing.T) {
	ns := newNS(t)
	var inside, outside []string
	names := func() ([]string, error) {
		ifs, err := net.Interfaces()
		var n []string
		for _, i := range ifs {
			n = append(n, i.Name)
		}
		return n, err
	}
	if err := netdev.InNetNS(ns, func() error {
		var err error
		inside, err = names()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"lo"}, inside); diff != "" {
		t.Errorf("links inside a fresh netns (-want +got):\n%s", diff)
	}
	outside, err := names()
	if err != nil {
		t.Fatal(err)
	}
	// The calling goroutine is back in its own netns.
	var self string
	if err := netdev.InNetNS("", func() error {
		var err error
		self, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	mine, _ := os.Readlink("/proc/self/ns/net")
	if self != mine {
		t.Errorf("InNetNS(\"\") ran in %s, want %s", self, mine)
	}
	if len(outside) == 0 {
		t.Error("no links in the current netns")
	}
	wantErr := errors.New("boom")
	if err := netdev.InNetNS(ns, func() error { return wantErr }); !errors.Is(err, wantErr) {
		t.Errorf("InNetNS error %v, want %v", err, wantErr)
	}
}

func TestSetGRO(t *testing.T) {
	ns := newNS(t)
	if err := netdev.InNetNS(ns, func() error {
		return exec.Command("ip", "link", "add", "kv0", "type", "veth", "peer", "name", "kv1").Run()
	}); err != nil {
		t.Fatal(err)
	}
	for _, on := range []bool{true, false, true} {
		if err := netdev.SetGRO(ns, "kv0", on); err != nil {
			t.Fatal(err)
		}
		got, err := netdev.GRO(ns, "kv0")
		if err != nil {
			t.Fatal(err)
		}
		if got != on {
			t.Errorf("GRO after SetGRO(%v) = %v", on, got)
		}
		if out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "ethtool", "-k", "kv0").CombinedOutput(); err == nil {
			want := "generic-receive-offload: off"
			if on {
				want = "generic-receive-offload: on"
			}
			if !strings.Contains(string(out), want) {
				t.Errorf("ethtool -k does not say %q:\n%s", want, out)
			}
		}
	}
}

func TestLookupTap(t *testing.T) {
	ns := newNS(t)
	if err := netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{Queues: 3, VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	fds, err := netdev.OpenTap(ns, "kdptap0", 2, true, false)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	ti, err := netdev.LookupTap(ns, "kdptap0")
	if err != nil {
		t.Fatal(err)
	}
	ti.LinkInfo = netdev.LinkInfo{}
	want := netdev.TapInfo{MultiQueue: true, VnetHdr: true, NoPI: true, Persistent: true, Queues: 2}
	if diff := cmp.Diff(want, ti); diff != "" {
		t.Errorf("LookupTap (-want +got):\n%s", diff)
	}
	if _, err := netdev.LookupTap(ns, "lo"); !errors.Is(err, netdev.ErrNotTap) {
		t.Errorf("LookupTap lo: %v, want ErrNotTap", err)
	}
	if _, err := netdev.LookupTap(ns, "kdptap1"); !errors.Is(err, netdev.ErrNotFound) {
		t.Errorf("LookupTap missing: %v, want ErrNotFound", err)
	}
}

func TestTapMTUBounds(t *testing.T) {
	ns := newNS(t)
	for _, mtu := range []int{68, 65521} {
		if err := netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{MTU: mtu, VnetHdr: true}); err != nil {
			t.Fatalf("mtu %d: %v", mtu, err)
		}
		li, err := netdev.LookupLink(ns, "kdptap0")
		if err != nil {
			t.Fatal(err)
		}
		if li.MTU != mtu {
			t.Errorf("mtu %d, want %d", li.MTU, mtu)
		}
		if err := netdev.DeleteLink(ns, "kdptap0"); err != nil {
			t.Fatal(err)
		}
	}
	for _, mtu := range []int{46, 67, 65522} {
		if err := netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{MTU: mtu}); !errors.Is(err, netdev.ErrInvalid) {
			t.Errorf("mtu %d: %v, want ErrInvalid", mtu, err)
		}
	}
}

// Concurrent creators of one tap: exactly one wins, the others see
// ErrExists (from the look-up or from IFF_TUN_EXCL).
func TestCreateTapRace(t *testing.T) {
	ns := newNS(t)
	const n = 8
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() { errs <- netdev.CreateTap(ns, "kdptap0", netdev.TapOptions{VnetHdr: true}) }()
	}
	ok := 0
	for i := 0; i < n; i++ {
		err := <-errs
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, netdev.ErrExists):
			t.Errorf("CreateTap: %v, want nil or ErrExists", err)
		}
	}
	if ok != 1 {
		t.Errorf("%d creators succeeded, want 1", ok)
	}
}
