package xdsproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

// Proxy serves ADS on the pod's unix socket and carries each Envoy stream
// to the control plane.
type Proxy struct {
	cfg     Config
	log     *zap.Logger
	codec   rawCodec
	metrics *metrics
	cache   *lastGood

	tokenWarned atomic.Bool
	lastConfig  atomic.Int64 // unix nanos of the last upstream response
	connected   atomic.Int32 // upstream streams established now
	// unreachable: the last upstream stream failed or ended and none has
	// got a response since. New Envoy streams are served from the cache
	// at once only then.
	unreachable atomic.Bool

	mu     sync.Mutex
	active *session
	nextID uint64

	// The upstream connection (*grpc.ClientConn or *h2grpc.ClientConn),
	// shared by the streams while it works; see sharedConn.
	upMu      sync.Mutex
	upConn    io.Closer
	upStopped bool
}

// New validates cfg and builds a proxy; Run starts serving.
func New(cfg Config, log *zap.Logger) (*Proxy, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Proxy{
		cfg:     cfg,
		log:     log.Named("xdsproxy"),
		codec:   newRawCodec(),
		metrics: newMetrics(cfg.Registerer),
		cache:   newLastGood(),
	}, nil
}

// SocketPath is the socket the proxy listens on (after defaults).
func (p *Proxy) SocketPath() string { return p.cfg.SocketPath }

// Connected reports whether an upstream stream is established now.
func (p *Proxy) Connected() bool { return p.connected.Load() > 0 }

// LastConfigReceived is when the control plane last sent a response (zero
// if never).
func (p *Proxy) LastConfigReceived() time.Time {
	n := p.lastConfig.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Run listens on the socket and serves until ctx ends; it returns nil on a
// clean stop.
func (p *Proxy) Run(ctx context.Context) error {
	lis, err := listenUnix(p.cfg.SocketPath)
	if err != nil {
		return err
	}
	var srv interface {
		Serve(net.Listener) error
		Stop()
	}
	if p.cfg.Transport == TransportCutThrough {
		srv = p.newH2Server()
	} else {
		gs := grpc.NewServer(
			grpc.ForceServerCodecV2(p.codec),
			grpc.MaxRecvMsgSize(maxMsgSize),
			grpc.MaxSendMsgSize(maxMsgSize),
			grpc.MaxConcurrentStreams(100000),
			grpc.KeepaliveParams(keepalive.ServerParameters{Time: p.cfg.KeepaliveInterval, Timeout: p.cfg.KeepaliveTimeout}),
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
		)
		discovery.RegisterAggregatedDiscoveryServiceServer(gs, adsServer{p})
		srv = gs
	}

	p.log.Info("serving xDS", zap.String("socket", p.cfg.SocketPath), zap.String("upstream", p.cfg.DiscoveryAddress), zap.String("transport", p.cfg.Transport))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("xdsproxy: serve %s: %w", p.cfg.SocketPath, err)
	case <-ctx.Done():
	}
	// Streams are endless, so there is nothing to drain: stop, which ends
	// every Envoy stream and, through them, the upstream streams.
	srv.Stop()
	<-errc
	p.dropConn(nil)
	p.cache.close()
	_ = os.Remove(p.cfg.SocketPath)
	return nil
}

// listenUnix prepares the socket: its directory (0750), no stale socket
// left by a previous run, and mode 0666 so every process in the pod
// (proxyless gRPC applications run as other users) can connect, as Istio.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("xdsproxy: create socket directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("xdsproxy: remove stale socket %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("xdsproxy: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		lis.Close()
		return nil, fmt.Errorf("xdsproxy: chmod socket %s: %w", path, err)
	}
	return sendBufferListener{Listener: lis, size: envoySendBuffer}, nil
}

// envoySendBuffer is the socket send buffer (SO_SNDBUF) the agent asks for
// on each Envoy connection: 4 MiB, which the kernel doubles, so that a
// whole 7 MB push fits, but caps at net.core.wmem_max (212992 by default,
// so 416 KiB on an untuned node: still twice the default).
//
// With the default buffer, the writer to Envoy fills it, waits for room,
// and is woken by the netpoller, which the Go scheduler polls only when
// its one P has nothing else to run (or every 10 ms): while a push
// arrives, the upstream reader keeps the P busy, so Envoy drained the
// socket and waited. In the 3000-service push benchmark, asking for the
// larger buffer took 0.7-6.4 ms off the time the agent adds in 5 of 6
// same-run comparisons (TLS and plaintext, SotW and Delta); capped at the
// untuned 416 KiB, 1.0-2.8 ms (docs/xds.md). The memory is the kernel's,
// used only while Envoy is behind, and bounded by the buffer.
const envoySendBuffer = 4 << 20

// sendBufferListener sets the send buffer of each connection it accepts.
type sendBufferListener struct {
	net.Listener
	size int
}

func (l sendBufferListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if uc, ok := c.(*net.UnixConn); ok && err == nil {
		// Best effort: the kernel's default buffer still works.
		_ = uc.SetWriteBuffer(l.size)
	}
	return c, err
}

// errReplaced ends a stream when Envoy opens a newer one.
var errReplaced = errors.New("replaced by a newer stream from Envoy")

// register makes s the active stream and closes the previous one: a
// restarted or reconnecting Envoy must not leave an old upstream stream
// behind.
func (p *Proxy) register(s *session) {
	p.mu.Lock()
	old := p.active
	p.active = s
	p.nextID++
	s.id = p.nextID
	p.mu.Unlock()
	if old != nil {
		p.log.Info("new stream from Envoy; closing the previous one", zap.Uint64("previous", old.id), zap.Uint64("stream", s.id))
		old.cancel(errReplaced)
	}
}

func (p *Proxy) unregister(s *session) {
	p.mu.Lock()
	if p.active == s {
		p.active = nil
	}
	p.mu.Unlock()
}

// adsServer adapts the proxy to the generated service interface.
type adsServer struct{ p *Proxy }

func (a adsServer) StreamAggregatedResources(stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	return a.p.serve(grpcDown{stream}, false)
}

func (a adsServer) DeltaAggregatedResources(stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	return a.p.serve(grpcDown{stream}, true)
}

func (p *Proxy) serve(stream downstream, delta bool) error {
	s := newSession(p, stream, delta)
	p.register(s)
	defer p.unregister(s)
	err := s.run()
	kind := "error"
	switch {
	case err == nil:
		kind = "cancelled"
	case errors.Is(err, errReplaced):
		kind = "replaced"
	}
	p.metrics.envoyTerms.WithLabelValues(kind).Inc()
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errReplaced):
		return status.Error(codes.Aborted, err.Error())
	default:
		return status.Error(codes.Unavailable, err.Error())
	}
}
