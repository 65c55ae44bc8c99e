#!/usr/bin/env bash
# Vendors the BPF headers kata-dp's C code builds against, from one pinned libbpf
# release fetched through the Go module proxy (so no network access beyond what
# `go mod download` already needs). Debian's UAPI headers are 6.1 and lack the TCX
# definitions (TCX_NEXT, ...), which is why we carry our own copy; bpf/include/linux/types.h
# is ours (a minimal replacement so we can build with -nostdinc).
#
# Usage: hack/update-bpf-headers.sh          # rewrite bpf/include from the pinned version
set -euo pipefail
LIBBPF_VERSION=v1.5.0
top=$(cd "$(dirname "$0")/.." && pwd)
dst="$top/bpf/include"

src=$(cd "$top" && GOFLAGS=-mod=mod go mod download -json "github.com/libbpf/libbpf@${LIBBPF_VERSION}" \
	| sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || { echo "libbpf ${LIBBPF_VERSION} not found in the module cache" >&2; exit 1; }

mkdir -p "$dst/linux"
for f in bpf_helpers.h bpf_helper_defs.h bpf_endian.h; do
	install -m 0644 "$src/src/$f" "$dst/$f"
done
for f in bpf.h bpf_common.h pkt_cls.h pkt_sched.h if_xdp.h; do
	install -m 0644 "$src/include/uapi/linux/$f" "$dst/linux/$f"
done
echo "libbpf ${LIBBPF_VERSION}" > "$dst/VERSION"
echo "vendored BPF headers from libbpf ${LIBBPF_VERSION} into bpf/include"
