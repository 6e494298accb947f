package simtest

import (
	"encoding/json"
	"fmt"
	"strings"
)

// AdminSocketName is the admin socket's file name in the working
// directory.
const AdminSocketName = "admin.sock"

// DefaultNodeID is an Istio sidecar node id.
const DefaultNodeID = "sidecar~10.10.0.2~app-0.demo~demo.svc.cluster.local"

// Bootstrap describes a reduced Istio-style bootstrap: admin on a unix
// socket, optional ADS over the xds-grpc cluster, optional sds-grpc
// cluster, and extra static resources (JSON objects).
type Bootstrap struct {
	NodeID    string // default DefaultNodeID
	XDSSocket string // ADS over this pipe; "" = static config only
	Delta     bool   // DELTA_GRPC instead of GRPC
	SDSSocket string // the sds-grpc cluster's pipe; "" = none
	Listeners []string
	Clusters  []string
	// AdminTCP puts the admin API on 127.0.0.1:0 instead of the
	// AdminSocketName pipe (for envoysim run in the test's process).
	AdminTCP bool
}

// JSON renders the bootstrap.
func (b Bootstrap) JSON() string {
	node := b.NodeID
	if node == "" {
		node = DefaultNodeID
	}
	pipeCluster := func(name, path string) string {
		return fmt.Sprintf(`{"name": %q, "type": "STATIC", "connect_timeout": "1s",
      "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}},
      "load_assignment": {"cluster_name": %q, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": %q}}}}]}]}}`,
			name, name, path)
	}
	clusters := append([]string(nil), b.Clusters...)
	dynamic := ""
	if b.XDSSocket != "" {
		api := "GRPC"
		if b.Delta {
			api = "DELTA_GRPC"
		}
		clusters = append(clusters, pipeCluster("xds-grpc", b.XDSSocket))
		dynamic = fmt.Sprintf(`"dynamic_resources": {
    "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
    "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
    "ads_config": {"api_type": %q, "set_node_on_first_message_only": true, "transport_api_version": "V3",
      "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}
  },`, api)
	}
	if b.SDSSocket != "" {
		clusters = append(clusters, pipeCluster("sds-grpc", b.SDSSocket))
	}
	nodeJSON, _ := json.Marshal(node)
	admin := fmt.Sprintf(`{"pipe": {"path": %q}}`, AdminSocketName)
	if b.AdminTCP {
		admin = `{"socket_address": {"address": "127.0.0.1", "port_value": 0}}`
	}
	return fmt.Sprintf(`{
  "node": {"id": %s, "cluster": "app.demo"},
  "admin": {"address": %s},
  %s
  "static_resources": {"clusters": [%s], "listeners": [%s]}
}`, nodeJSON, admin, dynamic, strings.Join(clusters, ",\n"), strings.Join(b.Listeners, ",\n"))
}

// SDSConfig is the sds_config Istio puts in every TLS context: the
// sds-grpc cluster, SotW gRPC.
const SDSConfig = `{"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
  "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}, "resource_api_version": "V3"}`

// MTLSListener is an inbound listener (not bound) whose filter chain
// terminates Istio mTLS: certificate secret cert (Istio: "default") and
// validation secret ca (Istio: "ROOTCA") from sds-grpc, as istiod sends
// for a workload port.
func MTLSListener(name, cert, ca string) string {
	return fmt.Sprintf(`{"name": %q, "traffic_direction": "INBOUND", "bind_to_port": false,
  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
  "filter_chains": [{
    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
      "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
      "require_client_certificate": true,
      "common_tls_context": {
        "alpn_protocols": ["istio-peer-exchange", "istio"],
        "tls_certificate_sds_secret_configs": [{"name": %q, "sds_config": %s}],
        "combined_validation_context": {"default_validation_context": {},
          "validation_context_sds_secret_config": {"name": %q, "sds_config": %s}}}}},
    "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
      "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
      "stat_prefix": "inbound", "cluster": "inbound"}}]}]}`, name, cert, SDSConfig, ca, SDSConfig)
}
