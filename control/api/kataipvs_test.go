package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
)

// fakeLB is a kata-ipvs dataplane that keeps the last table of each sandbox as ipvsadm-save
// lines.
type fakeLB struct {
	mu     sync.Mutex
	tables map[string]string
}

func (f *fakeLB) SetLB(_ context.Context, id string, t *ipvs.Table) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tables[id] = t.Save()
	return nil
}
func (f *fakeLB) RestoreLB(ctx context.Context, id string, t *ipvs.Table) error {
	return f.SetLB(ctx, id, t)
}
func (f *fakeLB) LBCounters(context.Context, string) (ipvs.Counters, error) { return nil, nil }
func (f *fakeLB) CleanupConns(context.Context, string, netip.Addr, uint8) (int, error) {
	return 0, nil
}

// TestKataIPVS runs the kata-ipvs calls through the client and the server: the listing and
// save output as ipvsadm prints them, a restore, cleanup, and failures with their kinds.
func TestKataIPVS(t *testing.T) {
	_, c, _ := newAgent(t)
	ctx := context.Background()
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "ipvs1", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	call := func(op string, req IPVSRequest, want string) {
		t.Helper()
		out, err := c.KataIPVS(ctx, "ipvs", op, req)
		if err != nil || out != want {
			t.Errorf("kata-ipvs %s %+v = %q, %v; want %q", op, req, out, err, want)
		}
	}
	call(IPVSOpIpvsadm, IPVSRequest{Parameters: "-A -t 172.17.0.7:80 -s rr -p 3000"}, "")
	call(IPVSOpIpvsadm, IPVSRequest{Parameters: "-a -t 172.17.0.7:80 -r 172.17.0.4:80 -w 100"}, "")
	call(IPVSOpIpvsadm, IPVSRequest{Parameters: "--list"}, "IP Virtual Server version 1.2.1 (size=4096)\n"+
		"Prot LocalAddress:Port Scheduler Flags\n"+
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"+
		"TCP  172.17.0.7:80 rr persistent 3000\n"+
		"  -> 172.17.0.4:80                Masq    100    0          0         \n")
	call(IPVSOpIpvsadm, IPVSRequest{Parameters: "--clear"}, "")
	call(IPVSOpRestore, IPVSRequest{Rules: "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m\n"}, "")
	call(IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"}, "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m -w 1\n")
	call(IPVSOpCleanup, IPVSRequest{Parameters: "--orig-dst 10.96.0.10 --protonum udp"}, "")

	for _, tc := range []struct {
		id, op string
		req    IPVSRequest
		want   error
		msg    string
	}{
		{"nope", IPVSOpIpvsadm, IPVSRequest{Parameters: "--list"}, control.ErrNoSuchSandbox, "no such container ID (nope)"},
		{"ipvs", IPVSOpIpvsadm, IPVSRequest{Parameters: "-A -t 10.0.0.1:80 -s rr -p 30"}, nil, ""},
		{"ipvs", IPVSOpIpvsadm, IPVSRequest{Parameters: "-A -t 10.0.0.1:80 -s rr -p 30"}, nil, `Service already exists: "-t 10.0.0.1:80"`},
		{"ipvs", IPVSOpRestore, IPVSRequest{Rules: "-A -t 10.0.0.2:80 -s rr\n"}, nil, ipvsctl.ErrRestoreNotEmpty.Error()},
	} {
		_, err := c.KataIPVS(ctx, tc.id, tc.op, tc.req)
		switch {
		case tc.msg == "" && err != nil:
			t.Errorf("kata-ipvs %s %+v: %v", tc.op, tc.req, err)
		case tc.msg != "" && (err == nil || err.Error() != tc.msg):
			t.Errorf("kata-ipvs %s %+v = %v, want %q", tc.op, tc.req, err, tc.msg)
		case tc.want != nil && !errors.Is(err, tc.want):
			t.Errorf("kata-ipvs %s %+v = %v, want errors.Is %v", tc.op, tc.req, err, tc.want)
		}
	}
}

// TestKataIPVSRestoreRules: a restore with the rules file as the body gives what the JSON call
// gives (the rules, the refusal of a second restore), and against an agent without that call
// (an older version) the client falls back to the JSON call.
func TestKataIPVSRestoreRules(t *testing.T) {
	_, c, _ := newAgent(t)
	ctx := context.Background()
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "ipvs2", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	rules := "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m\n"
	if err := c.KataIPVSRestore(ctx, "ipvs2", strings.NewReader(rules)); err != nil {
		t.Fatal(err)
	}
	out, err := c.KataIPVS(ctx, "ipvs2", IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"})
	if want := "-A -u 10.96.0.10:53 -s wlc\n-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m -w 1\n"; err != nil || out != want {
		t.Errorf("after the restore, -S = %q, %v; want %q", out, err, want)
	}
	if err := c.KataIPVSRestore(ctx, "ipvs2", strings.NewReader(rules)); err == nil || err.Error() != ipvsctl.ErrRestoreNotEmpty.Error() {
		t.Errorf("second restore = %v, want %q", err, ipvsctl.ErrRestoreNotEmpty)
	}
	if err := c.KataIPVSRestore(ctx, "nope", strings.NewReader(rules)); !errors.Is(err, control.ErrNoSuchSandbox) {
		t.Errorf("restore into no sandbox = %v, want ErrNoSuchSandbox", err)
	}

	// From a regular file (sent with its length, from where the file stands) and from a pipe
	// (chunked), as the CLI sends its standard input.
	for _, from := range []string{"file", "pipe"} {
		if _, err := c.KataIPVS(ctx, "ipvs2", IPVSOpIpvsadm, IPVSRequest{Parameters: "--clear"}); err != nil {
			t.Fatal(err)
		}
		var in *os.File
		if from == "file" {
			in, err = os.Create(filepath.Join(t.TempDir(), "rules"))
			if err == nil {
				_, err = in.WriteString("# skipped\n" + rules)
			}
			if err == nil {
				_, err = in.Seek(int64(len("# skipped\n")), 0)
			}
		} else {
			var w *os.File
			if in, w, err = os.Pipe(); err == nil {
				go func() { w.WriteString(rules); w.Close() }()
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := c.KataIPVSRestore(ctx, "ipvs2", in); err != nil {
			t.Errorf("restore from a %s: %v", from, err)
		}
		in.Close()
		if out, err := c.KataIPVS(ctx, "ipvs2", IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"}); err != nil || !strings.Contains(out, "10.244.1.2:53") {
			t.Errorf("after the restore from a %s, -S = %q, %v", from, out, err)
		}
	}
	// Rules that cannot be read, or too many bytes of them: the reading's error, nothing
	// restored.
	if _, err := c.KataIPVS(ctx, "ipvs2", IPVSOpIpvsadm, IPVSRequest{Parameters: "--clear"}); err != nil {
		t.Fatal(err)
	}
	bad := io.MultiReader(strings.NewReader(rules), iotest.ErrReader(errors.New("disk on fire")))
	if err := c.KataIPVSRestore(ctx, "ipvs2", bad); err == nil || err.Error() != "kata-ipvs: read rules: disk on fire" {
		t.Errorf("restore of unreadable rules = %v", err)
	}
	big := io.MultiReader(strings.NewReader(rules), strings.NewReader(strings.Repeat("#\n", MaxRestoreSize/2+1)))
	if err := c.KataIPVSRestore(ctx, "ipvs2", big); err == nil || err.Error() != fmt.Sprintf("kata-ipvs: rules file too big (more than %d bytes)", MaxRestoreSize) {
		t.Errorf("restore of too many bytes = %v", err)
	}
	if out, err := c.KataIPVS(ctx, "ipvs2", IPVSOpIpvsadm, IPVSRequest{Parameters: "-S"}); err != nil || out != "" {
		t.Errorf("after the failed restores, -S = %q, %v; want no rules", out, err)
	}

	// An older agent: only the JSON call.
	sock, got := fakeOlderAgent(t)
	if err := NewClient(sock).KataIPVSRestore(ctx, "x", strings.NewReader(rules)); err != nil {
		t.Fatal(err)
	}
	if got.Rules != rules {
		t.Errorf("older agent got rules %q, want %q", got.Rules, rules)
	}
}

// fakeOlderAgent serves, on a socket of the test's, what an agent before restore-rules serves of a
// restore: only the JSON call (every other path is a 404). got is the request it was sent.
func fakeOlderAgent(t *testing.T) (sock string, got *IPVSRequest) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "old.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got = new(IPVSRequest)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/sandboxes/{id}/kata-ipvs/restore", func(w http.ResponseWriter, r *http.Request) {
		if err := json.NewDecoder(r.Body).Decode(got); err != nil {
			t.Error(err)
		}
		WriteJSON(w, http.StatusOK, IPVSResult{})
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock, got
}
