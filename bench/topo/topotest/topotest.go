// Package topotest holds the test helpers of bench/topo: they take a testing.TB, skip when the
// process is not root, fail the test on error and register the teardown with tb.Cleanup, so
// nothing is left behind even when a test fails. They live apart from topo so that topo, which
// the kata-dp binary links for `kata-dp bench`, does not import testing.
package topotest

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/bench/topo"
)

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
