#!/usr/bin/env bash
# Installs what building, testing and the demo need on a Debian 12 machine (run as root).
# Idempotent: packages already present are left alone; Go modules come from the module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
# systemd: systemd-analyze verify checks the unit; zsh, fish: the completion scripts are parsed.
# dpdk-dev: dpdk-testpmd, the vhost-user switch of the vhost-user end-to-end tests.
# gcc, libc6-dev: cgo, which the race detector needs (make race).
# prometheus: promtool (check metrics, check and test the alert rules) and the server the
# metrics end-to-end test scrapes the agent with (on a test netns's loopback).
# etcd-server: the store of the real kube-apiserver the Kubernetes tests run (make kube builds it).
pkgs=(clang llvm iproute2 iputils-ping ethtool busybox-static qemu-system-x86 dpdk-dev make git ca-certificates systemd zsh fish gcc libc6-dev prometheus etcd-server)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The prometheus and etcd-server packages enable their own servers (:9090, :2379); the tests
# start their own, and a build machine needs none running.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
	systemctl disable --now prometheus.service >/dev/null 2>&1 || true
	systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
command -v go >/dev/null || { echo "install-deps: Go is not installed (expected at /usr/local/go)" >&2; exit 1; }
go mod download
