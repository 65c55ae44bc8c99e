package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
)

// TestVersionReport: `kata-dp version` (text and -o json) lists the probed features and every
// mode; with no agent it says so (and how to start it) instead of failing.
func TestVersionReport(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the feature probe loads BPF programs")
	}
	sock := filepath.Join(t.TempDir(), "none.sock")
	got := runCLI("version", "-o", "json", "--socket", sock)
	if got.code != 0 {
		t.Fatalf("version -o json: %+v", got)
	}
	var r versionReport
	dec := json.NewDecoder(strings.NewReader(got.stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("version -o json: %v\n%s", err, got.stdout)
	}
	if r.Version != version || r.Agent != "" || !strings.Contains(r.AgentError, sock) || r.Kernel == "" || r.FeatureError != "" {
		t.Errorf("version -o json: %+v", r)
	}
	if len(r.Modes) != len(dataplane.Modes()) {
		t.Errorf("modes: %+v", r.Modes)
	}
	names := map[string]bool{}
	for _, f := range r.Features {
		names[f.Name] = f.Supported
	}
	for _, want := range []string{"helper bpf_loop (sched_cls)", "helper bpf_xdp_load_bytes (xdp)", "map lpm_trie", "map devmap_hash", "program xdp", "link tcx", "verifier accepts the datapath object", "verifier accepts the node object"} {
		if !names[want] {
			t.Errorf("feature %q missing or unsupported: %v", want, names)
		}
	}
	text := runCLI("version", "--socket", sock)
	for _, want := range []string{"kata-dp " + version + "\n", "agent: not reachable (", "kernel features:\n", "  helper bpf_loop (xdp)", "modes:\n  tc  ", "  direct       ok\n"} {
		if !strings.Contains(text.stdout, want) {
			t.Errorf("version text lacks %q:\n%s", want, text.stdout)
		}
	}
	if got := runCLI("version", "-o", "yaml"); got.code != 1 || !strings.Contains(got.stderr, `--output "yaml": want text or json`) {
		t.Errorf("version -o yaml: %+v", got)
	}
}

// TestUnreachableHint: kata-dp's own client commands that find no agent add the hint on the
// line after their error; kata-network keeps the contract's stderr and null on stdout.
func TestUnreachableHint(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{{"status"}, {"sandbox", "list"}} {
		got := runCLI(append(args, "--socket", sock)...)
		lines := strings.Split(strings.TrimSuffix(got.stderr, "\n"), "\n")
		if got.code != 1 || len(lines) != 2 || !strings.Contains(lines[0], "kata-dp agent unreachable at "+sock) || lines[1] != unreachableHint {
			t.Errorf("kata-dp %v: %+v", args, got)
		}
	}
	got := runCLI("kata-network", "list-ifaces", "6ec", "--socket", sock)
	if got.code != 1 || got.stdout != "null\n" || strings.Contains(got.stderr, unreachableHint) {
		t.Errorf("kata-network: %+v", got)
	}
}

// TestReportRefusedObject: an object the verifier refuses makes every mode that loads it
// unable to run, with the verifier's text in the feature's error (as on Debian 12's 6.1, which
// has every probed feature and still refuses kdp_xdp_tap).
func TestReportRefusedObject(t *testing.T) {
	f := loader.Features{Checks: []loader.Check{{Name: "map array", Kind: "map", Objects: []string{"datapath", "node"}, Supported: true}}}
	r := reportOf(f, []loader.ObjectLoad{{Object: "datapath", Err: errors.New("load the datapath object: invalid zero-sized read")}, {Object: "node"}})
	for _, m := range r.Modes {
		if m.OK || strings.Join(m.Missing, ",") != "verifier accepts the datapath object" {
			t.Errorf("mode %+v", m)
		}
	}
	var found bool
	for _, ft := range r.Features {
		if ft.Name == "verifier accepts the datapath object" {
			found = !ft.Supported && strings.Contains(ft.Error, "invalid zero-sized read")
		}
	}
	if !found {
		t.Errorf("features: %+v", r.Features)
	}
}

// TestDashDashVersion: kata-dp --version prints the version the build set, and nothing else.
func TestDashDashVersion(t *testing.T) {
	if got := runCLI("--version"); got != (result{stdout: "kata-dp " + version + "\n"}) {
		t.Errorf("kata-dp --version: %+v", got)
	}
}
