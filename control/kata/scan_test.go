package kata_test

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/kata"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// fakeCtrl records what discovery asks of the control plane.
type fakeCtrl struct {
	sbs  map[string]control.Sandbox
	down map[string]string
	dels []string
}

func (f *fakeCtrl) Sandboxes() []control.Sandbox {
	var out []control.Sandbox
	for _, sb := range f.sbs {
		out = append(out, sb)
	}
	return out
}
func (f *fakeCtrl) Endpoints() []control.Endpoint { return nil }
func (f *fakeCtrl) AddSandbox(_ context.Context, spec control.SandboxSpec) (control.Sandbox, error) {
	sb := control.Sandbox{ID: spec.ID, NetNS: spec.NetNS, QMP: spec.QMP, Source: spec.Source, NoHotplug: spec.NoHotplug, Mode: spec.Mode, Netmon: spec.Netmon, Uplink: spec.Uplink}
	f.sbs[spec.ID] = sb
	return sb, nil
}
func (f *fakeCtrl) DelSandbox(_ context.Context, id string) error {
	delete(f.sbs, id)
	f.dels = append(f.dels, id)
	return nil
}
func (f *fakeCtrl) AdoptIface(context.Context, string, netspec.AddRequest, []netspec.Route) (netspec.Interface, error) {
	return netspec.Interface{}, nil
}
func (f *fakeCtrl) ReleaseSandbox(_ context.Context, id string) error { delete(f.sbs, id); return nil }
func (f *fakeCtrl) SetDown(id, reason string)                         { f.down[id] = reason }

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestScan: bad states are skipped with a clear log line (once), good ones registered, a
// sandbox registered by hand left alone, and discovered ones whose directory went collected.
func TestScan(t *testing.T) {
	dir := t.TempDir()
	l := kata.Layout{Dir: dir}
	full, err := os.ReadFile("testdata/persist-tcfilter.json")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, l.PersistFile("truncated"), string(full[:100]))
	writeFile(t, l.PersistFile("foreign"), `{"kind":"Pod","metadata":{"name":"x"}}`)
	writeFile(t, l.PersistFile("good"), `{"Network":{"NetworkID":"/proc/self/ns/net"}}`)
	writeFile(t, l.PersistFile("hand"), `{"Network":{"NetworkID":"/proc/self/ns/net"}}`)
	os.MkdirAll(filepath.Join(dir, "sbs", "nostate"), 0o700) // Kata has not written it yet
	f := &fakeCtrl{sbs: map[string]control.Sandbox{
		"hand": {ID: "hand"},
		"old":  {ID: "old", Source: control.SourceDiscovery},
		"mine": {ID: "mine"}, // by hand, not Kata's: never collected
	}, down: map[string]string{}}
	var logs syncBuffer
	d := kata.New(f, kata.Options{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	d.Scan(context.Background())
	d.Scan(context.Background())

	var ids []string
	for id := range f.sbs {
		ids = append(ids, id)
	}
	if d := cmp.Diff([]string{"good", "hand", "mine"}, sortStrings(ids)); d != "" {
		t.Errorf("registered (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]string{"old"}, f.dels); d != "" {
		t.Errorf("collected (-want +got):\n%s", d)
	}
	good := f.sbs["good"]
	if good.Source != control.SourceDiscovery || good.QMP != "" || !strings.Contains(good.NoHotplug, "extra-monitor.sock") || good.Mode != control.ModeTC || !good.Netmon {
		t.Errorf("good = %+v", good)
	}
	out := logs.String()
	for _, id := range []string{"truncated", "foreign"} {
		if c := strings.Count(out, `msg="Kata sandbox skipped: its state cannot be used" task=kata-discovery sandbox=`+id); c != 1 {
			t.Errorf("skip of %s logged %d times, want once:\n%s", id, c, out)
		}
	}
	if strings.Contains(out, "sandbox=nostate") {
		t.Errorf("a sandbox directory without state yet was reported:\n%s", out)
	}
	if c := strings.Count(out, "registered by hand: discovery leaves it alone"); c != 1 {
		t.Errorf("hand-registered sandbox logged %d times, want once:\n%s", c, out)
	}

	// The extra monitor socket gives a sandbox hot-plug.
	writeFile(t, l.PersistFile("qmp"), `{"Network":{"NetworkID":"/proc/self/ns/net"}}`)
	os.MkdirAll(filepath.Join(dir, "vm", "qmp"), 0o700)
	ln := listenUnix(t, l.ExtraMonitor("qmp"))
	defer ln.Close()
	d.Scan(context.Background())
	if sb := f.sbs["qmp"]; sb.QMP != l.ExtraMonitor("qmp") || sb.NoHotplug != "" {
		t.Errorf("sandbox with an extra monitor = %+v", sb)
	}

	// Release marks survive a new Discovery over the same state dir; Adopt lifts them.
	state := t.TempDir()
	d = kata.New(f, kata.Options{Dir: dir, StateDir: state, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err := d.Release(context.Background(), "good"); err != nil {
		t.Fatal(err)
	}
	d = kata.New(f, kata.Options{Dir: dir, StateDir: state, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	d.Scan(context.Background())
	if _, ok := f.sbs["good"]; ok {
		t.Error("released sandbox registered again")
	}
	if d := cmp.Diff([]string{"good"}, d.Released()); d != "" {
		t.Errorf("released (-want +got):\n%s", d)
	}
	if err := d.Adopt(context.Background(), "good"); err != nil {
		t.Fatal(err)
	}
	if _, ok := f.sbs["good"]; !ok {
		t.Error("adopted sandbox not registered")
	}
	if err := d.Release(context.Background(), "nosuch"); err == nil {
		t.Error("release of an unknown sandbox succeeded")
	}
	if err := d.Adopt(context.Background(), "hand"); err == nil {
		t.Error("adopt of a hand-registered sandbox succeeded")
	}
}

func sortStrings(s []string) []string {
	slices.Sort(s)
	return s
}

func listenUnix(t *testing.T, path string) net.Listener {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
