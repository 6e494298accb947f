# Outrigger images. One build of the static agent, layered two ways:
#
#   docker build --target istio-init  -t outrigger-init .
#       small Debian image: the agent, iptables (nft and legacy), iproute2.
#       Istio's injected istio-init container runs it as root with NET_ADMIN.
#   docker build --target istio-proxy --build-arg ENVOY_IMAGE=<image with /usr/local/bin/envoy> -t outrigger-proxy .
#       the Envoy image plus the agent; runs as uid 1337 (istio-proxy).
#
# Both answer to "pilot-agent", so Istio's injection template runs them unchanged.
ARG GO_IMAGE=golang:1.26-bookworm
ARG BASE_IMAGE=debian:bookworm-slim
ARG ENVOY_IMAGE=envoyproxy/envoy:distroless-v1.36-latest

FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/outrigger ./cmd/outrigger \
    && ln -s outrigger /out/pilot-agent

# Envoy binary of the chosen base, copied into a Debian runtime so the proxy
# image has the same tools whatever the Envoy image is built on.
FROM ${ENVOY_IMAGE} AS envoy

FROM ${BASE_IMAGE} AS istio-init
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 istio-proxy \
    && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin istio-proxy
COPY --from=build /out/outrigger /out/pilot-agent /usr/local/bin/
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/pilot-agent"]

FROM istio-init AS istio-proxy
USER root
COPY --from=envoy /usr/local/bin/envoy /usr/local/bin/envoy
RUN mkdir -p /etc/istio/proxy /etc/istio/config /var/lib/istio/data /var/run/secrets/workload-spiffe-uds \
    && chown -R 1337:1337 /etc/istio/proxy /var/lib/istio /var/run/secrets/workload-spiffe-uds
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/pilot-agent"]
