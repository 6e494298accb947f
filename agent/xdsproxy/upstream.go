package xdsproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"go.uber.org/zap"
)

const (
	adsSotwMethod  = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
	adsDeltaMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
	// Receive windows of the upstream connection. They bound what a slow
	// Envoy can make the agent buffer beyond the messages it holds (the
	// slow-Envoy test fails at 16 MiB), so they stay moderate.
	upstreamWindow = 4 << 20
)

var adsStreamDesc = grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// dial opens a fresh upstream connection; the root CA is read again.
func (p *Proxy) dial() (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if !p.cfg.Plaintext {
		tc, err := p.tlsConfig()
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(tc)
	}
	bo := backoff.DefaultConfig
	bo.MaxDelay = p.cfg.MaxBackoff
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                p.cfg.KeepaliveInterval,
			Timeout:             p.cfg.KeepaliveTimeout,
			PermitWithoutStream: true,
		}),
		grpc.WithInitialWindowSize(upstreamWindow),
		grpc.WithInitialConnWindowSize(upstreamWindow),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(maxMsgSize),
			grpc.MaxCallSendMsgSize(maxMsgSize),
			grpc.ForceCodecV2(p.codec),
		),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: p.cfg.ConnectTimeout}),
	}
	if !p.cfg.Plaintext {
		opts = append(opts, grpc.WithPerRPCCredentials(&tokenCreds{p: p}))
	}
	conn, err := grpc.NewClient(p.cfg.DiscoveryAddress, opts...)
	if err != nil {
		return nil, fmt.Errorf("xdsproxy: dial %s: %w", p.cfg.DiscoveryAddress, err)
	}
	return conn, nil
}

// openUpstream connects and opens an ADS stream.
func (p *Proxy) openUpstream(ctx context.Context, method string) (upstream, error) {
	if p.cfg.Transport == TransportCutThrough {
		return p.openH2(ctx, method)
	}
	c, err := p.sharedConn(func() (io.Closer, error) { return p.dial() })
	if err != nil {
		return nil, err
	}
	conn := c.(*grpc.ClientConn)
	sctx, cancel := context.WithCancel(ctx)
	stream, err := p.openStream(sctx, conn, method)
	if err != nil {
		cancel()
		p.dropConn(conn)
		return nil, err
	}
	return &grpcUp{connUse: connUse{p: p, ctx: ctx, conn: conn, cancel: cancel}, stream: stream}, nil
}

// sharedConn returns the upstream connection, dialing one if there is
// none. Istio dials a connection per Envoy stream; the agent keeps one
// while it works, so a restarted Envoy's first push does not wait for a
// TCP and TLS handshake with istiod (and istiod does not pay for one).
// Any stream that fails through the connection or the control plane drops
// it (connUse.release), so a reconnection after a failure always starts
// afresh: new handshake, root CA read again. The token is read for every
// stream.
func (p *Proxy) sharedConn(dial func() (io.Closer, error)) (io.Closer, error) {
	p.upMu.Lock()
	defer p.upMu.Unlock()
	if p.upStopped {
		return nil, errors.New("xdsproxy: stopping")
	}
	if p.upConn == nil {
		conn, err := dial()
		if err != nil {
			return nil, err
		}
		p.upConn = conn
	}
	return p.upConn, nil
}

// dropConn closes conn and forgets it if it is still the shared one; nil
// drops whichever is shared, for good (the proxy stops).
func (p *Proxy) dropConn(conn io.Closer) {
	p.upMu.Lock()
	if conn == nil {
		conn, p.upStopped = p.upConn, true
	}
	if p.upConn == conn {
		p.upConn = nil
	}
	p.upMu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
}

// connUse is an upstream stream's use of the shared connection.
type connUse struct {
	p      *Proxy
	ctx    context.Context // the stream's parent: its cause tells why it ended
	conn   io.Closer
	cancel context.CancelFunc // ends the stream
	// failed: the stream broke while the agent still wanted it, so the
	// connection or the control plane is at fault.
	failed atomic.Bool
}

// check notes an error of the stream that the agent did not cause.
func (u *connUse) check(err error) error {
	if err != nil && u.ctx.Err() == nil {
		u.failed.Store(true)
	}
	return err
}

// release ends the stream. The connection is kept for the next stream when
// the stream ended because its Envoy went away (or the agent stops), and
// dropped when it failed or stalled.
func (u *connUse) release() {
	u.cancel()
	if u.failed.Load() || errors.Is(context.Cause(u.ctx), errStalled) {
		u.p.dropConn(u.conn)
	}
}

// streamMetadata is the upstream stream's metadata: ClusterID, then the
// XDS_HEADER_* headers (which win on a clash). Keys are lower-cased on the
// wire by either transport.
func (p *Proxy) streamMetadata() map[string]string {
	md := make(map[string]string, len(p.cfg.Headers)+1)
	if p.cfg.ClusterID != "" {
		md["ClusterID"] = p.cfg.ClusterID
	}
	for k, v := range p.cfg.Headers {
		md[k] = v
	}
	return md
}

// openStream starts an ADS stream on conn with the ClusterID and
// XDS_HEADER_* metadata. It waits at most ConnectTimeout for the
// connection to come up.
func (p *Proxy) openStream(ctx context.Context, conn *grpc.ClientConn, method string) (grpc.ClientStream, error) {
	ctx = metadata.NewOutgoingContext(ctx, metadata.New(p.streamMetadata()))

	conn.Connect()
	wctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	for {
		st := conn.GetState()
		if st == connectivity.Ready {
			break
		}
		if st == connectivity.TransientFailure {
			// A fail-fast stream attempt reports the transport's error
			// (refused, TLS, DNS) without reaching the server.
			s, err := conn.NewStream(wctx, &adsStreamDesc, method, grpc.WaitForReady(false))
			if err != nil {
				return nil, fmt.Errorf("connect to %s: %w", p.cfg.DiscoveryAddress, err)
			}
			_ = s // raced with the connection coming up; wctx's cancel ends it
		}
		if !conn.WaitForStateChange(wctx, st) {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("connect to %s: not ready within %s", p.cfg.DiscoveryAddress, p.cfg.ConnectTimeout)
		}
	}
	return conn.NewStream(ctx, &adsStreamDesc, method)
}

func (p *Proxy) tlsConfig() (*tls.Config, error) {
	var pool *x509.CertPool
	if p.cfg.RootCAPath == SystemRootCA {
		sp, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("xdsproxy: system root pool (XDS_ROOT_CA=SYSTEM): %w", err)
		}
		pool = sp
	} else {
		pem, err := os.ReadFile(p.cfg.RootCAPath)
		if err != nil {
			return nil, fmt.Errorf("xdsproxy: read control plane root CA (XDS_ROOT_CA): %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("xdsproxy: control plane root CA %s (XDS_ROOT_CA): no PEM certificate found", p.cfg.RootCAPath)
		}
	}
	return &tls.Config{RootCAs: pool, ServerName: p.cfg.ServerName, MinVersion: tls.VersionTLS12}, nil
}

// tokenCreds sends the pod's JWT, read from disk on each new stream so a
// rotated projected token is picked up.
type tokenCreds struct{ p *Proxy }

func (t *tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(t.p.cfg.TokenPath)
	if err != nil {
		if t.p.tokenWarned.CompareAndSwap(false, true) {
			t.p.log.Warn("no token for the control plane; connecting without one",
				zap.Error(err))
		}
		return nil, nil
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (t *tokenCreds) RequireTransportSecurity() bool { return true }

// backoffDelay is attempt n's wait (n from 0): exponential from min, capped
// at max, with "equal jitter" (half fixed, half random) so a fleet of agents
// that lost the same istiod does not reconnect in lockstep.
func backoffDelay(n int, min, max time.Duration, rnd func(int64) int64) time.Duration {
	d := min
	for i := 0; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	half := int64(d) / 2
	return time.Duration(half + rnd(half+1))
}

func randInt64N(n int64) int64 { return rand.Int64N(n) }

// expectedEnd tells whether an upstream error is an ordinary end of stream
// (our cancel, a closing transport, the server going away) rather than a
// failure worth a warning.
func expectedEnd(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded:
		return true
	case codes.Unavailable:
		msg := err.Error()
		return strings.Contains(msg, "transport is closing") || strings.Contains(msg, "EOF") ||
			strings.Contains(msg, "NO_ERROR") || strings.Contains(msg, "GOAWAY")
	}
	return false
}
