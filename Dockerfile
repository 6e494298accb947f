# Outrigger images. Build the agent once, then layer it on:
#   --target istio-init   small image with iptables (nft + legacy) and iproute2
#   --target istio-proxy  Envoy base image (ENVOY_IMAGE) plus the agent
ARG GO_IMAGE=golang:1.26-bookworm
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.36-latest
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/outrigger ./cmd/outrigger

FROM ${BASE_IMAGE} AS istio-init
RUN apt-get update && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/outrigger /usr/local/bin/outrigger
RUN ln -s /usr/local/bin/outrigger /usr/local/bin/pilot-agent
ENTRYPOINT ["/usr/local/bin/pilot-agent"]

FROM ${ENVOY_IMAGE} AS istio-proxy
COPY --from=istio-init /usr/sbin/ /usr/sbin/
COPY --from=build /out/outrigger /usr/local/bin/outrigger
RUN ln -sf /usr/local/bin/outrigger /usr/local/bin/pilot-agent \
    && mkdir -p /etc/istio/proxy /var/lib/istio/data \
    && chown -R 1337:1337 /etc/istio/proxy /var/lib/istio
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/pilot-agent"]
