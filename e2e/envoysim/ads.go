package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	cdsType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	ldsType = "type.googleapis.com/envoy.config.listener.v3.Listener"
)

// shortType maps a type URL to Envoy's stat scope.
func shortType(typeURL string) string {
	switch typeURL {
	case cdsType:
		return "cds"
	case ldsType:
		return "lds"
	}
	return typeURL
}

func statScope(typ string) string {
	if typ == "cds" {
		return "cluster_manager.cds."
	}
	return "listener_manager.lds."
}

// ads is Envoy's ADS subscription: one stream to the xds-grpc cluster, CDS
// first and LDS once CDS has answered (as Envoy orders its init), both
// wildcard. What was accepted survives a reconnect, and the new stream
// tells the server about it (SotW: version_info; Delta:
// initial_resource_versions), as Envoy does.
type ads struct {
	s         *sim
	conn      *grpc.ClientConn
	delta     bool
	nodeFirst bool
	target    string

	mu       sync.Mutex
	versions map[string]string               // SotW: last accepted version per type
	known    map[string]map[string]string    // Delta: resource name -> version per type
	clusters map[string]*clusterv3.Cluster   // accepted state
	lsnrs    map[string]*listenerv3.Listener // accepted state
}

// newADS returns nil when the bootstrap has no ADS config (static only).
func newADS(s *sim) (*ads, error) {
	dr := s.bs.GetDynamicResources()
	cfg := dr.GetAdsConfig()
	if cfg == nil {
		if dr.GetCdsConfig() != nil || dr.GetLdsConfig() != nil {
			return nil, errors.New("envoysim supports only ADS (dynamic_resources.ads_config)")
		}
		return nil, nil
	}
	var delta bool
	switch cfg.GetApiType() {
	case corev3.ApiConfigSource_GRPC:
	case corev3.ApiConfigSource_DELTA_GRPC:
		delta = true
	default:
		return nil, fmt.Errorf("ads_config.api_type %s is not supported by envoysim (want GRPC or DELTA_GRPC)", cfg.GetApiType())
	}
	if len(cfg.GetGrpcServices()) != 1 || cfg.GetGrpcServices()[0].GetEnvoyGrpc() == nil {
		return nil, errors.New("ads_config: want exactly one envoy_grpc service")
	}
	name := cfg.GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName()
	network, address, err := clusterAddress(s, name)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient("passthrough:///"+name,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, address)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
	if err != nil {
		return nil, fmt.Errorf("ads: %w", err)
	}
	return &ads{
		s: s, conn: conn, delta: delta, nodeFirst: dr.GetAdsConfig().GetSetNodeOnFirstMessageOnly(),
		target:   network + ":" + address,
		versions: map[string]string{}, known: map[string]map[string]string{cdsType: {}, ldsType: {}},
		clusters: map[string]*clusterv3.Cluster{}, lsnrs: map[string]*listenerv3.Listener{},
	}, nil
}

// clusterAddress finds the static cluster's first endpoint: a pipe (unix
// socket) or a socket address.
func clusterAddress(s *sim, name string) (network, address string, err error) {
	for _, c := range s.bs.GetStaticResources().GetClusters() {
		if c.GetName() != name {
			continue
		}
		for _, le := range c.GetLoadAssignment().GetEndpoints() {
			for _, lb := range le.GetLbEndpoints() {
				a := lb.GetEndpoint().GetAddress()
				if p := a.GetPipe(); p != nil {
					return "unix", p.GetPath(), nil
				}
				if sa := a.GetSocketAddress(); sa != nil {
					return "tcp", net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))), nil
				}
			}
		}
		return "", "", fmt.Errorf("cluster %q has no endpoint address", name)
	}
	return "", "", fmt.Errorf("ads_config names cluster %q, which is not a static cluster", name)
}

func (a *ads) close() { a.conn.Close() }

// run keeps a stream open, reconnecting with jittered backoff like Envoy's
// ADS retry policy (shorter, for tests).
func (a *ads) run(ctx context.Context) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		start := time.Now()
		var err error
		if a.delta {
			err = a.streamDelta(ctx)
		} else {
			err = a.streamSotW(ctx)
		}
		a.s.stats.set("control_plane.connected_state", 0)
		if ctx.Err() != nil {
			return
		}
		a.s.stats.inc("cluster.xds-grpc.upstream_cx_connect_fail")
		if time.Since(start) > 10*time.Second {
			backoff = 200 * time.Millisecond
		}
		d := backoff/2 + time.Duration(rand.Int64N(int64(backoff)/2+1))
		a.s.log.Printf("warning: StreamAggregatedResources gRPC config stream to %s closed: %v; retrying in %v", a.target, err, d.Round(time.Millisecond))
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 3*time.Second)
	}
}

// check unpacks and validates the resources of one response.
func (a *ads) check(typeURL string, resources []*anypb.Any) (map[string]proto.Message, error) {
	if a.s.hooks.reject[shortType(typeURL)] {
		return nil, fmt.Errorf("rejected by ENVOYSIM_REJECT")
	}
	out := map[string]proto.Message{}
	var errs []error
	for i, r := range resources {
		if r.GetTypeUrl() != typeURL {
			errs = append(errs, fmt.Errorf("resource %d: type %s does not match the response type %s", i, r.GetTypeUrl(), typeURL))
			continue
		}
		m, err := r.UnmarshalNew()
		if err != nil {
			errs = append(errs, fmt.Errorf("resource %d: %w", i, err))
			continue
		}
		if err := validateDeep(m); err != nil {
			errs = append(errs, fmt.Errorf("resource %d: proto constraint validation failed (%w)", i, err))
			continue
		}
		name := resourceName(m)
		if name == "" {
			errs = append(errs, fmt.Errorf("resource %d: empty name", i))
			continue
		}
		out[name] = m
	}
	return out, errors.Join(errs...)
}

func resourceName(m proto.Message) string {
	if n, ok := m.(interface{ GetName() string }); ok {
		return n.GetName()
	}
	return ""
}

// apply installs an accepted state of typeURL (the full set of resources).
func (a *ads) apply(typeURL string, state map[string]proto.Message) error {
	switch typeURL {
	case cdsType:
		a.mu.Lock()
		a.clusters = map[string]*clusterv3.Cluster{}
		for n, m := range state {
			a.clusters[n] = m.(*clusterv3.Cluster)
		}
		n := len(a.clusters)
		a.mu.Unlock()
		a.s.stats.set("cluster_manager.active_clusters", uint64(n+len(a.s.bs.GetStaticResources().GetClusters())))
	case ldsType:
		want := map[string]*listenerv3.Listener{}
		for n, m := range state {
			want[n] = m.(*listenerv3.Listener)
		}
		if err := a.s.listeners.update(want); err != nil {
			return err
		}
		a.mu.Lock()
		a.lsnrs = want
		a.mu.Unlock()
	}
	return nil
}

// record counts one update and, on the first of its type, moves init on.
func (a *ads) record(typeURL string, err error) {
	typ := shortType(typeURL)
	scope := statScope(typ)
	a.s.stats.inc(scope + "update_attempt")
	if err != nil {
		a.s.stats.inc(scope + "update_rejected")
		a.s.log.Printf("warning: gRPC config for %s rejected: %v", typeURL, err)
	} else {
		a.s.stats.inc(scope + "update_success")
	}
	a.s.initDone(typ)
}

func (a *ads) slowAck() {
	if d := a.s.hooks.slowAck; d > 0 {
		time.Sleep(d)
	}
}

func nackStatus(err error) *statuspb.Status {
	return &statuspb.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
}

func (a *ads) streamSotW(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(a.conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	a.s.stats.set("control_plane.connected_state", 1)
	first := true
	send := func(req *discoveryv3.DiscoveryRequest) error {
		if first || !a.nodeFirst {
			req.Node = a.s.bs.GetNode()
		}
		first = false
		return stream.Send(req)
	}
	a.mu.Lock()
	cdsVersion, ldsVersion := a.versions[cdsType], a.versions[ldsType]
	a.mu.Unlock()
	if err := send(&discoveryv3.DiscoveryRequest{TypeUrl: cdsType, VersionInfo: cdsVersion}); err != nil {
		return err
	}
	ldsSent := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		typeURL := resp.GetTypeUrl()
		if typeURL != cdsType && typeURL != ldsType {
			a.s.log.Printf("warning: ignoring response of unsubscribed type %s", typeURL)
			continue
		}
		state, cerr := a.check(typeURL, resp.GetResources())
		if cerr == nil {
			cerr = a.apply(typeURL, state)
		}
		a.record(typeURL, cerr)
		a.slowAck()
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: typeURL, ResponseNonce: resp.GetNonce()}
		a.mu.Lock()
		if cerr == nil {
			a.versions[typeURL] = resp.GetVersionInfo()
		} else {
			ack.ErrorDetail = nackStatus(cerr)
		}
		ack.VersionInfo = a.versions[typeURL]
		a.mu.Unlock()
		if err := send(ack); err != nil {
			return err
		}
		if typeURL == cdsType && !ldsSent {
			ldsSent = true
			if err := send(&discoveryv3.DiscoveryRequest{TypeUrl: ldsType, VersionInfo: ldsVersion}); err != nil {
				return err
			}
		}
	}
}

func (a *ads) streamDelta(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(a.conn).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	a.s.stats.set("control_plane.connected_state", 1)
	first := true
	send := func(req *discoveryv3.DeltaDiscoveryRequest) error {
		if first || !a.nodeFirst {
			req.Node = a.s.bs.GetNode()
		}
		first = false
		return stream.Send(req)
	}
	initial := func(typeURL string) *discoveryv3.DeltaDiscoveryRequest {
		a.mu.Lock()
		defer a.mu.Unlock()
		req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL}
		if len(a.known[typeURL]) > 0 {
			req.InitialResourceVersions = map[string]string{}
			for n, v := range a.known[typeURL] {
				req.InitialResourceVersions[n] = v
			}
		}
		return req
	}
	if err := send(initial(cdsType)); err != nil {
		return err
	}
	ldsSent := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		typeURL := resp.GetTypeUrl()
		if typeURL != cdsType && typeURL != ldsType {
			a.s.log.Printf("warning: ignoring response of unsubscribed type %s", typeURL)
			continue
		}
		var anys []*anypb.Any
		for _, r := range resp.GetResources() {
			anys = append(anys, r.GetResource())
		}
		updated, cerr := a.check(typeURL, anys)
		if cerr == nil {
			// Delta carries changes: build the new full state from the
			// accepted one.
			state := a.current(typeURL)
			for _, n := range resp.GetRemovedResources() {
				delete(state, n)
			}
			for n, m := range updated {
				state[n] = m
			}
			cerr = a.apply(typeURL, state)
			if cerr == nil {
				a.mu.Lock()
				for _, n := range resp.GetRemovedResources() {
					delete(a.known[typeURL], n)
				}
				for _, r := range resp.GetResources() {
					a.known[typeURL][r.GetName()] = r.GetVersion()
				}
				a.mu.Unlock()
			}
		}
		a.record(typeURL, cerr)
		a.slowAck()
		ack := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: resp.GetNonce()}
		if cerr != nil {
			ack.ErrorDetail = nackStatus(cerr)
		}
		if err := send(ack); err != nil {
			return err
		}
		if typeURL == cdsType && !ldsSent {
			ldsSent = true
			if err := send(initial(ldsType)); err != nil {
				return err
			}
		}
	}
}

// current returns a copy of the accepted state of typeURL.
func (a *ads) current(typeURL string) map[string]proto.Message {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string]proto.Message{}
	if typeURL == cdsType {
		for n, c := range a.clusters {
			out[n] = c
		}
	} else {
		for n, l := range a.lsnrs {
			out[n] = l
		}
	}
	return out
}
