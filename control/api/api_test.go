package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/metrics"
	"github.com/kata-dp/kata-dp/control/store"
)

const testNS = "/run/netns/kdptapi"

func newAgent(t *testing.T) (*control.Controller, *Client, string) {
	t.Helper()
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	taps := controltest.NewMemTaps()
	taps.AddLink(testNS, "eth0", false)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctrl, err := control.New(context.Background(), control.Config{
		Dataplane: controltest.NewMemDataplane(), Taps: taps, Store: s, Hotplug: controltest.NewMemHotplugger(),
		CheckNetNS: func(p string) error {
			if p != testNS {
				return errors.New("no such file or directory")
			}
			return nil
		},
		Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "api", "kata-dp.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ist, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	lbm, err := ipvsctl.New(context.Background(), &fakeLB{tables: map[string]string{}}, ist, ctrl.Health, ctrl.Sandboxes(), log)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(ctrl, ServerOptions{Version: "v-test", Logger: log, Metrics: newMetrics(ctrl), IPVS: lbm})
	go srv.Serve(l)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	return ctrl, NewClient(sock), sock
}

func TestClientServer(t *testing.T) {
	_, c, sock := newAgent(t)
	ctx := context.Background()
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	if v, err := c.Version(ctx); err != nil || v != "v-test" {
		t.Errorf("Version = %q, %v", v, err)
	}
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "6ec7a98aa", NetNS: testNS, QMP: "/run/q.sock"}); err != nil {
		t.Fatal(err)
	}
	_, err = c.AddSandbox(ctx, control.SandboxSpec{ID: "6ec7a98aa", NetNS: testNS})
	if !errors.Is(err, control.ErrExists) {
		t.Errorf("duplicate AddSandbox = %v", err)
	}
	out, err := c.KataNetwork(ctx, "6ec", "add-iface", []byte(`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}`))
	want := `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","pciAddr":"02.0/01","queues":5}` + "\n"
	if err != nil || string(out) != want {
		t.Errorf("add-iface = %q, %v", out, err)
	}
	// Failures carry the message, the kind and the stdout.
	for _, tc := range []struct {
		id, op, in string
		want       error
		msg, out   string
	}{
		{"nope", "list-ifaces", "", control.ErrNoSuchSandbox, "no such container ID (nope)", "null\n"},
		{"6ec", "del-iface", `{"name":"eth-test","mtu":1}`, nil, "", "null\n"},
		{"6ec", "add-iface", `{"name":"eth-test"}`, control.ErrInvalid, "device is required", "null\n"},
		{"6ec", "add-iface", `{`, ErrDecode, "decode network file: unexpected EOF", ""},
		{"6ec", "add-route", `{"dest":"default","device":"eth-test"}`, control.ErrInvalid, "a default route needs a gateway", "null\n"},
		{"6ec", "frob", ``, ErrUnknownOp, `unknown kata-network operation: "frob"`, ""},
	} {
		out, err := c.KataNetwork(ctx, tc.id, tc.op, []byte(tc.in))
		if tc.want == nil {
			if err != nil || string(out) != tc.out {
				t.Errorf("%s %s: %q, %v", tc.op, tc.in, out, err)
			}
			continue
		}
		if !errors.Is(err, tc.want) || err.Error() != tc.msg || string(out) != tc.out {
			t.Errorf("%s %s: stdout %q, err %v; want %q, %v", tc.op, tc.in, out, err, tc.out, tc.msg)
		}
	}
	if _, err := c.Health(ctx, "6ec"); err != nil {
		t.Errorf("Health: %v", err)
	}
	// The CNI plugin's flavour matches the id exactly: a prefix names no sandbox.
	if out, err := c.KataNetworkExact(ctx, "6ec", "list-ifaces", nil); !errors.Is(err, control.ErrNoSuchSandbox) || string(out) != "null\n" {
		t.Errorf("KataNetworkExact(prefix) = %q, %v; want null, ErrNoSuchSandbox", out, err)
	}
	if _, err := c.KataNetworkExact(ctx, "6ec7a98aa", "list-ifaces", nil); err != nil {
		t.Errorf("KataNetworkExact(id): %v", err)
	}
	st, err := c.Status(ctx)
	if err != nil || len(st) != 1 || len(st[0].Endpoints) != 0 {
		t.Errorf("Status = %+v, %v", st, err)
	}
	sbs, err := c.Sandboxes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"6ec7a98aa"}, []string{sbs[0].ID}); d != "" {
		t.Errorf("Sandboxes (-want +got):\n%s", d)
	}
	// Delete takes the exact id: a prefix, even a unique one, deletes nothing.
	if err := c.DelSandbox(ctx, "6ec"); !errors.Is(err, control.ErrNoSuchSandbox) {
		t.Errorf("DelSandbox(prefix) = %v, want ErrNoSuchSandbox", err)
	}
	if sbs, err := c.Sandboxes(ctx); err != nil || len(sbs) != 1 {
		t.Errorf("after DelSandbox(prefix): %v, %v", sbs, err)
	}
	if err := c.DelSandbox(ctx, "6ec7a98aa"); err != nil {
		t.Fatal(err)
	}
	if err := c.DelSandbox(ctx, "6ec7a98aa"); !errors.Is(err, control.ErrNoSuchSandbox) {
		t.Errorf("second DelSandbox = %v", err)
	}
}

func TestUnreachable(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "none.sock"))
	if _, err := c.Version(context.Background()); !errors.Is(err, ErrUnreachable) {
		t.Errorf("Version on missing socket = %v", err)
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	_, _, sock := newAgent(t)
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "another agent") {
		t.Errorf("second Listen = %v", err)
	}
}

func newMetrics(ctrl *control.Controller) *metrics.Metrics {
	m := metrics.New("v-test")
	m.AddSources(metrics.Sources{Controller: ctrl})
	return m
}

// TestHelperNonRootClient is run by TestRefusesNonRoot as an unprivileged process.
func TestHelperNonRootClient(t *testing.T) {
	sock := os.Getenv("KDP_API_SOCK")
	if sock == "" {
		t.Skip("helper process only")
	}
	_, err := NewClient(sock).Version(context.Background())
	if err == nil {
		t.Fatal("non-root client was served")
	}
	t.Log("refused:", err)
}

func TestRefusesNonRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs a client as another user")
	}
	_, _, sock := newAgent(t)
	// Open the file permissions so that only the credential check stands in the way.
	for p := sock; p != "/"; p = filepath.Dir(p) {
		if fi, err := os.Stat(p); err == nil {
			if p == sock {
				os.Chmod(p, 0o666)
			} else if fi.Mode().Perm()&0o005 != 0o005 {
				os.Chmod(p, fi.Mode().Perm()|0o005)
			}
		}
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(t.TempDir(), "api.test")
	b, _ := os.ReadFile(exe)
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Dir(tmp), 0o755)
	cmd := exec.Command(tmp, "-test.run=^TestHelperNonRootClient$", "-test.v")
	cmd.Env = append(os.Environ(), "KDP_API_SOCK="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("non-root client: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "refused:") {
		t.Errorf("helper did not run:\n%s", out)
	}
	// Root is still served.
	if _, err := NewClient(sock).Version(context.Background()); err != nil {
		t.Errorf("root client: %v", err)
	}
}
