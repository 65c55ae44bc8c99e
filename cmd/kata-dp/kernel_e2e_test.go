package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

// TestVersionOnGuestKernel: `kata-dp version`, run inside the QEMU test guest, whose kernel is
// Debian 12's (6.1, no TCX), finds that kernel's verifier accepts both objects and that every
// mode but direct can run (with clsact instead of TCX; direct mode needs TCX). The datapath is written for 6.18; this keeps the
// oldest kernel a Kata node is likely to run honest: 6.1's verifier refused the XDP program
// twice before (a read it could not prove non-empty, then a combined stack of 544 bytes).
// TestTrafficOnGuestKernel passes frames through kata-dp on that kernel.
func TestVersionOnGuestKernel(t *testing.T) {
	g := needGuestKernel(t)

	// A static kata-dp, as released (the guest has no C library).
	work := t.TempDir()
	bin := filepath.Join(work, "kata-dp")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build a static kata-dp: %v\n%s", err, out)
	}
	const init = `#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /sys/fs/bpf /tmp
mount -t bpf bpf /sys/fs/bpf
echo KDP-VERSION-BEGIN
/kata-dp version 2>&1
echo KDP-VERSION-END
poweroff -f
`
	s := g.run(t, map[string]string{"/kata-dp": bin}, init, 1, 2*time.Minute)
	begin, end := strings.Index(s, "KDP-VERSION-BEGIN"), strings.Index(s, "KDP-VERSION-END")
	if begin < 0 || end < begin {
		t.Fatalf("no version report on the guest's console:\n%s", s)
	}
	report := s[begin:end]
	t.Logf("on the guest's kernel:\n%s", report)
	for _, want := range []string{"verifier accepts the datapath object", "verifier accepts the node object"} {
		if !containsLine(report, want, "yes") {
			t.Errorf("%q is not yes on the guest's kernel", want)
		}
	}
	for _, mode := range []string{"tc", "xdp", "tcfilter", "macvtap", "macvtap-bpf"} {
		if !containsLine(report, mode, "ok") {
			t.Errorf("mode %s cannot run on the guest's kernel", mode)
		}
	}
	// Before 6.3 xdp mode cannot tell whether the veth takes XDP frames.
	if !strings.Contains(report, "netlink netdev xdp_features") || !containsLine(report, "netlink netdev xdp_features", "NO") {
		t.Errorf("xdp_features not reported missing, with its fallback")
	}
	// Direct mode's node programs need TCX links (loader.ErrNoTCX).
	if !containsLine(report, "direct", "tcx") || !strings.Contains(report, "cannot run: missing link tcx") {
		t.Errorf("mode direct is not reported as missing link tcx")
	}
}

// guestKernel is the QEMU test guest's kernel and initramfs (hack/guest/build.sh).
type guestKernel struct {
	qemu, kernel, initrd string
}

// needGuestKernel skips the test when it cannot boot the test guest.
func needGuestKernel(t *testing.T) guestKernel {
	t.Helper()
	topotest.RequireRoot(t, "boots the QEMU test guest")
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	dir := guesttest.Dir()
	g := guestKernel{qemu: qemu, kernel: filepath.Join(dir, "vmlinuz"), initrd: filepath.Join(dir, "initramfs.cpio.gz")}
	for _, f := range []string{g.kernel, g.initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("test guest not built (%v): run hack/guest/build.sh", err)
		}
	}
	return g
}

// run boots the guest's kernel with the guest's initramfs plus files (guest path -> host
// path) and init as /init, on smp vCPUs, and returns what its console printed (without
// carriage returns) once init powered it off. The guest has no network device; its kernel
// prints only alerts on the console, so they cannot break the lines the tests look for.
func (g guestKernel) run(t *testing.T, files map[string]string, init string, smp int, timeout time.Duration) string {
	t.Helper()
	work := t.TempDir()
	root := filepath.Join(work, "root")
	for dst, src := range files {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(src)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(root, dst)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, st.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	// A second, uncompressed archive after the guest's: the kernel unpacks both, the later
	// file wins. It looks for an uncompressed archive's header only at a 4-byte boundary, so
	// the first one is padded with zeros (which it skips) up to one.
	var extra bytes.Buffer
	pack := exec.Command("sh", "-c", "find . | sort | /bin/busybox cpio -o -H newc")
	pack.Dir = root
	pack.Stdout = &extra
	var perr bytes.Buffer
	pack.Stderr = &perr
	if err := pack.Run(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, perr.String())
	}
	base, err := os.ReadFile(g.initrd)
	if err != nil {
		t.Fatal(err)
	}
	combined := filepath.Join(work, "initrd")
	initrd := append(base, make([]byte, (4-len(base)%4)%4)...)
	if err := os.WriteFile(combined, append(initrd, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out bytes.Buffer
	vm := exec.CommandContext(ctx, g.qemu, "-M", "q35", "-accel", "tcg", "-m", "1024", "-smp", itoa(smp),
		"-kernel", g.kernel, "-initrd", combined, "-append", "console=ttyS0 quiet loglevel=1 panic=-1",
		"-nographic", "-no-reboot", "-nic", "none")
	vm.Stdout, vm.Stderr = &out, &out
	if err := vm.Run(); err != nil {
		t.Fatalf("qemu: %v\n%s", err, out.String())
	}
	return strings.ReplaceAll(out.String(), "\r", "")
}

// raceBuild says whether this test binary was built with the race detector.
func raceBuild() bool {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" {
				return s.Value == "true"
			}
		}
	}
	return false
}

// containsLine says whether report has a line whose first words are prefix and whose last
// word is last.
func containsLine(report, prefix, last string) bool {
	for _, l := range strings.Split(report, "\n") {
		f := strings.Fields(l)
		if strings.HasPrefix(strings.TrimSpace(l), prefix+" ") && len(f) > 0 && (f[len(f)-1] == last || strings.Contains(l, " "+last+" ")) {
			return true
		}
	}
	return false
}
