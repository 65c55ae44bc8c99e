package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/hotplug/guesttest"
)

// TestVersionOnGuestKernel: `kata-dp version`, run inside the QEMU test guest, whose kernel is
// Debian 12's (6.1, no TCX), finds that kernel's verifier accepts both objects and that every
// mode can run (with clsact instead of TCX). The datapath is written for 6.18; this keeps the
// oldest kernel a Kata node is likely to run honest: 6.1's verifier refused the XDP program
// twice before (a read it could not prove non-empty, then a combined stack of 544 bytes).
func TestVersionOnGuestKernel(t *testing.T) {
	topotest.RequireRoot(t, "boots the QEMU test guest")
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	dir := guesttest.Dir()
	kernel, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.cpio.gz")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("test guest not built (%v): run hack/guest/build.sh", err)
		}
	}

	// The guest has busybox and no C library: a static kata-dp, and an /init of our own
	// appended as a second cpio archive (the kernel unpacks both, the later file wins).
	work := t.TempDir()
	root := filepath.Join(work, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(root, "kata-dp"), ".")
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
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	extra := filepath.Join(work, "extra.cpio")
	pack := exec.Command("sh", "-c", "find . | sort | /bin/busybox cpio -o -H newc > "+extra)
	pack.Dir = root
	if out, err := pack.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	base, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	more, err := os.ReadFile(extra)
	if err != nil {
		t.Fatal(err)
	}
	// Compressed like the first: the kernel looks for an uncompressed archive's header only
	// at a 4-byte boundary, which the end of a gzip stream rarely is.
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(more); err != nil || zw.Close() != nil {
		t.Fatalf("gzip: %v", err)
	}
	combined := filepath.Join(work, "initrd")
	if err := os.WriteFile(combined, append(base, gz.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	vm := exec.CommandContext(ctx, qemu, "-M", "q35", "-accel", "tcg", "-m", "1024", "-smp", "1",
		"-kernel", kernel, "-initrd", combined, "-append", "console=ttyS0 quiet panic=-1",
		"-nographic", "-no-reboot", "-nic", "none")
	vm.Stdout, vm.Stderr = &out, &out
	if err := vm.Run(); err != nil {
		t.Fatalf("qemu: %v\n%s", err, out.String())
	}
	s := out.String()
	begin, end := strings.Index(s, "KDP-VERSION-BEGIN"), strings.Index(s, "KDP-VERSION-END")
	if begin < 0 || end < begin {
		t.Fatalf("no version report on the guest's console:\n%s", s)
	}
	report := strings.ReplaceAll(s[begin:end], "\r", "")
	t.Logf("on the guest's kernel:\n%s", report)
	for _, want := range []string{"verifier accepts the datapath object", "verifier accepts the node object"} {
		if !containsLine(report, want, "yes") {
			t.Errorf("%q is not yes on the guest's kernel", want)
		}
	}
	for _, mode := range []string{"tc", "xdp", "tcfilter", "macvtap", "macvtap-bpf", "direct"} {
		if !containsLine(report, mode, "ok") {
			t.Errorf("mode %s cannot run on the guest's kernel", mode)
		}
	}
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
