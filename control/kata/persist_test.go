package kata_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control/kata"
)

// The fixture is a persist.json in the shape Kata's fs driver writes it (json.Encoder of
// persistapi.SandboxState, default field names): a veth endpoint in the tcfilter model and a
// vhost-user one, with fields kata-dp does not read.
func TestParseFixture(t *testing.T) {
	b, err := os.ReadFile("testdata/persist-tcfilter.json")
	if err != nil {
		t.Fatal(err)
	}
	s, err := kata.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if s.Network.NetworkID != "/var/run/netns/cni-7f1b6d5c-0f2e-8a43-6c11-2f7b7d2d3c44" || s.HypervisorState.Pid != 4241 || s.HypervisorState.Type != "qemu" || s.State != "running" {
		t.Errorf("parsed %+v", s)
	}
	pairs, others := s.Pairs()
	want := []kata.Pair{{Type: "virtual", Veth: "eth0", Tap: "tap0_kata", MAC: "2a:5e:0c:7d:91:04"}}
	if d := cmp.Diff(want, pairs); d != "" {
		t.Errorf("pairs (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]string{"vhost-user"}, others); d != "" {
		t.Errorf("others (-want +got):\n%s", d)
	}
}

func TestParseBad(t *testing.T) {
	full, err := os.ReadFile("testdata/persist-tcfilter.json")
	if err != nil {
		t.Fatal(err)
	}
	for name, in := range map[string]string{
		"empty":         "",
		"truncated":     string(full[:len(full)/2]),
		"foreign":       `{"hello":"world","Network":{"Endpoints":[]}}`,
		"array":         `[1,2,3]`,
		"wrong types":   `{"Network":{"NetworkID":42}}`,
		"relative ns":   `{"Network":{"NetworkID":"netns/x"}}`,
		"not json":      "PersistVersion=2\n",
		"null":          "null",
		"endpoints bad": `{"Network":{"NetworkID":"/run/netns/x","Endpoints":{"a":1}}}`,
	} {
		t.Run(name, func(t *testing.T) {
			s, err := kata.Parse([]byte(in))
			if !errors.Is(err, kata.ErrBadState) {
				t.Fatalf("Parse = %+v, %v; want ErrBadState", s, err)
			}
		})
	}
}

func TestLayout(t *testing.T) {
	dir := t.TempDir()
	l := kata.Layout{Dir: dir}
	if ids, err := l.IDs(); err != nil || len(ids) != 0 {
		t.Fatalf("IDs of an empty dir = %v, %v", ids, err)
	}
	for _, id := range []string{"b", "a"} {
		if err := os.MkdirAll(filepath.Join(dir, "sbs", id), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, "sbs", "stray-file"), nil, 0o600)
	ids, err := l.IDs()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"a", "b"}, ids); d != "" {
		t.Errorf("IDs (-want +got):\n%s", d)
	}
	if _, err := l.Read("a"); err == nil {
		t.Error("Read without persist.json succeeded")
	}
	os.WriteFile(l.PersistFile("a"), []byte(`{"Network":{"NetworkID":"/run/netns/a"}}`), 0o600)
	if s, err := l.Read("a"); err != nil || s.Network.NetworkID != "/run/netns/a" {
		t.Errorf("Read = %+v, %v", s, err)
	}
	if got := l.ExtraMonitor("a"); got != filepath.Join(dir, "vm", "a", "extra-monitor.sock") {
		t.Errorf("ExtraMonitor = %s", got)
	}
	if got := l.QMPSocket("a"); got != filepath.Join(dir, "vm", "a", "qmp.sock") {
		t.Errorf("QMPSocket = %s", got)
	}
}
