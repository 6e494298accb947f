package bootstrap

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	udpatypev1 "github.com/cncf/xds/go/udpa/type/v1"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	metricsv3 "github.com/envoyproxy/go-control-plane/envoy/config/metrics/v3"
	overloadv3 "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	filev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	internallistenerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/bootstrap/internal_listener/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	downstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Names Envoy, the agent and istiod agree on.
const (
	XDSCluster        = "xds-grpc"
	SDSCluster        = "sds-grpc"
	AgentCluster      = "agent"
	PrometheusCluster = "prometheus_stats"
	// AdminProfilePath is Envoy's admin profile_path, as in Istio.
	AdminProfilePath = "/var/lib/istio/data/envoy.prof"
)

// Generate renders the bootstrap: the user's template when one is configured
// (see TemplatePath), else the built-in one. It returns the document and its
// format ("json" or "yaml"). The result is not validated; Prepare does that.
func Generate(p Params) (data []byte, format string, err error) {
	if err := p.check(); err != nil {
		return nil, "", err
	}
	if tp := TemplatePath(p); tp != "" {
		return renderTemplate(p, tp)
	}
	b, err := Build(p)
	if err != nil {
		return nil, "", err
	}
	data, err = Marshal(b)
	return data, "json", err
}

func (p Params) check() error {
	switch {
	case p.Node == nil:
		return errors.New("bootstrap: no node identity")
	case p.Proxy == nil:
		return errors.New("bootstrap: no proxy config")
	}
	return nil
}

// Marshal renders a bootstrap as indented JSON with Envoy's field names, in
// proto field order and byte-stable (protojson's own output is not).
func Marshal(b *bootstrapv3.Bootstrap) ([]byte, error) {
	js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("encode bootstrap: %w", err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, js, "", "  "); err != nil {
		return nil, fmt.Errorf("encode bootstrap: %w", err)
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// Build returns the built-in bootstrap as a typed message: what Istio's
// envoy_bootstrap.json produces, without the 15021 health listener (the agent
// serves 15021 itself) and without the legacy tracer/metrics-service
// clusters.
func Build(p Params) (*bootstrapv3.Bootstrap, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	fam := familyOf(p.Node.IPs, p.DualStack)
	meta, err := structFromJSON(p.Node.Metadata)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: node metadata: %w", err)
	}
	flags, err := structpb.NewStruct(runtimeFlags(p))
	if err != nil {
		return nil, fmt.Errorf("bootstrap: runtime flags: %w", err)
	}
	maxConns, err := maxConnections(p)
	if err != nil {
		return nil, err
	}
	xdsType := corev3.ApiConfigSource_GRPC
	if p.Delta || p.Node.Type == "waypoint" {
		xdsType = corev3.ApiConfigSource_DELTA_GRPC
	}
	metadataDiscovery := p.MetadataDiscovery && xdsType == corev3.ApiConfigSource_DELTA_GRPC
	stats := buildStats(p)

	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{
			Id:      p.Node.ID,
			Cluster: p.Node.Cluster,
			Locality: &corev3.Locality{
				Region:  p.Node.Locality.Region,
				Zone:    p.Node.Locality.Zone,
				SubZone: p.Node.Locality.SubZone,
			},
			Metadata: meta,
		},
		LayeredRuntime: &bootstrapv3.LayeredRuntime{Layers: []*bootstrapv3.RuntimeLayer{
			{Name: "global config", LayerSpecifier: &bootstrapv3.RuntimeLayer_StaticLayer{StaticLayer: flags}},
			{Name: "admin", LayerSpecifier: &bootstrapv3.RuntimeLayer_AdminLayer_{AdminLayer: &bootstrapv3.RuntimeLayer_AdminLayer{}}},
		}},
		StatsConfig: statsConfig(stats, metadataDiscovery),
		Admin: &bootstrapv3.Admin{
			AccessLog: []*accesslogv3.AccessLog{{
				Name:       "envoy.access_loggers.file",
				ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: mustAny(&filev3.FileAccessLog{Path: "/dev/null"})},
			}},
			ProfilePath: AdminProfilePath,
			Address:     socketAddress(fam.localhost, uint32(p.Proxy.ProxyAdminPort)),
		},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			LdsConfig: adsConfigSource(),
			CdsConfig: adsConfigSource(),
			AdsConfig: &corev3.ApiConfigSource{
				ApiType:                   xdsType,
				SetNodeOnFirstMessageOnly: true,
				TransportApiVersion:       corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{
					TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: XDSCluster}},
				}},
			},
		},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Clusters: []*clusterv3.Cluster{
				staticCluster(PrometheusCluster, 250*time.Millisecond, socketAddress(fam.localhost, uint32(p.Proxy.ProxyAdminPort))),
				staticCluster(AgentCluster, 250*time.Millisecond, socketAddress(fam.localhost, uint32(p.Proxy.StatusPort))),
				withHTTP2(staticCluster(SDSCluster, time.Second, pipeAddress(p.SDSSocketPath)), 0),
				xdsCluster(p.Proxy.XDSSocketPath()),
			},
			Listeners: []*listenerv3.Listener{prometheusListener(fam, p.EnvoyPrometheusPort)},
		},
		OverloadManager: &overloadv3.OverloadManager{ResourceMonitors: []*overloadv3.ResourceMonitor{{
			Name: "envoy.resource_monitors.global_downstream_max_connections",
			ConfigType: &overloadv3.ResourceMonitor_TypedConfig{TypedConfig: mustAny(&downstreamv3.DownstreamConnectionsConfig{
				MaxActiveDownstreamConnections: maxConns,
			})},
		}}},
	}

	if metadataDiscovery {
		b.BootstrapExtensions = append(b.BootstrapExtensions, &corev3.TypedExtensionConfig{
			Name: "metadata_discovery",
			TypedConfig: mustAny(&udpatypev1.TypedStruct{
				TypeUrl: "type.googleapis.com/istio.workload.BootstrapExtension",
				Value:   mustStruct(map[string]any{"config_source": map[string]any{"ads": map[string]any{}}}),
			}),
		})
	}
	b.BootstrapExtensions = append(b.BootstrapExtensions, &corev3.TypedExtensionConfig{
		Name:        "envoy.bootstrap.internal_listener",
		TypedConfig: mustAny(&internallistenerv3.InternalListener{BufferSizeKb: wrapperspb.UInt32(64)}),
	})
	if p.OutlierLogPath != "" {
		b.ClusterManager = &bootstrapv3.ClusterManager{
			OutlierDetection: &bootstrapv3.ClusterManager_OutlierDetection{EventLogPath: p.OutlierLogPath},
		}
	}
	if p.LogAsJSON {
		b.ApplicationLogConfig = &bootstrapv3.Bootstrap_ApplicationLogConfig{
			LogFormat: &bootstrapv3.Bootstrap_ApplicationLogConfig_LogFormat{
				LogFormat: &bootstrapv3.Bootstrap_ApplicationLogConfig_LogFormat_JsonFormat{JsonFormat: mustStruct(map[string]any{
					"level": "%l", "time": "%Y-%m-%dT%T.%fZ", "scope": "envoy %n", "msg": "%j", "caller": "%g:%#", "thread": "%t",
				})},
			},
		}
	}
	return b, nil
}

func maxConnections(p Params) (int64, error) {
	const key = "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"
	if v, ok := p.Proxy.ProxyMetadata[key]; ok {
		var n int64
		if _, err := fmt.Sscan(v, &n); err != nil || n <= 0 {
			return 0, fmt.Errorf("proxy config: proxyMetadata %s: %q is not a positive integer", key, v)
		}
		return n, nil
	}
	return maxDownstreamConnections(p), nil
}

func statsConfig(s statsOptions, metadataDiscovery bool) *metricsv3.StatsConfig {
	sc := &metricsv3.StatsConfig{UseAllDefaultTags: wrapperspb.Bool(false)}
	for _, t := range statsTags(s.extraTags) {
		sc.StatsTags = append(sc.StatsTags, &metricsv3.TagSpecifier{
			TagName: t[0], TagValue: &metricsv3.TagSpecifier_Regex{Regex: t[1]},
		})
	}
	for _, b := range s.buckets {
		sc.HistogramBucketSettings = append(sc.HistogramBucketSettings, &metricsv3.HistogramBucketSettings{
			Match: prefixMatcher(b.prefix), Buckets: b.buckets,
		})
	}
	patterns := []*matcherv3.StringMatcher{prefixMatcher("reporter=")}
	if metadataDiscovery {
		patterns = append(patterns, prefixMatcher("workload_discovery"))
	}
	for _, v := range s.prefixes {
		patterns = append(patterns, prefixMatcher(v))
	}
	for _, v := range s.suffixes {
		patterns = append(patterns, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: v}})
	}
	for _, v := range s.regexps {
		patterns = append(patterns, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{
			SafeRegex: &matcherv3.RegexMatcher{Regex: v},
		}})
	}
	patterns = append(patterns, prefixMatcher("component"), prefixMatcher("istio"))
	sc.StatsMatcher = &metricsv3.StatsMatcher{StatsMatcher: &metricsv3.StatsMatcher_InclusionList{
		InclusionList: &matcherv3.ListStringMatcher{Patterns: patterns},
	}}
	return sc
}

func prefixMatcher(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

func adsConfigSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		InitialFetchTimeout:   durationpb.New(0),
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Protocol:      corev3.SocketAddress_TCP,
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func pipeAddress(p string) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: p}}}
}

func staticCluster(name string, connectTimeout time.Duration, addr *corev3.Address) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(connectTimeout),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: addr}},
			}}}},
		},
	}
}

// withHTTP2 makes c speak HTTP/2 (gRPC); maxRequestsPerConn > 0 also caps
// requests per connection (the non-deprecated home of Istio's
// max_requests_per_connection).
func withHTTP2(c *clusterv3.Cluster, maxRequestsPerConn uint32) *clusterv3.Cluster {
	opts := &upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
				},
			},
		},
	}
	if maxRequestsPerConn > 0 {
		opts.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{MaxRequestsPerConnection: wrapperspb.UInt32(maxRequestsPerConn)}
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{
		"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(opts),
	}
	return c
}

// xdsCluster is the ADS upstream: the agent's xDS proxy on a unix socket.
func xdsCluster(socket string) *clusterv3.Cluster {
	c := withHTTP2(staticCluster(XDSCluster, time.Second, pipeAddress(socket)), 1)
	threshold := func(p corev3.RoutingPriority) *clusterv3.CircuitBreakers_Thresholds {
		return &clusterv3.CircuitBreakers_Thresholds{
			Priority:           p,
			MaxConnections:     wrapperspb.UInt32(100000),
			MaxPendingRequests: wrapperspb.UInt32(100000),
			MaxRequests:        wrapperspb.UInt32(100000),
		}
	}
	c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		threshold(corev3.RoutingPriority_DEFAULT), threshold(corev3.RoutingPriority_HIGH),
	}}
	c.UpstreamConnectionOptions = &clusterv3.UpstreamConnectionOptions{
		TcpKeepalive: &corev3.TcpKeepalive{KeepaliveTime: wrapperspb.UInt32(300)},
	}
	return c
}

// prometheusListener serves /stats/prometheus from the admin port on
// ENVOY_PROMETHEUS_PORT. It is exempt from the global connection limit so
// scrapes work under load.
func prometheusListener(fam ipFamily, port uint16) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: "stats",
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			VirtualHosts: []*routev3.VirtualHost{{
				Name:    "backend",
				Domains: []string{"*"},
				Routes: []*routev3.Route{{
					Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/stats/prometheus"}},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{
						ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: PrometheusCluster},
					}},
				}},
			}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})},
		}},
	}
	l := &listenerv3.Listener{
		Address: socketAddress(fam.wildcard, uint32(port)),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name:       "envoy.filters.network.http_connection_manager",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)},
		}}}},
		IgnoreGlobalConnLimit: true,
		BypassOverloadManager: true,
	}
	if fam.dualStack {
		l.AdditionalAddresses = []*listenerv3.AdditionalAddress{{Address: socketAddress(fam.additionalWildcard, uint32(port))}}
	}
	return l
}

// mustAny packs a message built in this file; it cannot fail.
func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("bootstrap: pack %T: %v", m, err))
	}
	return a
}

// mustStruct converts a literal map built in this file; it cannot fail.
func mustStruct(m map[string]any) *structpb.Struct {
	s, err := structpb.NewStruct(m)
	if err != nil {
		panic(fmt.Sprintf("bootstrap: struct: %v", err))
	}
	return s
}

// structFromJSON converts node metadata (typed Go values) to a Struct via
// JSON, as Istio does.
func structFromJSON(v any) (*structpb.Struct, error) {
	js, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	s := &structpb.Struct{}
	if err := protojson.Unmarshal(js, s); err != nil {
		return nil, err
	}
	return s, nil
}
