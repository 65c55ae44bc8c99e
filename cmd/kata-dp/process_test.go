package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

// agentProcess is the real agent binary (this test binary in main mode, with the production
// dependency factory) running in the test netns, so its metrics port is on that netns's
// loopback.
type agentProcess struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
}

// startAgentProcess starts the agent in ns, or in the test's own netns when ns is nil (the
// Kubernetes tests: the API server listens on its loopback).
func startAgentProcess(t *testing.T, ns *topo.NetNS, args ...string) *agentProcess {
	t.Helper()
	p := &agentProcess{stderr: &syncBuffer{}}
	argv := append([]string{os.Args[0], "agent"}, args...)
	if ns != nil {
		argv = append([]string{"nsenter", "--net=" + ns.Path()}, argv...)
	}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1")
	p.cmd.Stderr = p.stderr
	if err := proctest.Start(p.cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			p.cmd.Wait()
		}
	})
	return p
}

// agentFiles gives an agent of the test a socket and a state directory in a directory of the
// test's, and a bpffs root named from prefix (removed when the test ends); args are the agent's
// flags for them, then extra. A test that restarts the agent starts it with args again.
func agentFiles(t *testing.T, prefix string, extra ...string) (sock string, args []string) {
	t.Helper()
	dir := t.TempDir()
	sock = filepath.Join(dir, "kata-dp.sock")
	args = append([]string{"--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--bpffs-root", topotest.BPFFS(t, prefix)}, extra...)
	return sock, args
}

// startTestAgent starts the agent in host with a socket, state directory and bpffs root of its own
// (the root named from prefix, removed when the test ends), plus extra flags, and waits until
// it serves; the CLI of the returned testAgent talks to it, its kata-network calls naming ns.
func startTestAgent(t *testing.T, host, ns *topo.NetNS, prefix string, extra ...string) (*testAgent, *agentProcess) {
	t.Helper()
	sock, args := agentFiles(t, prefix, extra...)
	p := startAgentProcess(t, host, args...)
	waitAgent(t, sock, p)
	return &testAgent{sock: sock, ns: ns}, p
}

func waitAgent(t *testing.T, sock string, p *agentProcess) {
	t.Helper()
	c := api.NewClient(sock)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := c.Version(context.Background()); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent did not come up:\n%s", p.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentProcessKill9 runs the real agent process: state survives kill -9 without
// re-creating anything, metrics are served, SIGTERM stops it cleanly and removes its socket.
func TestAgentProcessKill9(t *testing.T) {
	topotest.RequireRoot(t, "creates network namespaces and taps")
	ns := topotest.MustNetNS(t, "kdptc")
	if _, err := ns.Exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "kdptc-peer"); err != nil {
		t.Fatal(err)
	}
	sock, args := agentFiles(t, "kdptc", "--metrics-addr", "127.0.0.1:19400")
	p := startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: ns}

	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", ns.Path()}, result{stdout: sandboxID + "\n"})
	a.check(t, testIface, []string{"kata-network", "add-iface", "6ec", "-"}, result{
		stdout: `{"device":"tap-test","name":"eth-test","IPAddresses":[{"Family":2,"Address":"172.16.0.3","Mask":"16"}],"mtu":1500,"hwAddr":"02:42:20:6f:a3:69","queues":5}` + "\n"})
	a.check(t, `{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}`, []string{"kata-network", "add-route", "6ec", "-"}, result{
		stdout: `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"})
	tap, err := ns.Link("tap-test")
	if err != nil {
		t.Fatal(err)
	}

	// Metrics, on the netns's loopback.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) {
		return ns.Dial("tcp", "127.0.0.1:19400", 5*time.Second)
	}}}
	resp, err := hc.Get("http://metrics/metrics")
	if err != nil {
		t.Fatalf("metrics: %v\n%s", err, p.stderr)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`kata_dp_agent_info{version="dev"} 1`,
		`kata_dp_operations_total{op="add-iface",result="ok"} 1`,
		`kata_dp_operations_total{op="sandbox-add",result="ok"} 1`,
		`kata_dp_endpoint_packets_total{direction="from_guest",mode="tc",nic="eth-test",sandbox="` + sandboxID + `"}`,
		`kata_dp_endpoints{sandbox="` + sandboxID + `"} 1`,
		`kata_dp_sandboxes{state="ready"} 1`,
		`kata_dp_conntrack_capacity{sandbox="` + sandboxID + `"} 16384`,
		`kata_dp_bpf_map_memory_bytes{map="kdp_lb_ct2",sandbox="` + sandboxID + `"}`,
		`kata_dp_reconciles_total{result="error"} 0`,
	} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Health: alive and ready (state loaded, datapaths re-adopted, API serving).
	for _, path := range []string{"/healthz", "/readyz?verbose"} {
		resp, err := hc.Get("http://metrics" + path)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !bytes.HasSuffix(body, []byte("ok\n")) {
			t.Errorf("%s = %d %q, want 200 ok", path, resp.StatusCode, body)
		}
	}

	// kill -9, restart: the same state, nothing re-created.
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	p = startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	a.check(t, "", []string{"kata-network", "list-ifaces", "6ec"}, result{stdout: `[{"name":"eth-test","mac":"02:42:20:6f:a3:69","ip":["172.16.0.3/16"],"mtu":1500}]` + "\n"})
	a.check(t, "", []string{"kata-network", "list-routes", "6ec"}, result{stdout: `[{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}]` + "\n"})
	if tap2, err := ns.Link("tap-test"); err != nil || tap2.Index != tap.Index {
		t.Errorf("tap re-created: %+v -> %+v (%v)", tap, tap2, err)
	}

	// SIGTERM: clean exit, socket removed, tap (the dataplane's business) left in place.
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("agent exit on SIGTERM: %v\n%s", err, p.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after SIGTERM: %v", err)
	}
	if _, err := ns.Link("tap-test"); err != nil {
		t.Errorf("tap gone after agent stop: %v", err)
	}
	p = startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
	if _, err := ns.Link("tap-test"); err == nil {
		t.Error("tap survived sandbox del")
	}
	if !strings.Contains(p.stderr.String(), "PLACEHOLDER DATAPLANE") {
		t.Log("agent runs with a real dataplane")
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.cmd.Wait()
}
