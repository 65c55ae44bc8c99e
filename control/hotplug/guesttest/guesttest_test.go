package guesttest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestCmdline(t *testing.T) {
	got := cmdline(GuestConfig{
		NetTable:   map[string]string{"02:42:20:6F:A3:69": "172.16.0.3/16@1400", "02:00:00:00:00:01": "10.0.0.2/24"},
		Gateway:    "172.16.0.1",
		KernelArgs: []string{"loglevel=7"},
	})
	want := "console=ttyS0 quiet panic=-1 kdp.net=02:00:00:00:00:01=10.0.0.2/24,02:42:20:6f:a3:69=172.16.0.3/16@1400 kdp.gw=172.16.0.1 loglevel=7"
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("cmdline (-want +got):\n%s", diff)
	}
}

func TestStripEscapes(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                               "plain",
		"\x1bc\x1b[?7l\x1b[2JKDP-GUEST-READY": "KDP-GUEST-READY",
		"a\x1b[0mb":                           "ab",
	} {
		if got := stripEscapes(in); got != want {
			t.Errorf("stripEscapes(%q) = %q, want %q", in, got, want)
		}
	}
}
