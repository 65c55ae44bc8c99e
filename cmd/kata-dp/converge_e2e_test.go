package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

// killSteps are the fault points of control (internal/faultinject), in the order the script
// below reaches them.
var killSteps = []string{
	"sandbox-add:intent", "sandbox-add:dataplane",
	"add-iface:intent", "add-iface:tap", "add-iface:endpoint", "add-iface:plug",
	"del-iface:intent", "del-iface:unplug", "del-iface:routes", "del-iface:endpoint", "del-iface:tap",
	"sandbox-del:intent", "sandbox-del:endpoints", "sandbox-del:dataplane",
}

// TestE2EKillAtEveryStep runs the real agent with a real QEMU guest and kills it (SIGKILL,
// from inside, at a named step) at each step of sandbox add, add-iface, del-iface and sandbox
// del in turn; restarts it, retries the command, and checks after add-iface that the guest
// has the NIC and traffic flows through the BPF path, and at the end that nothing is left:
// no tap, no pins, no state, nothing of kata-dp's in QEMU.
func TestE2EKillAtEveryStep(t *testing.T) {
	topotest.RequireRoot(t, "runs QEMU and the BPF dataplane in namespaces")
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptk", NoTap: true})
	const mac = "02:42:20:6f:a3:71"
	g := guesttest.Boot(t, guesttest.GuestConfig{NetNS: sb.NS.Path(), NetTable: map[string]string{mac: "10.199.0.2/24"}})
	dir := t.TempDir()
	sock, state := filepath.Join(dir, "kata-dp.sock"), filepath.Join(dir, "state")
	bpffs := topotest.BPFFS(t, "kdptk")
	args := []string{"--socket", sock, "--state-dir", state, "--bpffs-root", bpffs}
	a := &testAgent{sock: sock, ns: sb.NS}
	const id = "kill9"
	iface := `{"device":"tap-k","name":"eth-k","IPAddresses":[{"address":"10.199.0.2","mask":"24"}],"hwAddr":"` + mac + `","mtu":1500,"queues":2}`

	for _, step := range killSteps {
		t.Run(step, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			p := startKillable(t, sb.Host, step, args...)
			waitAgent(t, sock, p.agentProcess)
			killed := false
			// run runs one command; when the agent died at the step, it restarts the agent
			// (no kill point) and runs the command again.
			run := func(stdin string, okGone bool, cmd ...string) result {
				t.Helper()
				r := a.cli(t, stdin, cmd...)
				if r.code == 0 {
					return r // every kill point comes before the reply
				}
				select {
				case <-p.done:
				case <-time.After(10 * time.Second): // bounded: a killed agent is reaped long before
					t.Fatalf("kata-dp %v: %+v\nagent:\n%s", cmd, r, p.stderr)
				}
				if killed {
					t.Fatalf("agent died twice:\n%s", p.stderr)
				}
				killed = true
				p = startKillable(t, sb.Host, "", args...)
				waitAgent(t, sock, p.agentProcess)
				r = a.cli(t, stdin, cmd...)
				if r.code != 0 && !(okGone && strings.Contains(r.stderr, "no such")) {
					t.Fatalf("kata-dp %v retried after a kill at %s: %+v\nagent:\n%s", cmd, step, r, p.stderr)
				}
				return r
			}
			run("", false, "sandbox", "add", id, "--netns", sb.NS.Path(), "--qmp", g.QMPPath)
			from := g.Lines()
			run(iface, false, "kata-network", "add-iface", id, "-")
			if _, err := g.WaitNICUp(ctx, from, mac); err != nil {
				t.Fatalf("guest never saw the NIC: %v\n%s", err, g.Log())
			}
			if err := sb.Host.Ping("10.199.0.2", 2, 10*time.Second); err != nil {
				t.Fatalf("ping the guest: %v", err)
			}
			a.check(t, "", []string{"kata-network", "list-ifaces", id}, result{stdout: `[{"name":"eth-k","mac":"` + mac + `","ip":["10.199.0.2/24"],"mtu":1500}]` + "\n"})
			from = g.Lines()
			run(`{"name":"eth-k"}`, false, "kata-network", "del-iface", id, "-")
			if err := g.WaitNICGone(ctx, from, mac); err != nil {
				t.Fatalf("guest still has the NIC: %v", err)
			}
			run("", true, "sandbox", "del", id)
			if !killed {
				t.Errorf("the agent never reached %s", step)
			}

			// Nothing left: stop the agent (it holds QMP's only client), then look.
			p.cmd.Process.Signal(syscall.SIGTERM)
			<-p.done
			if _, err := sb.NS.Link("tap-k"); err == nil {
				t.Error("tap left behind")
			}
			if ents, _ := os.ReadDir(bpffs); len(ents) != 0 {
				t.Errorf("pins left behind: %v", ents)
			}
			if ents, _ := os.ReadDir(state); len(ents) != 0 {
				var names []string
				for _, e := range ents {
					names = append(names, e.Name())
				}
				if !(len(names) == 1 && names[0] == "ipvs") {
					t.Errorf("state left behind: %v", names)
				}
			}
			c := qmp.New(g.QMPPath)
			defer c.Close()
			for _, hmp := range []string{"info network", "info qtree", "info chardev"} {
				out, err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": hmp})
				if err != nil {
					t.Fatal(err)
				}
				if strings.Contains(string(out), "kdp-") {
					t.Errorf("QEMU still has kata-dp's objects (%s):\n%s", hmp, out)
				}
			}
		})
	}
}

// killable is an agent process started with a kill point, and a channel closed when it exits.
type killable struct {
	*agentProcess
	done chan struct{}
}

func startKillable(t *testing.T, ns *topo.NetNS, step string, args ...string) *killable {
	t.Helper()
	p := &agentProcess{stderr: &syncBuffer{}}
	p.cmd = exec.Command("nsenter", append([]string{"--net=" + ns.Path(), os.Args[0], "agent"}, args...)...)
	p.cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1", "KDP_TEST_KILL_AT="+step)
	p.cmd.Stderr = p.stderr
	if err := proctest.Start(p.cmd); err != nil {
		t.Fatal(err)
	}
	k := &killable{agentProcess: p, done: make(chan struct{})}
	go func() { p.cmd.Wait(); close(k.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-k.done
	})
	return k
}
