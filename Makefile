# kata-dp. Everything needs root except build, generate and lint.
GO      ?= go
BIN     ?= bin/kata-dp
PKGS    ?= ./...
# Long benchmarks stay out of `make test`; `make bench` runs the standard set.
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all build generate check-generate test unit lint bench demo guest headers clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/kata-dp
	$(GO) build -o bin/kata-dp-cni ./cmd/kata-dp-cni

# Recompile the BPF object(s) with the pinned clang + vendored headers. The outputs are
# committed; CI checks that this reproduces them byte for byte.
generate:
	$(GO) generate ./loader/... ./bench/...

check-generate: generate
	git diff --exit-code -- loader/ bench/ || (echo "generated BPF objects are stale: run make generate and commit" >&2; exit 1)

# Re-vendor the BPF headers from the pinned libbpf release.
headers:
	hack/update-bpf-headers.sh

# The QEMU test guest (kernel + busybox initramfs) for the end-to-end tests.
guest:
	hack/guest/build.sh

test: guest
	$(GO) test $(TESTFLAGS) $(PKGS)

# Tests that need neither root nor a guest.
unit:
	$(GO) test -count=1 -short $(PKGS)

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting" >&2; exit 1)
	$(GO) vet $(PKGS)

bench: build
	$(BIN) bench

demo: build
	hack/demo.sh

clean:
	rm -rf bin
