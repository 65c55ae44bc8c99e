package loader

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// Features is what the running kernel supports, probed (never guessed from its version).
type Features struct {
	TCX      bool // BPF links at tc ingress/egress (Linux 6.6+)
	XDP      bool // XDP programs
	SchedCLS bool // tc BPF programs (needed for the clsact fallback too)
	LPMTrie  bool // route tables
	DevMap   bool // XDP redirect into another device
}

func (f Features) String() string {
	var b strings.Builder
	for _, x := range []struct {
		name string
		ok   bool
	}{{"tcx", f.TCX}, {"xdp", f.XDP}, {"sched_cls", f.SchedCLS}, {"lpm_trie", f.LPMTrie}, {"devmap", f.DevMap}} {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%v", x.name, x.ok)
	}
	return b.String()
}

var (
	probeOnce sync.Once
	probed    Features
	probeErr  error
)

// Probe reports the kernel's features. It probes once per process; later calls return the
// cached result.
func Probe() (Features, error) {
	probeOnce.Do(func() { probed, probeErr = probe() })
	return probed, probeErr
}

func probe() (Features, error) {
	var f Features
	have := func(err error) (bool, error) {
		if err == nil {
			return true, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return false, nil
		}
		return false, err
	}
	var err error
	if f.SchedCLS, err = have(features.HaveProgramType(ebpf.SchedCLS)); err != nil {
		return f, fmt.Errorf("probe sched_cls: %w", err)
	}
	if f.XDP, err = have(features.HaveProgramType(ebpf.XDP)); err != nil {
		return f, fmt.Errorf("probe xdp: %w", err)
	}
	if f.LPMTrie, err = have(features.HaveMapType(ebpf.LPMTrie)); err != nil {
		return f, fmt.Errorf("probe lpm_trie: %w", err)
	}
	if f.DevMap, err = have(features.HaveMapType(ebpf.DevMap)); err != nil {
		return f, fmt.Errorf("probe devmap: %w", err)
	}
	// Querying TCX programs of the loopback device is read-only and fails with EINVAL on
	// kernels without TCX.
	if _, qerr := link.QueryPrograms(link.QueryOptions{Target: 1, Attach: ebpf.AttachTCXIngress}); qerr == nil {
		f.TCX = true
	}
	return f, nil
}
