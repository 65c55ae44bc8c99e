#!/usr/bin/env bash
# build.sh: build the tiny QEMU test guest used by kata-dp's end-to-end tests.
#
# Output (git-ignored): hack/guest/out/vmlinuz and hack/guest/out/initramfs.cpio.gz.
# Everything comes from Debian packages: the real linux-image-<abi>-cloud-amd64 package that
# linux-image-cloud-amd64 depends on (fetched with apt-get download, unpacked with dpkg-deb -x,
# no install hooks run) and busybox-static. The script is idempotent: it caches the downloaded
# package and only rebuilds the initramfs when init or the kernel changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${KDP_GUEST_OUT:-$here/out}"
mkdir -p "$out"

modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)
# Modules for running kata-dp itself inside the guest (the guest-kernel tests' own /init loads
# them, in this order, from /lib/modules/net.order; the standard /init does not): veth and tap
# devices, clsact and the bpf / u32 filters with mirred, macvlan and macvtap.
netmodules=(veth tun tap macvlan macvtap sch_ingress cls_bpf cls_u32 act_mirred)

log() { echo "guest: $*" >&2; }

# Install the tools we need, only when missing.
need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
if [ "${#need[@]}" -gt 0 ]; then
	log "installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Resolve the meta package to the real kernel package.
pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$pkg" ]; then
	apt-get update -qq
	pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
abi="${pkg#linux-image-}"
log "kernel package $pkg"

# Drop what an older kernel ABI left behind.
for old in "$out"/linux-image-*.deb "$out"/kernel-*; do
	[ -e "$old" ] || continue
	case "${old##*/}" in
	"${pkg}"_*.deb | "kernel-$abi") ;;
	*) rm -rf "$old" ;;
	esac
done

deb="$(ls "$out"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$deb" ]; then
	(cd "$out" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null) || {
		apt-get update -qq
		(cd "$out" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null)
	}
	deb="$(ls "$out"/"${pkg}"_*.deb | head -n1)"
fi

kdir="$out/kernel-$abi"
if [ ! -f "$kdir/.done" ]; then
	rm -rf "$kdir"
	mkdir -p "$kdir"
	dpkg-deb -x "$deb" "$kdir"
	touch "$kdir/.done"
fi
cp -f "$kdir/boot/vmlinuz-$abi" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"

# Rebuild the initramfs only when an input changed.
img="$out/initramfs.cpio.gz"
if [ -f "$img" ] && [ "$img" -nt "$here/init" ] && [ "$img" -nt "$here/build.sh" ] && [ "$img" -nt "$kdir/.done" ] && [ "$img" -nt /bin/busybox ]; then
	log "up to date: $out/vmlinuz and $img"
	exit 0
fi

# Stage the initramfs.
stage="$out/initramfs.stage"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,run,lib/modules,etc}
cp /bin/busybox "$stage/bin/busybox"
for m in "${modules[@]}" "${netmodules[@]}"; do
	f="$(find "$kdir/lib/modules/$abi" -name "$m.ko*" | head -n1)"
	[ -n "$f" ] || { log "module $m not found"; exit 1; }
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$stage/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -qdc "$f" >"$stage/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$stage/lib/modules/$m.ko" ;;
	*) cp "$f" "$stage/lib/modules/$m.ko" ;;
	esac
done
printf '%s\n' "${modules[@]}" >"$stage/lib/modules/order"
printf '%s\n' "${netmodules[@]}" >"$stage/lib/modules/net.order"
install -m 0755 "$here/init" "$stage/init"

(cd "$stage" && find . | sort | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -9n) >"$out/initramfs.cpio.gz.tmp"
mv -f "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
rm -rf "$stage"
log "built $out/vmlinuz and $out/initramfs.cpio.gz"
