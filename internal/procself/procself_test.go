package procself

import (
	"os"
	"strings"
	"testing"
)

func TestReadFile(t *testing.T) {
	var buf [1 << 16]byte
	n := ReadFile("/proc/self/cmdline", buf[:])
	if got, want := string(buf[:n]), strings.Join(os.Args, "\x00")+"\x00"; got != want {
		t.Errorf("cmdline = %q, want %q", got, want)
	}
	if n := ReadFile("/proc/self/cmdline", buf[:3]); n != 3 {
		t.Errorf("read into 3 bytes: %d", n)
	}
	if n := ReadFile("/nonexistent", buf[:]); n != 0 {
		t.Errorf("missing file: %d bytes", n)
	}
}
