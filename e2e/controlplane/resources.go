package controlplane

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Node groups: Envoy sidecars get the full sidecar view; proxyless gRPC
// clients (node metadata GENERATOR=grpc, as in the gRPC bootstrap) get API
// listeners and plain EDS clusters, which is all grpc-go accepts.
const (
	groupEnvoy = "envoy"
	groupGRPC  = "grpc"

	passthrough        = "PassthroughCluster"
	inboundPassthrough = "InboundPassthroughCluster"
)

// ClusterName is the cluster of a service port, in Istio's format.
func ClusterName(s Service, port uint32) string {
	return fmt.Sprintf("outbound|%d||%s", port, s.Host())
}

// GRPCTarget is the xds:/// target (and API listener name) of a port.
func GRPCTarget(s Service, port uint32) string {
	return s.Host() + ":" + strconv.FormatUint(uint64(port), 10)
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only static, valid messages reach here
	}
	return a
}

var adsSource = &core.ConfigSource{
	ResourceApiVersion:    core.ApiVersion_V3,
	ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
}

func edsCluster(name string, padding int) *cluster.Cluster {
	c := &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig:     &cluster.Cluster_EdsClusterConfig{EdsConfig: adsSource, ServiceName: name},
		ConnectTimeout:       durationpb.New(10 * time.Second),
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
	}
	if padding > 0 {
		c.Metadata = &core.Metadata{FilterMetadata: map[string]*structpb.Struct{
			"istio": {Fields: map[string]*structpb.Value{
				"services": structpb.NewStringValue(name),
				"padding":  structpb.NewStringValue(strings.Repeat("x", padding)),
			}},
		}}
	}
	return c
}

func loadAssignment(name string, s Service, port uint32) *endpoint.ClusterLoadAssignment {
	var lbs []*endpoint.LbEndpoint
	for _, e := range s.Endpoints {
		p := e.Port
		if p == 0 {
			p = port
		}
		lbs = append(lbs, &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
			Address: socketAddress(e.IP, p),
		}}})
	}
	return &endpoint.ClusterLoadAssignment{
		ClusterName: name,
		Endpoints: []*endpoint.LocalityLbEndpoints{{
			Locality: &core.Locality{Region: "test"},
			// grpc-go drops localities without a weight.
			LoadBalancingWeight: wrapperspb.UInt32(1),
			LbEndpoints:         lbs,
		}},
	}
}

func socketAddress(ip string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address: ip, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

func tcpProxy(stat, clusterName string) *listener.Filter {
	return &listener.Filter{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listener.Filter_TypedConfig{
		TypedConfig: mustAny(&tcpproxy.TcpProxy{StatPrefix: stat, ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: clusterName}}),
	}}
}

func httpManager(stat, routeName string) *hcm.HttpConnectionManager {
	return &hcm.HttpConnectionManager{
		StatPrefix: stat,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			ConfigSource: adsSource, RouteConfigName: routeName,
		}},
		HttpFilters: []*hcm.HttpFilter{{
			Name: "envoy.filters.http.router", ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&router.Router{})},
		}},
	}
}

// resourcesFor builds one node group's resources.
func resourcesFor(m Mesh, group string) map[resource.Type][]types.Resource {
	out := map[resource.Type][]types.Resource{}
	add := func(t resource.Type, r types.Resource) { out[t] = append(out[t], r) }
	routes := map[string]*route.RouteConfiguration{}
	var routeOrder []string
	for _, s := range m.Services {
		for _, p := range s.Ports {
			name := ClusterName(s, p.Port)
			if group == groupGRPC {
				if p.Protocol != "grpc" {
					continue
				}
				add(resource.ClusterType, edsCluster(name, 0))
				add(resource.EndpointType, loadAssignment(name, s, p.Port))
				target := GRPCTarget(s, p.Port)
				add(resource.ListenerType, &listener.Listener{
					Name:        target,
					ApiListener: &listener.ApiListener{ApiListener: mustAny(httpManager(target, target))},
				})
				add(resource.RouteType, &route.RouteConfiguration{Name: target, VirtualHosts: []*route.VirtualHost{{
					Name: target, Domains: []string{"*"},
					Routes: []*route.Route{{
						Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
						Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: name}}},
					}},
				}}})
				continue
			}
			add(resource.ClusterType, edsCluster(name, m.ClusterPadding))
			add(resource.EndpointType, loadAssignment(name, s, p.Port))
			lname := fmt.Sprintf("%s_%d", s.VIP, p.Port)
			l := &listener.Listener{
				Name:       lname,
				Address:    socketAddress(s.VIP, p.Port),
				BindToPort: wrapperspb.Bool(false),
			}
			if p.Protocol == "http" || p.Protocol == "grpc" {
				rn := strconv.FormatUint(uint64(p.Port), 10)
				l.FilterChains = []*listener.FilterChain{{Filters: []*listener.Filter{{
					Name:       "envoy.filters.network.http_connection_manager",
					ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(httpManager(lname, rn))},
				}}}}
				rc := routes[rn]
				if rc == nil {
					rc = &route.RouteConfiguration{Name: rn}
					routes[rn] = rc
					routeOrder = append(routeOrder, rn)
				}
				host := s.Host()
				rc.VirtualHosts = append(rc.VirtualHosts, &route.VirtualHost{
					Name:    host + ":" + rn,
					Domains: []string{host, host + ":" + rn, s.Name + "." + s.Namespace, s.VIP, s.VIP + ":" + rn},
					Routes: []*route.Route{{
						Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
						Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: name}}},
					}},
				})
			} else {
				l.FilterChains = []*listener.FilterChain{{Filters: []*listener.Filter{tcpProxy(lname, name)}}}
			}
			add(resource.ListenerType, l)
		}
	}
	if group == groupEnvoy {
		add(resource.ClusterType, &cluster.Cluster{
			Name:                 passthrough,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
			LbPolicy:             cluster.Cluster_CLUSTER_PROVIDED,
			ConnectTimeout:       durationpb.New(10 * time.Second),
		})
		// Inbound passthrough connects from 127.0.0.6, as Istio's does: the
		// capture rules let that source past, so the app gets the
		// connection instead of it looping back into 15006.
		add(resource.ClusterType, &cluster.Cluster{
			Name:                 inboundPassthrough,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
			LbPolicy:             cluster.Cluster_CLUSTER_PROVIDED,
			ConnectTimeout:       durationpb.New(10 * time.Second),
			UpstreamBindConfig: &core.BindConfig{SourceAddress: &core.SocketAddress{
				Address: "127.0.0.6", PortSpecifier: &core.SocketAddress_PortValue{PortValue: 0},
			}},
		})
		origDst := &listener.ListenerFilter{Name: "envoy.filters.listener.original_dst", ConfigType: &listener.ListenerFilter_TypedConfig{
			TypedConfig: mustAny(&originaldst.OriginalDst{}),
		}}
		add(resource.ListenerType, &listener.Listener{
			Name: "virtualOutbound", Address: socketAddress("0.0.0.0", 15001),
			UseOriginalDst:  wrapperspb.Bool(true),
			ListenerFilters: []*listener.ListenerFilter{origDst},
			FilterChains:    []*listener.FilterChain{{Filters: []*listener.Filter{tcpProxy("PassthroughCluster", passthrough)}}},
		})
		add(resource.ListenerType, &listener.Listener{
			Name: "virtualInbound", Address: socketAddress("0.0.0.0", 15006),
			TrafficDirection: core.TrafficDirection_INBOUND,
			ListenerFilters:  []*listener.ListenerFilter{origDst},
			FilterChains:     []*listener.FilterChain{{Filters: []*listener.Filter{tcpProxy("InboundPassthroughCluster", inboundPassthrough)}}},
		})
		for _, rn := range routeOrder {
			add(resource.RouteType, routes[rn])
		}
	}
	return out
}

// NameTable is the mesh's DNS name table, as istiod builds it for a
// sidecar: one entry per service host with its VIP.
func NameTable(m Mesh) *nds.NameTable {
	t := &nds.NameTable{Table: map[string]*nds.NameInfo{}}
	for _, s := range m.Services {
		t.Table[s.Host()] = &nds.NameInfo{IPs: []string{s.VIP}, Registry: "Kubernetes", Shortname: s.Name, Namespace: s.Namespace}
	}
	return t
}
