# CML: the two commands are `make demo` and `make test`.
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)
# /usr/local/sbin first: scripts/install-deps.sh puts runc 1.3 there, ahead
# of Debian's 1.1 in /usr/sbin, whatever root's PATH says.
export PATH := /usr/local/sbin:$(PATH):/usr/local/go/bin
BIN := bin
PROTOC_GEN_GO := v1.36.12
PROTOC_GEN_GO_GRPC := v1.5.1
STATICCHECK := v0.8.2

.PHONY: all build deps demo test test-unit test-vm bench fuzz generate lint clean

all: build

deps:
	@scripts/install-deps.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# Install what is needed, build, and run the guided tour on the embedded
# defaults (no TPM, no token, no config file; state in ./_demo).
demo: deps build
	@scripts/demo.sh

# All tests. Root-only tests (real runc, mounts, cgroups) skip with a reason
# when not root; CI runs as root.
# RACE are the packages where clients or goroutines meet; their tests run
# again under the race detector.
RACE := ./internal/container/ ./internal/reaper/ ./internal/api/ ./internal/guestos/ ./internal/tpm/ ./internal/device/ ./internal/network ./internal/audit ./internal/access ./internal/token ./internal/storage

test: deps build lint
	$(GO) test -count=1 -timeout 20m ./...
	$(GO) test -race -count=1 -timeout 20m $(RACE)
	@GO=$(GO) FUZZTIME=5000x scripts/fuzz.sh
	@GO=$(GO) scripts/vm-test.sh

# The tests this kernel cannot run (device-mapper, a kernel TPM, pure
# cgroup v2), inside QEMU booting Debian's own kernel; part of make test.
test-vm: deps
	@GO=$(GO) scripts/vm-test.sh

# Every parser of outside input fuzzed for a minute each.
fuzz:
	@GO=$(GO) FUZZTIME=$${FUZZTIME:-60s} scripts/fuzz.sh

# gofmt, go vet and staticcheck (pinned; fetched from the module proxy).
lint:
	@test -z "$$(gofmt -l cmd internal test)" || { echo "gofmt needed:"; gofmt -l cmd internal test; exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK) ./...

test-unit:
	$(GO) test -count=1 -short ./...

# Start-latency benchmark against bare runc, in one run.
bench: deps build
	@scripts/install-deps.sh bench
	$(BIN)/cmlbench

# Regenerate api/cml/v1 from cml.proto (protoc from Debian, plugins pinned).
generate:
	GOBIN=$(CURDIR)/$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO)
	GOBIN=$(CURDIR)/$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC)
	PATH=$(CURDIR)/$(BIN):$$PATH protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative api/cml/v1/cml.proto

clean:
	-chattr -R -a _demo 2>/dev/null
	rm -rf $(BIN) _demo
