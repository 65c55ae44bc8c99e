package loader_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/kata-dp/kata-dp/loader"
)

// TestLegacyAttachOneSide: the pre-TCX way (clsact + bpf filters) keeps kata-dp's program on
// one side of a device, as TCX links do: attaching at egress where ours is at ingress (a tap
// whose endpoint moved to macvtap-bpf) deletes the ingress filter, and back again; another
// user's filter on either side stays, and Detach leaves only that.
func TestLegacyAttachOneSide(t *testing.T) {
	needRoot(t)
	nsPath := netnsWithVeth(t)
	ns := nsPath[strings.LastIndexByte(nsPath, '/')+1:]
	root := testRoot(t)
	sb, err := loader.OpenWithOptions(root, "lgside", loader.Options{LegacyTC: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sb.Close()
		if err := loader.Remove(root, "lgside"); err != nil {
			t.Error(err)
		}
	})
	const dev = "kdptxt"
	show := func(side string) string {
		t.Helper()
		out, err := exec.Command("tc", "-n", ns, "filter", "show", "dev", dev, side).CombinedOutput()
		if err != nil {
			t.Fatalf("tc filter show %s: %v: %s", side, err, out)
		}
		return string(out)
	}
	ours := func(side string) int { // filter lines naming one of our programs
		n := 0
		for _, l := range strings.Split(show(side), "\n") {
			if strings.Contains(l, " kdp_") {
				n++
			}
		}
		return n
	}
	want := func(step string, in, out int) {
		t.Helper()
		if i, o := ours("ingress"), ours("egress"); i != in || o != out {
			t.Fatalf("%s: kata-dp filters at ingress %d, egress %d; want %d, %d\ningress: %s\negress: %s",
				step, i, o, in, out, show("ingress"), show("egress"))
		}
	}
	if a, err := sb.Attach(nsPath, dev, loader.ProgTapIn); err != nil || !a.Legacy {
		t.Fatalf("attach: %+v, %v", a, err)
	}
	want("ingress", 1, 0)
	// Another user's filters, one per side, at a priority of their own.
	for _, side := range []string{"ingress", "egress"} {
		if out, err := exec.Command("tc", "-n", ns, "filter", "add", "dev", dev, side, "prio", "9", "protocol", "ip",
			"u32", "match", "ip", "dst", "192.0.2.1/32", "flowid", "1:1").CombinedOutput(); err != nil {
			t.Fatalf("add u32 at %s: %v: %s", side, err, out)
		}
	}
	if _, err := sb.AttachEgress(nsPath, dev, loader.ProgTapIn); err != nil {
		t.Fatal(err)
	}
	want("to egress", 0, 1)
	if _, err := sb.AttachEgress(nsPath, dev, loader.ProgTapIn); err != nil {
		t.Fatal(err)
	}
	want("egress again (replaced, not doubled)", 0, 1)
	if _, err := sb.Attach(nsPath, dev, loader.ProgTapIn); err != nil {
		t.Fatal(err)
	}
	want("back to ingress", 1, 0)
	if err := sb.Detach(nsPath, dev); err != nil {
		t.Fatal(err)
	}
	want("detached", 0, 0)
	for _, side := range []string{"ingress", "egress"} {
		if !strings.Contains(show(side), "u32") {
			t.Errorf("another user's filter at %s was removed: %s", side, show(side))
		}
	}
}
