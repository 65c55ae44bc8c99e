package headstart

import (
	"strconv"
	"testing"
)

func TestRestoreArgs(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		sock, id string
		ok       bool
	}{
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "6ec7a98"}, "", "6ec7a98", true},
		{[]string{"kata-ipvs", "ipvsadm", "--restore=-", "6ec7a98"}, "", "6ec7a98", true},
		{[]string{"kata-ipvs", "--restore", "-", "ipvsadm", "6ec7a98"}, "", "6ec7a98", true},
		{[]string{"kata-ipvs", "ipvsadm", "6ec7a98", "--restore", "-"}, "", "6ec7a98", true},
		{[]string{"kata-ipvs", "ipvsadm", "--socket", "/s", "--restore", "-", "a_b.c~d-e"}, "/s", "a_b.c~d-e", true},
		{[]string{"kata-ipvs", "--socket=/run/x.sock", "ipvsadm", "--restore", "-", "sb"}, "/run/x.sock", "sb", true},
		// Left to main: what this package does not read as the command does.
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "a", "b"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "rules", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--restore", "-", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--parameters", "-L", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--timeout", "1s", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--help", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--socket", "-x", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--socket=", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "--socket", "/a", "--socket", "/b", "a"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "a/b"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", "a%20"}, "", "", false},
		{[]string{"kata-ipvs", "ipvsadm", "--restore", "-", ".."}, "", "", false},
		{[]string{"kata-ipvs", "cleanup", "--restore", "-", "a"}, "", "", false},
		{[]string{"kata-ipvs", "a", "ipvsadm", "--restore", "-"}, "", "", false},
		{[]string{"kata-network", "ipvsadm", "--restore", "-", "a"}, "", "", false},
		{[]string{"agent"}, "", "", false},
		{nil, "", "", false},
	} {
		sock, id, ok := restoreArgs(tc.args)
		if sock != tc.sock || id != tc.id || ok != tc.ok {
			t.Errorf("restoreArgs(%q) = %q, %q, %v; want %q, %q, %v", tc.args, sock, id, ok, tc.sock, tc.id, tc.ok)
		}
	}
}

func TestSplitArgs(t *testing.T) {
	if got := splitArgs([]byte("kata-dp\x00kata-ipvs\x00\x00x\x00")); len(got) != 4 || got[1] != "kata-ipvs" || got[2] != "" || got[3] != "x" {
		t.Errorf("splitArgs = %q", got)
	}
	if got := splitArgs([]byte("kata-dp\x00cut")); got != nil {
		t.Errorf("splitArgs of a cut line = %q, want none", got)
	}
}

func TestNumbers(t *testing.T) {
	for _, n := range []int{0, 1, 9, 10, 15, 16, 255, 262144, 8 << 20} {
		if got, want := decimal(int64(n)), strconv.Itoa(n); got != want {
			t.Errorf("decimal(%d) = %q", n, got)
		}
		if got, want := hex(n), strconv.FormatInt(int64(n), 16); got != want {
			t.Errorf("hex(%d) = %q, want %q", n, got, want)
		}
	}
}
