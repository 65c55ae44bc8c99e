package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func completionScript(t *testing.T, shell string) string {
	t.Helper()
	var out, errb bytes.Buffer
	e := &env{ctx: context.Background(), stdin: strings.NewReader(""), stdout: &out, stderr: &errb,
		args: []string{"completion", shell}, getenv: func(string) string { return "" }}
	if code := e.main(); code != 0 {
		t.Fatalf("completion %s: exit %d: %s", shell, code, errb.String())
	}
	return out.String()
}

// TestCompletionScriptsParse: each script is valid for its shell (bash -n, zsh -n,
// fish --no-execute) and bash's really completes commands, sub-verbs and options.
func TestCompletionScriptsParse(t *testing.T) {
	dir := t.TempDir()
	for _, sh := range []struct{ shell, file string }{{"bash", "kata-dp.bash"}, {"zsh", "_kata-dp"}, {"fish", "kata-dp.fish"}} {
		path := filepath.Join(dir, sh.file)
		script := completionScript(t, sh.shell)
		if !strings.Contains(script, "kata-network") || !strings.Contains(script, "metrics-addr") {
			t.Errorf("%s script lacks commands or options:\n%s", sh.shell, script)
		}
		if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
			t.Fatal(err)
		}
		check := []string{"-n", path}
		if sh.shell == "fish" {
			check = []string{"--no-execute", path}
		}
		if _, err := exec.LookPath(sh.shell); err != nil {
			if sh.shell == "bash" {
				t.Fatal("bash not found")
			}
			t.Logf("%s not installed (hack/install-deps.sh installs it): syntax not checked", sh.shell)
			continue
		}
		if out, err := exec.Command(sh.shell, check...).CombinedOutput(); err != nil {
			t.Errorf("%s %v: %v\n%s", sh.shell, check, err, out)
		}
	}
	// Real completions through bash.
	for _, tc := range []struct {
		line string // the words typed, the last one being completed
		want string // one of the completions
	}{
		{"kata-dp sand", "sandbox"},
		{"kata-dp --ver", "--version"},
		{"kata-dp sandbox a", "add"},
		{"kata-dp kata-network add-", "add-route"},
		{"kata-dp agent --metr", "--metrics-addr"},
		{"kata-dp status -", "--output"},
		{"kata-dp completion f", "fish"},
	} {
		words := strings.Fields(tc.line)
		script := `source "$1"; COMP_WORDS=(` + strings.Join(words, " ") + `); COMP_CWORD=` +
			strconv.Itoa(len(words)-1) + `; _kata_dp; printf '%s\n' "${COMPREPLY[@]}"`
		out, err := exec.Command("bash", "-c", script, "bash", filepath.Join(dir, "kata-dp.bash")).CombinedOutput()
		if err != nil {
			t.Fatalf("%q: %v\n%s", tc.line, err, out)
		}
		if !strings.Contains("\n"+string(out), "\n"+tc.want+"\n") {
			t.Errorf("%q completes to %q, want %q among them", tc.line, out, tc.want)
		}
	}
}
