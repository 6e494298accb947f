package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/outrigger-mesh/outrigger/e2e/envoysim/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/envoysim/simtest"
)

// adsSource waits forever for its first answer (initial_fetch_timeout 0),
// so warming is visible.
func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3, InitialFetchTimeout: durationpb.New(0),
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
}

func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ConnectTimeout: durationpb.New(time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource(), ServiceName: name}}
}

func cla(name, addr string) *endpointv3.ClusterLoadAssignment {
	host, port, _ := net.SplitHostPort(addr)
	var p uint32
	fmt.Sscan(port, &p)
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: p}}}}}}}}}}}
}

func socketAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
}

func httpListener(t *testing.T, name, ip string, port uint32, bind bool, route string) *listenerv3.Listener {
	router, _ := anypb.New(&routerv3.Router{})
	hcm, err := anypb.New(&hcmv3.HttpConnectionManager{StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: adsSource(), RouteConfigName: route}},
		HttpFilters:    []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}}}})
	if err != nil {
		t.Fatal(err)
	}
	return &listenerv3.Listener{Name: name, Address: socketAddr(ip, port), BindToPort: wrapperspb.Bool(bind),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.http_connection_manager",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm}}}}}}
}

func tcpListener(t *testing.T, name, ip string, port uint32, bind bool, cluster string) *listenerv3.Listener {
	tp, err := anypb.New(&tcpv3.TcpProxy{StatPrefix: name, ClusterSpecifier: &tcpv3.TcpProxy_Cluster{Cluster: cluster}})
	if err != nil {
		t.Fatal(err)
	}
	return &listenerv3.Listener{Name: name, Address: socketAddr(ip, port), BindToPort: wrapperspb.Bool(bind),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.tcp_proxy",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: tp}}}}}}
}

func routeConfig(name, domain, cluster string) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{{Name: domain, Domains: []string{domain, domain + ":*"},
		Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}}}}}}}
}

// backend is a TCP server that answers each line with "<tag>:<line>".
func backend(t *testing.T, tag string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "%s:%s", tag, line)
			}()
		}
	}()
	return ln.Addr().String()
}

// httpBackend answers every request with "<tag> <host> <path>".
func httpBackend(t *testing.T, tag string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s %s", tag, r.Host, r.URL.Path)
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func (r *simRun) listenerAddr(t *testing.T, name string) string {
	t.Helper()
	_, lst := r.get(t, "/listeners")
	for _, l := range strings.Split(strings.TrimSpace(lst), "\n") {
		if n, a, _ := strings.Cut(l, "::"); n == name {
			return a
		}
	}
	t.Fatalf("listener %s not in /listeners:\n%s", name, lst)
	return ""
}

func typesSeen(reqs []controlplane.Request) []string {
	var out []string
	for _, r := range reqs {
		if r.Nonce == "" { // a subscription, not an ACK
			out = append(out, shortType(r.TypeURL))
		}
	}
	return out
}

// CDS, then EDS for the EDS clusters, then LDS once they warmed, then RDS
// for the listeners' routes, in SotW and Delta; LIVE only when all
// arrived; traffic then follows listener -> route -> cluster -> endpoint.
func TestEDSAndRDS(t *testing.T) {
	const node = simtest.DefaultNodeID
	for _, delta := range []bool{false, true} {
		t.Run(fmt.Sprintf("delta=%v", delta), func(t *testing.T) {
			tcpAddr, webAddr := backend(t, "tcp"), httpBackend(t, "web")
			sock := filepath.Join(shortDir(t), "XDS")
			cp := controlplane.Start(t, sock)
			r := startSim(t, simtest.Bootstrap{AdminTCP: true, XDSSocket: sock, Delta: delta}.JSON())
			clusters := []types.Resource{edsCluster("outbound|9000||tcp"), edsCluster("outbound|80||web")}
			listeners := []types.Resource{
				tcpListener(t, "tcp", "127.0.0.1", 0, true, "outbound|9000||tcp"),
				httpListener(t, "web", "127.0.0.1", 0, true, "80"),
				// Istio's per-service listener: never bound (10.96.0.5 is
				// not a local address, binding would fail).
				tcpListener(t, "10.96.0.5_9000", "10.96.0.5", 9000, false, "outbound|9000||tcp"),
			}

			// Clusters without endpoints: clusters warm, no LDS yet.
			cp.SetResources(t, node, "v1", map[resource.Type][]types.Resource{resource.ClusterType: clusters, resource.ListenerType: listeners})
			r.waitStat(t, "cluster_manager.cds.update_success: 1")
			time.Sleep(300 * time.Millisecond)
			if got := typesSeen(cp.Requests()); slices.Contains(got, "lds") {
				t.Errorf("LDS requested before the EDS clusters warmed: %v", got)
			}
			if code, _ := r.get(t, "/ready"); code == http.StatusOK {
				t.Error("LIVE before EDS")
			}

			// Endpoints: LDS follows, then RDS for route "80"; still not
			// live without the route.
			cp.SetResources(t, node, "v2", map[resource.Type][]types.Resource{resource.ClusterType: clusters, resource.ListenerType: listeners,
				resource.EndpointType: {cla("outbound|9000||tcp", tcpAddr), cla("outbound|80||web", webAddr)}})
			r.waitStat(t, "listener_manager.lds.update_success: 1")
			time.Sleep(300 * time.Millisecond)
			if code, _ := r.get(t, "/ready"); code == http.StatusOK {
				t.Error("LIVE before RDS")
			}
			cp.SetResources(t, node, "v3", map[resource.Type][]types.Resource{resource.ClusterType: clusters, resource.ListenerType: listeners,
				resource.EndpointType: {cla("outbound|9000||tcp", tcpAddr), cla("outbound|80||web", webAddr)},
				resource.RouteType:    {routeConfig("80", "web.demo.svc.cluster.local", "outbound|80||web")}})
			r.waitStat(t, "server.state: 0")

			if got, want := typesSeen(cp.Requests()), []string{"cds", "eds", "lds", "rds"}; !slices.Equal(got[:4], want) {
				t.Errorf("subscription order = %v, want %v first", got, want)
			}
			for _, req := range cp.Requests() {
				if req.NACK != "" {
					t.Errorf("NACK: %+v", req)
				}
				if req.TypeURL == edsType && req.Nonce == "" && !slices.Equal(req.Names, []string{"outbound|80||web", "outbound|9000||tcp"}) {
					t.Errorf("EDS subscription names = %v", req.Names)
				}
			}
			stats := []string{"cluster_manager.eds.update_success: ", "http.rds.update_success: ",
				"cluster.outbound|9000||tcp.update_success: ", "http.web.rds.80.update_success: "}
			for _, s := range stats {
				r.waitStat(t, s)
			}
			if a := r.listenerAddr(t, "10.96.0.5_9000"); a != "10.96.0.5:9000" {
				t.Errorf("bind_to_port false listener shows %q", a)
			}

			// TCP: listener -> tcp_proxy -> EDS endpoint.
			c, err := net.Dial("tcp", r.listenerAddr(t, "tcp"))
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(c, "hello\n")
			got, _ := io.ReadAll(c)
			c.Close()
			if string(got) != "tcp:hello\n" {
				t.Errorf("tcp through envoysim = %q", got)
			}
			// HTTP: listener -> RDS route by Host -> EDS endpoint.
			req, _ := http.NewRequest("GET", "http://"+r.listenerAddr(t, "web")+"/x", nil)
			req.Host = "web.demo.svc.cluster.local"
			resp, err := noKeepAlive.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "web web.demo.svc.cluster.local /x" {
				t.Errorf("http through envoysim = %q", body)
			}
			r.eventually(t, "access log lines", func() bool {
				out := r.out.String()
				return strings.Contains(out, "cluster=outbound|9000||tcp upstream="+tcpAddr) &&
					strings.Contains(out, "cluster=outbound|80||web upstream="+webAddr)
			})
			_, dump := r.get(t, "/config_dump?resource=dynamic_endpoint_configs")
			if !strings.Contains(dump, "outbound|80||web") || !strings.Contains(dump, "DynamicEndpointConfig") {
				t.Errorf("endpoint dump:\n%s", dump)
			}

			// A bad route update is NACKed.
			cp.SetResources(t, node, "v4", map[resource.Type][]types.Resource{resource.ClusterType: clusters, resource.ListenerType: listeners,
				resource.EndpointType: {cla("outbound|9000||tcp", tcpAddr), cla("outbound|80||web", webAddr)},
				resource.RouteType:    {&routev3.RouteConfiguration{Name: "80", VirtualHosts: []*routev3.VirtualHost{{Name: "bad"}}}}})
			r.waitStat(t, "http.rds.update_rejected: ")

			// A cluster removed by CDS leaves the EDS subscription: Delta
			// unsubscribes it, SotW asks for the remaining names only.
			cp.SetResources(t, node, "v5", map[resource.Type][]types.Resource{resource.ClusterType: clusters[:1], resource.ListenerType: listeners,
				resource.EndpointType: {cla("outbound|9000||tcp", tcpAddr)},
				resource.RouteType:    {routeConfig("80", "web.demo.svc.cluster.local", "outbound|80||web")}})
			r.eventually(t, "the EDS subscription to shrink", func() bool {
				for _, req := range cp.Requests() {
					if req.TypeURL != edsType {
						continue
					}
					if delta && slices.Equal(req.Unsub, []string{"outbound|80||web"}) ||
						!delta && req.Nonce != "" && slices.Equal(req.Names, []string{"outbound|9000||tcp"}) {
						return true
					}
				}
				return false
			})
		})
	}
}
