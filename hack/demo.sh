#!/usr/bin/env bash
# make demo: build the test guest if QEMU is here, then run the demo program (hack/demo) against
# the freshly built binary. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v qemu-system-x86_64 >/dev/null; then
	hack/guest/build.sh || echo "demo: could not build the test guest; the VM part will be skipped" >&2
fi
exec go run ./hack/demo --bin bin/kata-dp "$@"
