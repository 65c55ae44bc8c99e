package topotest

import (
	"fmt"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/kata-dp/kata-dp/control/netdev"
)

// TCXProgram is a program attached to a device through TCX, as the kernel lists it.
type TCXProgram struct {
	Name string // the program's name (the kernel keeps its first 15 bytes)
	ID   ebpf.ProgramID
	Link link.ID // 0 when it was attached without a link
}

// TCX lists the programs attached to dev in the network namespace at nsPath at attach
// (ebpf.AttachTCXIngress or ebpf.AttachTCXEgress), in the kernel's order, and fails tb when it
// cannot. Tests use it to see what kata-dp attached, detached or kept across a restart.
func TCX(tb testing.TB, nsPath, dev string, attach ebpf.AttachType) []TCXProgram {
	tb.Helper()
	var out []TCXProgram
	err := netdev.InNetNS(nsPath, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("find %s: %w", dev, err)
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: attach})
		if err != nil {
			return fmt.Errorf("query %s programs of %s: %w", attach, dev, err)
		}
		for _, p := range res.Programs {
			prog, err := ebpf.NewProgramFromID(p.ID)
			if err != nil {
				return fmt.Errorf("program %d of %s: %w", p.ID, dev, err)
			}
			info, err := prog.Info()
			prog.Close()
			if err != nil {
				return fmt.Errorf("program %d of %s: %w", p.ID, dev, err)
			}
			tp := TCXProgram{Name: info.Name, ID: p.ID}
			if id, ok := p.LinkID(); ok {
				tp.Link = id
			}
			out = append(out, tp)
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("tcx: %v", err)
	}
	return out
}

// TCXCount is the number of TCX programs on dev's ingress and egress in the network namespace
// at nsPath.
func TCXCount(tb testing.TB, nsPath, dev string) (in, out int) {
	tb.Helper()
	return len(TCX(tb, nsPath, dev, ebpf.AttachTCXIngress)), len(TCX(tb, nsPath, dev, ebpf.AttachTCXEgress))
}
