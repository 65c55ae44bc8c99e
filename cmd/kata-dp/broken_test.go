package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
)

// TestAgentStartsWithBrokenState runs the real agent (BPF dataplane) over state it cannot fully
// re-adopt: a sandbox with kata-ipvs rules whose netns vanished while the agent was down, and a
// corrupt state file. The agent must start (it used to exit: a crash loop), report both
// sandboxes unhealthy with the reason, move the corrupt file aside, and let `sandbox del`
// remove what is left of them. `sandbox del` matches ids exactly: deleting "web" again once it
// is gone must not delete "web-2".
func TestAgentStartsWithBrokenState(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane")
	ns := topotest.MustNetNS(t, "kdptb")
	sbns, err := topo.NewNetNS("kdptbs")
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			sbns.Close()
		}
	})
	dir := t.TempDir()
	sock := filepath.Join(dir, "kata-dp.sock")
	state := filepath.Join(dir, "state")
	bpffs := topotest.BPFFS(t, "kdptb")
	args := []string{"--socket", sock, "--state-dir", state, "--bpffs-root", bpffs}
	p := startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: ns}
	ok := result{}
	a.check(t, "", []string{"sandbox", "add", "web", "--netns", sbns.Path()}, result{stdout: "web\n"})
	a.check(t, "", []string{"sandbox", "add", "web-2", "--netns", ns.Path()}, result{stdout: "web-2\n"})
	a.check(t, "", []string{"kata-ipvs", "ipvsadm", "--parameters", "--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000", "web"}, ok)
	if _, err := os.Stat(filepath.Join(bpffs, "web")); err != nil {
		t.Fatalf("pins of web: %v", err)
	}

	// While the agent is down, web's netns vanishes and a state file gets corrupted.
	p.cmd.Process.Kill()
	p.cmd.Wait()
	closed = true
	if err := sbns.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "junk.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	p = startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)

	r := a.cli(t, "", "status", "-o", "json")
	var st []control.SandboxStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); r.code != 0 || err != nil {
		t.Fatalf("status: %+v, %v", r, err)
	}
	why := map[string]string{}
	for _, s := range st {
		why[s.ID] = s.Unhealthy
	}
	if len(why) != 3 || why["web-2"] != "" || !strings.Contains(why["web"], "netns") || !strings.Contains(why["junk"], "state unreadable") {
		t.Errorf("status: unhealthy reasons %q", why)
	}
	moved, _ := filepath.Glob(filepath.Join(state, "junk.json.corrupt-*"))
	if _, err := os.Stat(filepath.Join(state, "junk.json")); err == nil || len(moved) != 1 {
		t.Errorf("corrupt state not moved aside: %v, %v", moved, err)
	}
	if r := a.cli(t, "", "status"); r.code != 0 || !strings.Contains(r.stdout, "sandbox web unhealthy") {
		t.Errorf("status table: %+v", r)
	}
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", "--list", "web"); r.code != 1 || !strings.Contains(r.stderr, "not healthy") {
		t.Errorf("kata-ipvs on a sandbox that was not re-adopted: %+v", r)
	}

	// The broken sandboxes can be deleted, and that removes their pins and saved rules.
	a.check(t, "", []string{"sandbox", "del", "web"}, ok)
	a.check(t, "", []string{"sandbox", "del", "junk"}, ok)
	for _, gone := range []string{filepath.Join(bpffs, "web"), filepath.Join(state, "web.json"), filepath.Join(state, "ipvs", "web.json")} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("%s left behind", gone)
		}
	}
	// Exact ids: "web" is gone, so neither it nor a prefix deletes web-2.
	a.check(t, "", []string{"sandbox", "del", "web"}, result{stderr: "del sandbox: no such container ID (web)\n", code: 1})
	a.check(t, "", []string{"sandbox", "del", "we"}, result{stderr: "del sandbox: no such container ID (we)\n", code: 1})
	a.check(t, "", []string{"sandbox", "list", "-o", "json"}, result{stdout: "[\n  {\n    \"id\": \"web-2\",\n    \"netns\": \"" + ns.Path() +
		"\",\n    \"uplink\": \"eth0\",\n    \"mode\": \"tc\",\n    \"antiSpoof\": true,\n    \"strictEgress\": true\n  }\n]\n"})

	// A clean restart after the cleanup.
	p.cmd.Process.Kill()
	p.cmd.Wait()
	p = startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	if r := a.cli(t, "", "status", "-o", "json"); r.code != 0 || strings.Contains(r.stdout, "unhealthy") {
		t.Errorf("status after cleanup: %+v", r)
	}
	a.check(t, "", []string{"sandbox", "del", "web-2"}, ok)
}
