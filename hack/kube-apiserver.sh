#!/usr/bin/env bash
# Builds the real Kubernetes API server the Kubernetes tests run against, once, into a cache
# directory outside the tree (never committed): k8s.io/kubernetes at $VERSION, whose go.mod
# replaces its staging modules with local paths, so a throwaway module pins each of them to the
# matching v0 release (see shared notes: about 12 minutes and 2.4 GB on 2 cores, 119 MB binary).
#
#   hack/kube-apiserver.sh          prints the binary's path (builds it when missing)
#
# KDP_KUBE_CACHE overrides the cache directory (default /var/cache/kata-dp/kube).
set -euo pipefail
export PATH=/usr/local/go/bin:$PATH
VERSION=v1.37.2
STAGING=v0${VERSION#v1}
CACHE=${KDP_KUBE_CACHE:-/var/cache/kata-dp/kube}
OUT=$CACHE/$VERSION/kube-apiserver
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE/$VERSION"
# One build at a time: two test runs started together (helpers' worktrees, a developer's
# second shell) would otherwise both build for 12 minutes and race on the result. The second
# waits for the first and finds the binary.
exec 9>"$CACHE/.lock"
flock 9
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
cat > go.mod <<MOD
module kdp.local/kubeapiserver

go 1.26.0

require k8s.io/kubernetes $VERSION
MOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
cat > main.go <<'GO'
package main

func main() {}
GO
# The staging modules k8s.io/kubernetes requires at v0.0.0 (replaced by ./staging there).
gomod=$(go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
for m in $(awk '/^\tk8s.io\/[^ ]+ v0.0.0$/ {print $1}' "$gomod" | sort -u); do
	echo "replace $m => $m $STAGING" >> go.mod
done
GOFLAGS=-mod=mod go mod tidy >/dev/null
go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$VERSION" \
	-o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
mv "$work/kube-apiserver" "$OUT"
echo "$OUT"
