# kata-dp. Everything needs root except build, generate and lint.
GO      ?= go
OUT     ?= bin
BIN     ?= $(OUT)/kata-dp
PKGS    ?= ./...
# The version both binaries carry (kata-dp version, kata-dp --version, kata_dp_agent_info).
VERSION ?= $(shell git describe --always --dirty --tags 2>/dev/null || echo dev)
LDFLAGS ?= -X main.version=$(VERSION)
# make install: DESTDIR is prepended to every path; the paths themselves are what the
# installed files refer to (the unit's ExecStart is $(BINDIR)/kata-dp).
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
CNI_BIN_DIR ?= /opt/cni/bin
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(PREFIX)/lib/systemd/system
DATADIR     ?= $(PREFIX)/share
# Long benchmarks stay out of `make test`; `make bench` runs the standard set.
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all build install uninstall generate check-generate test race unit lint bench demo guest kube headers clean

all: build

# Static binaries (no cgo): they run in the scratch image (deploy/Dockerfile) as on the host.
build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/kata-dp
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(OUT)/kata-dp-cni ./cmd/kata-dp-cni

# Installs the agent and CLI, the CNI plugin, the systemd unit, the default config file (kept
# when one is there: it is the operator's) and the shell completions (docs/install.md).
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(CNI_BIN_DIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/kata-dp \
		$(DESTDIR)$(DATADIR)/bash-completion/completions $(DESTDIR)$(DATADIR)/zsh/vendor-completions \
		$(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	install -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/kata-dp
	install -m 0755 $(OUT)/kata-dp-cni $(DESTDIR)$(CNI_BIN_DIR)/kata-dp-cni
	sed -e 's|/usr/local/bin/kata-dp|$(BINDIR)/kata-dp|g' -e 's|/etc/kata-dp/|$(SYSCONFDIR)/kata-dp/|g' \
		deploy/systemd/kata-dp.service > $(DESTDIR)$(UNITDIR)/kata-dp.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/kata-dp.service
	test -e $(DESTDIR)$(SYSCONFDIR)/kata-dp/config.yaml || install -m 0644 deploy/config.yaml $(DESTDIR)$(SYSCONFDIR)/kata-dp/config.yaml
	$(BIN) completion bash > $(DESTDIR)$(DATADIR)/bash-completion/completions/kata-dp
	$(BIN) completion zsh > $(DESTDIR)$(DATADIR)/zsh/vendor-completions/_kata-dp
	$(BIN) completion fish > $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/kata-dp.fish

# Removes what install put there except the config file (the operator's). It does not touch
# the datapath: docs/install.md says how to remove the sandboxes first.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/kata-dp $(DESTDIR)$(CNI_BIN_DIR)/kata-dp-cni $(DESTDIR)$(UNITDIR)/kata-dp.service \
		$(DESTDIR)$(DATADIR)/bash-completion/completions/kata-dp $(DESTDIR)$(DATADIR)/zsh/vendor-completions/_kata-dp \
		$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/kata-dp.fish

# Recompile the BPF object(s) with the pinned clang + vendored headers. The outputs are
# committed; CI checks that this reproduces them byte for byte.
generate:
	$(GO) generate ./loader/... ./bench/...

check-generate: generate
	git diff --exit-code -- loader/ bench/ || (echo "generated BPF objects are stale: run make generate and commit" >&2; exit 1)

# Re-vendor the BPF headers from the pinned libbpf release.
headers:
	hack/update-bpf-headers.sh

# The real Kubernetes API server the Kubernetes tests run against (control/kube/kubetest): built
# once from k8s.io/kubernetes into /var/cache/kata-dp/kube (about 12 minutes on 2 cores; later
# runs find it there). Never part of the tree.
kube:
	hack/kube-apiserver.sh

# The QEMU test guest (kernel + busybox initramfs) for the end-to-end tests.
guest:
	hack/guest/build.sh

test: guest kube
	$(GO) test $(TESTFLAGS) $(PKGS)

# The race detector over the packages where goroutines meet: the controller, the real
# dataplane, the API server and the agent (its end-to-end tests run the agent binary built
# with -race). CI runs it as its own step after make test.
RACE_PKGS ?= ./control/ ./control/dataplane/ ./control/api/ ./control/clusterlb/ ./control/kube/ ./cmd/kata-dp/
race: guest
	CGO_ENABLED=1 $(GO) test -race $(TESTFLAGS) $(RACE_PKGS)

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
