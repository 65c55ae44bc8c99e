// Package topotest holds the test helpers of bench/topo: they take a testing.TB, skip when the
// process is not root, fail the test on error and register the teardown with tb.Cleanup, so
// nothing is left behind even when a test fails. They live apart from topo so that topo, which
// the kata-dp binary links for `kata-dp bench`, does not import testing.
//
// A test binary killed before its cleanups run (go test's timeout) cannot remove what it made,
// so what these helpers make is named for its process (topo.OwnedName), and the first helper
// called in a test binary removes what binaries that are gone left under kata-dp's test
// prefix, "kdpt" (topo.SweepStale).
package topotest

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo"
)

// Prefix starts the name of every kernel object kata-dp's tests make.
const Prefix = "kdpt"

var sweepOnce sync.Once

// sweep removes, once per test binary, what killed test binaries left behind.
func sweep(tb testing.TB) {
	sweepOnce.Do(func() {
		swept, err := topo.SweepStale(Prefix)
		if len(swept) > 0 || err != nil {
			tb.Logf("removed what killed test runs left: %v (errors: %v)", swept, err)
		}
	})
}

// RequireRoot skips tb unless the process runs as root.
func RequireRoot(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: " + why)
	}
}

// MustNetNS is topo.NewNetNS for tests: it skips when not root, fails tb on error and deletes
// the namespace when the test ends.
func MustNetNS(tb testing.TB, prefix string) *topo.NetNS {
	tb.Helper()
	RequireRoot(tb, "creates network namespaces")
	sweep(tb)
	n, err := topo.NewNetNS(prefix)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := n.Close(); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
	return n
}

// MustSandbox is topo.NewSandbox for tests: it skips when not root, fails tb on error and
// tears the sandbox down when the test ends.
func MustSandbox(tb testing.TB, cfg topo.SandboxConfig) *topo.Sandbox {
	tb.Helper()
	RequireRoot(tb, "builds a sandbox topology in network namespaces")
	sweep(tb)
	s, err := topo.NewSandbox(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
	return s
}

// MustGuest is s.StartGuest for tests; the guest is closed when the test ends.
func MustGuest(tb testing.TB, s *topo.Sandbox, cfg topo.GuestConfig) *topo.Guest {
	tb.Helper()
	g, err := s.StartGuest(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := g.Close(); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
	return g
}

// BPFFS returns a directory of the BPF filesystem for the test's pins, named
// topo.OwnedName(prefix) (prefix should start with Prefix), and removes it with all it holds
// when the test ends. The directory itself is not made: kata-dp's loader and agent make it.
func BPFFS(tb testing.TB, prefix string) string {
	tb.Helper()
	RequireRoot(tb, "pins BPF objects")
	sweep(tb)
	name, err := topo.OwnedName(prefix)
	if err != nil {
		tb.Fatalf("bpffs: %v", err)
	}
	dir := filepath.Join(topo.BPFFSDir, name)
	tb.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
	return dir
}
