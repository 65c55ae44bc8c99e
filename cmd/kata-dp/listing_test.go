package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/control"
)

// decodeStrict decodes one JSON value, refusing fields the type does not have.
func decodeStrict(t *testing.T, s string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("decode %T: %v\n%s", v, err, s)
	}
}

// TestListingsJSON: every listing has -o json (sandbox list, status, status <id>), empty
// listings are [] not null, and status <id> takes an id or unique prefix with kata-network's
// errors.
func TestListingsJSON(t *testing.T) {
	a := startAgent(t)
	for _, args := range [][]string{{"sandbox", "list", "-o", "json"}, {"status", "-o", "json"}} {
		if got := a.runIn("", args...); got.code != 0 || got.stdout != "[]\n" {
			t.Errorf("%v with no sandboxes: %+v", args, got)
		}
	}
	a.check(t, "", []string{"sandbox", "add", "6ec7a98a", "--netns", a.ns.Path()}, result{stdout: "6ec7a98a\n"})
	a.check(t, "", []string{"sandbox", "add", "6ec7a98bbb", "--netns", a.ns.Path(), "--mode", "xdp"}, result{stdout: "6ec7a98bbb\n"})

	var sbs []control.Sandbox
	decodeStrict(t, a.runIn("", "sandbox", "list", "-o", "json").stdout, &sbs)
	if len(sbs) != 2 || sbs[0].ID != "6ec7a98a" || sbs[1].Mode != "xdp" || sbs[0].NetNS != a.ns.Path() {
		t.Errorf("sandbox list -o json: %+v", sbs)
	}
	var st []control.SandboxStatus
	decodeStrict(t, a.runIn("", "status", "6ec7a98b", "-o", "json").stdout, &st)
	if len(st) != 1 || st[0].ID != "6ec7a98bbb" || st[0].Endpoints == nil {
		t.Errorf("status 6ec7a98b -o json: %+v", st)
	}
	if got := a.runIn("", "status", "6ec7a98a"); got.code != 0 || !strings.Contains(got.stdout, "6ec7a98a") || strings.Contains(got.stdout, "6ec7a98bbb") {
		t.Errorf("status 6ec7a98a: %+v", got)
	}
	for _, tc := range []struct{ id, want string }{
		{"6ec", "status: multiple containers found (6ec)\n"},
		{"zzz", "status: no such container ID (zzz)\n"},
	} {
		if got := a.runIn("", "status", tc.id); got.code != 1 || got.stderr != tc.want {
			t.Errorf("status %s: %+v", tc.id, got)
		}
	}
	if got := a.runIn("", "sandbox", "list", "-o", "yaml"); got.code != 1 || !strings.Contains(got.stderr, `--output "yaml"`) {
		t.Errorf("sandbox list -o yaml: %+v", got)
	}
	// Every command's help has examples.
	for _, c := range commands {
		if c.name == "bench" {
			continue // bench.Main's own help
		}
		got := a.runIn("", c.name, "--help")
		if got.code != 0 || !strings.Contains(got.stdout, "kata-dp "+c.name+" ") || !strings.Contains(strings.ToLower(got.stdout), "example") {
			t.Errorf("kata-dp %s --help has no example:\n%s", c.name, got.stdout)
		}
	}
}
