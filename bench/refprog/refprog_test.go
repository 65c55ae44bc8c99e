package refprog

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
)

// skbCtx is the head of struct __sk_buff as BPF_PROG_TEST_RUN takes it.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority uint32
	IngressIfindex, Ifindex                                                               uint32
}

const (
	tcxNext     = -1
	tcxDrop     = 2
	tcxRedirect = 7
	xdpDrop     = 1
	xdpPass     = 2
)

// TestVerdicts runs the reference programs on a crafted frame "arriving" on
// the loopback device (ifindex 1); nothing is transmitted.
func TestVerdicts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	o, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	frame := make([]byte, 64)
	frame[12], frame[13] = 0x08, 0x00
	run := func(p Prog, ctx any) int32 {
		t.Helper()
		prog, err := o.prog(p)
		if err != nil {
			t.Fatal(err)
		}
		ret, err := prog.Run(&ebpf.RunOptions{Data: append([]byte(nil), frame...), Context: ctx})
		if err != nil {
			t.Fatalf("run %d: %v", p, err)
		}
		return int32(ret)
	}
	lo := skbCtx{Ifindex: 1}
	if got := run(Redirect, lo); got != tcxNext {
		t.Errorf("redirect without a peer = %d, want TCX_NEXT", got)
	}
	if err := o.SetPeer("", 1, 1); err != nil {
		t.Fatal(err)
	}
	if got := run(Redirect, lo); got != tcxRedirect {
		t.Errorf("redirect with a peer = %d, want TCX_REDIRECT", got)
	}
	if got := run(Drop, lo); got != tcxDrop {
		t.Errorf("drop = %d, want TCX_DROP", got)
	}
	if got := run(XDPPass, nil); got != xdpPass {
		t.Errorf("xdp pass = %d, want XDP_PASS", got)
	}
	for i := 0; i < 3; i++ {
		if got := run(XDPDrop, nil); got != xdpDrop {
			t.Errorf("xdp drop = %d, want XDP_DROP", got)
		}
	}
	if n, err := o.XDPDropped(); err != nil || n != 3 {
		t.Errorf("xdp drop counter = %d, %v; want 3", n, err)
	}
}
