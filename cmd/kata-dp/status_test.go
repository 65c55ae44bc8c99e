package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/kata-dp/kata-dp/control"
)

// lineWriter collects output and signals each complete line.
type lineWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines chan string
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadString('\n')
		if err != nil {
			w.buf.WriteString(line) // incomplete: keep it
			return len(p), nil
		}
		w.lines <- line
	}
}

// TestStatusSummaryAndWatch: status starts with a one-line summary; --watch repeats it with
// rates until its context ends; bad --watch arguments are refused.
func TestStatusSummaryAndWatch(t *testing.T) {
	a := startAgent(t)
	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", a.ns.Path()}, result{stdout: sandboxID + "\n"})
	if r := a.runIn(testIface, "kata-network", "add-iface", "6ec7a98", "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v", r)
	}
	got := a.runIn("", "status")
	first, _, _ := strings.Cut(got.stdout, "\n")
	if got.code != 0 || !strings.HasPrefix(first, "1 sandboxes, 1 NICs; from guests ") || !strings.Contains(first, "; drops 0") {
		t.Errorf("status summary line: %q (%+v)", first, got)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &lineWriter{lines: make(chan string, 16)}
	var errb bytes.Buffer
	e := &env{ctx: ctx, stdin: strings.NewReader(""), stdout: w, stderr: &errb,
		args:   []string{"status", "--watch", "--interval", "100ms", "6ec"},
		getenv: func(k string) string { return map[string]string{"KATA_DP_SOCKET": a.sock}[k] }}
	done := make(chan int)
	go func() { done <- e.main() }()
	l1, l2 := <-w.lines, <-w.lines
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("status --watch exit %d: %s", code, errb.String())
	}
	if !strings.Contains(l1, " 1 sandboxes, 1 NICs;") || strings.Contains(l1, "rates:") {
		t.Errorf("first --watch line: %q", l1)
	}
	if !strings.Contains(l2, " 1 sandboxes, 1 NICs;") || !strings.Contains(l2, "; rates: from guests ") {
		t.Errorf("second --watch line: %q", l2)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"status", "--watch", "-o", "json"}, `status: --watch prints lines of text: no --output "json"`},
		{[]string{"status", "--watch", "--interval", "1ms"}, "status: --interval 1ms: want at least 100ms"},
		{[]string{"status", "--watch", "zzz"}, "status: no such container ID (zzz)"},
	} {
		if r := a.runIn("", tc.args...); r.code != 1 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: %+v, want %q", tc.args, r, tc.want)
		}
	}
}

// TestStatusTableMacvtap: in the macvtap modes the TAP column names the device the VM uses, the
// macvtap and its character device, not the tap no frame passes.
func TestStatusTableMacvtap(t *testing.T) {
	var out bytes.Buffer
	st := []control.SandboxStatus{{
		Sandbox: control.Sandbox{ID: "sb1", Mode: control.ModeMacvtapBPF},
		Endpoints: []control.EndpointStatus{
			{NIC: "eth0", Tap: "tap0_kata", TapCreated: true, Mode: control.ModeMacvtapBPF, Macvtap: "kdpmv0", MacvtapDev: "/dev/tap12"},
			{NIC: "eth1", Tap: "tap1_kata", TapCreated: true, Mode: control.ModeTC},
		},
	}}
	if err := statusTable(&env{stdout: &out}, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), " kdpmv0 (macvtap /dev/tap12) ") || strings.Contains(out.String(), "tap0_kata") {
		t.Errorf("macvtap NIC's device not shown:\n%s", out.String())
	}
	if !strings.Contains(out.String(), " tap1_kata ") {
		t.Errorf("tc NIC's tap not shown:\n%s", out.String())
	}
}
