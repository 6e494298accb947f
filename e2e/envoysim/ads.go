package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
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

// shortType maps a type URL to Envoy's short name.
func shortType(typeURL string) string {
	switch typeURL {
	case cdsType:
		return "cds"
	case ldsType:
		return "lds"
	case edsType:
		return "eds"
	case rdsType:
		return "rds"
	case secretType:
		return "sds"
	}
	return typeURL
}

// statScope is where a type's update counters live. CDS and LDS are
// Envoy's names; eds and rds aggregate what Envoy counts per cluster
// (cluster.<name>.update_*) and per route config
// (http.<prefix>.rds.<name>.update_*), which are kept too.
func statScope(typeURL string) string {
	switch typeURL {
	case cdsType:
		return "cluster_manager.cds."
	case ldsType:
		return "listener_manager.lds."
	case edsType:
		return "cluster_manager.eds."
	case rdsType:
		return "http.rds."
	}
	return "unknown."
}

// typeState is one type's subscription. version, known and answered
// survive reconnects; the rest is per stream.
type typeState struct {
	wildcard bool
	version  string            // SotW: last accepted version_info
	known    map[string]string // Delta: accepted resource name -> version
	answered map[string]bool   // names that had a first answer ("" = the type)

	subscribed bool     // a request went out on this stream
	names      []string // the names sent on this stream (not wildcard)
	nonce      string   // last nonce received on this stream
}

// ads is Envoy's ADS subscription: one stream to the xds-grpc cluster. It
// subscribes CDS (wildcard), EDS for the EDS clusters it got, LDS
// (wildcard) once the clusters have warmed, and RDS for the route
// configurations the listeners name, in Envoy's order. What was accepted
// survives a reconnect, and the new stream tells the server about it
// (SotW: version_info; Delta: initial_resource_versions).
type ads struct {
	s         *sim
	conn      *grpc.ClientConn
	delta     bool
	nodeFirst bool
	target    string

	mu    sync.Mutex
	types map[string]*typeState
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
		// Envoy's default HTTP/2 windows (256 MiB stream and connection).
		grpc.WithInitialWindowSize(256<<20), grpc.WithInitialConnWindowSize(256<<20),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
	if err != nil {
		return nil, fmt.Errorf("ads: %w", err)
	}
	a := &ads{s: s, conn: conn, delta: delta, nodeFirst: cfg.GetSetNodeOnFirstMessageOnly(),
		target: network + ":" + address, types: map[string]*typeState{}}
	for _, t := range []string{cdsType, edsType, ldsType, rdsType} {
		a.types[t] = &typeState{wildcard: t == cdsType || t == ldsType, known: map[string]string{}, answered: map[string]bool{}}
	}
	return a, nil
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
	return "", "", fmt.Errorf("config source names cluster %q, which is not a static cluster", name)
}

func (a *ads) close() { a.conn.Close() }

// isAnswered reports whether typeURL (name "") or one of its resources had
// a first answer.
func (a *ads) isAnswered(typeURL, name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.types[typeURL].answered[name]
}

// version returns the SotW version accepted last for typeURL.
func (a *ads) version(typeURL, name string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	ts := a.types[typeURL]
	if a.delta {
		return ts.known[name]
	}
	return ts.version
}

// run keeps a stream open, reconnecting with jittered backoff like Envoy's
// ADS retry policy (shorter, for tests).
func (a *ads) run(ctx context.Context) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		start := time.Now()
		err := a.stream(ctx)
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

// response is a SotW or Delta response in one shape.
type response struct {
	typeURL   string
	nonce     string
	version   string       // SotW
	resources []*anypb.Any // both
	rversions []string     // Delta: version per resource, same order
	rnames    []string     // Delta: name per resource, same order
	removed   []string     // Delta
}

// xdsStream hides the SotW/Delta difference in requests.
type xdsStream interface {
	recv() (*response, error)
	// subscribe sends the initial request or a change of names.
	subscribe(typeURL string, ts *typeState, names []string) error
	// ack ACKs (err nil) or NACKs a response.
	ack(typeURL string, ts *typeState, nonce string, err error) error
}

func (a *ads) stream(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := discoveryv3.NewAggregatedDiscoveryServiceClient(a.conn)
	var st xdsStream
	if a.delta {
		s, err := c.DeltaAggregatedResources(ctx)
		if err != nil {
			return err
		}
		st = &deltaStream{a: a, s: s, first: true}
	} else {
		s, err := c.StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		st = &sotwStream{a: a, s: s, first: true}
	}
	a.s.stats.set("control_plane.connected_state", 1)
	a.mu.Lock()
	for _, ts := range a.types {
		ts.subscribed, ts.names, ts.nonce = false, nil, ""
	}
	a.mu.Unlock()

	resps := make(chan *response)
	errc := make(chan error, 1)
	go func() {
		for {
			r, err := st.recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case resps <- r:
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		if err := a.sync(st); err != nil {
			return err
		}
		select {
		case r := <-resps:
			if err := a.handle(st, r); err != nil {
				return err
			}
		case <-a.s.adsKick:
		case <-a.s.init.cdsReady:
		case err := <-errc:
			return err
		case <-ctx.Done():
			return nil
		}
	}
}

// sync sends what the current state calls for: CDS at once, EDS for the
// EDS clusters once CDS answered, LDS once the clusters warmed (or at once
// on a reconnect after that), RDS for the listeners' route names.
func (a *ads) sync(st xdsStream) error {
	want := func(typeURL string) (bool, []string) {
		switch typeURL {
		case cdsType:
			return true, nil
		case edsType:
			return a.isAnswered(cdsType, ""), a.s.wantedNames(edsType)
		case ldsType:
			select {
			case <-a.s.init.cdsReady:
				return true, nil
			default:
				return false, nil
			}
		case rdsType:
			return a.isAnswered(ldsType, ""), a.s.wantedNames(rdsType)
		}
		return false, nil
	}
	for _, t := range []string{cdsType, edsType, ldsType, rdsType} {
		ok, names := want(t)
		if !ok {
			continue
		}
		a.mu.Lock()
		ts := a.types[t]
		send := !ts.subscribed && (ts.wildcard || len(names) > 0)
		if ts.subscribed && !ts.wildcard && !slices.Equal(ts.names, names) {
			// SotW cannot express "none" (an empty list means wildcard),
			// so an emptied EDS/RDS subscription is left as it was.
			send = a.delta || len(names) > 0
		}
		a.mu.Unlock()
		if !send {
			continue
		}
		if err := st.subscribe(t, ts, names); err != nil {
			return err
		}
	}
	return nil
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
		if _, dup := out[name]; dup {
			errs = append(errs, fmt.Errorf("duplicate resource %s", name))
			continue
		}
		out[name] = m
	}
	return out, errors.Join(errs...)
}

func resourceName(m proto.Message) string {
	if c, ok := m.(*endpointv3.ClusterLoadAssignment); ok {
		return c.GetClusterName()
	}
	if n, ok := m.(interface{ GetName() string }); ok {
		return n.GetName()
	}
	return ""
}

// handle checks, applies, counts and ACKs/NACKs one response.
func (a *ads) handle(st xdsStream, r *response) error {
	a.mu.Lock()
	ts := a.types[r.typeURL]
	a.mu.Unlock()
	if ts == nil {
		a.s.log.Printf("warning: ignoring response of unsubscribed type %s", r.typeURL)
		return nil
	}
	a.mu.Lock()
	ts.nonce = r.nonce
	a.mu.Unlock()
	updated, cerr := a.check(r.typeURL, r.resources)
	if cerr == nil {
		state := a.s.res.snapshot(r.typeURL)
		switch {
		case a.delta:
			for _, n := range r.removed {
				delete(state, n)
			}
			for n, m := range updated {
				state[n] = m
			}
		case ts.wildcard:
			state = updated
		default:
			// SotW EDS/RDS: absence is not removal; names no longer
			// wanted are dropped.
			for n, m := range updated {
				state[n] = m
			}
			wanted := a.s.wantedNames(r.typeURL)
			for n := range state {
				if !slices.Contains(wanted, n) {
					delete(state, n)
				}
			}
		}
		cerr = a.s.apply(r.typeURL, state, func(name string) string {
			if a.delta {
				for i, n := range r.rnames {
					if n == name {
						return r.rversions[i]
					}
				}
				return a.version(r.typeURL, name)
			}
			return r.version
		})
	}
	a.mu.Lock()
	if cerr == nil {
		if a.delta {
			for _, n := range r.removed {
				delete(ts.known, n)
			}
			for i, n := range r.rnames {
				ts.known[n] = r.rversions[i]
			}
		} else {
			ts.version = r.version
		}
	}
	ts.answered[""] = true
	for n := range updated {
		ts.answered[n] = true
	}
	if cerr != nil && !ts.wildcard {
		// A rejected EDS/RDS update ends warming for what it was meant
		// to answer, as Envoy's onConfigUpdateFailed does.
		for _, n := range ts.names {
			ts.answered[n] = true
		}
	}
	a.mu.Unlock()
	a.record(r.typeURL, updated, cerr)
	a.s.slowAckFor()
	if err := st.ack(r.typeURL, ts, r.nonce, cerr); err != nil {
		return err
	}
	a.s.changed()
	return nil
}

// record counts one update.
func (a *ads) record(typeURL string, updated map[string]proto.Message, err error) {
	scope := statScope(typeURL)
	a.s.stats.inc(scope + "update_attempt")
	if err != nil {
		a.s.stats.inc(scope + "update_rejected")
		a.s.log.Printf("warning: gRPC config for %s rejected: %v", typeURL, err)
		return
	}
	a.s.stats.inc(scope + "update_success")
	for n := range updated {
		switch typeURL {
		case edsType:
			a.s.stats.inc("cluster." + n + ".update_success")
		case rdsType:
			a.s.stats.inc("http." + a.s.rdsStatPrefix(n) + ".rds." + n + ".update_success")
		}
	}
}

// rdsStatPrefix is the stat_prefix of the first HTTP connection manager
// naming route config name, as Envoy scopes RDS stats.
func (s *sim) rdsStatPrefix(name string) string {
	for _, l := range s.allListeners() {
		for _, h := range httpManagers(l) {
			if h.GetRds().GetRouteConfigName() == name {
				return h.GetStatPrefix()
			}
		}
	}
	return "unknown"
}

// apply installs an accepted state of typeURL (the full set of resources
// of that type).
func (s *sim) apply(typeURL string, state map[string]proto.Message, version func(string) string) error {
	switch typeURL {
	case cdsType:
		for _, m := range state {
			if _, ok := m.(*clusterv3.Cluster); !ok {
				return fmt.Errorf("not a cluster")
			}
		}
		s.res.replace(cdsType, state, version)
		s.stats.set("cluster_manager.active_clusters", uint64(len(state)+len(s.bs.GetStaticResources().GetClusters())))
	case ldsType:
		want := map[string]*listenerv3.Listener{}
		for n, m := range state {
			want[n] = m.(*listenerv3.Listener)
		}
		if err := s.listeners.update(want); err != nil {
			return err
		}
		s.res.replace(ldsType, state, version)
	case edsType:
		for _, m := range state {
			if _, ok := m.(*endpointv3.ClusterLoadAssignment); !ok {
				return fmt.Errorf("not a cluster load assignment")
			}
		}
		s.res.replace(edsType, state, version)
	case rdsType:
		for _, m := range state {
			if _, ok := m.(*routev3.RouteConfiguration); !ok {
				return fmt.Errorf("not a route configuration")
			}
		}
		s.res.replace(rdsType, state, version)
	}
	s.syncSecrets()
	return nil
}

func (s *sim) slowAckFor() {
	if d := s.hooks.slowAck; d > 0 {
		time.Sleep(d)
	}
}

func nackStatus(err error) *statuspb.Status {
	return &statuspb.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
}

type sotwStream struct {
	a     *ads
	s     grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	first bool
}

func (x *sotwStream) send(req *discoveryv3.DiscoveryRequest) error {
	if x.first || !x.a.nodeFirst {
		req.Node = x.a.s.bs.GetNode()
	}
	x.first = false
	return x.s.Send(req)
}

func (x *sotwStream) recv() (*response, error) {
	r, err := x.s.Recv()
	if err != nil {
		return nil, err
	}
	return &response{typeURL: r.GetTypeUrl(), nonce: r.GetNonce(), version: r.GetVersionInfo(), resources: r.GetResources()}, nil
}

func (x *sotwStream) subscribe(typeURL string, ts *typeState, names []string) error {
	x.a.mu.Lock()
	req := &discoveryv3.DiscoveryRequest{TypeUrl: typeURL, VersionInfo: ts.version, ResponseNonce: ts.nonce, ResourceNames: names}
	ts.subscribed, ts.names = true, names
	x.a.mu.Unlock()
	return x.send(req)
}

func (x *sotwStream) ack(typeURL string, ts *typeState, nonce string, err error) error {
	x.a.mu.Lock()
	req := &discoveryv3.DiscoveryRequest{TypeUrl: typeURL, VersionInfo: ts.version, ResponseNonce: nonce, ResourceNames: ts.names}
	x.a.mu.Unlock()
	if err != nil {
		req.ErrorDetail = nackStatus(err)
	}
	return x.send(req)
}

type deltaStream struct {
	a     *ads
	s     grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	first bool
}

func (x *deltaStream) send(req *discoveryv3.DeltaDiscoveryRequest) error {
	if x.first || !x.a.nodeFirst {
		req.Node = x.a.s.bs.GetNode()
	}
	x.first = false
	return x.s.Send(req)
}

func (x *deltaStream) recv() (*response, error) {
	r, err := x.s.Recv()
	if err != nil {
		return nil, err
	}
	out := &response{typeURL: r.GetTypeUrl(), nonce: r.GetNonce(), removed: r.GetRemovedResources()}
	for _, res := range r.GetResources() {
		out.resources = append(out.resources, res.GetResource())
		out.rnames = append(out.rnames, res.GetName())
		out.rversions = append(out.rversions, res.GetVersion())
	}
	return out, nil
}

func (x *deltaStream) subscribe(typeURL string, ts *typeState, names []string) error {
	x.a.mu.Lock()
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL}
	if !ts.subscribed {
		req.ResourceNamesSubscribe = names
		for n, v := range ts.known {
			if ts.wildcard || slices.Contains(names, n) {
				if req.InitialResourceVersions == nil {
					req.InitialResourceVersions = map[string]string{}
				}
				req.InitialResourceVersions[n] = v
			}
		}
	} else {
		for _, n := range names {
			if !slices.Contains(ts.names, n) {
				req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
			}
		}
		for _, n := range ts.names {
			if !slices.Contains(names, n) {
				req.ResourceNamesUnsubscribe = append(req.ResourceNamesUnsubscribe, n)
				delete(ts.known, n)
			}
		}
	}
	ts.subscribed, ts.names = true, names
	x.a.mu.Unlock()
	return x.send(req)
}

func (x *deltaStream) ack(typeURL string, _ *typeState, nonce string, err error) error {
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: nonce}
	if err != nil {
		req.ErrorDetail = nackStatus(err)
	}
	return x.send(req)
}
