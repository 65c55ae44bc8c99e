package deploy

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// goTool is the go command that runs this test, for make to build with.
func goTool(t *testing.T) string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestMakeInstall installs into a temporary DESTDIR as an operator would (`make install
// DESTDIR=...`), then runs the installed binaries: both carry `git describe`'s version. The
// installed unit passes `systemd-analyze verify` without a single warning (it names the
// installed binary), the installed completion scripts parse, and `make uninstall` leaves only
// the config file.
func TestMakeInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make not installed")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.TrimSpace(run(t, root, "git", "describe", "--always", "--dirty", "--tags"))
	dest, out := t.TempDir(), t.TempDir()
	run(t, root, "make", "--no-print-directory", "install", "DESTDIR="+dest, "OUT="+out, "GO="+goTool(t))

	for _, f := range []string{
		"usr/local/bin/kata-dp",
		"opt/cni/bin/kata-dp-cni",
		"usr/local/lib/systemd/system/kata-dp.service",
		"etc/kata-dp/config.yaml",
		"usr/local/share/bash-completion/completions/kata-dp",
		"usr/local/share/zsh/vendor-completions/_kata-dp",
		"usr/local/share/fish/vendor_completions.d/kata-dp.fish",
	} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	if got := run(t, dest, filepath.Join(dest, "usr/local/bin/kata-dp"), "--version"); got != "kata-dp "+want+"\n" {
		t.Errorf("kata-dp --version = %q, want %q", got, "kata-dp "+want)
	}
	if got := run(t, dest, filepath.Join(dest, "opt/cni/bin/kata-dp-cni"), "--version"); got != "kata-dp-cni "+want+"\n" {
		t.Errorf("kata-dp-cni --version = %q, want %q", got, "kata-dp-cni "+want)
	}
	// Static: they run in the scratch image as on the host.
	for _, bin := range []string{"usr/local/bin/kata-dp", "opt/cni/bin/kata-dp-cni"} {
		f, err := elf.Open(filepath.Join(dest, bin))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s is dynamically linked", bin)
			}
		}
		f.Close()
	}
	run(t, dest, "bash", "-n", filepath.Join(dest, "usr/local/share/bash-completion/completions/kata-dp"))
	// The Kubernetes ConfigMap's config is one the agent accepts.
	_, cm, _ := manifests(t)
	cmCfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cmCfg, []byte(cm.Data["config.yaml"]), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, dest, filepath.Join(dest, "usr/local/bin/kata-dp"), "agent", "--config", cmCfg, "--print-config")
	cfg := filepath.Join(dest, "etc/kata-dp/config.yaml")
	if got := run(t, dest, filepath.Join(dest, "usr/local/bin/kata-dp"), "agent", "--config", cfg, "--print-config"); !strings.Contains(got, "socket: /run/kata-dp/kata-dp.sock # default") {
		t.Errorf("installed config: --print-config:\n%s", got)
	}
	// A second install keeps the operator's config.
	if err := os.WriteFile(cfg, []byte("log-level: debug\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, root, "make", "--no-print-directory", "install", "DESTDIR="+dest, "OUT="+out, "GO="+goTool(t))
	if b, _ := os.ReadFile(cfg); string(b) != "log-level: debug\n" {
		t.Errorf("make install replaced the existing config: %q", b)
	}

	defer func() {
		// make uninstall removes every file install put there but the operator's config.
		run(t, root, "make", "--no-print-directory", "uninstall", "DESTDIR="+dest)
		var left []string
		filepath.Walk(dest, func(p string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				left = append(left, strings.TrimPrefix(p, dest+"/"))
			}
			return nil
		})
		if strings.Join(left, ",") != "etc/kata-dp/config.yaml" {
			t.Errorf("left after make uninstall: %v", left)
		}
	}()
	unit, err := os.ReadFile(filepath.Join(dest, "usr/local/lib/systemd/system/kata-dp.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "\nExecStart=/usr/local/bin/kata-dp agent --config /etc/kata-dp/config.yaml\n") {
		t.Errorf("installed unit's ExecStart is not the installed binary:\n%s", unit)
	}
	verifyUnit(t, strings.ReplaceAll(string(unit), "/usr/local/bin/kata-dp", filepath.Join(dest, "usr/local/bin/kata-dp")))
}

// verifyUnit runs `systemd-analyze verify` on the unit text; any output (systemd prints
// unknown keys and bad values and still exits 0) fails the test.
func verifyUnit(t *testing.T, unit string) {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze not installed (hack/install-deps.sh installs Debian's systemd)")
	}
	path := filepath.Join(t.TempDir(), "kata-dp.service")
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
	if err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestUnitPromises checks the unit keeps what docs/install.md promises about it: the datapath
// survives a stop (KillMode=process, no ExecStop), readiness is signalled, and the
// directories and ordering are there.
func TestUnitPromises(t *testing.T) {
	b, err := os.ReadFile("systemd/kata-dp.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{
		"Type=notify", "KillMode=process", "RuntimeDirectory=kata-dp", "StateDirectory=kata-dp",
		"After=sys-fs-bpf.mount", "Before=containerd.service", "RuntimeDirectoryPreserve=yes",
		"CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN",
	} {
		if !strings.Contains(unit, "\n"+want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	for _, bad := range []string{"\nExecStop", "\nExecStopPost"} {
		if strings.Contains(unit, bad) {
			t.Errorf("unit has %s: stopping must not touch the datapath", bad[1:])
		}
	}
}
