package main

import (
	"sort"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	edsType    = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	rdsType    = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
)

// defaultFetchTimeout is Envoy's initial_fetch_timeout when a config source
// does not set one.
const defaultFetchTimeout = 15 * time.Second

// versioned is one accepted dynamic resource with what config_dump shows.
type versioned struct {
	msg     proto.Message
	version string
	updated time.Time
}

// resources is the accepted dynamic xDS state (listeners also live in the
// listener manager, which binds them). Static resources stay in the
// bootstrap.
type resources struct {
	mu        sync.Mutex
	clusters  map[string]versioned
	endpoints map[string]versioned // by service name (CLA cluster_name)
	listeners map[string]versioned
	routes    map[string]versioned
	rr        map[string]int // round-robin position per cluster
}

func newResources() *resources {
	return &resources{clusters: map[string]versioned{}, endpoints: map[string]versioned{},
		listeners: map[string]versioned{}, routes: map[string]versioned{}, rr: map[string]int{}}
}

func (r *resources) table(typeURL string) map[string]versioned {
	switch typeURL {
	case cdsType:
		return r.clusters
	case edsType:
		return r.endpoints
	case ldsType:
		return r.listeners
	case rdsType:
		return r.routes
	}
	return nil
}

// snapshot copies the messages of one type.
func (r *resources) snapshot(typeURL string) map[string]proto.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]proto.Message{}
	for n, v := range r.table(typeURL) {
		out[n] = v.msg
	}
	return out
}

// replace installs the full state of one type; unchanged resources keep
// their version and time.
func (r *resources) replace(typeURL string, state map[string]proto.Message, version func(string) string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.table(typeURL)
	now := time.Now()
	for n := range t {
		if _, ok := state[n]; !ok {
			delete(t, n)
		}
	}
	for n, m := range state {
		if old, ok := t[n]; ok && proto.Equal(old.msg, m) {
			continue
		}
		t[n] = versioned{msg: m, version: version(n), updated: now}
	}
}

// list returns the entries of one type sorted by name.
func (r *resources) list(typeURL string) []struct {
	name string
	versioned
} {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []struct {
		name string
		versioned
	}
	for n, v := range r.table(typeURL) {
		out = append(out, struct {
			name string
			versioned
		}{n, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// cluster finds a cluster by name: dynamic first, then static.
func (s *sim) cluster(name string) *clusterv3.Cluster {
	s.res.mu.Lock()
	v, ok := s.res.clusters[name]
	s.res.mu.Unlock()
	if ok {
		return v.msg.(*clusterv3.Cluster)
	}
	for _, c := range s.bs.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

func (s *sim) route(name string) *routev3.RouteConfiguration {
	s.res.mu.Lock()
	defer s.res.mu.Unlock()
	if v, ok := s.res.routes[name]; ok {
		return v.msg.(*routev3.RouteConfiguration)
	}
	return nil
}

// endpointsOf returns the load assignment of a cluster: EDS from the
// received endpoints, else the cluster's own load_assignment.
func (s *sim) endpointsOf(c *clusterv3.Cluster) *endpointv3.ClusterLoadAssignment {
	if c.GetType() == clusterv3.Cluster_EDS {
		s.res.mu.Lock()
		defer s.res.mu.Unlock()
		if v, ok := s.res.endpoints[edsName(c)]; ok {
			return v.msg.(*endpointv3.ClusterLoadAssignment)
		}
		return nil
	}
	return c.GetLoadAssignment()
}

// nextIndex advances the round-robin position of a cluster.
func (s *sim) nextIndex(cluster string) int {
	s.res.mu.Lock()
	defer s.res.mu.Unlock()
	i := s.res.rr[cluster]
	s.res.rr[cluster] = i + 1
	return i
}

// edsName is the resource name an EDS cluster subscribes to.
func edsName(c *clusterv3.Cluster) string {
	if n := c.GetEdsClusterConfig().GetServiceName(); n != "" {
		return n
	}
	return c.GetName()
}

// dependency is one resource that must arrive before the cluster or
// listener referencing it has warmed.
type dependency struct {
	typeURL string // edsType, rdsType or secretType
	name    string
	cluster string        // SDS: the cluster the secret is fetched over
	timeout time.Duration // initial_fetch_timeout; 0 waits forever
}

func (d dependency) key() string { return d.typeURL + "|" + d.cluster + "|" + d.name }

func fetchTimeout(cs *corev3.ConfigSource) time.Duration {
	if t := cs.GetInitialFetchTimeout(); t != nil {
		return t.AsDuration()
	}
	return defaultFetchTimeout
}

// clusterDeps lists what a cluster waits for: its endpoints (EDS) and the
// secrets of its transport sockets.
func clusterDeps(c *clusterv3.Cluster) []dependency {
	var out []dependency
	if c.GetType() == clusterv3.Cluster_EDS {
		out = append(out, dependency{typeURL: edsType, name: edsName(c), timeout: fetchTimeout(c.GetEdsClusterConfig().GetEdsConfig())})
	}
	return append(out, secretDeps(c)...)
}

// listenerDeps lists what a listener waits for: the route configurations
// of its HTTP connection managers (RDS) and its secrets.
func listenerDeps(l *listenerv3.Listener) []dependency {
	var out []dependency
	for _, h := range httpManagers(l) {
		if rds := h.GetRds(); rds != nil {
			out = append(out, dependency{typeURL: rdsType, name: rds.GetRouteConfigName(), timeout: fetchTimeout(rds.GetConfigSource())})
		}
	}
	return append(out, secretDeps(l)...)
}

// httpManagers returns the HTTP connection managers of every filter chain.
func httpManagers(l *listenerv3.Listener) []*hcmv3.HttpConnectionManager {
	var out []*hcmv3.HttpConnectionManager
	chains := l.GetFilterChains()
	if d := l.GetDefaultFilterChain(); d != nil {
		chains = append(chains[:len(chains):len(chains)], d)
	}
	for _, fc := range chains {
		for _, f := range fc.GetFilters() {
			if f.GetTypedConfig().GetTypeUrl() != hcmType {
				continue
			}
			h := &hcmv3.HttpConnectionManager{}
			if f.GetTypedConfig().UnmarshalTo(h) == nil {
				out = append(out, h)
			}
		}
	}
	return out
}

// secretDeps finds every SDS secret a message references, wherever a TLS
// context sits (transport_socket, transport_socket_matches, filter
// chains): certificates, validation contexts, and combined validation
// contexts. Secrets without an sds_config name static bootstrap secrets
// and are not fetched.
func secretDeps(m proto.Message) []dependency {
	var out []dependency
	add := func(sc *tlsv3.SdsSecretConfig) {
		if sc == nil || sc.GetSdsConfig() == nil {
			return
		}
		cs := sc.GetSdsConfig()
		cluster := ""
		if svcs := cs.GetApiConfigSource().GetGrpcServices(); len(svcs) > 0 {
			cluster = svcs[0].GetEnvoyGrpc().GetClusterName()
		}
		out = append(out, dependency{typeURL: secretType, name: sc.GetName(), cluster: cluster, timeout: fetchTimeout(cs)})
	}
	walkMessages(m.ProtoReflect(), func(msg proto.Message) {
		ctx, ok := msg.(*tlsv3.CommonTlsContext)
		if !ok {
			return
		}
		for _, sc := range ctx.GetTlsCertificateSdsSecretConfigs() {
			add(sc)
		}
		add(ctx.GetValidationContextSdsSecretConfig())
		add(ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig())
	})
	return out
}

// walkMessages calls fn for m and every message inside it, unpacking Any.
func walkMessages(m protoreflect.Message, fn func(proto.Message)) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err == nil {
			walkMessages(inner.ProtoReflect(), fn)
		}
		return
	}
	fn(m.Interface())
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walkMessages(l.Get(i).Message(), fn)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				walkMessages(mv.Message(), fn)
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walkMessages(v.Message(), fn)
		}
		return true
	})
}

// allClusters returns static and dynamic clusters.
func (s *sim) allClusters() []*clusterv3.Cluster {
	out := append([]*clusterv3.Cluster(nil), s.bs.GetStaticResources().GetClusters()...)
	for _, m := range s.res.snapshot(cdsType) {
		out = append(out, m.(*clusterv3.Cluster))
	}
	return out
}

// allListeners returns static and dynamic listener configs.
func (s *sim) allListeners() []*listenerv3.Listener {
	out := append([]*listenerv3.Listener(nil), s.bs.GetStaticResources().GetListeners()...)
	for _, m := range s.res.snapshot(ldsType) {
		out = append(out, m.(*listenerv3.Listener))
	}
	return out
}

// wantedNames returns the sorted EDS or RDS names the current clusters or
// listeners reference.
func (s *sim) wantedNames(typeURL string) []string {
	set := map[string]bool{}
	if typeURL == edsType {
		for _, c := range s.allClusters() {
			for _, d := range clusterDeps(c) {
				if d.typeURL == edsType {
					set[d.name] = true
				}
			}
		}
	} else {
		for _, l := range s.allListeners() {
			for _, d := range listenerDeps(l) {
				if d.typeURL == rdsType {
					set[d.name] = true
				}
			}
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// wantedSecrets returns every SDS secret referenced by any cluster or
// listener.
func (s *sim) wantedSecrets() []dependency {
	seen := map[string]bool{}
	var out []dependency
	add := func(ds []dependency) {
		for _, d := range ds {
			if d.typeURL == secretType && !seen[d.key()] {
				seen[d.key()] = true
				out = append(out, d)
			}
		}
	}
	for _, c := range s.allClusters() {
		add(secretDeps(c))
	}
	for _, l := range s.allListeners() {
		add(secretDeps(l))
	}
	return out
}
