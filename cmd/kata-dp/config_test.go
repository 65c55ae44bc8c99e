package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/pflag"
)

// runCLI runs kata-dp in-process with args and no agent.
func runCLI(args ...string) result {
	var out, errb bytes.Buffer
	e := &env{ctx: context.Background(), stdin: strings.NewReader(""), stdout: &out, stderr: &errb, args: args,
		getenv: func(string) string { return "" }}
	code := e.main()
	return result{out.String(), errb.String(), code}
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConfigPrecedence: the file sets what the command line does not; the command line wins;
// --print-config shows the effective values and each one's source.
func TestConfigPrecedence(t *testing.T) {
	p := writeConfig(t, "# comment\nsocket: /run/file.sock\nlog-level: debug\nmetrics-addr: 127.0.0.1:9464\n")
	got := runCLI("agent", "--config", p, "--socket", "/run/flag.sock", "--print-config")
	want := "# effective kata-dp agent configuration (config file: " + p + ")\n\n" +
		"bpffs-root: /sys/fs/bpf/kata-dp # default\n" +
		"cluster-max-rules: \"20000\" # default\n" +
		"kata-dir: /run/vc # default\n" +
		"kube-in-cluster: false # default\n" +
		"kubeconfig: \"\" # default\n" +
		"log-format: text # default\n" +
		"log-level: debug # file\n" +
		"metrics-addr: 127.0.0.1:9464 # file\n" +
		"metrics-allow-remote: false # default\n" +
		"node-name: \"\" # default\n" +
		"socket: /run/flag.sock # flag\n" +
		"state-dir: /var/lib/kata-dp # default\n"
	if d := cmp.Diff(result{stdout: want}, got, cmp.AllowUnexported(result{})); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	// The printed configuration is itself a valid config file giving the same values.
	again := runCLI("agent", "--config", writeConfig(t, got.stdout), "--print-config")
	if d := cmp.Diff(stripSources(got.stdout), stripSources(again.stdout)); again.code != 0 || d != "" {
		t.Errorf("printed config does not load back (%+v):\n%s", again, d)
	}
	// An empty or comment-only file is all defaults; no file at the default path is no error.
	for _, text := range []string{"", "# nothing\n"} {
		if r := runCLI("agent", "--config", writeConfig(t, text), "--print-config"); r.code != 0 || !strings.Contains(r.stdout, "socket: /run/kata-dp/kata-dp.sock # default") {
			t.Errorf("config %q: %+v", text, r)
		}
	}
	if _, err := loadConfig(agentFlagSet(t), filepath.Join(t.TempDir(), "absent.yaml"), false, agentChecks); err != nil {
		t.Errorf("absent default config: %v", err)
	}
}

// agentFlagSet returns the agent's FlagSet as runAgent defines it.
func agentFlagSet(t *testing.T) *pflag.FlagSet {
	t.Helper()
	var fs *pflag.FlagSet
	e := &env{ctx: context.Background(), stdin: strings.NewReader(""), stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{},
		getenv: func(string) string { return "" }, onFlagSet: func(f *pflag.FlagSet) { fs = f }}
	runAgent(e, []string{"--help"})
	return fs
}

// TestConfigErrors: every refusal names the file, the line and the key.
func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ text, want string }{
		{"socket: /run/a.sock\nlog-levle: debug\n", ":2: log-levle: unknown key"},
		{"\n\nlog-level: loud\n", `:3: log-level: "loud": slog: level string "loud": unknown name`},
		{"log-format: xml\n", `:1: log-format: "xml": want text or json`},
		{"state-dir: var/lib\n", `:1: state-dir: "var/lib": want an absolute path`},
		{"metrics-addr: 9464\n", `:1: metrics-addr: "9464": address 9464: missing port in address`},
		{"socket: /a\nsocket: /b\n", ":2: socket: repeated (first on line 1)"},
		{"socket:\n  - /a\n", ":1: socket: want a single value"},
		{"socket:\n", ":1: socket: want a single value"},
		{"config: /etc/other.yaml\n", ":1: config: unknown key"},
		{"print-config: true\n", ":1: print-config: unknown key"},
		{"- socket\n", ":1: want a mapping of option: value"},
		{"socket: [\n", "yaml: line 1: did not find expected node content"},
	} {
		p := writeConfig(t, tc.text)
		got := runCLI("agent", "--config", p, "--print-config")
		if got.code != 1 || got.stdout != "" || !strings.HasPrefix(got.stderr, "agent: config "+p) || !strings.Contains(got.stderr, tc.want) {
			t.Errorf("config %q: got %+v, want an error with %q", tc.text, got, tc.want)
		}
	}
	// A bad value on the command line is refused as such, before the file is read.
	if got := runCLI("agent", "--config", "", "--log-format", "xml", "--print-config"); got.stderr != "agent: --log-format \"xml\": want text or json\n" {
		t.Errorf("bad flag: %+v", got)
	}
	// The metrics listener has no authentication: a non-loopback address needs
	// --metrics-allow-remote (refused before the agent starts anything).
	if got := runCLI("agent", "--config", "", "--metrics-addr", "0.0.0.0:9464"); got.code != 1 ||
		!strings.HasPrefix(got.stderr, `agent: --metrics-addr "0.0.0.0:9464": "0.0.0.0": not a loopback address`) {
		t.Errorf("non-loopback metrics address: %+v", got)
	}
	// A config file named explicitly must exist.
	if got := runCLI("agent", "--config", "/nonexistent/kata-dp.yaml", "--print-config"); got.code != 1 || !strings.Contains(got.stderr, "/nonexistent/kata-dp.yaml: no such file") {
		t.Errorf("missing config: %+v", got)
	}
}

// TestShippedConfig: deploy/config.yaml names every agent option, and with every line
// uncommented it loads and gives exactly the defaults (so the file never lies about them).
func TestShippedConfig(t *testing.T) {
	b, err := os.ReadFile("../../deploy/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	uncomment := regexp.MustCompile(`(?m)^#([a-z-]+: )`)
	p := writeConfig(t, uncomment.ReplaceAllString(string(b), "$1"))
	got := runCLI("agent", "--config", p, "--print-config")
	if got.code != 0 {
		t.Fatalf("shipped config: %+v", got)
	}
	defaults := runCLI("agent", "--config", "", "--print-config")
	if d := cmp.Diff(stripSources(defaults.stdout), stripSources(got.stdout)); d != "" {
		t.Errorf("deploy/config.yaml's values are not the defaults (-defaults +file):\n%s", d)
	}
	if strings.Contains(got.stdout, "# default") {
		t.Errorf("deploy/config.yaml lacks options:\n%s", got.stdout)
	}
}

// stripSources drops --print-config's header and source comments.
func stripSources(s string) string {
	s = s[strings.Index(s, "\n\n"):]
	return regexp.MustCompile(` # (file|flag|default)\n`).ReplaceAllString(s, "\n")
}
