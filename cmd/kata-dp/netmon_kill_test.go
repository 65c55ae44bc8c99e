package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
)

// TestNetmonKill9MidJoin: the agent process is killed with SIGKILL while netmon is joining a
// burst of links (at a different moment each round, from before the first join to after the
// last), then started again: each time the sandbox converges to exactly the links in the
// netns, one NIC and one tap kata-dp created per link, nothing left over.
func TestNetmonKill9MidJoin(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptk", NoTap: true})
	sock, args := agentFiles(t, "kdptk")
	p := startAgentProcess(t, sb.Host, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: sb.NS}
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path(), "--netmon"}, result{stdout: sandboxID + "\n"})

	const links = 4
	// Round r kills the agent right after it logged the join of the first r links of its burst
	// (round 0: at once, before any), so the kill lands inside the next join.
	for round := range links {
		// Round r adds links k<r>0..k<r>3 and removes the previous round's.
		var cmds []string
		for i := range links {
			name := fmt.Sprintf("k%d%d", round, i)
			cmds = append(cmds, fmt.Sprintf("link add %s type veth peer name p%s netns %s", name, name, sb.Host.Name()),
				fmt.Sprintf("addr add 10.77.%d.%d/24 dev %s", round, 2+i, name), fmt.Sprintf("link set %s up", name))
			if round > 0 {
				cmds = append(cmds, fmt.Sprintf("link del k%d%d", round-1, i))
			}
		}
		ipBatch(t, sb.NS, cmds)
		guard := time.Now().Add(60 * time.Second)
		for strings.Count(p.stderr.String(), fmt.Sprintf(`msg="netmon: link joined the VM" sandbox=%s nic=k%d`, sandboxID, round)) < round {
			if time.Now().After(guard) {
				t.Fatalf("round %d: the agent never joined %d links:\n%s", round, round, p.stderr)
			}
			time.Sleep(time.Millisecond)
		}
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
		p = startAgentProcess(t, sb.Host, args...)
		waitAgent(t, sock, p)

		var want []string
		for i := range links {
			name := fmt.Sprintf("k%d%d", round, i)
			li, err := sb.NS.Link(name)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, fmt.Sprintf("%s %s 10.77.%d.%d/24 %s created netmon", name, li.MAC, round, 2+i, name))
		}
		deadline := time.Now().Add(60 * time.Second)
		var got []string
		for {
			ep := netmonEndpoints(t, a)
			got = got[:0]
			for _, e := range ep {
				created := "adopted"
				if e.TapCreated {
					created = "created"
				}
				got = append(got, fmt.Sprintf("%s %s %s %s %s %s", e.NIC, e.MAC, e.Addr, e.Uplink, created, e.Source))
			}
			slices.Sort(got)
			if slices.Equal(got, want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d (killed after %d joins): never converged\n got %q\nwant %q\nagent:\n%s", round, round, got, want, p.stderr)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("round %d (killed after %d joins): converged; leftover tap removed: %v", round, round, strings.Contains(p.stderr.String(), "removed a tap left behind"))
		taps, err := sb.NS.Exec("ip", "-o", "link", "show", "type", "tun")
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(strings.TrimSpace(taps), "\n") + 1; strings.TrimSpace(taps) == "" || n != links {
			t.Errorf("round %d: taps in the netns:\n%s", round, taps)
		}
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}

func netmonEndpoints(t *testing.T, a *testAgent) []control.EndpointStatus {
	t.Helper()
	var out []control.EndpointStatus
	r := a.cli(t, "", "status", "-o", "json")
	var st []control.SandboxStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status -o json: %v: %q", err, r.stdout)
	}
	for _, s := range st {
		out = append(out, s.Endpoints...)
	}
	return out
}

func ipBatch(t *testing.T, ns *topo.NetNS, cmds []string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "batch")
	if err := os.WriteFile(f, []byte(strings.Join(cmds, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Exec("ip", "-batch", f); err != nil {
		t.Fatalf("ip -batch: %v\n%s", err, out)
	}
}
