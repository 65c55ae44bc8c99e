#!/bin/sh
# Installs the reference CNI plugins kata-dp-cni's tests chain with (bridge, host-local) into
# a directory, pinned to the containernetworking/plugins release in go.mod.
#
#   hack/cni-plugins.sh [DIR]     (default: bin/cni)
#
# Then: KDP_CNI_PLUGINS=$PWD/bin/cni go test ./cmd/kata-dp-cni/
# Without KDP_CNI_PLUGINS the tests install them into a temporary directory themselves.
set -eu
VERSION=v1.9.1
DIR=${1:-bin/cni}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
GOBIN=$DIR go install \
	"github.com/containernetworking/plugins/plugins/main/bridge@$VERSION" \
	"github.com/containernetworking/plugins/plugins/ipam/host-local@$VERSION"
echo "reference CNI plugins $VERSION in $DIR"
