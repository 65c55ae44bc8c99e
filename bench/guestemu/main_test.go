package guestemu_test

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo"
)

// TestMain removes namespaces that an earlier, killed run of these tests
// left behind.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		topo.SweepStale("kdptg")
	}
	os.Exit(m.Run())
}
