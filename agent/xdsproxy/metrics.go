package xdsproxy

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// metrics are the proxy's Prometheus series. Names without a comment are
// Istio's (pkg/istio-agent/metrics); the status server adds istio_agent_.
type metrics struct {
	requests     *prometheus.CounterVec // xds_proxy_requests{type}: requests sent upstream
	responses    *prometheus.CounterVec // xds_proxy_responses{type}: responses from upstream
	connFailures prometheus.Counter     // istiod_connection_failures
	connTerms    *prometheus.CounterVec // istiod_connection_terminations{type}
	envoyTerms   *prometheus.CounterVec // envoy_connection_terminations{type}

	// Outrigger only.
	envoyRequests  *prometheus.CounterVec // xds_proxy_envoy_requests_total{type}
	envoyResponses *prometheus.CounterVec // xds_proxy_envoy_responses_total{type,source}
	coalesced      *prometheus.CounterVec // xds_proxy_coalesced_responses_total{type}
	lastConfig     prometheus.Gauge       // xds_proxy_last_config_received_timestamp_seconds
	connected      prometheus.Gauge       // xds_proxy_upstream_connected
	recycles       prometheus.Counter     // xds_proxy_stalled_stream_recycles_total
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xds_proxy_requests", Help: "Discovery requests sent to the control plane, by type.",
		}, []string{"type"}),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xds_proxy_responses", Help: "Discovery responses received from the control plane, by type.",
		}, []string{"type"}),
		connFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istiod_connection_failures", Help: "Upstream connection attempts that failed before any response.",
		}),
		connTerms: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_connection_terminations", Help: "Established upstream streams that ended, by type (cancelled, error).",
		}, []string{"type"}),
		envoyTerms: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "envoy_connection_terminations", Help: "Envoy (downstream) streams that ended, by type (cancelled, replaced, error).",
		}, []string{"type"}),
		envoyRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xds_proxy_envoy_requests_total", Help: "Discovery requests received from Envoy, by type.",
		}, []string{"type"}),
		envoyResponses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xds_proxy_envoy_responses_total", Help: "Discovery responses sent to Envoy, by type and source (upstream, cache).",
		}, []string{"type", "source"}),
		coalesced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xds_proxy_coalesced_responses_total", Help: "SotW responses replaced by a newer one before a slow Envoy read them, by type.",
		}, []string{"type"}),
		lastConfig: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "xds_proxy_last_config_received_timestamp_seconds", Help: "Unix time of the last response from the control plane.",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "xds_proxy_upstream_connected", Help: "1 while an upstream stream is established.",
		}),
		recycles: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xds_proxy_stalled_stream_recycles_total", Help: "Upstream streams replaced by the stall watchdog.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.responses, m.connFailures, m.connTerms, m.envoyTerms,
			m.envoyRequests, m.envoyResponses, m.coalesced, m.lastConfig, m.connected, m.recycles} {
			// Re-registration (a second proxy on the same registry) keeps
			// the first collector; the proxy itself works either way.
			_ = reg.Register(c)
		}
	}
	return m
}

// shortType gives the metric label for a type URL: the well-known xDS
// abbreviations, else the message name.
func shortType(typeURL string) string {
	switch typeURL {
	case "type.googleapis.com/envoy.config.cluster.v3.Cluster":
		return "cds"
	case "type.googleapis.com/envoy.config.listener.v3.Listener":
		return "lds"
	case "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment":
		return "eds"
	case "type.googleapis.com/envoy.config.route.v3.RouteConfiguration":
		return "rds"
	case "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret":
		return "sds"
	case "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig":
		return "ecds"
	case nds.TypeURL:
		return "nds"
	}
	if i := strings.LastIndexByte(typeURL, '.'); i >= 0 {
		return typeURL[i+1:]
	}
	return typeURL
}
