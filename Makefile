# Outrigger: build, test, benchmark and demo. `make test` is what CI runs.
SHELL      := /bin/bash
GO         ?= go
BIN        := $(CURDIR)/bin
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS    := -s -w -X main.version=$(VERSION)
GOTESTFLAGS ?=
# Debian packages the tests and the demo need: real iptables (nft and legacy),
# ip/netns, dig, dnsperf, conntrack; curl and nghttp (nghttp2 HTTP/2 clients
# the h2grpc server is tested against).
DEB_PKGS   := iptables iproute2 dnsutils dnsperf conntrack procps curl nghttp2-client

export CGO_ENABLED := 0

.PHONY: all build test unit e2e bench demo lint deps image clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/outrigger ./cmd/outrigger

# deps installs the Debian packages the tests need, when missing and when
# running as root (CI machines start without them).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -q --no-install-recommends $$missing >/tmp/outrigger-apt.log 2>&1 || \
	     { apt-get update -q >>/tmp/outrigger-apt.log 2>&1 && apt-get install -y -q --no-install-recommends $$missing >>/tmp/outrigger-apt.log 2>&1; }) \
	     || { echo "apt-get install failed, see /tmp/outrigger-apt.log"; tail -20 /tmp/outrigger-apt.log; exit 1; }; \
	  else echo "warning: missing packages$$missing (run as root to install); some tests will skip"; fi; \
	fi

test: deps build
	$(GO) vet ./...
	OUTRIGGER_BIN=$(BIN)/outrigger $(GO) test -count=1 -timeout 30m $(GOTESTFLAGS) ./...
	# The xDS proxy's fallback transport (grpc-go) passes the same tests.
	XDSPROXY_TEST_TRANSPORT=grpc $(GO) test -count=1 $(GOTESTFLAGS) ./agent/xdsproxy/
	# The push benchmark runs once, so it cannot rot unnoticed.
	$(GO) test -count=1 -run '^$$' -bench Push3000 -benchtime 1x ./e2e/xds/

unit:
	$(GO) test -count=1 -short ./...

e2e: deps build
	OUTRIGGER_BIN=$(BIN)/outrigger $(GO) test -count=1 -timeout 30m ./e2e/...

# bench runs every benchmark; each reports its own figures (medians, RSS,
# queries/s, CPU per query) with b.ReportMetric. The whole run takes a few
# minutes; the figures are in the README.
bench: deps build
	OUTRIGGER_BIN=$(BIN)/outrigger $(GO) test -run '^$$' -bench . -benchmem ./iptables/ ./agent/... ./dnsproxy/ ./health/
	OUTRIGGER_BIN=$(BIN)/outrigger $(GO) test -run '^$$' -bench . -benchtime 5x ./e2e/... ./dnsproxy/bench/
	# The xDS push again, with the control plane behind a 10 Gbit/s link as
	# istiod is from a pod (plaintext, then TLS as on istiod's 15012, the
	# grpc-go fallback taking turns in the same loop), and back to back (a
	# burst).
	XDS_BENCH_LINK=10gbit XDS_BENCH_VARIANT=-transport=grpc $(GO) test -run '^$$' -bench Push3000 -benchtime 20x ./e2e/xds/
	XDS_BENCH_LINK=10gbit XDS_BENCH_TLS=1 XDS_BENCH_VARIANT=-transport=grpc $(GO) test -run '^$$' -bench Push3000 -benchtime 20x ./e2e/xds/
	XDS_BENCH_GAP=0 $(GO) test -run '^$$' -bench Push3000 -benchtime 40x ./e2e/xds/

demo: deps build
	$(GO) build -o $(BIN)/ ./e2e/demo ./e2e/envoysim ./e2e/controlplane/cmd/controlplane ./e2e/testca/cmd/testca
	$(BIN)/demo -bin $(BIN)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd tools && $(GO) build -o $(BIN)/staticcheck honnef.co/go/tools/cmd/staticcheck
	$(BIN)/staticcheck ./...

image:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  docker build -t outrigger:$(VERSION) . ; \
	else echo "no container engine running; skipping image build"; fi

clean:
	rm -rf $(BIN)
