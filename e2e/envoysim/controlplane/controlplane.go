// Package controlplane is a small xDS server for tests that run envoysim:
// go-control-plane's ADS server (SotW and Delta) over a snapshot cache, on
// a unix socket or any listener, recording the requests it gets so a test
// can see ACKs and NACKs.
package controlplane

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Request is what the server saw from a client.
type Request struct {
	Delta   bool
	TypeURL string
	NodeID  string
	Nonce   string
	Version string
	NACK    string   // error_detail message, empty for an ACK or a request
	Names   []string // SotW resource_names; Delta resource_names_subscribe
	Unsub   []string // Delta resource_names_unsubscribe
}

// Server is a running control plane.
type Server struct {
	Cache cache.SnapshotCache
	grpc  *grpc.Server

	mu   sync.Mutex
	reqs []Request
}

// Start serves ADS on the unix socket path (created, parent dirs too) until
// the test ends.
func Start(t testing.TB, socket string) *Server {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.Remove(socket)
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	return Serve(t, ln)
}

// Serve serves ADS on ln until the test ends.
func Serve(t testing.TB, ln net.Listener) *Server {
	t.Helper()
	s := &Server{Cache: cache.NewSnapshotCache(false, cache.IDHash{}, nil)}
	cb := server.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discoverygrpc.DiscoveryRequest) error {
			s.record(Request{TypeURL: r.GetTypeUrl(), NodeID: r.GetNode().GetId(), Nonce: r.GetResponseNonce(),
				Version: r.GetVersionInfo(), NACK: r.GetErrorDetail().GetMessage(), Names: r.GetResourceNames()})
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoverygrpc.DeltaDiscoveryRequest) error {
			s.record(Request{Delta: true, TypeURL: r.GetTypeUrl(), NodeID: r.GetNode().GetId(), Nonce: r.GetResponseNonce(),
				NACK: r.GetErrorDetail().GetMessage(), Names: r.GetResourceNamesSubscribe(), Unsub: r.GetResourceNamesUnsubscribe()})
			return nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := server.NewServer(ctx, s.Cache, cb)
	s.grpc = grpc.NewServer()
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(s.grpc, srv)
	go func() { _ = s.grpc.Serve(ln) }()
	t.Cleanup(func() {
		cancel()
		s.grpc.Stop()
	})
	return s
}

func (s *Server) record(r Request) {
	s.mu.Lock()
	s.reqs = append(s.reqs, r)
	s.mu.Unlock()
}

// Requests returns what the server has seen so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

// Stop ends the server and its streams (to test reconnects).
func (s *Server) Stop() { s.grpc.Stop() }

// Set publishes clusters and listeners for nodeID as one snapshot version.
func (s *Server) Set(t testing.TB, nodeID, version string, clusters []*clusterv3.Cluster, listeners []*listenerv3.Listener) {
	t.Helper()
	var cs, ls []types.Resource
	for _, c := range clusters {
		cs = append(cs, c)
	}
	for _, l := range listeners {
		ls = append(ls, l)
	}
	s.SetResources(t, nodeID, version, map[resource.Type][]types.Resource{
		resource.ClusterType:  cs,
		resource.ListenerType: ls,
	})
}

// SetResources publishes any resources (clusters, endpoints, listeners,
// routes, ...) for nodeID as one snapshot version.
func (s *Server) SetResources(t testing.TB, nodeID, version string, res map[resource.Type][]types.Resource) {
	t.Helper()
	snap, err := cache.NewSnapshot(version, res)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Cache.SetSnapshot(context.Background(), nodeID, snap); err != nil {
		t.Fatal(err)
	}
}

// Cluster returns a minimal valid static cluster.
func Cluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       durationpb.New(time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
	}
}

// TCPListener returns an inbound listener on addr:port with a tcp_proxy
// to cluster, as istiod would send for a plain TCP port.
func TCPListener(name, addr string, port uint32, cluster string) *listenerv3.Listener {
	tp, _ := anypb.New(&tcpv3.TcpProxy{
		StatPrefix:       name,
		ClusterSpecifier: &tcpv3.TcpProxy_Cluster{Cluster: cluster},
	})
	return &listenerv3.Listener{
		Name:             name,
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: addr, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
		}}},
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name: "envoy.filters.network.tcp_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: tp},
		}}}},
	}
}
