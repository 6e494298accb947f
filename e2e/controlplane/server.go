package controlplane

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Config configures the control plane.
type Config struct {
	// Addr to listen on; default 127.0.0.1:0. The port picked on the first
	// Start is kept for restarts.
	Addr string
	// TLS, when set, serves TLS (see NewTestCA).
	TLS *tls.Config
	// Token, when set, is the bearer token every stream must present.
	Token string
	// Log receives go-control-plane's logs; nil discards them.
	Log *zap.Logger
	// OnResponse, when set, is told of every response as it is about to
	// be sent (resources already marshalled), with when the stream's
	// first request of that type arrived: a benchmark can take the
	// control plane's own time out of a push it measures.
	OnResponse func(ResponseTiming)
}

// ResponseTiming is one response of the control plane.
type ResponseTiming struct {
	NodeID, TypeURL string
	// Requested is when the stream's first request of the type arrived,
	// Responding when the response was ready to be sent.
	Requested, Responding time.Time
}

// Event is one request the control plane received.
type Event struct {
	Delta    bool
	NodeID   string
	TypeURL  string
	Version  string // SotW version_info
	Nonce    string
	Error    string // error_detail.message: a NACK
	Names    []string
	Metadata metadata.MD
}

// Server is the test control plane.
type Server struct {
	cfg     Config
	log     *zap.Logger
	snap    cachev3.SnapshotCache
	nds     *cachev3.LinearCache
	ndsType protoreflect.MessageDescriptor
	mux     *cachev3.MuxCache
	version int

	mu        sync.Mutex
	addr      string
	grpc      *grpc.Server
	done      chan struct{}
	events    []Event
	responses map[string]int
	streamMD  map[int64]metadata.MD
	firstReq  map[streamType]nodeAt
	changed   chan struct{}
}

// streamType and nodeAt remember when a stream first asked for a type
// (for Config.OnResponse).
type streamType struct {
	id      int64
	typeURL string
}

type nodeAt struct {
	node string
	at   time.Time
}

type nodeGroup struct{}

func (nodeGroup) ID(n *core.Node) string {
	if n.GetMetadata().GetFields()["GENERATOR"].GetStringValue() == "grpc" {
		return groupGRPC
	}
	return groupEnvoy
}

// New builds a control plane serving mesh; Start listens.
func New(cfg Config, mesh Mesh) (*Server, error) {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	md, err := nameTableType()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg: cfg, log: cfg.Log.Named("controlplane"), ndsType: md,
		// ads=false: answer requests for a subset of the resources (one EDS
		// cluster), which ADS consistency mode holds back.
		snap:      cachev3.NewSnapshotCache(false, nodeGroup{}, cfg.Log.Sugar()),
		nds:       cachev3.NewLinearCache(nds.TypeURL),
		addr:      cfg.Addr,
		responses: map[string]int{},
		streamMD:  map[int64]metadata.MD{},
		firstReq:  map[streamType]nodeAt{},
		changed:   make(chan struct{}),
	}
	s.mux = &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return classify(r.GetTypeUrl()) },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return classify(r.GetTypeUrl()) },
		Caches:        map[string]cachev3.Cache{"nds": s.nds, "xds": s.snap},
	}
	if err := s.SetMesh(mesh); err != nil {
		return nil, err
	}
	return s, nil
}

func classify(typeURL string) string {
	if typeURL == nds.TypeURL {
		return "nds"
	}
	return "xds"
}

// SetMesh publishes a new mesh as a new snapshot version.
func (s *Server) SetMesh(m Mesh) error {
	if err := m.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	s.version++
	v := "v" + strconv.Itoa(s.version)
	s.mu.Unlock()
	for _, g := range []string{groupEnvoy, groupGRPC} {
		snap, err := cachev3.NewSnapshot(v, resourcesFor(m, g))
		if err != nil {
			return fmt.Errorf("controlplane: snapshot: %w", err)
		}
		if err := s.snap.SetSnapshot(context.Background(), g, snap); err != nil {
			return fmt.Errorf("controlplane: set snapshot: %w", err)
		}
	}
	return s.SetNameTable(NameTable(m))
}

// SetNameTable publishes a DNS name table.
func (s *Server) SetNameTable(t *nds.NameTable) error {
	msg, err := nameTableMessage(s.ndsType, t)
	if err != nil {
		return err
	}
	s.nds.SetResources(map[string]types.Resource{"nametable": msg})
	return nil
}

// Addr is the listening address (host:port), fixed after the first Start.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Start listens and serves in the background. After Stop it can be called
// again and listens on the same address.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc != nil {
		return errors.New("controlplane: already running")
	}
	var lis net.Listener
	var err error
	for range 50 { // the old socket may linger for a moment after Stop
		if lis, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("controlplane: listen %s: %w", s.addr, err)
	}
	s.addr = lis.Addr().String()
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(1 << 30), grpc.MaxSendMsgSize(1 << 30),
		grpc.StreamInterceptor(s.authorize),
	}
	if s.cfg.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(s.cfg.TLS)))
	}
	g := grpc.NewServer(opts...)
	xds := serverv3.NewServer(context.Background(), s.mux, s.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(g, xds)
	s.grpc = g
	done := make(chan struct{})
	s.done = done
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	return nil
}

// Stop kills the server and every stream at once, as a crashed istiod.
func (s *Server) Stop() {
	s.mu.Lock()
	g, done := s.grpc, s.done
	s.grpc = nil
	s.mu.Unlock()
	if g != nil {
		g.Stop()
		<-done
	}
}

func (s *Server) authorize(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if s.cfg.Token != "" {
		md, _ := metadata.FromIncomingContext(ss.Context())
		got := md.Get("authorization")
		if len(got) != 1 || subtle.ConstantTimeCompare([]byte(got[0]), []byte("Bearer "+s.cfg.Token)) != 1 {
			return status.Error(codes.Unauthenticated, "missing or wrong bearer token")
		}
	}
	return handler(srv, ss)
}

func (s *Server) record(e Event) {
	s.mu.Lock()
	s.events = append(s.events, e)
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

func (s *Server) callbacks() serverv3.Callbacks {
	open := func(ctx context.Context, id int64, _ string) error {
		md, _ := metadata.FromIncomingContext(ctx)
		s.mu.Lock()
		s.streamMD[id] = md
		s.mu.Unlock()
		return nil
	}
	mdOf := func(id int64) metadata.MD {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.streamMD[id]
	}
	requested := func(id int64, typeURL, node string) {
		if s.cfg.OnResponse == nil {
			return
		}
		k := streamType{id, typeURL}
		s.mu.Lock()
		if _, ok := s.firstReq[k]; !ok {
			s.firstReq[k] = nodeAt{node, time.Now()}
		}
		s.mu.Unlock()
	}
	counted := func(id int64, typeURL string) {
		now := time.Now()
		s.mu.Lock()
		s.responses[typeURL]++
		close(s.changed)
		s.changed = make(chan struct{})
		first := s.firstReq[streamType{id, typeURL}]
		s.mu.Unlock()
		if s.cfg.OnResponse != nil {
			s.cfg.OnResponse(ResponseTiming{NodeID: first.node, TypeURL: typeURL, Requested: first.at, Responding: now})
		}
	}
	closed := func(id int64) {
		s.mu.Lock()
		delete(s.streamMD, id)
		for k := range s.firstReq {
			if k.id == id {
				delete(s.firstReq, k)
			}
		}
		s.mu.Unlock()
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc:        open,
		DeltaStreamOpenFunc:   open,
		StreamClosedFunc:      func(id int64, _ *core.Node) { closed(id) },
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) { closed(id) },
		StreamRequestFunc: func(id int64, r *discovery.DiscoveryRequest) error {
			requested(id, r.GetTypeUrl(), r.GetNode().GetId())
			s.record(Event{NodeID: r.GetNode().GetId(), TypeURL: r.GetTypeUrl(), Version: r.GetVersionInfo(),
				Nonce: r.GetResponseNonce(), Error: r.GetErrorDetail().GetMessage(), Names: r.GetResourceNames(), Metadata: mdOf(id)})
			return nil
		},
		StreamDeltaRequestFunc: func(id int64, r *discovery.DeltaDiscoveryRequest) error {
			requested(id, r.GetTypeUrl(), r.GetNode().GetId())
			s.record(Event{Delta: true, NodeID: r.GetNode().GetId(), TypeURL: r.GetTypeUrl(),
				Nonce: r.GetResponseNonce(), Error: r.GetErrorDetail().GetMessage(), Names: r.GetResourceNamesSubscribe(), Metadata: mdOf(id)})
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
			counted(id, r.GetTypeUrl())
		},
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, r *discovery.DeltaDiscoveryResponse) {
			counted(id, r.GetTypeUrl())
		},
	}
}

// Events returns the requests received so far.
func (s *Server) Events() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Event(nil), s.events...)
}

// Responses returns how many responses of typeURL were sent.
func (s *Server) Responses(typeURL string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.responses[typeURL]
}

// WaitFor waits until an event satisfies match, or ctx ends.
func (s *Server) WaitFor(ctx context.Context, match func(Event) bool) (Event, error) {
	seen := 0
	for {
		s.mu.Lock()
		evs, ch := s.events[seen:], s.changed
		seen = len(s.events)
		s.mu.Unlock()
		for _, e := range evs {
			if match(e) {
				return e, nil
			}
		}
		select {
		case <-ctx.Done():
			return Event{}, fmt.Errorf("controlplane: no matching request: %w", ctx.Err())
		case <-ch:
		}
	}
}
