package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
)

// TestKataIPVSUserGuide runs the user guide's kata-ipvs commands through the real CLI against
// the real agent (BPF dataplane), checking stdout, stderr and exit codes byte for byte, and that
// the rules survive an agent restart.
func TestKataIPVSUserGuide(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane")
	ns := topotest.MustNetNS(t, "kdptv")
	sock, args := agentFiles(t, "kdptv")
	p := startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock, ns: ns}
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", ns.Path()}, result{stdout: sandboxID + "\n"})

	ipvsadm := func(params string, want result) {
		t.Helper()
		a.check(t, "", []string{"kata-ipvs", "ipvsadm", "--parameters", params, "6ec7a98"}, want)
	}
	ok := result{}
	ipvsadm("--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000", ok)
	ipvsadm("--edit-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 5000", ok)
	ipvsadm("--add-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 100", ok)
	ipvsadm("--edit-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 200", ok)
	list := "IP Virtual Server version 1.2.1 (size=4096)\n" +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  172.17.0.7:80 rr persistent 5000\n" +
		"  -> 172.17.0.4:80                Masq    200    0          0         \n"
	ipvsadm("--list", result{stdout: list})
	ipvsadm("-L -n", result{stdout: list})
	ipvsadm("--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 60", result{stderr: "Service already exists: \"-t 172.17.0.7:80\"\n", code: 1})
	// openEuler's API table: --scheduler and --persistent are mandatory (issue 18 item 6).
	ipvsadm("--add-service --tcp-service 192.168.0.7:80 --persistent 3000", result{stderr: "You need to supply the 'scheduler' option for the 'add-service' command: \"--add-service\"\n", code: 1})
	ipvsadm("-E -t 172.17.0.7:80 -s rr", result{stderr: "You need to supply the 'persistent' option for the 'edit-service' command: \"-E\"\n", code: 1})
	ipvsadm("--add-server --tcp-service 172.17.0.9:80 --real-server 172.17.0.4:80", result{stderr: "Service not defined: \"-t 172.17.0.9:80\"\n", code: 1})
	ipvsadm("--set 100 100 200", ok)
	ipvsadm("--save", result{stdout: "-A -t 172.17.0.7:80 -s rr -p 5000\n-a -t 172.17.0.7:80 -r 172.17.0.4:80 -m -w 200\n"})

	// Restore is refused while rules exist; after --clear it takes the user guide's file.
	rules := "-A -t 10.10.11.12:100 -s rr -p  3000\n-a -t 10.10.11.12:100 -r  172.16.0.1:80 -m\n" +
		"-a -t 10.10.11.12:100 -r  172.16.0.1:81 -m\n-a -t 10.10.11.12:100 -r 172.16.0.1:82  -m\n"
	restore := []string{"kata-ipvs", "ipvsadm", "--restore", "-", "6ec7a98"}
	if r := a.cli(t, rules, restore...); r.code != 1 || !strings.Contains(r.stderr, "clear") {
		t.Errorf("restore into a full table: %+v", r)
	}
	ipvsadm("--clear", ok)
	a.check(t, rules, restore, ok)
	saved := "-A -t 10.10.11.12:100 -s rr -p 3000\n" +
		"-a -t 10.10.11.12:100 -r 172.16.0.1:80 -m -w 1\n" +
		"-a -t 10.10.11.12:100 -r 172.16.0.1:81 -m -w 1\n" +
		"-a -t 10.10.11.12:100 -r 172.16.0.1:82 -m -w 1\n"
	ipvsadm("-S", result{stdout: saved})
	a.check(t, "", []string{"kata-ipvs", "cleanup", "--parameters", "--orig-dst 172.17.0.4 --protonum tcp", "6ec7a98"}, ok)
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--restore", "rules.txt", "6ec7a98"); r.code != 1 || !strings.Contains(r.stderr, `accepts only "-"`) {
		t.Errorf("--restore with a file: %+v", r)
	}
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", "--list", "nosuch"); r.code != 1 || r.stderr != "no such container ID (nosuch)\n" {
		t.Errorf("unknown sandbox: %+v", r)
	}

	// The rules survive an agent restart.
	p.cmd.Process.Kill()
	p.cmd.Wait()
	p = startAgentProcess(t, ns, args...)
	waitAgent(t, sock, p)
	ipvsadm("--save", result{stdout: saved})
	a.check(t, "", []string{"sandbox", "del", sandboxID}, ok)
}

// TestKataIPVSRestoreShapes: a restore from the command line, which the CLI sends to the agent
// while it starts (internal/headstart reads the command line before main does), in every
// form of the command line that it takes, from a pipe and from a regular file, and in forms it
// leaves to main; each must restore the rules as the command line says (the CLI fails if the
// two readings of the command line disagree).
func TestKataIPVSRestoreShapes(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane")
	ns := topotest.MustNetNS(t, "kdptr")
	a, _ := startTestAgent(t, ns, ns, "kdptr")
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", ns.Path()}, result{stdout: sandboxID + "\n"})
	rules := "-A -t 10.10.11.12:100 -s rr\n-a -t 10.10.11.12:100 -r 172.16.0.1:80 -m\n"
	saved := "-A -t 10.10.11.12:100 -s rr\n-a -t 10.10.11.12:100 -r 172.16.0.1:80 -m -w 1\n"
	ok := result{}
	for _, args := range [][]string{
		{"kata-ipvs", "ipvsadm", "--restore", "-", "6ec7a98"},
		{"kata-ipvs", "ipvsadm", "--restore=-", "6ec7a98"},
		{"kata-ipvs", "--restore", "-", "ipvsadm", "6ec7a98"},
		{"kata-ipvs", "ipvsadm", "6ec7a98", "--restore", "-", "--socket", a.sock},
		{"kata-ipvs", "--socket=" + a.sock, "ipvsadm", "--restore", "-", sandboxID},
		{"kata-ipvs", "ipvsadm", "--restore", "-", "--timeout", "10s", "6ec7a98"}, // left to main
	} {
		for _, from := range []string{"pipe", "file"} {
			if from == "pipe" {
				a.check(t, rules, args, ok)
			} else {
				f, err := os.Create(filepath.Join(t.TempDir(), "rules"))
				if err == nil {
					_, err = f.WriteString("# skipped\n" + rules)
				}
				if err == nil {
					_, err = f.Seek(int64(len("# skipped\n")), 0)
				}
				if err != nil {
					t.Fatal(err)
				}
				cmd := exec.Command(os.Args[0], args...)
				cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1", "KATA_DP_SOCKET="+a.sock)
				cmd.Stdin = f
				if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
					t.Errorf("kata-dp %s < file: %v\n%s", strings.Join(args, " "), err, out)
				}
				f.Close()
			}
			a.check(t, "", []string{"kata-ipvs", "ipvsadm", "--parameters", "-S", "6ec7a98"}, result{stdout: saved})
			a.check(t, rules, args, result{stderr: "restore refused: the sandbox has rules (run --clear first)\n", code: 1})
			a.check(t, "", []string{"kata-ipvs", "ipvsadm", "--parameters", "--clear", "6ec7a98"}, ok)
		}
	}
	a.check(t, rules, []string{"kata-ipvs", "ipvsadm", "--restore", "-", "nosuch"}, result{stderr: "no such container ID (nosuch)\n", code: 1})
	a.check(t, "-A -t 10.10.11.12:100 -s nope\n", []string{"kata-ipvs", "ipvsadm", "--restore", "-", "6ec7a98"}, result{stderr: "line 1: Scheduler or persistence engine not found: \"nope\"\n", code: 1})
}
